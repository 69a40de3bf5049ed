"""ttt-bench: long-context streaming evaluation of Moshi (frozen and TTT) on LibriLight."""

__version__ = "0.1.0"
