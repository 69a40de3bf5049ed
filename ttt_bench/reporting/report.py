"""Outputs of a run: results.json, curves.npz, samples.jsonl, leaderboard.md and the
loss-versus-position plots; and ``ttt-bench leaderboard DIR...`` (merging runs).

results.json = the run's record handed in (``ttt_bench.reporting.run_record.RunRecord``: config,
environment, git_hash, command, complete, skipped, models, tasks, baseline, ...) plus::

    "schema_version": 1,
    "metrics_config": {task: the task metrics' settings (TaskMetrics.to_dict), with
                       "leaderboard": the columns, unit and note of its table},
    "baselines": {task: the model every other model is compared to, or null},
    "results": {task: {model: metrics}},  # schema in ttt_bench.metrics; non-baseline models
                                          # carry "delta_vs_baseline"
    "higher_is_better": {task: {metric: true | false}},  # every metric with an estimate and an
                                          # interval; counts and speeds have no direction
    "warnings": {task: [{"code": "unreached", "metrics": [...], "config_keys": [...],
                         "message": str}]}  # metrics no document reached, for any model

Each task's metrics come from its task class (``ttt_bench.metrics.TaskMetrics``); the long-stream
ones (:class:`ttt_bench.metrics.StreamMetrics`) also give curves and plots.

curves.npz keys of long-stream tasks (``group`` = semantic | acoustic; the unprefixed ones are
the "all" group)::

    {task}/{model}/mean, {task}/{model}/count              mean NLL per position, documents
    {task}/{model}/{group}/mean, {task}/{model}/{group}/count
    {task}/{model}/voiced/mean, {task}/{model}/voiced/count  the same over voiced frames
                                                           (documents with voice activity)
    {task}/{model}/doc_ids                                 str [n_docs]
    {task}/{model}/doc/{i}                                 float32 [T_i], document i's curve
    frame_rate                                             frames per second (12.5)

samples.jsonl: one line per task, model and document (long-stream tasks: task, model, doc_id,
source, duration_s, n_frames, seconds, that document's metrics, and its metadata; other task
classes say what their lines hold).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from tabulate import tabulate

from ttt_bench.config import StreamTaskConfig
from ttt_bench.constants import FRAME_RATE
from ttt_bench.metrics import DocRecord, ModelShape, StreamMetrics, TaskMetrics
from ttt_bench.models.legacy import legacy_name
from ttt_bench.reporting.run_record import ModelRecord, RunRecord

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
DEFAULT_BASELINE = "frozen"
# a results.json written before metrics_config[task] said its columns: the long-stream ones
DEFAULT_LEADERBOARD = StreamMetrics(StreamTaskConfig(task="default")).leaderboard_spec()


# ----------------------------------------------------------------------------- JSON


def to_jsonable(obj: Any) -> Any:
    """Plain JSON types; NaN and Inf become null (results.json never holds a NaN literal)."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(dataclasses.asdict(obj))
    return str(obj)


def dumps(obj: Any) -> str:
    return json.dumps(to_jsonable(obj), indent=2, allow_nan=False, ensure_ascii=False)


# ----------------------------------------------------------------------------- results


def resolve_baseline(requested: str | None, models: Iterable[str], strict: bool = True
                     ) -> str | None:
    """``--baseline NAME`` if given (must be one of the models), else ``frozen`` if present. In a
    task scored with ``use_fixed_method: false`` the baseline is its legacy version, legacy(NAME).

    strict=False (writing outputs at the end of a run): a requested baseline that has no
    results in this task gives no deltas and a warning instead of losing the run's outputs.
    """
    models = list(models)
    wanted = requested if requested is not None else DEFAULT_BASELINE
    if wanted not in models and legacy_name(wanted) in models:
        return legacy_name(wanted)
    if requested is not None:
        if requested not in models and not strict:
            logger.warning("baseline %r has no results here (models: %s): no deltas",
                           requested, models)
            return None
        if requested not in models:
            raise ValueError(f"--baseline {requested!r} is not among the evaluated models "
                             f"{models}; add it to --model or choose one of these")
        return requested
    return DEFAULT_BASELINE if DEFAULT_BASELINE in models else None


def for_model(metrics: TaskMetrics, run: RunRecord, model: str) -> TaskMetrics:
    """The task's metrics for ``model``, with that model's own shape (card, delays) where the run
    recorded it: every model is summarised and flagged against its own card and delays, not against
    those of the model the task's metrics were built with."""
    shape = run.shape_of(model)
    return metrics if shape is None else metrics.for_model(shape)


