"""Task classes: long streams, pair likelihood, recall (the registry imports each when it is named)."""
