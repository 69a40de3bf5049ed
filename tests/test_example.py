"""examples/train_and_evaluate.py end to end: a few optimiser steps on the tiny model, evaluated
every 2 steps through simple_evaluate, logged to W&B (offline) and TensorBoard at the training
step."""

from __future__ import annotations

import importlib.util

import pytest

from runner_fixtures import REPO
from wandb_files import history

KEY = "ttt_bench/librilight_sample/tiny/mean_nll"


def load_example():
    spec = importlib.util.spec_from_file_location("train_and_evaluate", REPO / "examples" / "train_and_evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_training_loop_evaluates_every_n_steps_and_logs_at_the_training_step(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for var in ("WANDB_DIR", "WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    evaluations = load_example().main(["--steps", "4", "--eval_every", "2", "--max_frames", "60",
                                       "--tensorboard_dir", str(tmp_path / "tb"), "--wandb_project", "example",
                                       "--wandb_dir", str(tmp_path)])
    import wandb

    wandb.teardown()
    assert [e["step"] for e in evaluations] == [2, 4]
    nll = [e["results"]["results"]["librilight_sample"]["tiny"]["mean_nll"] for e in evaluations]
    assert nll[0] != nll[1]  # the model trained between the two evaluations

    events = EventAccumulator(str(tmp_path / "tb")).Reload()
    assert [(p.step, pytest.approx(p.value, rel=1e-6)) for p in events.Scalars(KEY)] == list(zip([2, 4], nll))
    assert [p.step for p in events.Scalars("train/loss")] == [1, 2, 3, 4]

    [run_dir] = (tmp_path / "wandb").glob("offline-run-*")
    rows = history(run_dir)
    assert [r["_step"] for r in rows if "train/loss" in r] == [1, 2, 3, 4]
    assert [(r["_step"], r[KEY]) for r in rows if KEY in r] == list(zip([2, 4], nll))