def build_results(run: RunRecord, summaries: dict[str, dict[str, Any]],
                  metrics_by_task: dict[str, TaskMetrics]) -> dict[str, Any]:
    """The results.json dict (not yet sanitised). ``summaries[task][model]`` is what that
    task's metrics made of the model's records (``TaskMetrics.summarize``)."""
    results: dict[str, dict[str, Any]] = {}
    baselines: dict[str, str | None] = {}
    metrics_config: dict[str, dict[str, Any]] = {}
    directions: dict[str, dict[str, bool]] = {}
    warnings: dict[str, list[dict[str, Any]]] = {}
    for task, models in summaries.items():
        metrics = metrics_by_task[task]
        base = resolve_baseline(run.baseline, models, strict=False)
        baselines[task] = base
        metrics_config[task] = {**metrics.to_dict(), "leaderboard": metrics.leaderboard_spec()}
        results[task] = {}
        for model, summary in models.items():
            mine = for_model(metrics, run, model)
            m = mine.model_metrics(summary)
            if base is not None and model != base:
                m["delta_vs_baseline"] = {"baseline": base, **mine.deltas(summary, models[base])}
            flags = mine.model_flags(m, run.models.get(model) or ModelRecord(label=model))
            if flags:
                m.setdefault("flags", []).extend(flags)
            results[task][model] = m
        add_declared_lookahead_flags(results[task], run.models)
        add_lookahead_flags(results[task], run.causality.get(task) or [])
        directions[task] = metric_directions(metrics, results[task])
        warning = unreached_warning(task, metrics, results[task])
        if warning is not None:
            logger.warning(warning["message"])
            warnings[task] = [warning]
    out = run.to_dict()
    out.update({"schema_version": SCHEMA_VERSION, "metrics_config": metrics_config,
                "baselines": baselines, "results": results, "higher_is_better": directions,
                "warnings": warnings,
                "groups": group_results(results, baselines, run.group_subtasks, run.group_metrics)})
    return out


def _estimated(models: dict[str, dict]) -> list[str]:
    """The metrics the rows estimate (those with a count of contributing documents), in row order."""
    return list(dict.fromkeys(k for m in models.values() for k in (m.get("n") or {})))


def metric_directions(metrics: TaskMetrics, models: dict[str, dict]) -> dict[str, bool]:
    """``higher_is_better[task]``: the direction of every metric the rows estimate; counts and speeds
    (``n_docs``, ``n_frames``, ``frames_per_second``, ...) have none and are left out."""
    found = {name: metrics.direction(name) for name in _estimated(models)}
    return {name: better for name, better in found.items() if better is not None}


def unreached_warning(task: str, metrics: TaskMetrics, models: dict[str, dict]) -> dict[str, Any] | None:
    """The metrics that no document reached for any model (n = 0 everywhere, while documents were
    scored), and the config keys that decide it; None when every metric has a value somewhere."""
    if not any(m.get(metrics.count_key) for m in models.values()):
        return None  # nothing scored: the rows' flags say so
    unreached = [name for name in _estimated(models) if not any((m.get("n") or {}).get(name) for m in models.values())]
    if not unreached:
        return None
    keys = list(dict.fromkeys(k for k in map(metrics.config_key, unreached) if k))
    change = f"change {', '.join(keys)}" if keys else "change its settings"
    return {"code": "unreached", "metrics": unreached, "config_keys": keys, "message": (
        f"{task}: no document reached {', '.join(unreached)} for any model (n=0: the documents are too short "
        f"for these settings); {change} in the task config (or --task_args)")}


def add_declared_lookahead_flags(models: dict[str, dict], info: dict[str, ModelRecord]) -> None:
    """A model that looks ahead by construction (the ttt adapter with ``causal=false``): flag its
    row ``lookahead``, whatever the causality check saw."""
    for name, m in models.items():
        if name in info and info[name].lookahead:
            m.setdefault("flags", []).append({"code": "lookahead", "message": (
                "looks ahead by construction (causal=false): the loss at a frame uses the TTT update of "
                "its whole mini-batch, later frames included")})


