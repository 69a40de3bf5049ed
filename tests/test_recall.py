"""The recall task (docs/design.md invariant 7): memory is measured, not assumed. A model whose only
memory is attention gains nothing from a repeat past its attention's reach (exactly); inside the
reach it copies what it sees; a model that learns while it listens gains past the reach."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from moshi.utils.compile import no_compile

from ttt_bench.config import ConfigError
from ttt_bench.metrics import DocRecord, ModelShape, prediction_mask, voiced_frames
from ttt_bench.registry import get_model, get_task
from ttt_bench.reporting.run_record import ModelRecord
from evaluate_helper import evaluate_run
from ttt_bench.tasks.recall import RecallMetrics, RecallTaskConfig, attention_reach

R = 40  # frames of A
SAMPLE = Path(__file__).resolve().parent.parent / "ttt_bench" / "data" / "librilight_sample"


@pytest.fixture(scope="module")
def codec(mimi, tmp_path_factory):
    """One code cache for the module: the pairs reuse the chapters' codes."""
    from ttt_bench.audio.cache import CodeCache
    from ttt_bench.audio.codec import MimiCodec

    return MimiCodec(mimi, cache=CodeCache(tmp_path_factory.mktemp("codes")), chunk_frames=25)


@pytest.fixture(scope="module")
def frozen():
    return get_model("frozen", preset="tiny")


def recall_task(frozen, **overrides):
    task = get_task("librilight_sample_recall", recall_frames=R, **overrides)
    task.use_models({"frozen": frozen})
    return task


def test_reach_is_the_sum_of_the_layers_contexts(frozen):
    assert attention_reach(frozen.lm) == 2 * 64  # the tiny preset: 2 layers, context 64


def test_pairs_are_built_from_separately_encoded_recordings(frozen, codec):
    chapters = {d.doc_id: d.codes for d in get_task("librilight_sample", max_frames=128).documents(codec)}
    ids = list(chapters)
    docs = recall_task(frozen).documents(codec)
    gap = 128
    assert [d.doc_id for d in docs] == [f"{i}/{role}" for i in ids for role in ("seen", "unseen")]
    for k, a_id in enumerate(ids):
        seen, unseen = docs[2 * k], docs[2 * k + 1]
        other = ids[(k + 1) % 3]
        assert seen.n_frames == unseen.n_frames == R + gap + R
        a = chapters[a_id][:, :R]
        assert torch.equal(seen.codes[:, :R], a) and torch.equal(seen.codes[:, -R:], a)
        assert torch.equal(unseen.codes[:, :R], chapters[other][:, :R]) and torch.equal(unseen.codes[:, -R:], a)
        assert torch.equal(seen.codes[:, R:R + gap], unseen.codes[:, R:R + gap])  # the same filler
        assert a_id not in seen.meta["filler"] and seen.meta["filler"][0] == ids[(k + 2) % 3]
        filler = seen.meta["filler"][0]
        assert torch.equal(seen.codes[:, R:R + gap], chapters[filler][:, :gap])
        assert seen.meta["recall_start"] == R + gap and unseen.meta["first"] == other


def test_limit_counts_pairs(frozen, codec):
    docs = recall_task(frozen).documents(codec, limit=2)
    assert len(docs) == 4 and {d.meta["pair"] for d in docs} == set(d.doc_id.rsplit("/", 1)[0] for d in docs)
    assert len(recall_task(frozen, pairs=1).documents(codec)) == 2


def test_gap_context_needs_the_models_and_bad_keys_are_refused(codec):
    with pytest.raises(ValueError, match="gap_frames: context"):
        get_task("librilight_sample_recall").documents(codec)
    with pytest.raises(ConfigError, match="gap_frames"):
        get_task("librilight_sample_recall", gap_frames="window")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) positions"):
        get_task("librilight_sample_recall", positions=[10])


def run(tmp_path, models, model_args, limit=None, **task_args):
    with no_compile():
        return evaluate_run(models, ["librilight_sample_recall"], model_args=model_args,
                            task_overrides={"recall_frames": R, **task_args}, chunk_size=32, limit=limit,
                            device="cpu", output_path=str(tmp_path))


@pytest.fixture(scope="module")
def past_the_reach(tmp_path_factory):
    out = tmp_path_factory.mktemp("recall")
    return out, run(out, ["frozen", "dyneval"],
                    {"preset": "tiny", "dyneval.lr": 1e-2, "dyneval.optimizer": "adam"})


def test_attention_alone_gains_nothing_past_its_reach(past_the_reach):
    _, results = past_the_reach
    frozen = results["results"]["librilight_sample_recall"]["frozen"]
    assert frozen["n_pairs"] == 3 and frozen["gap_frames"] == frozen["attention_reach"] == 128
    assert all(abs(gain) <= 1e-6 for gain in frozen["per_pair"].values())
    assert frozen["nll_seen"] > 1.0  # a real loss, equal in both documents
    assert "attention_recall" not in [f["code"] for f in frozen["flags"]]


def test_a_model_that_learns_while_it_listens_gains_past_the_reach(past_the_reach):
    _, results = past_the_reach
    dyneval = results["results"]["librilight_sample_recall"]["dyneval"]
    assert dyneval["recall_gain"] > 0
    assert dyneval["delta_vs_baseline"]["delta"]["recall_gain"] == pytest.approx(dyneval["recall_gain"])


