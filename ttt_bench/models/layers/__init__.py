"""TTT layers inserted into Moshi's transformer (TTT-Linear/MLP, the TTT fork's layer)."""
