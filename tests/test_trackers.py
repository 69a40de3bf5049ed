"""Results sent to Weights & Biases (offline, read back from the run's own files) and TensorBoard
(read back with tensorboard's own event reader), at the caller's training step; a missing
extra is one line saying how to install it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from ttt_bench import simple_evaluate
from ttt_bench.cli import main
from ttt_bench.reporting.trackers import MissingExtraError
from wandb_files import artifacts, history

TASK = "librilight_sample"
RUN = dict(model="frozen,dyneval", model_args="preset=tiny,dyneval.lr=1e-3", tasks=[TASK],
           task_args={"max_frames": 80, "verify_loss_computation": False, "verify_causality": False},
           limit=1, chunk_size=16)
PREFIX = f"ttt_bench/{TASK}"


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    for var in ("WANDB_DIR", "WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    import wandb

    return wandb


def test_wandb_logs_into_the_callers_run_at_its_step(tmp_path, wandb_offline):
    run = wandb_offline.init(project="ttt-bench-test", dir=str(tmp_path), mode="offline")
    run.log({"train/loss": 3.5}, step=10)
    results = simple_evaluate(**RUN, wandb_run=run, step=20)
    run.log({"train/loss": 3.0}, step=30)  # the caller's run goes on
    run_dir = Path(run.dir).parent
    run.finish()
    wandb_offline.teardown()  # the wandb service writes the run's log to disk by the time it stops

    rows = history(run_dir)
    assert [r["_step"] for r in rows] == [10, 20, 30]
    logged = rows[1]
    for model in ("frozen", "dyneval"):
        metrics = results["results"][TASK][model]
        assert logged[f"{PREFIX}/{model}/mean_nll"] == pytest.approx(metrics["mean_nll"], rel=1e-12)
        assert logged[f"{PREFIX}/{model}/n_frames"] == metrics["n_frames"] == 80
    assert logged[f"{PREFIX}/dyneval/delta_vs_baseline/delta/mean_nll"] == pytest.approx(
        results["results"][TASK]["dyneval"]["delta_vs_baseline"]["delta"]["mean_nll"])

    table = json.loads((run_dir / "files" / logged["ttt_bench/leaderboard/path"]).read_text())
    by_model = {row[1]: dict(zip(table["columns"], row)) for row in table["data"]}
    assert set(by_model) == {"frozen", "dyneval"}
    assert by_model["dyneval"]["mean_nll"] == pytest.approx(results["results"][TASK]["dyneval"]["mean_nll"])

    curve = json.loads((run_dir / "files" / logged[f"{PREFIX}/loss_vs_position_table/path"]).read_text())
    points = [dict(zip(curve["columns"], row)) for row in curve["data"]]
    assert {p["lineKey"] for p in points} == {"frozen", "dyneval"}  # one line series per model
    positions = sorted(p["step"] for p in points if p["lineKey"] == "frozen")
    assert positions == list(range(79))  # x = position (the last frame: no prediction, codebook delays)
    assert logged["ttt_bench/loss_vs_position/_type"] == "image-file"
    assert (run_dir / "files" / logged["ttt_bench/loss_vs_position/path"]).stat().st_size > 0

    [artifact] = [a for a in artifacts(run_dir) if a.type == "evaluation"]
    [entry] = artifact.manifest.contents
    assert entry.path == "results.json"
    assert json.loads(Path(entry.local_path).read_text())["results"] == results["results"]


def test_wandb_args_start_and_finish_a_run(tmp_path, wandb_offline):
    assert main(["--model", "frozen", "--model_args", "preset=tiny", "--tasks", TASK, "--task_args",
                 "max_frames=80,verify_loss_computation=false,verify_causality=false", "--limit", "1",
                 "--chunk_size", "16",
                 "--output_path", str(tmp_path / "run"),
                 "--wandb_args", f"project=ttt-bench-test,name=cli-run,dir={tmp_path}"]) == 0
    wandb_offline.teardown()
    [run_dir] = (tmp_path / "wandb").glob("offline-run-*")
    [row] = history(run_dir)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert row[f"{PREFIX}/frozen/mean_nll"] == pytest.approx(results["results"][TASK]["frozen"]["mean_nll"])
    assert wandb_offline.run is None  # the run it started is finished


def test_tensorboard_holds_the_scalars_at_the_callers_step(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path / "tb"))
    writer.add_scalar("train/loss", 3.5, 7)
    results = simple_evaluate(**RUN, tensorboard_writer=writer, step=7)
    writer.close()

    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0, "images": 0}).Reload()
    for model in ("frozen", "dyneval"):
        [point] = events.Scalars(f"{PREFIX}/{model}/mean_nll")
        assert point.step == 7
        assert point.value == pytest.approx(results["results"][TASK][model]["mean_nll"], rel=1e-6)
        curve = events.Scalars(f"{PREFIX}/{model}/loss_vs_position/step_7")
        assert [p.step for p in curve] == list(range(79))  # one point per predicted position
    [image] = events.Images("ttt_bench/loss_vs_position")
    assert image.step == 7 and image.width > 0
    assert [p.step for p in events.Scalars("train/loss")] == [7]  # the caller's own scalars untouched


def test_tensorboard_dir_from_the_cli(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert main(["--model", "frozen", "--model_args", "preset=tiny", "--tasks", TASK, "--task_args",
                 "max_frames=80,verify_loss_computation=false,verify_causality=false", "--limit", "1",
                 "--chunk_size", "16",
                 "--output_path", str(tmp_path / "run"), "--tensorboard_dir", str(tmp_path / "tb")]) == 0
    events = EventAccumulator(str(tmp_path / "tb")).Reload()
    assert f"{PREFIX}/frozen/mean_nll" in events.Tags()["scalars"]


@pytest.mark.parametrize("extra,flag", [("wandb", "--wandb_args"), ("tensorboard", "--tensorboard_dir")])
def test_a_missing_extra_is_one_line_saying_how_to_install_it(extra, flag, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, extra, None)  # as if not installed: import raises ImportError
    with pytest.raises(MissingExtraError, match=f'pip install "ttt-bench\\[{extra}\\]"'):
        simple_evaluate(**RUN, **({"wandb_args": {}} if extra == "wandb" else {"tensorboard_dir": tmp_path}))
    code = main(["--model", "frozen", "--model_args", "preset=tiny", "--tasks", TASK,
                 "--output_path", str(tmp_path / "run"), flag, "project=x" if extra == "wandb" else str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and f'pip install "ttt-bench[{extra}]"' in err
    assert not (tmp_path / "run").exists()


def test_task_groups_are_logged_beside_their_members():
    from ttt_bench.reporting.trackers import leaderboard_rows, scalars

    results = {"results": {"salmon_rir_consistency": {"frozen": {"acc": 0.5, "n_pairs": 4, "flags": []}}},
               "groups": {"salmon": {"frozen": {"acc": 0.625, "ci": {"acc": [0.5, 0.75]}}}}}
    assert scalars(results) == {"ttt_bench/salmon_rir_consistency/frozen/acc": 0.5,
                                "ttt_bench/salmon_rir_consistency/frozen/n_pairs": 4.0,
                                "ttt_bench/salmon/frozen/acc": 0.625}
    columns, rows = leaderboard_rows(results)
    assert columns == ["task", "model", "acc", "n_pairs"]
    assert rows == [["salmon_rir_consistency", "frozen", 0.5, 4.0], ["salmon", "frozen", 0.625, None]]