def add_lookahead_flags(models: dict[str, dict], checks: list[dict]) -> None:
    """A model measured with ``--allow_lookahead`` although its loss depends on later frames: flag
    its row ``lookahead`` (a row flagged so elsewhere, e.g. a ``causal=false`` adapter, once)."""
    for check in checks:
        m = models.get(check["model"])
        if check.get("passed") is False and m is not None and not any(
                f["code"] == "lookahead" for f in m.setdefault("flags", [])):
            m["flags"].append({"code": "lookahead", "message": (
                f"the loss at a frame depends on later frames (changing frames from "
                f"{check['perturbed_from']} on moved earlier NLL by "
                f"{check['max_abs_change_before']:.3g} nats); measured with --allow_lookahead")})


def group_results(results: dict[str, dict[str, Any]], baselines: dict[str, str | None],
                  subtasks: dict[str, list[str]], metrics: dict[str, list[str]]) -> dict[str, dict[str, Any]]:
    """``groups[group][model]`` (lm-eval's ``groups``): the mean of each aggregated metric over the
    group's members (a member group counts once, with its own mean); None where a member has no
    value for that model. Groups come members first (``registry.expand_tasks``)."""
    groups: dict[str, dict[str, Any]] = {}

    def member_value(member: str, model: str, metric: str) -> float | None:
        source = groups if member in groups else results
        return ((source.get(member) or {}).get(model) or {}).get(metric)

    for group, members in subtasks.items():
        models = [m for member in members for m in (groups.get(member) or results.get(member) or {})]
        rows: dict[str, Any] = {}
        for model in dict.fromkeys(models):
            row: dict[str, Any] = {"n_tasks": len(members)}
            for metric in metrics.get(group, []):
                values = [member_value(member, model, metric) for member in members]
                row[metric] = None if any(v is None for v in values) else float(np.mean(values))
            row["n_missing"] = sum(member_value(m, model, metrics[group][0]) is None for m in members) \
                if metrics.get(group) else 0
            rows[model] = row
        base = next((b for b in (baselines.get(m) or _group_baseline(groups, m) for m in members) if b), None)
        for model, row in rows.items():
            if base is not None and base in rows and model != base:
                row["delta_vs_baseline"] = {"baseline": base, "delta": {
                    metric: None if row[metric] is None or rows[base][metric] is None else row[metric] - rows[base][metric]
                    for metric in metrics.get(group, [])}}
        groups[group] = rows
    return groups


def _group_baseline(groups: dict[str, dict[str, Any]], member: str) -> str | None:
    for row in (groups.get(member) or {}).values():
        if row.get("delta_vs_baseline"):
            return row["delta_vs_baseline"]["baseline"]
    return None


def _curve_arrays(summaries: dict[str, dict[str, Any]], metrics_by_task: dict[str, TaskMetrics],
                  frame_rate: float) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {"frame_rate": np.asarray(frame_rate)}
    for task, models in summaries.items():
        for model, summary in models.items():
            arrays.update(metrics_by_task[task].curve_arrays(f"{task}/{model}", summary))
    return arrays


def _sample_lines(summaries: dict[str, dict[str, Any]], metrics_by_task: dict[str, TaskMetrics]
                  ) -> Iterable[str]:
    for task, models in summaries.items():
        for model, summary in models.items():
            for rec in metrics_by_task[task].sample_lines(summary):
                yield json.dumps(to_jsonable({"task": task, "model": model, **rec}), allow_nan=False,
                                 ensure_ascii=False)


def _labels(run: RunRecord) -> dict[str, str]:
    return {name: row_label(name, info.to_dict()) for name, info in run.models.items()}


def _log_flags(results: dict[str, dict[str, Any]]) -> None:
    for task, models in results.items():
        for model, m in models.items():
            for f in m.get("flags", []):
                logger.warning("sanity flag %s/%s: %s: %s", task, model, f["code"],
                               f["message"])


