"""Outputs of a run, the leaderboard snapshot, merging runs, plots."""

from __future__ import annotations

import copy
import json
import math
import os
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from test_metrics import linear_doc, small_cfg
from ttt_bench.metrics import DocRecord, StreamMetrics, summarize_all
from ttt_bench.reporting.run_record import ModelRecord, RunRecord
from ttt_bench.reporting.report import (build_results, merge_runs, render_leaderboard, resolve_baseline,
                              to_jsonable, write_outputs)

DATA = Path(__file__).parent / "data"
TASK = "librilight_sample"


def synthetic_records(seed: int = 0) -> dict[str, list[DocRecord]]:
    """frozen: noisy decreasing curves; ttt: the same documents, learning faster;
    legacy: the ln(10) signature of the old evaluation."""
    rng = np.random.default_rng(seed)
    frozen = [linear_doc(f"spk{i}/book/file{i}", int(n), rng.normal(3.0, 0.3), -4e-4, 0.3, rng)
              for i, n in enumerate([640, 520, 450, 300])]
    ttt, legacy = [], []
    for d in frozen:
        t = np.arange(d.nll.shape[1])
        ttt.append(DocRecord(d.doc_id, d.meta, d.nll - 2e-4 * t + rng.normal(0, .05, d.nll.shape),
                             seconds=0.25))
        flat = np.full_like(d.nll, math.log(10))
        flat[1:, -1] = np.nan
        legacy.append(DocRecord(d.doc_id, d.meta, flat, seconds=1.0))
    return {"frozen": frozen, "ttt": ttt, "legacy": legacy}


def make_run(records: dict[str, list[DocRecord]], **over) -> RunRecord:
    run = dict(config={"model": ",".join(records), "tasks": TASK}, environment={"numpy": "x"},
               git_hash="0" * 40, command="ttt-bench --model ...", complete=True,
               skipped={TASK: []},
               models={"frozen": ModelRecord(label="frozen"),
                       "ttt": ModelRecord(label="ttt", options={"layers": [1]}),
                       "legacy": ModelRecord(label="ttt", legacy=True)},
               tasks={TASK: {"layout": {"text_stream": "pad", "user_stream": "zero"},
                             "data": {"source": "synthetic",
                                      "doc_ids": [d.doc_id for d in next(iter(records.values()))]}}},
               baseline=None)
    run.update(over)
    return RunRecord(**run)


def cfg():
    return StreamMetrics(small_cfg(bootstrap_iters=100, targets={"late_nll": "< 2.9", "slope": "< -1e-4"}))


def results_json(records: dict[str, list[DocRecord]], run: dict) -> dict:
    summaries = {TASK: {m: summarize_all(r) for m, r in records.items()}}
    return to_jsonable(build_results(run, summaries, {TASK: cfg()}))


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    records = synthetic_records()
    markdown = write_outputs(out, make_run(records), {TASK: records}, {TASK: cfg()})
    return out, markdown, records


def _no_nan(token: str):
    raise AssertionError(f"results.json holds {token}")


def test_results_json_schema(written):
    out, _, _ = written
    res = json.loads((out / "results.json").read_text(), parse_constant=_no_nan)
    assert res["schema_version"] == 1 and res["baselines"] == {TASK: "frozen"}
    frozen = res["results"][TASK]["frozen"]
    assert isinstance(frozen["mean_nll"], float) and frozen["n_docs"] == 4
    assert frozen["n_frames"] == 640 + 520 + 450 + 300
    assert frozen["frames_per_second"] == pytest.approx(1910 / 2.0)
    assert len(frozen["ci"]["mean_nll"]) == 2 and frozen["stderr"]["mean_nll"] > 0
    assert "delta_vs_baseline" not in frozen
    delta = res["results"][TASK]["ttt"]["delta_vs_baseline"]
    assert delta["baseline"] == "frozen" and delta["n_docs"] == 4
    assert delta["delta"]["slope"] == pytest.approx(-2e-4, rel=0.05)
    assert delta["significant"]["slope"] is True
    codes = [f["code"] for f in res["results"][TASK]["legacy"]["flags"]]
    assert codes == ["degenerate", "flat_curve"]
    assert res["metrics_config"][TASK]["positions"] == [200, 400]
    assert res["git_hash"] == "0" * 40 and res["complete"] is True


