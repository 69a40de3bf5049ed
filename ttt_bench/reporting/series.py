"""A training run's metrics against its training step (docs/design.md, data flow).

From a written results.json whose models carry a ``step`` (the checkpoints of a run, named
``<model>@<step>``): ``series[task][model][metric]`` = ``[[step, value, low, high], ...]`` for
each headline metric (long-stream: mean_nll, late_nll, improvement, voiced_improvement, nll@P;
pair tasks: acc; recall: recall_gain), a table per task with one row per step (values with their intervals, and
the delta to the baseline), ``<task>_vs_step.png``/``.svg`` (each headline metric against the
step with its bootstrap band), and the trackers' scalars of each checkpoint at its own step.

This module reads results.json dicts only; of the package it imports only plots (to draw).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Mapping

logger = logging.getLogger(__name__)

HEADLINE = ("mean_nll", "late_nll", "improvement", "voiced_improvement", "nll@*", "acc",
            "recall_gain")
PREFIX = "ttt_bench"


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value) else None


def members(results_json: Mapping[str, Any]) -> dict[str, tuple[str, int]]:
    """Model name -> (series, step) for every checkpoint of a training run."""
    out = {}
    for name, info in (results_json.get("models") or {}).items():
        options = (info or {}).get("options") or {}
        step = info.get("step", options.get("step"))
        if step is not None:
            out[name] = (info.get("series") or options.get("series") or name.rpartition("@")[0], int(step))
    return out


def headline_metrics(rows: list[Mapping[str, Any]]) -> list[str]:
    """The headline metrics present (as numbers) in any of ``rows``, in HEADLINE's order."""
    present: list[str] = []
    for pattern in HEADLINE:
        found = sorted({k for row in rows for k, v in row.items() if _number(v) is not None
                        and (k.startswith(pattern[:-1]) if pattern.endswith("*") else k == pattern)},
                       key=lambda k: float(k.split("@")[1]) if "@" in k and k.split("@")[1].isdigit() else k)
        present += [k for k in found if k not in present]
    return present


def build_series(results_json: Mapping[str, Any]) -> dict[str, dict[str, dict[str, list[list]]]]:
    """``series[task][model][metric]`` = [[step, value, low, high], ...] by step."""
    by_member = members(results_json)
    out: dict[str, dict[str, dict[str, list[list]]]] = {}
    for task, models in (results_json.get("results") or {}).items():
        rows = {name: m for name, m in models.items() if name in by_member}
        for name, m in sorted(rows.items(), key=lambda kv: by_member[kv[0]][1]):
            series, step = by_member[name]
            for metric in headline_metrics(list(rows.values())):
                ci = (m.get("ci") or {}).get(metric) or [None, None]
                out.setdefault(task, {}).setdefault(series, {}).setdefault(metric, []).append(
                    [step, _number(m.get(metric)), _number(ci[0]), _number(ci[1])])
    return out


def _fmt(value: float | None) -> str:
    if value is None:
        return "n/a"
    text = f"{value:.4f}"
    return text[1:] if text.startswith("-") and float(text) == 0.0 else text


def _cell(value: float | None, ci: list | None, mark: str = "") -> str:
    text = _fmt(value) + mark
    if value is not None and ci and ci[0] is not None and ci[1] is not None:
        text += f" [{_fmt(ci[0])}, {_fmt(ci[1])}]"
    return text


def series_tables(results_json: Mapping[str, Any]) -> list[str]:
    """Markdown: per task and run, one row per step (headline metrics with intervals, deltas)."""
    from tabulate import tabulate

    by_member = members(results_json)
    lines: list[str] = []
    for task, by_series in (results_json.get("series") or {}).items():
        models = (results_json.get("results") or {}).get(task) or {}
        for series, metrics in by_series.items():
            names = sorted((n for n, (s, _) in by_member.items() if s == series and n in models),
                           key=lambda n: by_member[n][1])
            cols = list(metrics)
            base = next(((models[n].get("delta_vs_baseline") or {}).get("baseline") for n in names
                         if models[n].get("delta_vs_baseline")), None)
            headers = ["step"] + cols + ([f"Δ {c}" for c in cols] if base else [])
            rows = []
            for name in names:
                m = models[name]
                row = [str(by_member[name][1])] + [_cell(_number(m.get(c)), (m.get("ci") or {}).get(c)) for c in cols]
                if base and name == base:
                    row += ["-"] * len(cols)
                elif base:
                    d = m.get("delta_vs_baseline") or {}
                    for c in cols:
                        ci = (d.get("ci") or {}).get(c)
                        star = "*" if ci and None not in ci and (ci[0] > 0 or ci[1] < 0) else ""
                        row.append(_cell(_number((d.get("delta") or {}).get(c)), ci, star))
                rows.append(row)
            lines += [f"### {task}: {series} against the training step", "",
                      tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True), ""]
            if base:
                lines += [f"Δ = checkpoint − {base} on the same documents (paired bootstrap); * = the interval "
                          "excludes 0. Plot: " + f"`{task}_vs_step.png`.", ""]
            else:
                lines += [f"Plot: `{task}_vs_step.png`.", ""]
    return lines