def write_outputs(out_dir: Path, run: RunRecord, records: dict[str, dict[str, list[DocRecord]]],
                  metrics_by_task: dict[str, TaskMetrics]) -> str:
    """Write every output file of a run into ``out_dir``; return the leaderboard markdown.
    ``metrics_by_task[task]`` is the task's :class:`TaskMetrics` (``Task.metrics``)."""
    from ttt_bench.reporting.plots import plot_loss_vs_position  # matplotlib only when plotting

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summaries = {task: {model: for_model(metrics_by_task[task], run, model).summarize(recs)
                        for model, recs in models.items()}
                 for task, models in records.items()}
    results_json = to_jsonable(build_results(run, summaries, metrics_by_task))
    (out_dir / "results.json").write_text(dumps(results_json) + "\n")
    curve_tasks = [t for t in summaries if metrics_by_task[t].loss_curves]
    np.savez_compressed(out_dir / "curves.npz", **_curve_arrays(summaries, metrics_by_task, FRAME_RATE))
    with open(out_dir / "samples.jsonl", "w") as fh:
        for line in _sample_lines(summaries, metrics_by_task):
            fh.write(line + "\n")
    markdown = render_leaderboard(results_json)
    (out_dir / "leaderboard.md").write_text(markdown)
    if curve_tasks:
        plot_loss_vs_position(out_dir / "loss_vs_position", {t: summaries[t] for t in curve_tasks},
                              results_json["baselines"], _labels(run))
    for task, metrics in metrics_by_task.items():
        if task in summaries:  # the task's own figure, if it draws one (recall: the gain curve)
            metrics.plot(out_dir / f"{task}.png", task, summaries[task], _labels(run))
    _log_flags(results_json["results"])
    return markdown


# ----------------------------------------------------------------------------- leaderboard


def row_label(name: str, info: dict | None) -> str:
    """Display name of a model row; legacy rows say so."""
    info = info or {}
    label = info.get("label") or name
    if info.get("legacy") and not str(label).lower().startswith("legacy"):
        return f"legacy ({label})"
    return str(label)


def _fmt(name: str, v: float | None) -> str:
    if v is None:
        return "n/a"
    text = f"{v:.3e}" if name.startswith("slope") else f"{v:.4f}"
    return text[1:] if text.startswith("-") and float(text) == 0.0 else text  # no "-0.0000"


def _cell(name: str, value: float | None, ci: list | None, n: int | None = None,
          n_docs: int | None = None, mark: str = "") -> str:
    if value is None:
        return "n/a" if not n_docs else f"n/a (n={n or 0})"
    text = _fmt(name, value) + mark
    if ci is not None:
        text += f" [{_fmt(name, ci[0])}, {_fmt(name, ci[1])}]"
    if n is not None and n_docs is not None and n < n_docs:
        text += f" (n={n})"
    return text


def _metric_columns(models: dict[str, dict], patterns: Iterable[str]) -> list[str]:
    present = [k for m in models.values() for k in m if isinstance(m.get(k), (float, int))
               or (k in m.get("n", {}))]
    cols = []
    for pattern in patterns:
        if pattern.endswith("*"):
            found = {k for k in present if k.startswith(pattern[:-1])}
            cols += sorted(found, key=lambda k: int(k.split("@")[1]) if "@" in k else k)
        elif pattern in present:
            cols.append(pattern)
    return cols


def _targets_cell(m: dict) -> str:
    parts = []
    for name, t in (m.get("targets") or {}).items():
        verdict = {True: "pass", False: "FAIL", None: "n/a"}[t.get("pass")]
        parts.append(f"{name} {t['target']}: {verdict}")
    return "; ".join(parts) if parts else "-"


def _fps(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1f}"


def _task_table(task: str, models: dict[str, dict], info: dict[str, dict], baseline: str | None,
                spec: dict[str, Any], directions: dict[str, bool], warnings: list[dict]) -> list[str]:
    cols = _metric_columns(models, spec["columns"])
    deltas = _delta_columns(models, spec)
    count_key = spec["count_key"]
    has_delta = baseline is not None and baseline in models
    headers = ["model"] + cols
    if has_delta:
        headers += [f"Δ {c}" for c in deltas]
    has_targets = any(m.get("targets") for m in models.values())
    headers += (["targets"] if has_targets else []) + [spec["count_header"], "frames/s"]
    rows, notes = [], []
    for name, m in models.items():
        plain = row_label(name, info.get(name))
        label = plain + (" (baseline)" if name == baseline else "")
        for f in m.get("flags", []):
            notes.append(f"⚠{len(notes) + 1} {plain}: {f['code']}: {f['message']}")
            label += f" ⚠{len(notes)}"
        count = m.get(count_key)
        row = [label] + [_cell(c, m.get(c), m.get("ci", {}).get(c), m.get("n", {}).get(c),
                               count) for c in cols]
        if has_delta:
            row += _delta_cells(m.get("delta_vs_baseline"), name == baseline, deltas, directions)
        if has_targets:
            row.append(_targets_cell(m))
        row += [str(count), _fps(m.get("frames_per_second"))]
        rows.append(row)
    lines = [f"### {task}", "", tabulate(rows, headers=headers, tablefmt="github",
                                         disable_numparse=True), ""]
    notes += [f"Warning: {w['message']}." for w in warnings]
    lines += _footnotes(models, baseline if has_delta else None, notes,
                        {**spec, "note": _column_note(cols, spec)},
                        any(c in directions for c in deltas))
    return lines


