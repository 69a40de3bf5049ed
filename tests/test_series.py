"""A training run's checkpoints evaluated as a series (``checkpoint=`` a run folder): each checkpoint
scores as it does alone, the base is loaded once, and the metrics are reported against the step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hf_cache import write_finetune_checkpoint, write_tiny_hf_checkpoint
from test_ttt_fork_checkpoint import REPO as FORK_REPO
from test_ttt_fork_checkpoint import trained_fork_model, write_fork_checkpoint
from ttt_bench import simple_evaluate
from ttt_bench.models.loading.series import expand_series, find_series, parse_steps
from ttt_bench.models.series import CheckpointScorer
from ttt_bench.options import ModelArgs

REPO = "ttt-bench-test/tiny-series-base"
TASK = "librilight_sample"
CHECKED_ARGS = dict(tasks=[TASK], limit=2, chunk_size=16,
                    task_args={"max_frames": 40, "early_late_frames": 10, "positions": [20], "window": 10})
# the causality check scores 2 x 128 frames per model: on in the resume test (whose checks are carried over)
RUN_ARGS = {**CHECKED_ARGS, "task_args": {**CHECKED_ARGS["task_args"], "verify_causality": False}}
STEPS = (10, 20, 30)


@pytest.fixture(scope="module")
def base(hf_hub_cache):
    return write_tiny_hf_checkpoint(hf_hub_cache, REPO, seed=3)


def lora_run(run: Path, base: Path, steps=STEPS) -> Path:
    for step in steps:  # each checkpoint its own adapters
        write_finetune_checkpoint(run, base, kind="lora", step=step, seed=step)
    return run


@pytest.fixture(scope="module")
def fork_base(hf_hub_cache):
    return write_tiny_hf_checkpoint(hf_hub_cache, FORK_REPO, seed=2)


def fork_run(run: Path, base: Path, steps=STEPS) -> Path:
    for step in steps:  # the fork's TTT layers and adapters, moved differently at each step
        lm = trained_fork_model(base)
        generator = torch.Generator().manual_seed(step)
        with torch.no_grad():
            for name, p in lm.named_parameters():
                if ".seq_modeling_block." in name or ".lora_" in name:
                    p.add_(torch.randn(p.shape, generator=generator) * 0.05)
        write_fork_checkpoint(run / "checkpoints" / f"checkpoint_{step:06d}", lm, "lora")
    return run


class BaseLoads:
    """Counts how often moshi's loader reads the base's weight file."""

    def __init__(self, monkeypatch, weights: Path):
        from moshi.models import loaders

        self.count, real, target = 0, loaders.load_file, Path(weights).resolve()

        def counting(filename, *args, **kwargs):
            self.count += Path(filename).resolve() == target
            return real(filename, *args, **kwargs)

        monkeypatch.setattr(loaders, "load_file", counting)


class ScoreCalls:
    """Counts the scoring calls of each checkpoint of a series (verification included)."""

    def __init__(self, monkeypatch):
        self.calls: dict[str, int] = {}
        real = CheckpointScorer.score

        def counting(scorer, *args, **kwargs):
            self.calls[scorer.checked.member.name] = self.calls.get(scorer.checked.member.name, 0) + 1
            return real(scorer, *args, **kwargs)

        monkeypatch.setattr(CheckpointScorer, "score", counting)


def mean_nll(results: dict) -> dict[str, float]:
    return {model: m["mean_nll"] for model, m in results["results"][TASK].items()}


def alone(model: str, folders: dict[int, Path], **model_args) -> dict[int, float]:
    """Each checkpoint evaluated on its own, as before series existed: its own model, built from
    its files (LoRA unfused, as in a series), here side by side in one run."""
    unchecked = {**RUN_ARGS, "task_args": {**RUN_ARGS["task_args"], "verify_loss_computation": False,
                                           "verify_causality": False}}  # the series run checks; the NLL is the same
    names = {f"alone{step}": model for step in folders}
    args = {**model_args, "fuse_lora": False, **{f"alone{step}.checkpoint": str(f) for step, f in folders.items()}}
    results = simple_evaluate(names, args, **unchecked)
    return {step: results["results"][TASK][f"alone{step}"]["mean_nll"] for step in folders}


def checkpoint(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"checkpoint_{step:06d}"


# ----------------------------------------------------------------------------- loading once, scoring as alone


def test_lora_run_scores_each_checkpoint_as_alone_and_loads_the_base_once(base, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from wandb_files import history

    for var in ("WANDB_DIR", "WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = lora_run(tmp_path / "run", base)
    loads = BaseLoads(monkeypatch, base / "model.safetensors")
    out = tmp_path / "out"
    results = simple_evaluate("frozen", {"checkpoint": str(run), "hf_repo": REPO}, output_path=str(out),
                              tensorboard_dir=str(tmp_path / "tb"),
                              wandb_args={"project": "ttt-bench-test", "dir": str(tmp_path)}, **RUN_ARGS)
    assert loads.count == 1
    got = mean_nll(results)
    assert list(got) == [f"frozen@{s}" for s in STEPS]
    expected = alone("frozen", {step: checkpoint(run, step) for step in STEPS}, hf_repo=REPO)
    for step in STEPS:
        assert abs(got[f"frozen@{step}"] - expected[step]) <= 1e-6
        assert results["models"][f"frozen@{step}"]["step"] == step
        assert results["models"][f"frozen@{step}"]["options"]["checkpoint"]["fuse_lora"] is False
    values = sorted(got.values())
    assert values[1] - values[0] > 1e-3 and values[2] - values[1] > 1e-3  # the checkpoints differ
    assert loads.count == 1 + len(STEPS)  # one per checkpoint evaluated alone: the counter counts

    series = results["series"][TASK]["frozen"]
    assert set(series) >= {"mean_nll", "late_nll", "improvement", "voiced_improvement"}
    assert [p[0] for p in series["mean_nll"]] == list(STEPS)
    for step, value, low, high in series["mean_nll"]:
        assert value == pytest.approx(got[f"frozen@{step}"]) and low <= value <= high
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["series"] == results["series"]
    assert (out / f"{TASK}_vs_step.png").stat().st_size > 0 and (out / f"{TASK}_vs_step.svg").exists()
    board = (out / "leaderboard.md").read_text()
    assert "frozen@20 (run/checkpoint_000020 lora)" in board
    assert f"### {TASK}: frozen against the training step" in board
    table = board.split("against the training step")[1]
    assert [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ") and
            line.split("|")[1].strip().isdigit()] == [str(s) for s in STEPS]

    events = EventAccumulator(str(tmp_path / "tb")).Reload()
    scalars = events.Scalars(f"ttt_bench/{TASK}/frozen/mean_nll")
    assert [e.step for e in scalars] == list(STEPS)
    assert [e.value for e in scalars] == pytest.approx([got[f"frozen@{s}"] for s in STEPS], abs=1e-6)

    import wandb

    wandb.teardown()  # the wandb service writes the run's log to disk by the time it stops
    [wandb_run] = (tmp_path / "wandb").glob("offline-run-*")
    rows = {row["_step"]: row for row in history(wandb_run)}
    assert {step: rows[step][f"ttt_bench/{TASK}/frozen/mean_nll"] for step in STEPS} == pytest.approx(
        {step: got[f"frozen@{step}"] for step in STEPS}, abs=1e-12)


def test_fork_run_scores_each_checkpoint_as_alone_and_loads_the_base_once(fork_base, tmp_path, monkeypatch):
    run = fork_run(tmp_path / "run", fork_base)
    loads = BaseLoads(monkeypatch, fork_base / "model.safetensors")
    results = simple_evaluate({"ttt": "ttt", "frozen": "frozen"},
                              {"ttt.checkpoint": str(run / "checkpoints"), "hf_repo": FORK_REPO}, **RUN_ARGS)
    assert loads.count == 2  # the series' base, once, and the frozen baseline
    got = mean_nll(results)
    assert list(got) == ["ttt@10", "ttt@20", "ttt@30", "frozen"]
    expected = alone("ttt", {step: checkpoint(run, step) for step in STEPS}, hf_repo=FORK_REPO)
    for step in STEPS:
        assert abs(got[f"ttt@{step}"] - expected[step]) <= 1e-6
        fork = results["models"][f"ttt@{step}"]["options"]["fork_checkpoint"]
        assert f"checkpoint_{step:06d}" in fork["training_config"] and fork["unused_keys"]
        assert results["results"][TASK][f"ttt@{step}"]["delta_vs_baseline"]["baseline"] == "frozen"
    assert len({round(v, 4) for v in got.values()}) == 4
    assert "moshi_finetune_ttt, causal=true" in results["models"]["ttt@20"]["label"]


def test_full_finetunes_are_replaced_in_place(base, tmp_path, monkeypatch):
    run = tmp_path / "run"
    for step in (10, 20):
        write_finetune_checkpoint(run, base, kind="full", step=step, seed=step)
    results = simple_evaluate("dyneval", {"checkpoint": str(run), "hf_repo": REPO, "lr": 1e-3}, **RUN_ARGS)
    got = mean_nll(results)
    expected = alone("dyneval", {step: checkpoint(run, step) for step in (10, 20)}, hf_repo=REPO, lr=1e-3)
    for step in (10, 20):  # dyneval restarts each document from the checkpoint's own weights
        assert abs(got[f"dyneval@{step}"] - expected[step]) <= 1e-6
    assert abs(got["dyneval@10"] - got["dyneval@20"]) > 1e-3


def test_checkpoints_share_one_model_and_score_per_position_as_alone(base, tmp_path):
    """The scorers of a series, used in any order (the legacy wrapper too), give each checkpoint's
    NLL at every position as that checkpoint loaded alone does."""
    from ttt_bench.models.legacy import make_legacy
    from ttt_bench.models.series import build_series, check_runs, series_args
    from ttt_bench.registry import get_model

    run = lora_run(tmp_path / "run", base, steps=(10, 20))
    entries, per_model, runs = expand_series({"frozen": "frozen"}, {"frozen": ModelArgs(
        {"checkpoint": str(run), "hf_repo": REPO}, {})})
    checked, skipped = check_runs(runs, per_model, seed=0, on_error="fail")
    scorers = build_series(lambda first: get_model("frozen", **series_args(per_model[first.member.name], first).kwargs()),
                           checked["frozen"])
    codes = torch.randint(0, 256, (1, 8, 20), generator=torch.Generator().manual_seed(0))
    single = {s: get_model("frozen", checkpoint=str(checkpoint(run, s)), hf_repo=REPO, fuse_lora=False) for s in (10, 20)}
    expected = {s: single[s].score(codes, 8) for s in (10, 20)}
    for name in ("frozen@20", "frozen@10", "frozen@20"):
        torch.testing.assert_close(scorers[name].score(codes, 8), expected[int(name.split("@")[1])], rtol=0, atol=1e-6,
                                   equal_nan=True)
        assert scorers[name].lm is scorers["frozen@10"].lm  # one model
    legacy = make_legacy(scorers["frozen@10"])  # scores through lm directly: it must swap first
    torch.testing.assert_close(legacy.score(codes, 8), make_legacy(single[10]).score(codes, 8), rtol=0, atol=1e-6,
                               equal_nan=True)
    assert scorers["frozen@20"].shared.swaps == 4  # 10 -> 20 -> 10 -> 20 -> 10


def test_a_pair_task_reports_acc_against_the_step_and_legacy_takes_a_run_as_its_base(base, tmp_path):
    run = lora_run(tmp_path / "run", base, steps=(10, 20))
    out = tmp_path / "out"
    results = simple_evaluate("legacy", {"base": "frozen", "checkpoint": str(run), "hf_repo": REPO},
                              tasks=["zeroshot_sample"], limit=6, chunk_size=16, output_path=str(out),
                              task_args={"verify_causality": False})
    assert list(results["results"]["zeroshot_sample"]) == ["legacy@10", "legacy@20"]
    assert results["models"]["legacy@20"]["label"].startswith("legacy@20[frozen (run/checkpoint_000020 lora)")
    series = results["series"]["zeroshot_sample"]["legacy"]
    assert list(series) == ["acc"]  # the pair tasks' headline metric
    for step, value, low, high in series["acc"]:
        assert value == results["results"]["zeroshot_sample"][f"legacy@{step}"]["acc"] and low <= value <= high
    assert (out / "zeroshot_sample_vs_step.png").exists()


# ----------------------------------------------------------------------------- naming and choosing checkpoints


def folders(run: Path, steps) -> list[tuple[int, Path]]:
    for step in steps:
        (run / "checkpoints" / f"checkpoint_{step:06d}" / "consolidated").mkdir(parents=True)
    return [(s, run / "checkpoints" / f"checkpoint_{s:06d}") for s in sorted(steps)]


def test_run_folder_checkpoints_folder_and_glob_name_the_same_checkpoints(tmp_path):
    run = tmp_path / "run"
    expected = folders(run, (1500, 500, 1000, 3000))
    assert find_series(run) == expected
    assert find_series(run / "checkpoints") == expected
    assert find_series(f"{run}/checkpoints/checkpoint_00*") == expected
    assert find_series(f"{run}/checkpoints/checkpoint_0015*") == expected[2:3]
    assert find_series(expected[0][1]) is None  # a single checkpoint stays a single model
    assert find_series(expected[0][1] / "consolidated") is None


def test_a_run_folder_with_glob_characters_in_its_name_is_taken_as_written(tmp_path):
    run = tmp_path / "exp[1]"
    expected = folders(run, (500, 1000))
    assert find_series(run) == expected  # as a glob, exp[1] would match only a folder named exp1
    assert find_series(run / "checkpoints") == expected


@pytest.mark.parametrize("steps, chosen", [([500, 1500], [500, 1500]), ("1000:3000", [1000, 1500, 3000]),
                                           ("1500:", [1500, 3000]), (":1000", [500, 1000]),
                                           ("every:2", [500, 1500]), ("last:3", [1000, 1500, 3000]), (3000, [3000])])
def test_steps_select_checkpoints(tmp_path, steps, chosen):
    run = tmp_path / "run"
    folders(run, (500, 1000, 1500, 3000))
    per_model = {"ttt": ModelArgs({"checkpoint": str(run)}, {"steps": steps, "causal": True})}
    entries, args, series = expand_series({"ttt": "ttt"}, per_model)
    assert list(entries) == [f"ttt@{s}" for s in chosen]
    assert [m.step for m in series["ttt"].members] == chosen
    first = args[f"ttt@{chosen[0]}"]
    assert first.load["checkpoint"] == str(run / "checkpoints" / f"checkpoint_{chosen[0]:06d}")
    assert first.options == {"causal": True}


@pytest.mark.parametrize("steps, message", [("every:0", "positive integer"), ("3000:1000", "range is empty"),
                                            ("some", "give a list"), ([700], "no checkpoint of step 700"),
                                            ("4000:", "selects none")])
def test_bad_steps_are_refused_by_value(tmp_path, steps, message):
    run = tmp_path / "run"
    folders(run, (500, 1000))
    with pytest.raises(ValueError, match=message):
        expand_series({"ttt": "ttt"}, {"ttt": ModelArgs({"checkpoint": str(run)}, {"steps": steps})})
    if message != "selects none":
        with pytest.raises(ValueError, match=message):
            parse_steps(steps)([500, 1000])


@pytest.mark.parametrize("args, message", [
    ("checkpoint={run},steps=every:x", "every:K needs a positive integer"),
    ("checkpoint={empty}", "holds no checkpoint_NNNNNN folder"),
    ("preset=tiny,steps=last:2", "has no training run to choose from")])
def test_cli_refuses_bad_steps_and_an_empty_run_in_one_line(tmp_path, capsys, args, message):
    from ttt_bench.cli import main

    run, empty = tmp_path / "run", tmp_path / "empty"
    folders(run, (500, 1000))
    (empty / "checkpoints").mkdir(parents=True)
    out = tmp_path / "out"
    code = main(["--model", "frozen", "--model_args", args.format(run=run, empty=empty), "--tasks", TASK,
                 "--output_path", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1 and not out.exists()


# ----------------------------------------------------------------------------- bad checkpoints


def truncate(folder: Path) -> Path:
    path = folder / "consolidated" / "lora.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    return path


def test_a_truncated_checkpoint_stops_the_run_before_scoring(base, tmp_path, monkeypatch, capsys):
    from ttt_bench.cli import main

    run = lora_run(tmp_path / "run", base)
    bad = truncate(run / "checkpoints" / "checkpoint_000020")
    calls = ScoreCalls(monkeypatch)
    loads = BaseLoads(monkeypatch, base / "model.safetensors")
    out = tmp_path / "out"
    code = main(["--model", "frozen", "--model_args", f"checkpoint={run},hf_repo={REPO}", "--tasks", TASK,
                 "--limit", "1", "--output_path", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert str(run / "checkpoints" / "checkpoint_000020") in err and "truncated" in err and str(bad) in err
    assert calls.calls == {} and loads.count == 0 and not out.exists()


def test_with_on_error_skip_the_others_are_evaluated_and_the_skip_reported(base, tmp_path, monkeypatch):
    run = lora_run(tmp_path / "run", base)
    lora = run / "checkpoints" / "checkpoint_000020" / "consolidated" / "lora.safetensors"
    whole = lora.read_bytes()
    truncate(run / "checkpoints" / "checkpoint_000020")
    out = tmp_path / "out"
    args = dict(model_args={"checkpoint": str(run), "hf_repo": REPO}, output_path=str(out), **RUN_ARGS)
    results = simple_evaluate("frozen", on_error="skip", **args)
    first = mean_nll(results)
    assert list(first) == ["frozen@10", "frozen@30"]
    skipped = results["skipped_checkpoints"]
    assert [(s["model"], s["step"]) for s in skipped] == [("frozen@20", 20)] and "truncated" in skipped[0]["reason"]
    assert [p[0] for p in results["series"][TASK]["frozen"]["mean_nll"]] == [10, 30]
    board = (out / "leaderboard.md").read_text()
    assert f"checkpoint {run / 'checkpoints' / 'checkpoint_000020'} skipped" in board

    # the trainer finished writing it: --resume scores it, and only it
    lora.write_bytes(whole)
    calls = ScoreCalls(monkeypatch)
    resumed = simple_evaluate("frozen", on_error="skip", resume=True, **args)
    assert set(calls.calls) == {"frozen@20"} and resumed["skipped_checkpoints"] == []
    got = mean_nll(resumed)
    assert list(got) == [f"frozen@{s}" for s in STEPS] and all(got[m] == first[m] for m in first)
    assert abs(got["frozen@20"] - alone("frozen", {20: checkpoint(run, 20)}, hf_repo=REPO)[20]) <= 1e-6


# ----------------------------------------------------------------------------- --resume


def test_resume_scores_only_new_checkpoints_and_ones_saved_again(base, tmp_path, monkeypatch):
    run = lora_run(tmp_path / "run", base)
    out = tmp_path / "out"
    args = dict(model_args={"checkpoint": str(run), "hf_repo": REPO}, output_path=str(out), **CHECKED_ARGS)
    first = mean_nll(simple_evaluate("frozen", **args))

    write_finetune_checkpoint(run, base, kind="lora", step=40, seed=40)
    calls = ScoreCalls(monkeypatch)
    results = simple_evaluate("frozen", resume=True, **args)
    assert set(calls.calls) == {"frozen@40"}
    got = mean_nll(results)
    assert list(got) == [f"frozen@{s}" for s in (*STEPS, 40)]
    assert all(got[m] == first[m] for m in first)
    assert [p[0] for p in results["series"][TASK]["frozen"]["mean_nll"]] == [*STEPS, 40]
    assert "| 40 " in (out / "leaderboard.md").read_text()
    checks = {(c["model"]) for c in results["causality"][TASK]}
    assert checks == set(got)  # the finished checkpoints' checks carried over

    # checkpoint_000020 saved again (other weights at the same path): it alone is scored again
    saved_again = tmp_path / "again"
    write_finetune_checkpoint(saved_again, base, kind="lora", step=20, seed=99)
    lora = run / "checkpoints" / "checkpoint_000020" / "consolidated" / "lora.safetensors"
    lora.write_bytes((saved_again / "checkpoints" / "checkpoint_000020" / "consolidated" / "lora.safetensors").read_bytes())
    calls.calls.clear()
    again = mean_nll(simple_evaluate("frozen", resume=True, **args))
    assert set(calls.calls) == {"frozen@20"}
    assert abs(again["frozen@20"] - alone("frozen", {20: checkpoint(run, 20)}, hf_repo=REPO)[20]) <= 1e-6
    assert abs(again["frozen@20"] - first["frozen@20"]) > 1e-3
    assert all(again[m] == got[m] for m in got if m != "frozen@20")


def test_a_checkpoint_named_like_another_model_is_refused(tmp_path):
    run = tmp_path / "run"
    folders(run, (10, 20))
    with pytest.raises(ValueError, match="'frozen@10' has the name of another model"):
        expand_series({"frozen@10": "frozen", "frozen": "frozen"},
                      {"frozen@10": ModelArgs({}, {}), "frozen": ModelArgs({"checkpoint": str(run)}, {})})