def test_outputs_have_recall_columns_curve_and_plot(past_the_reach):
    out, results = past_the_reach
    board = (out / "leaderboard.md").read_text()
    assert "| recall_gain" in board and "recall_gain_semantic" in board and "| pairs" in board
    assert "nll@" not in board
    curves = np.load(out / "curves.npz")
    curve = curves["librilight_sample_recall/dyneval/recall_gain/mean"]
    assert curve.shape == (R,)
    assert not np.any(curves["librilight_sample_recall/frozen/recall_gain/mean"][:-1])
    assert (out / "librilight_sample_recall.png").stat().st_size > 0
    lines = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(lines) == 6 and {line["pair"] for line in lines} == set(
        results["results"]["librilight_sample_recall"]["frozen"]["per_pair"])


def test_inside_the_reach_attention_carries_the_first_a(tmp_path):
    """The positive control: with the gap inside the reach the two documents of every pair score the
    final A differently. (That the difference is a gain, copying, needs a trained model: the tiny
    preset's random weights have no reason to copy; frozen Moshi 7B is expected to.)"""
    results = run(tmp_path, ["frozen"], {"preset": "tiny"}, limit=2, gap_frames=20)
    frozen = results["results"]["librilight_sample_recall"]["frozen"]
    assert frozen["n_pairs"] == 2 and frozen["gap_frames"] == 20
    assert all(abs(gain) > 1e-4 for gain in frozen["per_pair"].values())


def test_an_attention_only_model_that_gains_past_its_reach_is_flagged():
    config = RecallTaskConfig.from_dict({"task": "recall", "recall_frames": R})
    metrics = RecallMetrics(config, ModelShape(card=256), gap_frames=128, reach=128)
    row = {"max_abs_pair_gain": 3e-3}
    [flag] = metrics.model_flags(row, ModelRecord(label="m", attention_only=True))
    assert flag["code"] == "attention_recall"
    assert metrics.model_flags(row, ModelRecord(label="m", attention_only=False)) == []
    assert metrics.model_flags({"max_abs_pair_gain": 1e-7}, ModelRecord(label="m", attention_only=True)) == []
    inside = RecallMetrics(config, ModelShape(card=256), gap_frames=20, reach=128)
    assert inside.model_flags(row, ModelRecord(label="m", attention_only=True)) == []


def test_terminal_table_fits_120_columns_with_deltas_marks_and_flags(past_the_reach):
    from ttt_bench.reporting.report import render_terminal

    _, results = past_the_reach
    text = render_terminal(results)
    assert max(len(line) for line in text.splitlines()) <= 120
    [dyneval] = [line for line in text.splitlines() if line.startswith("dyneval")]
    delta = results["results"]["librilight_sample_recall"]["dyneval"]["delta_vs_baseline"]
    mark = "*" if delta["significant"]["recall_gain"] else ""
    assert f"{delta['delta']['recall_gain']:.4f}{mark} " in dyneval
    assert "leaderboard.md" in text and "[" not in dyneval  # intervals stay in leaderboard.md


def test_recall_gain_voiced_counts_only_the_voiced_frames_of_a(frozen, codec):
    """A's voiced segments (the sample's .json, cut at A's end) travel with both documents of a pair;
    a gain that lives only in A's pauses is a recall_gain but no recall_gain_voiced."""
    docs = recall_task(frozen).documents(codec, limit=1)
    [sidecar] = SAMPLE.rglob(docs[0].meta["pair"].rsplit("/", 1)[1] + ".json")
    recorded = json.loads(sidecar.read_text())["voice_activity"]
    expected = [[s, min(e, R / 12.5)] for s, e in recorded if s < R / 12.5]
    assert all(d.meta["recall_voice_activity"] == expected for d in docs) and len(expected) >= 2
    voiced = voiced_frames(expected, R)
    assert 0 < voiced.sum() < R
    config = RecallTaskConfig.from_dict({"task": "recall", "recall_frames": R})
    metrics = RecallMetrics(config, ModelShape(), gap_frames=128, reach=128)
    start = docs[0].meta["recall_start"]
    records = []
    for d in docs:
        nll = np.full((8, d.n_frames), 3.0)
        if d.meta["role"] == "unseen":
            nll[:, start:][:, ~voiced] += 0.5  # the seen document is better on A's pauses only
        records.append(DocRecord(d.doc_id, d.meta, nll))
    row = metrics.model_metrics(metrics.summarize(records))
    predicted = prediction_mask(docs[0].n_frames, ModelShape().delays)[:, start:]  # the last frame: codebook 0
    assert row["recall_gain"] == pytest.approx(0.5 * predicted[:, ~voiced].sum() / predicted.sum(), rel=1e-12)
    assert row["recall_gain_voiced"] == 0.0 and row["n"]["recall_gain_voiced"] == 1
    without = [DocRecord(r.doc_id, {k: v for k, v in r.meta.items() if k != "recall_voice_activity"}, r.nll)
               for r in records]
    assert "recall_gain_voiced" not in metrics.model_metrics(metrics.summarize(without))