def _delta_columns(models: dict[str, dict], spec: dict[str, Any]) -> list[str]:
    """The spec's delta columns that the rows estimate (voiced ones only where documents carry
    voice activity)."""
    estimated = set(_estimated(models))
    return [c for c in spec["delta_columns"] if c in estimated]


def _column_note(cols: list[str], spec: dict[str, Any]) -> str:
    """The spec's note, and the notes of the column patterns that the table shows."""
    notes = [spec.get("note") or ""] + [
        note for pattern, note in (spec.get("column_notes") or {}).items()
        if any(c.startswith(pattern[:-1]) if pattern.endswith("*") else c == pattern for c in cols)]
    return "; ".join(n for n in notes if n)


def delta_mark(d: dict, metric: str, directions: dict[str, bool]) -> str:
    """``*`` when the delta's interval excludes 0, followed by ``better`` or ``worse`` when the
    metric has a direction (``higher_is_better``): which side of 0 the interval lies on;
    ``underpowered`` when it includes 0 but the run could not have detected a difference of the
    metric's target size (``underpowered`` in results.json)."""
    ci = (d.get("ci") or {}).get(metric)
    if (d.get("underpowered") or {}).get(metric):
        return " underpowered"
    if not (d.get("significant") or {}).get(metric) or ci is None:
        return ""
    if metric not in directions:
        return "*"
    return "* better" if (ci[0] > 0) == directions[metric] else "* worse"


def _delta_cells(d: dict | None, is_baseline: bool, columns: list[str], directions: dict[str, bool]) -> list[str]:
    if is_baseline:
        return ["-"] * len(columns)
    if not d:
        return ["n/a"] * len(columns)
    return [_cell(c, d.get("delta", {}).get(c), d.get("ci", {}).get(c), mark=delta_mark(d, c, directions))
            for c in columns]


def _footnotes(models: dict[str, dict], baseline: str | None, notes: list[str],
               spec: dict[str, Any], directed: bool = False) -> list[str]:
    level = next((m.get("ci_level") for m in models.values() if m.get("ci_level")), 0.95)
    iters = next((m.get("bootstrap_iters") for m in models.values()
                  if m.get("bootstrap_iters") is not None), None)
    unit = spec["unit"]
    out = [f"Values: estimate [{100 * level:.0f}% bootstrap interval over {unit}, "
           f"{iters} resamples]" + (f"; {spec['note']}" if spec.get("note") else "") + "."]
    if baseline is not None:
        out.append(f"Δ = model − {baseline} on the same {unit} (paired bootstrap); "
                   "* = the interval excludes 0" + ("; better / worse = the change is an improvement / a "
                                                    "degradation of that metric (`higher_is_better` in "
                                                    "results.json)." if directed else "."))
        out += _power_notes(models, spec)
    out += notes
    return [line + "  " for line in out[:-1]] + out[-1:] + [""]


def _power_notes(models: dict[str, dict], spec: dict[str, Any]) -> list[str]:
    """The minimum detectable effect of the headline delta per model, and what "underpowered" says
    where a row has it."""
    metric, unit = spec.get("headline"), spec["unit"]
    found = [(name, m["delta_vs_baseline"]) for name, m in models.items() if m.get("delta_vs_baseline")]
    mdes = [(name, d) for name, d in found if (d.get("mde") or {}).get(metric) is not None]
    out = []
    if mdes:
        parts = ", ".join(f"{name} {_fmt(metric, d['mde'][metric])} (n={d['n'][metric]})" for name, d in mdes)
        out.append(f"MDE of Δ {metric} (the smallest difference this run detects with 80% power at a two-sided "
                   f"5% level, paired over {unit}: (z_0.975 + z_0.8) × sd of the per-{unit[:-1]} differences / "
                   f"√n): {parts}.")
    if any(any((d.get("underpowered") or {}).values()) for _, d in found):
        out.append(f"underpowered = the interval includes 0 but the MDE exceeds the target's size: no effect "
                   f"was detected, and none of that size could have been; `docs_needed` in results.json says how "
                   f"many {unit} would do.")
    return out


