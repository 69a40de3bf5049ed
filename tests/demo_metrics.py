"""The numbers of the README's demo run, as results.json holds them, without wall-clock timings:
what a refactoring must leave exactly as it was (tests/fixtures/demo_metrics.json)."""

from __future__ import annotations

from typing import Any

DEMO_MODELS = "frozen,ttt,legacy,dyneval"
DEMO_TASKS = "librilight_sample,zeroshot_sample"
TIMING_KEYS = {"seconds", "frames_per_second"}  # depend on the machine, not on the measurement


def numbers(results: dict[str, Any]) -> dict[str, Any]:
    """``results`` and ``groups`` of a results.json dict, timings left out."""
    return {"results": _without_timings(results["results"]), "groups": _without_timings(results.get("groups", {}))}


def _without_timings(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if k not in TIMING_KEYS}
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value
