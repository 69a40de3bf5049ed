"""Runs for tests that describe one in the evaluation loop's own words, through the one entrance
(``simple_evaluate``), as the command line does."""

from __future__ import annotations

from typing import Any, Sequence

from ttt_bench.api import simple_evaluate


def evaluate_run(models: Sequence[str], tasks: Sequence[str], model_args: dict[str, Any] | None = None,
                 task_overrides: dict[str, Any] | None = None, **options: Any) -> dict[str, Any] | None:
    """``models`` on ``tasks``: ``model_args`` for every model, ``task_overrides`` for every task."""
    return simple_evaluate(list(models), dict(model_args or {}), list(tasks), task_args=task_overrides, **options)