def _group_table(group: str, models: dict[str, dict], info: dict[str, dict], members: list[str]) -> list[str]:
    metrics = [k for k in next(iter(models.values()), {}) if k not in ("n_tasks", "n_missing", "delta_vs_baseline")]
    base = next((m["delta_vs_baseline"]["baseline"] for m in models.values() if m.get("delta_vs_baseline")), None)
    headers = ["model"] + metrics + ([f"Δ {c}" for c in metrics] if base else []) + ["tasks"]
    rows = []
    for name, m in models.items():
        row = [row_label(name, info.get(name)) + (" (baseline)" if name == base else "")]
        row += [_fmt(c, m.get(c)) for c in metrics]
        if base:
            delta = (m.get("delta_vs_baseline") or {}).get("delta") or {}
            row += ["-" if name == base else _fmt(c, delta.get(c)) for c in metrics]
        row.append(f"{m['n_tasks'] - m.get('n_missing', 0)}/{m['n_tasks']}")
        rows.append(row)
    return [f"### {group} (group)", "", tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True), "",
            f"Mean over the group's {len(members)} members ({', '.join(members)}); a member group counts once "
            "with its own mean; n/a where a member has no value.", ""]


def leaderboard_spec(results_json: dict, task: str) -> dict[str, Any]:
    """The columns the task's metrics declared (``metrics_config[task]["leaderboard"]``)."""
    spec = ((results_json.get("metrics_config") or {}).get(task) or {}).get("leaderboard")
    return {**DEFAULT_LEADERBOARD, **(spec or {})}


def render_leaderboard(results_json: dict) -> str:
    """GitHub-markdown leaderboard (one table per task) from a results.json dict."""
    info = results_json.get("models") or {}
    baselines = results_json.get("baselines") or {}
    lines: list[str] = []
    directions = results_json.get("higher_is_better") or {}
    warnings = results_json.get("warnings") or {}
    for task, models in (results_json.get("results") or {}).items():
        lines += _task_table(task, models, info, baselines.get(task), leaderboard_spec(results_json, task),
                             directions.get(task) or {}, warnings.get(task) or [])
    for group, models in (results_json.get("groups") or {}).items():
        lines += _group_table(group, models, info, (results_json.get("group_subtasks") or {}).get(group, []))
    from ttt_bench.reporting.series import series_notes, series_tables  # a training run's checkpoints

    lines += series_tables(results_json)
    extra = _input_notes(results_json) + (results_json.get("merge_notes") or []) + series_notes(results_json)
    if results_json.get("complete") is False:
        extra = ["This run is incomplete (interrupted; resume with --resume)."] + extra
    lines += extra
    return "\n".join(lines).rstrip() + "\n"


def _input_notes(results_json: dict) -> list[str]:
    """One line per task whose inputs were skipped or whose documents failed, so nothing that was
    left out of the table goes unmentioned (the details are in results.json)."""
    notes = []
    for task, skipped in (results_json.get("skipped") or {}).items():
        if skipped:
            notes.append(f"{task}: {len(skipped)} input(s) skipped (first: {skipped[0]['doc_id']}: "
                         f"{skipped[0]['reason']}); see `skipped` in results.json.  ")
    for task, by_model in (results_json.get("failed") or {}).items():
        for model, failures in by_model.items():
            if failures:
                notes.append(f"{task}/{model}: {len(failures)} document(s) failed and are not in its row "
                             f"(first: {failures[0]['doc_id']}: {failures[0]['error']}); see `failed` in "
                             "results.json.  ")
    return notes


# ----------------------------------------------------------------------------- merging


def load_results(path: Path) -> dict:
    path = Path(path)
    file = path / "results.json" if path.is_dir() else path
    if not file.is_file():
        raise ValueError(f"{path}: no results.json; pass a directory written by `ttt-bench "
                         "run` (its --output_path)")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{file}: not valid JSON ({exc}); was the run interrupted?") from exc


def _describe_difference(key: str, a: Any, b: Any) -> str:
    if key == "doc_ids" and isinstance(a, list) and isinstance(b, list):
        first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        return (f"document ids differ ({len(a)} vs {len(b)} documents; first difference at "
                f"index {first}: {a[first] if first < len(a) else None!r} vs "
                f"{b[first] if first < len(b) else None!r})")
    return f"{key} differs: {a!r} vs {b!r}"