def test_curves_and_samples(written):
    out, _, records = written
    z = np.load(out / "curves.npz")
    count = z[f"{TASK}/frozen/count"]
    assert count.shape == (640,) and count[0] == 4 and count[400] == 3 and count[639] == 0
    assert z[f"{TASK}/ttt/semantic/count"][639] == 1
    assert np.isfinite(z[f"{TASK}/ttt/acoustic/mean"][:600]).all()
    assert list(z[f"{TASK}/ttt/doc_ids"]) == [d.doc_id for d in records["ttt"]]
    assert z[f"{TASK}/frozen/doc/3"].shape == (300,)
    lines = (out / "samples.jsonl").read_text().splitlines()
    assert len(lines) == 3 * 4
    rows = [json.loads(line, parse_constant=_no_nan) for line in lines]
    first = rows[0]
    assert first["doc_id"] == "spk0/book/file0" and first["source"] == "synthetic"
    assert first["n_frames"] == 640 and first["model"] == "frozen"
    assert first["metrics"]["nll@400"] is not None
    assert rows[3]["metrics"]["nll@400"] is None  # 300 frames: does not reach 400


def test_leaderboard_written_and_marked(written):
    out, markdown, _ = written
    assert (out / "leaderboard.md").read_text() == markdown
    assert markdown.endswith("loss\n")  # one final newline, no trailing blank lines
    assert "| legacy (ttt) ⚠1 ⚠2" in markdown
    assert "⚠1 legacy (ttt): degenerate: NLL clustered at ln(10)" in markdown
    assert "frozen (baseline)" in markdown and "Δ slope" in markdown
    assert "late_nll < 2.9" in markdown and "FAIL" in markdown


def test_plots_are_images(written):
    out, _, _ = written
    png, svg = out / "loss_vs_position.png", out / "loss_vs_position.svg"
    assert png.stat().st_size > 10_000 and svg.stat().st_size > 10_000
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 500 and im.size[1] > 500
        assert np.unique(np.asarray(im.convert("L"))).size > 10  # something was drawn
    assert ET.parse(svg).getroot().tag.endswith("svg")


def test_leaderboard_snapshot():
    records = synthetic_records()
    markdown = render_leaderboard(results_json(records, make_run(records)))
    snap = DATA / "leaderboard_snapshot.md"
    if os.environ.get("UPDATE_SNAPSHOTS") == "1":
        snap.parent.mkdir(exist_ok=True)
        snap.write_text(markdown)
    assert markdown == snap.read_text()


def test_baseline_choice():
    assert resolve_baseline(None, ["ttt", "frozen"]) == "frozen"
    assert resolve_baseline(None, ["ttt", "dyneval"]) is None
    assert resolve_baseline("dyneval", ["ttt", "dyneval"]) == "dyneval"
    with pytest.raises(ValueError, match="--baseline 'nope'"):
        resolve_baseline("nope", ["ttt"])
    assert resolve_baseline("nope", ["ttt"], strict=False) is None  # never lose a run's outputs
    records = synthetic_records()
    del records["frozen"]
    res = results_json(records, make_run(records, baseline="ttt"))
    assert "delta_vs_baseline" in res["results"][TASK]["legacy"]
    assert "Δ = model − ttt" in render_leaderboard(res)


def _write_run(directory: Path, res: dict) -> Path:
    directory.mkdir()
    (directory / "results.json").write_text(json.dumps(res))
    return directory


def test_merge_compatible_runs(tmp_path):
    records = synthetic_records()
    a = results_json({"frozen": records["frozen"], "ttt": records["ttt"]}, make_run(records))
    later = {"frozen": records["frozen"], "ttt": records["legacy"]}
    b_run = make_run(records)
    b_run.models["ttt"] = ModelRecord(label="ttt", options={"layers": [2]})
    b = results_json(later, b_run)
    merged = merge_runs([_write_run(tmp_path / "jan", a), _write_run(tmp_path / "feb", b)])
    rows = [line for line in merged.splitlines() if line.startswith("| ")]
    names = [r.split("|")[1].strip() for r in rows[1:]]
    assert names == ["frozen (baseline)", "ttt", "ttt [feb] ⚠1 ⚠2"]
    assert "frozen: also in" in merged


