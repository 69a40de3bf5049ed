"""A task's metrics take their settings from its config, validated once, and the model's shape
from the model: one target grammar for every task class, a direction for every metric, deltas
marked better or worse, a warning for metrics no document reached, every model summarised and
flagged against its own card and delays, and the README's task template running as written."""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import numpy as np
import pytest

from test_metrics import OFFSETS, linear_doc, small_cfg
from ttt_bench.config import ConfigError, StreamTaskConfig, TaskConfig
from ttt_bench.metrics import DocRecord, ModelShape, StreamMetrics, compute_model_metrics, metric_names
from ttt_bench.reporting.report import build_results, render_leaderboard, render_terminal, to_jsonable, write_outputs
from ttt_bench.reporting.run_record import ModelRecord, RunRecord
from ttt_bench.tasks.pairs import PAIR_METRICS, PairMetrics, PairTaskConfig
from ttt_bench.tasks.recall import RECALL_METRICS, RecallMetrics, RecallTaskConfig

README = Path(__file__).resolve().parent.parent / "README.md"
TEMPLATE_MARKER = "# my_tasks/my_librilight.yaml"

CLASSES = {  # a valid config of each built-in task class, and a metric it reports
    "librilight_stream": ({"task": "s", "class": "librilight_stream", "source": {"type": "librilight_dir",
                                                                              "path": "nowhere"}}, "late_nll"),
    "pair_likelihood": ({"task": "p", "class": "pair_likelihood", "source": {"path": "nowhere"}}, "acc"),
    "librilight_recall": ({"task": "r", "class": "librilight_recall", "source": {"type": "librilight_dir",
                                                                              "path": "nowhere"}}, "recall_gain"),
}


# ----------------------------------------------------------------------------- one target grammar


@pytest.mark.parametrize("task_class", list(CLASSES))
def test_an_invalid_target_is_refused_once_with_one_message_for_every_class(task_class):
    data, metric = CLASSES[task_class]
    TaskConfig.from_dict({**data, "targets": {metric: ">= 0.5"}})  # valid for each class
    with pytest.raises(ConfigError) as bad:
        TaskConfig.from_dict({**data, "targets": {metric: "about 2"}})
    message = str(bad.value)
    assert message == (f"<dict>: key 'targets.{metric}': target 'about 2': expected '<', '<=', '>' or '>=' "
                       "and a number, e.g. '< 2.25'")
    with pytest.raises(ConfigError, match=rf"key 'targets.no_such': unknown metric 'no_such' for a task of "
                                          rf"class '{task_class}'; known: .*{metric}"):
        TaskConfig.from_dict({**data, "targets": {"no_such": "< 1"}})
    for condition in ("< nan", "<", "1 <", "< 1e", "<< 2", 2.0):
        with pytest.raises(ConfigError, match="expected '<'"):
            TaskConfig.from_dict({**data, "targets": {metric: condition}})


def test_the_stream_metrics_read_their_settings_from_the_task_config():
    config = small_cfg(window=20)
    doc = linear_doc("d", 600)
    doc.meta["voice_activity"] = [[0.0, 10.0]]
    m = compute_model_metrics([doc], config)
    assert set(m["n"]) == set(config.metric_names())  # the names the config validated targets against
    # documents without voice activity: the voiced-frame metrics are not reported
    plain = compute_model_metrics([linear_doc("d", 600)], config)
    assert set(plain["n"]) == set(metric_names(config, voiced=False)) < set(config.metric_names())
    d = StreamMetrics(config, ModelShape(card=256)).to_dict()
    assert d["window"] == 20 and d["positions"] == [200, 400] and d["card"] == 256
    with pytest.raises(ConfigError, match="'segments' must be .*end - start >= 2"):
        small_cfg(segments=[[10, 11]])  # a slope needs two frames: refused when read, not at scoring


# ----------------------------------------------------------------------------- directions