def check_compatible(task: str, ref: dict, ref_dir: Path, other: dict, other_dir: Path) -> None:
    """Raise ValueError when two runs' data or stream layout for ``task`` differ."""
    a, b = ref.get("tasks", {}).get(task, {}), other.get("tasks", {}).get(task, {})
    for section in ("data", "layout"):
        sa, sb = a.get(section) or {}, b.get(section) or {}
        for key in sorted(set(sa) | set(sb)):
            if sa.get(key) != sb.get(key):
                raise ValueError(
                    f"cannot merge {other_dir} with {ref_dir}: task {task!r}: {section} "
                    f"{_describe_difference(key, sa.get(key), sb.get(key))}; only runs on the "
                    "same documents with the same stream layout are comparable")


def task_version(run: dict, task: str) -> Any:
    """The task's version a run was made with (None for runs from before versions existed)."""
    if task in (run.get("versions") or {}):
        return run["versions"][task]
    return ((run.get("tasks") or {}).get(task, {}).get("config") or {}).get("version")


def check_versions(runs: list[tuple[dict, Path]], allow_mismatch: bool) -> set[str]:
    """The tasks run at different versions; raise ValueError naming them and their versions
    unless ``allow_mismatch``."""
    by_task: dict[str, dict[Any, list[str]]] = {}
    for run, run_dir in runs:
        for task in run.get("results", {}):
            by_task.setdefault(task, {}).setdefault(task_version(run, task), []).append(str(run_dir))
    mixed = {task: versions for task, versions in by_task.items() if len(versions) > 1}
    if mixed and not allow_mismatch:
        details = "; ".join(f"task {task!r}: " + ", ".join(f"version {v} in {', '.join(dirs)}"
                                                           for v, dirs in versions.items())
                            for task, versions in mixed.items())
        raise ValueError(f"cannot merge runs of different task versions ({details}): they measure different "
                         "things; compare runs of one version, or pass --allow_version_mismatch to show them "
                         "together with each row marked by its version")
    return set(mixed)


def _merge_into(merged: dict, run: dict, run_dir: Path, seen: dict, mixed: set[str] = frozenset()) -> None:
    for task, models in run.get("results", {}).items():
        if task in seen:
            check_compatible(task, seen[task][0], seen[task][1], run, run_dir)
        else:
            seen[task] = (run, run_dir)
            merged["tasks"][task] = run.get("tasks", {}).get(task, {})
            merged["metrics_config"][task] = (run.get("metrics_config") or {}).get(task, {})
            merged["baselines"][task] = (run.get("baselines") or {}).get(task)
            merged["higher_is_better"][task] = (run.get("higher_is_better") or {}).get(task, {})
            merged["warnings"][task] = (run.get("warnings") or {}).get(task, [])
        target = merged["results"].setdefault(task, {})
        for model, m in models.items():
            info = (run.get("models") or {}).get(model, {})
            name = model
            if task in mixed:  # --allow_version_mismatch: every row of the task says its version
                tag = f"[{task} v{task_version(run, task)}]"
                name = f"{model} {tag}"
                info = {**info, "label": f"{info.get('label') or model} {tag}"}
            if name in target:
                if merged["models"].get(name) == info:
                    merged["merge_notes"].append(f"{task}/{model}: also in {run_dir}; "
                                                 "the first run's row is shown")
                    continue
                info = {**info, "label": f"{info.get('label') or name} [{run_dir.name}]"}
                name = f"{name} [{run_dir.name}]"
            target[name] = m
            merged["models"][name] = info
        if run.get("complete") is False:
            merged["merge_notes"].append(f"{run_dir} is an incomplete run")


