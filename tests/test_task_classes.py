"""Task classes own their configuration and their metrics: each class declares the keys it
accepts (others are refused with the valid ones listed) and the metrics and leaderboard columns
it reports, so one run over tasks of two classes writes two tables that each make sense."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pytest
from moshi.utils.compile import no_compile

import runner_fixtures  # noqa: F401  (registers synthetic_docs, a task class without hooks)
from runner_fixtures import synthetic_documents
from ttt_bench.config import ConfigError, StreamTaskConfig, TaskConfig, load_task_config
from ttt_bench.metrics import DocRecord, TaskMetrics
from ttt_bench.registry import get_task, register_task, task_config_files
from evaluate_helper import evaluate_run
from ttt_bench.tasks.base import Task


@dataclass
class FirstFrameConfig(TaskConfig):
    n_first: int = 2


class FirstFrameMetrics(TaskMetrics):
    """Mean NLL of the first ``n_first`` frames of codebook 0 over the documents."""

    unit = "documents"
    columns = ("first_nll",)
    delta_columns = ("first_nll",)

    def __init__(self, n_first: int):
        self.n_first = n_first

    def to_dict(self) -> dict[str, Any]:
        return {"n_first": self.n_first}

    def summarize(self, records: Sequence[DocRecord]) -> dict[str, float]:
        return {r.doc_id: float(np.mean(r.nll[0, :self.n_first])) for r in records}

    def model_metrics(self, summary: dict[str, float]) -> dict[str, Any]:
        return {"first_nll": float(np.mean(list(summary.values()))), "n_docs": len(summary)}

    def deltas(self, summary: dict[str, float], base: dict[str, float]) -> dict[str, Any]:
        return {"delta": {"first_nll": float(np.mean([summary[k] - base[k] for k in base]))}}


@register_task("first_frames_for_tests")
class FirstFramesTask(Task):
    config_class = FirstFrameConfig

    def documents(self, codec, limit=None, on_bad_input="skip"):
        return synthetic_documents(names=["a/long", "c/short"])[:limit]

    def metrics(self, lm):
        return FirstFrameMetrics(self.config.n_first)


def test_each_class_builds_its_own_config_and_refuses_the_keys_of_another():
    sample = load_task_config(task_config_files()["librilight_sample"])
    assert type(sample) is StreamTaskConfig and sample.max_frames == 2000
    task = get_task("first_frames_for_tests", n_first=3)
    assert type(task.config) is FirstFrameConfig and task.config.n_first == 3
    with pytest.raises(ConfigError, match=r"unknown key\(s\) max_frames .*first_frames_for_tests.*valid keys: .*n_first") \
            as err:
        get_task("first_frames_for_tests", max_frames=10)
    assert "positions" not in str(err.value)
    with pytest.raises(ConfigError, match=r"unknown key\(s\) n_first .*valid keys: .*max_frames"):
        get_task("librilight_sample", n_first=1)
    with pytest.raises(ConfigError, match="key 'class': unknown task class 'no_such_class'"):
        TaskConfig.from_dict({"task": "x", "class": "no_such_class"})


def test_a_run_over_two_task_classes_writes_a_table_for_each(tmp_path):
    with no_compile():
        results = evaluate_run(["frozen"], ["synthetic_docs", "first_frames_for_tests"],
                               model_args={"preset": "tiny"}, chunk_size=8, limit=2, device="cpu",
                               output_path=str(tmp_path))
    stream, first = results["results"]["synthetic_docs"]["frozen"], results["results"]["first_frames_for_tests"]["frozen"]
    assert "mean_nll" in stream and "nll_cb0" in stream
    assert set(first) == {"first_nll", "n_docs"}
    nll = {r["doc_id"]: r for r in map(json.loads, (tmp_path / "samples.jsonl").read_text().splitlines())}
    assert set(nll) == {d.doc_id for d in synthetic_documents()[:2]}  # only the stream task writes lines
    assert results["metrics_config"]["first_frames_for_tests"] == {
        "n_first": 2, "leaderboard": FirstFrameMetrics(2).leaderboard_spec()}
    board = (tmp_path / "leaderboard.md").read_text()
    stream_table, first_table = board.split("### first_frames_for_tests")
    assert "| mean_nll" in stream_table and "first_nll" not in stream_table
    assert "| first_nll" in first_table and "mean_nll" not in first_table and "slope" not in first_table
    assert f"| {first['first_nll']:.4f} " in first_table
