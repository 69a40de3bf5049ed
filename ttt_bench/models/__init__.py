"""Model adapters: frozen, ttt, legacy, dyneval (the registry imports each when it is named)."""
