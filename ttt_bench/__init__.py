"""ttt-bench: long-context streaming evaluation of Moshi (frozen and TTT) on LibriLight."""

from ttt_bench.version import __version__


def __getattr__(name: str):
    if name == "simple_evaluate":  # imported on first use: ``import ttt_bench`` stays light
        from ttt_bench.api import simple_evaluate

        return simple_evaluate
    raise AttributeError(f"module 'ttt_bench' has no attribute {name!r}")


__all__ = ["simple_evaluate", "__version__"]
