"""The harness version, recorded in every results.json (``ttt_bench_version``)."""

__version__ = "0.1.0"