def test_merge_refuses_different_data_or_layout(tmp_path):
    records = synthetic_records()
    a = results_json(records, make_run(records))
    other_docs = copy.deepcopy(a)
    other_docs["tasks"][TASK]["data"]["doc_ids"][2] = "spk9/book/other"
    with pytest.raises(ValueError, match="document ids differ.*index 2"):
        merge_runs([_write_run(tmp_path / "a", a), _write_run(tmp_path / "b", other_docs)])
    other_layout = copy.deepcopy(a)
    other_layout["tasks"][TASK]["layout"]["text_stream"] = "zero"
    with pytest.raises(ValueError, match="layout text_stream differs"):
        merge_runs([tmp_path / "a", _write_run(tmp_path / "c", other_layout)])
    with pytest.raises(ValueError, match="no results.json"):
        merge_runs([tmp_path / "missing"])


def test_skipped_inputs_and_failed_documents_are_mentioned_under_the_table():
    from ttt_bench.reporting.report import render_leaderboard

    results = {"results": {}, "models": {},
               "skipped": {"t": [{"doc_id": "a/b/c", "reason": "empty file (0 bytes)"}]},
               "failed": {"t": {"frozen": [], "legacy": [{"doc_id": "d1", "error": "ValueError: boom"},
                                                         {"doc_id": "d2", "error": "ValueError: boom"}]}}}
    text = render_leaderboard(results)
    assert "t: 1 input(s) skipped (first: a/b/c: empty file (0 bytes))" in text
    assert "t/legacy: 2 document(s) failed" in text and "ValueError: boom" in text
    assert "t/frozen" not in text


def test_merging_runs_of_different_task_versions_is_refused_naming_them(tmp_path, capsys):
    from ttt_bench.cli import main

    records = synthetic_records()
    v1 = results_json(records, make_run(records, versions={TASK: 1}))
    v2 = results_json(records, make_run(records, versions={TASK: 2}))
    dirs = [_write_run(tmp_path / "old", v1), _write_run(tmp_path / "new", v2)]
    with pytest.raises(ValueError, match=rf"task '{TASK}': version 1 in .*old, version 2 in .*new"):
        merge_runs(dirs)
    assert main(["leaderboard", *map(str, dirs)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "version 1" in err and "version 2" in err and "--allow_version_mismatch" in err

    merged = merge_runs(dirs, allow_version_mismatch=True)
    names = [r.split("|")[1].strip() for r in merged.splitlines() if r.startswith("| ")][1:]
    assert f"frozen [{TASK} v1]" in names and f"frozen [{TASK} v2]" in names
    assert all(f"[{TASK} v" in name for name in names)  # every row of the task says its version
    assert "runs of different task versions" in merged
    same = merge_runs([dirs[0], _write_run(tmp_path / "again", v1)])  # one version: merged as before
    assert f"{TASK} v1" not in same


def test_every_shipped_task_config_has_a_version():
    import yaml

    from ttt_bench.config import ConfigError, TaskConfig
    from ttt_bench.registry import task_config_files

    for name, path in task_config_files().items():
        data = yaml.safe_load(path.read_text())
        if "group" in data:  # a group (salmon, ...) reports its members, each with its own version
            continue
        version = data.get("version")
        assert isinstance(version, (int, float)) and not isinstance(version, bool), f"{path}: version {version!r}"
    with pytest.raises(ConfigError, match="'version' must be a number"):
        TaskConfig.from_dict({"task": "t", "version": "one"})


def test_results_json_begins_with_the_typed_run_record_in_its_fields_order(written):
    from dataclasses import fields

    out, _, _ = written
    keys = list(json.loads((out / "results.json").read_text()))
    recorded = [f.name for f in fields(RunRecord) if f.name != "resume_command"]  # a finished run has none
    assert keys[:len(recorded)] == recorded
    assert keys[len(recorded):] == ["schema_version", "metrics_config", "baselines", "results", "higher_is_better",
                                    "warnings", "groups"]
    assert json.loads((out / "results.json").read_text())["models"]["ttt"] == {
        "label": "ttt", "legacy": False, "lookahead": False, "attention_only": False, "options": {"layers": [1]},
        "shape": None}
