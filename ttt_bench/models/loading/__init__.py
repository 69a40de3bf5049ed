"""Loading Moshi, Mimi and checkpoints (moshi's loaders, the Hub, LoRA, the TTT fork's)."""