def test_every_task_metrics_class_declares_a_direction_for_each_metric_it_reports():
    stream = StreamMetrics(small_cfg())
    row = stream.model_metrics(stream.summarize([linear_doc("d", 600)]))
    assert row["n"] and all(stream.direction(name) is not None for name in row["n"]), row["n"]
    assert stream.direction("improvement") is True and stream.direction("late_nll") is False
    assert stream.direction("nll@400") is False and stream.direction("slope_100_200") is False
    for count in ("n_docs", "n_frames", "frames_per_second"):
        assert stream.direction(count) is None
    pairs = PairMetrics(PairTaskConfig.from_dict({"task": "p", "source": {"path": "x"}}))
    assert {name: pairs.direction(name) for name in PAIR_METRICS} == {"acc": True, "acc_norm": True}
    recall = RecallMetrics(RecallTaskConfig.from_dict({"task": "r"}), ModelShape(), gap_frames=10, reach=None)
    assert {name: recall.direction(name) for name in RECALL_METRICS} == {
        "recall_gain": True, "recall_gain_semantic": True, "recall_gain_acoustic": True,
        "nll_seen": False, "nll_unseen": False, "recall_gain_voiced": True}
    # documents with voice activity: every voiced metric has a direction but voiced_fraction, which
    # describes the recordings (the same for every model), not a model
    voiced = linear_doc("v", 600)
    voiced.meta["voice_activity"] = [[1.0, 30.0]]
    row = stream.model_metrics(stream.summarize([voiced]))
    assert [name for name in row["n"] if stream.direction(name) is None] == ["voiced_fraction"]
    assert stream.direction("voiced_improvement") is True and stream.direction("voiced_nll@200") is False
    assert stream.direction("silence_mean_nll") is False


def _delta_results(deltas: dict[str, tuple[float, list[float]]]) -> dict:
    """A results.json dict with one task, a baseline and one model whose deltas are given."""
    metrics = {name: value for name, (value, _) in deltas.items()}
    row = {**metrics, "ci": {}, "n": {name: 3 for name in deltas}, "n_docs": 3, "flags": [],
           "delta_vs_baseline": {"baseline": "frozen", "delta": metrics,
                                 "ci": {name: ci for name, (_, ci) in deltas.items()},
                                 "significant": {name: not ci[0] <= 0 <= ci[1] for name, (_, ci) in deltas.items()}}}
    return {"results": {"t": {"frozen": {**metrics, "ci": {}, "n": row["n"], "n_docs": 3, "flags": []},
                              "ttt": row}},
            "baselines": {"t": "frozen"}, "models": {},
            "metrics_config": {"t": {"leaderboard": {"columns": ["mean_nll"], "delta_columns": list(deltas)}}},
            "higher_is_better": {"t": {"mean_nll": False, "improvement": True, "late_nll": False}}}


def test_a_delta_whose_interval_excludes_0_is_marked_better_or_worse():
    results = _delta_results({"mean_nll": (-0.05, [-0.08, -0.02]),     # lower NLL: better
                              "improvement": (-0.03, [-0.05, -0.01]),  # less improvement: worse
                              "late_nll": (-0.01, [-0.03, 0.02])})     # interval includes 0: no mark
    board = render_leaderboard(results)
    [row] = [line for line in board.splitlines() if line.startswith("| ttt")]
    assert "-0.0500* better [-0.0800, -0.0200]" in row
    assert "-0.0300* worse [-0.0500, -0.0100]" in row
    assert "-0.0100 [-0.0300, 0.0200]" in row and row.count("better") == 1 and row.count("worse") == 1
    assert "better / worse = the change is an improvement / a degradation" in board
    terminal = render_terminal(results)
    [line] = [line for line in terminal.splitlines() if line.startswith("ttt")]
    assert "-0.0500* better" in line and "-0.0300* worse" in line and re.search(r"-0\.0100\s", line)
    assert "better / worse" in terminal and max(len(x) for x in terminal.splitlines()) <= 120
    results["higher_is_better"] = {}  # a run written before directions: the significance mark alone
    assert "-0.0500* [-0.0800, -0.0200]" in render_leaderboard(results)


def test_results_json_records_the_directions_of_every_estimated_metric(tmp_path):
    records = {"frozen": [linear_doc(f"d{i}", 600, noise=0.1, rng=np.random.default_rng(i)) for i in range(3)]}
    out = to_jsonable(build_results(RunRecord(config={}), {"t": {"frozen": StreamMetrics(small_cfg()).summarize(
        records["frozen"])}}, {"t": StreamMetrics(small_cfg())}))
    directions = out["higher_is_better"]["t"]
    assert set(directions) == set(out["results"]["t"]["frozen"]["n"])  # counts and speeds left out
    assert directions["improvement"] is True and directions["mean_nll"] is False


# ----------------------------------------------------------------------------- metrics nobody reached


