"""The README's demo prints the numbers it printed before the harness was restructured
(tests/fixtures/demo_metrics.json, written from the demo's results.json at afb3930 with the
test suite's environment, NO_TORCH_COMPILE=1): every metric,
interval, delta, flag and count of both tasks and all four adapters, timings aside."""

import json
import math
from pathlib import Path

from demo_metrics import DEMO_MODELS, DEMO_TASKS, numbers

from ttt_bench.cli import main

FIXTURE = Path(__file__).parent / "fixtures" / "demo_metrics.json"


def assert_same(actual, expected, path="") -> None:
    """Equal structure and values; floats to 1e-6 relative. On one machine the same computation
    gives the same bits (two runs here: 0 differences); the margin absorbs another CPU's kernels
    (moshi's compiled helpers alone move the legacy rows by 1e-8), far below the 4 decimals a
    table prints and far below any change in what is computed."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and set(actual) == set(expected), \
            f"{path}: keys {sorted(set(actual) ^ set(expected)) if isinstance(actual, dict) else type(actual)}"
        for key in expected:
            assert_same(actual[key], expected[key], f"{path}/{key}")
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected), f"{path}: {actual!r} != {expected!r}"
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_same(a, e, f"{path}[{i}]")
    elif isinstance(expected, float) and not isinstance(actual, bool) and isinstance(actual, (int, float)):
        assert math.isclose(actual, expected, rel_tol=1e-6, abs_tol=1e-12), f"{path}: {actual!r} != {expected!r}"
    else:
        assert actual == expected, f"{path}: {actual!r} != {expected!r}"


def test_demo_numbers_unchanged(tmp_path):
    out = tmp_path / "demo"
    assert main(["--model", DEMO_MODELS, "--model_args", "preset=tiny", "--tasks", DEMO_TASKS,
                 "--output_path", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert_same(numbers(results), json.loads(FIXTURE.read_text()))