def merge_runs(dirs: list[Path], allow_version_mismatch: bool = False) -> str:
    """``ttt-bench leaderboard DIR...``: one leaderboard over several runs' results.json.

    Runs are merged per task; a run whose documents (ids, source) or stream layout differ from
    the first run with that task is refused with ValueError naming both and the difference. A
    model present in several runs with the same options is shown once; with different options
    each row gets its run directory's name. Deltas are those computed within each run. Runs of
    different versions of a task are refused, naming the versions, unless
    ``allow_version_mismatch`` (then each of that task's rows is marked with its version).
    """
    if not dirs:
        raise ValueError("ttt-bench leaderboard: give at least one run directory")
    merged: dict[str, Any] = {"models": {}, "tasks": {}, "metrics_config": {}, "baselines": {}, "results": {},
                              "higher_is_better": {}, "warnings": {}, "merge_notes": []}
    seen: dict[str, tuple[dict, Path]] = {}
    runs = [(load_results(Path(d)), Path(d)) for d in dirs]
    mixed = check_versions(runs, allow_version_mismatch)
    for task in sorted(mixed):
        merged["merge_notes"].append(f"{task}: runs of different task versions, each row marked with its "
                                     "version (--allow_version_mismatch); they are not comparable")
    for run, run_dir in runs:
        _merge_into(merged, run, run_dir, seen, mixed)
    merged["merge_notes"] = [n + "  " for n in merged["merge_notes"][:-1]] + \
        merged["merge_notes"][-1:]
    return render_leaderboard(merged)


# ----------------------------------------------------------------------------- terminal

TERMINAL_WIDTH = 120
_LABEL_WIDTH = 28
_FLAGS_WIDTH = 32


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


def _terminal_rows(models: dict[str, dict], info: dict[str, dict], baseline: str | None, cols: list[str],
                   deltas: list[str], count_key: str, directions: dict[str, bool]) -> list[list[str]]:
    rows = []
    for name, m in models.items():
        label = row_label(name, info.get(name)) + (" (base)" if name == baseline else "")
        row = [_clip(label, _LABEL_WIDTH)] + [_fmt(c, m.get(c)) for c in cols]
        d = m.get("delta_vs_baseline") or {}
        for c in deltas:
            if name == baseline:
                row.append("-")
            else:
                value = (d.get("delta") or {}).get(c)
                row.append(_fmt(c, value) + delta_mark(d, c, directions) if value is not None else "n/a")
        flags = sorted({f["code"] for f in m.get("flags", [])})
        row += [str(m.get(count_key)), _clip(",".join(flags), _FLAGS_WIDTH) if flags else "-"]
        rows.append(row)
    return rows


def _terminal_task(task: str, models: dict[str, dict], info: dict[str, dict], baseline: str | None,
                   spec: dict[str, Any], width: int, directions: dict[str, bool]) -> list[str]:
    """Estimates, Δ vs the baseline with its significance mark and flags; columns dropped from the
    right (estimates first, then deltas) until the table fits ``width``."""
    cols = _metric_columns(models, spec["columns"])
    deltas = _delta_columns(models, spec) if baseline is not None and baseline in models else []
    while True:
        headers = ["model"] + cols + [f"Δ {c}" for c in deltas] + [spec["count_header"], "flags"]
        rows = _terminal_rows(models, info, baseline, cols, deltas, spec["count_key"], directions)
        table = tabulate(rows, headers=headers, tablefmt="simple", disable_numparse=True)
        if max(len(line) for line in table.splitlines()) <= width or len(cols) + len(deltas) <= 1:
            break
        if len(cols) > 1:
            cols = cols[:-1]
        else:
            deltas = deltas[:-1]
    return [f"{task}", table, ""]


def render_terminal(results_json: dict, width: int = TERMINAL_WIDTH) -> str:
    """The run's summary for a terminal (at most about ``width`` columns): estimates, Δ vs the
    baseline (* = its interval excludes 0, better / worse = in the metric's good / bad direction)
    and flags. leaderboard.md has everything."""
    info = results_json.get("models") or {}
    baselines = results_json.get("baselines") or {}
    directions = results_json.get("higher_is_better") or {}
    lines: list[str] = []
    for task, models in (results_json.get("results") or {}).items():
        lines += _terminal_task(task, models, info, baselines.get(task), leaderboard_spec(results_json, task),
                                width, directions.get(task) or {})
    for group, models in (results_json.get("groups") or {}).items():
        lines += _group_table(group, models, info, (results_json.get("group_subtasks") or {}).get(group, []))
    if any(baselines.values()):
        lines.append("Δ = model − baseline on the same documents; * = its 95% bootstrap interval excludes 0;")
        lines.append("better / worse = the change improves / degrades that metric (higher_is_better in results.json).")
    lines.append("Intervals, every column and what each flag means: leaderboard.md.")
    if results_json.get("complete") is False:
        lines.append("This run is incomplete (interrupted; resume with --resume).")
    return "\n".join(lines) + "\n"