def series_notes(results_json: Mapping[str, Any]) -> list[str]:
    """A footnote per checkpoint left out of its series (``--on_error skip``)."""
    return [f"{c['model']}: checkpoint {c['path']} skipped ({c['reason']}); see `skipped_checkpoints` in "
            "results.json.  " for c in results_json.get("skipped_checkpoints") or []]


def plot_vs_step(stem: Path, task: str, by_series: Mapping[str, Mapping[str, list[list]]]) -> list[Path]:
    """``stem.png`` and ``stem.svg``: one panel per headline metric, value against step with its band."""
    from ttt_bench.reporting import plots  # selects the Agg backend
    import matplotlib.pyplot as plt

    metrics = list(dict.fromkeys(m for s in by_series.values() for m in s))
    cols = min(3, len(metrics)) or 1
    rows = math.ceil(len(metrics) / cols) or 1
    fig, axes = plt.subplots(rows, cols, squeeze=False, figsize=(5 * cols, 3.6 * rows))
    for i, metric in enumerate(metrics):
        ax = axes[i // cols, i % cols]
        for series, data in by_series.items():
            points = [p for p in data.get(metric, []) if p[1] is not None]
            if not points:
                continue
            steps = [p[0] for p in points]
            line, = ax.plot(steps, [p[1] for p in points], marker="o", label=series)
            if all(p[2] is not None and p[3] is not None for p in points):
                ax.fill_between(steps, [p[2] for p in points], [p[3] for p in points], color=line.get_color(),
                                alpha=0.2, lw=0)
        ax.set_title(f"{task}: {metric}")
        ax.set_ylabel(metric)
        ax.set_xlabel("training step")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    for j in range(len(metrics), rows * cols):
        axes[j // cols, j % cols].set_visible(False)
    return plots.save_png_svg(fig, stem)


def add_series(out_dir: Path) -> bool:
    """Add ``series`` to ``out_dir/results.json`` and write the ``<task>_vs_step`` plots; False
    (nothing written) when the run has no checkpoint series."""
    path = Path(out_dir) / "results.json"
    results_json = json.loads(path.read_text())
    if not members(results_json):
        return False
    results_json["series"] = build_series(results_json)
    path.write_text(json.dumps(results_json, indent=2, allow_nan=False, ensure_ascii=False) + "\n")
    for task, by_series in results_json["series"].items():
        plot_vs_step(Path(out_dir) / f"{task}_vs_step", task, by_series)
    return True


def step_scalars(results_json: Mapping[str, Any]) -> dict[int, dict[str, float]]:
    """step -> {``ttt_bench/<task>/<series>/<metric>``: value}: each checkpoint's numbers under
    its run's name, so they form one curve over the training steps."""
    by_member = members(results_json)
    out: dict[int, dict[str, float]] = {}

    def numbers(tree: Mapping[str, Any], prefix: str):
        for key, value in tree.items():
            if isinstance(value, Mapping):
                yield from numbers(value, f"{prefix}{key}/")
            elif _number(value) is not None:
                yield f"{prefix}{key}", float(value)

    for task, models in (results_json.get("results") or {}).items():
        for name, metrics in models.items():
            if name in by_member:
                series, step = by_member[name]
                out.setdefault(step, {}).update(
                    {f"{PREFIX}/{task}/{series}/{k}": v for k, v in numbers(metrics, "")})
    return dict(sorted(out.items()))

