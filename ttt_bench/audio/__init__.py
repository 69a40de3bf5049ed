"""Audio sources, decoding and the Mimi codec with its on-disk code cache."""