def test_metrics_no_document_reached_give_one_warning_naming_the_keys(caplog):
    config = small_cfg(positions=[200, 5000], early_late_frames=400, segments=[[100, 200], [300, 9000]])
    metrics = StreamMetrics(config)
    records = {m: [linear_doc(f"d{i}", 600) for i in range(2)] for m in ("frozen", "ttt")}
    with caplog.at_level(logging.WARNING, logger="ttt_bench.reporting.report"):
        out = to_jsonable(build_results(RunRecord(config={}), {"t": {m: metrics.summarize(r) for m, r in records.items()}},
                                        {"t": metrics}))
    [warning] = out["warnings"]["t"]
    assert warning["metrics"] == ["nll@5000", "early_nll", "late_nll", "improvement", "slope_300_9000"]
    assert warning["config_keys"] == ["positions (or window)", "early_late_frames", "segments"]
    logged = [r.getMessage() for r in caplog.records if "no document reached" in r.getMessage()]
    assert logged == [warning["message"]]
    assert "early_late_frames" in logged[0] and "nll@5000" in logged[0]
    assert warning["message"] in render_leaderboard(out)
    # reached by one model only (the other's documents are shorter): no warning
    records["ttt"] = [linear_doc("long", 9100)]
    out = build_results(RunRecord(config={}), {"t": {m: metrics.summarize(r) for m, r in records.items()}},
                        {"t": metrics})
    assert out["warnings"] == {}


# ----------------------------------------------------------------------------- each model's own shape


def test_each_model_is_summarised_and_flagged_against_its_own_card_and_delays(tmp_path):
    """Two models of one run with different shapes: "small" predicts over 16 classes, with its
    acoustic codebooks 2 frames late (so its last 2 acoustic frames have no prediction, as the
    runner masks them). Both score the same values, near ln(16). The task's metrics are built from
    the first model; every row must be computed with its own model's shape."""
    rng = np.random.default_rng(0)
    base = [linear_doc(f"d{i}", 300, offset=math.log(16), slope=0.0, noise=0.3, rng=rng) for i in range(3)]
    for d in base:
        d.nll[:] -= OFFSETS[:, None]
    small = []
    for d in base:
        nll = d.nll.copy()
        nll[1:, -2:] = np.nan
        small.append(DocRecord(d.doc_id, d.meta, nll))
    big_shape, small_shape = ModelShape(card=2048), ModelShape(card=16, delays=[0, 2, 2, 2, 2, 2, 2, 2])
    run = RunRecord(config={}, models={"big": ModelRecord(label="big", shape=big_shape),
                                       "small": ModelRecord(label="small", shape=small_shape)})
    metrics = StreamMetrics(small_cfg(), big_shape)  # as the runner builds it: from the first model
    write_outputs(tmp_path, run, {"t": {"big": base, "small": small}}, {"t": metrics})
    rows = json.loads((tmp_path / "results.json").read_text())["results"]["t"]
    assert [f["code"] for f in rows["big"]["flags"]] == []               # ln(16) is far below ln(2048)
    assert [f["code"] for f in rows["small"]["flags"]] == ["near_uniform"]  # its own uniform guess
    assert "ln(16)" in rows["small"]["flags"][0]["message"]
    assert rows["small"]["n_nonfinite"] == 0 and rows["small"]["n_no_prediction"] == 3 * 14
    assert rows["big"]["n_no_prediction"] == 3 * 7
    # the same model alone, with its own shape from the start: the same row
    alone = StreamMetrics(small_cfg(), small_shape)
    expected = to_jsonable(alone.model_metrics(alone.summarize(small)))
    assert {k: v for k, v in rows["small"].items() if k != "delta_vs_baseline"} == expected


# ----------------------------------------------------------------------------- the README's template


def readme_template() -> str:
    """The YAML block of README's "Adding a task" that starts with the template's marker."""
    blocks = re.findall(r"```yaml\n(.*?)```", README.read_text(), flags=re.S)
    [block] = [b for b in blocks if b.startswith(TEMPLATE_MARKER)]
    return block


def test_the_readme_task_template_runs_as_written_on_the_bundled_sample(tmp_path, monkeypatch, capsys):
    from ttt_bench import registry
    from ttt_bench.cli import main

    monkeypatch.setattr(registry, "_TASK_CONFIG_DIRS", list(registry._TASK_CONFIG_DIRS))
    tasks = tmp_path / "my_tasks"
    tasks.mkdir()
    path = tasks / "my_librilight.yaml"
    path.write_text(readme_template())
    assert main(["validate", str(path)]) == 0
    out = tmp_path / "run"
    assert main(["--model", "frozen", "--model_args", "preset=tiny", "--tasks", "my_librilight",
                 "--include_path", str(tasks), "--limit", "1", "--output_path", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    row = results["results"]["my_librilight"]["frozen"]
    assert row["n_docs"] == 1 and row["n"] and all(n == 1 for n in row["n"].values()), row["n"]
    assert results["warnings"] == {}
    assert "n/a" not in (out / "leaderboard.md").read_text().split("### my_librilight")[1].split("\n\n")[1]
    lm_shape = results["models"]["frozen"]["shape"]
    assert lm_shape["delays"] == [0, 1, 1, 1, 1, 1, 1, 1] and results["metrics_config"]["my_librilight"]["card"] == \
        lm_shape["card"]
