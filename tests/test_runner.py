"""Runner pieces in one process: length sharding, batching (B=1 vs B=4 on documents of different
lengths), per-document failures (model errors, out of memory, non-finite losses), the record
store (atomic records, truncation detection, config refusal) and signal handling."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from moshi.utils.compile import no_compile

import runner_fixtures
from runner_fixtures import LENGTHS, synthetic_documents
from ttt_bench.evaluation.batching import BatchScorer, auto_batch_size, largest_fitting, pad_batch
from ttt_bench.evaluation.distributed import shard_by_length
from ttt_bench.evaluation.interrupt import Interrupted, SignalGuard
from ttt_bench.metrics import DocRecord
from ttt_bench.models.base import StreamLayout
from ttt_bench.evaluation.records import (ConfigMismatchError, DocFailure, RecordStore, UnsafePathError, config_hash,
                               safe_name)
from ttt_bench.registry import get_model
from evaluate_helper import evaluate_run

from ttt_bench.options import RunOptions
from ttt_bench.evaluation.runner import RunStopped, hashed_config


@pytest.fixture(autouse=True)
def _eager():
    """moshi's lazy torch.compile costs ~20 s per process on CPU and is no part of what is tested."""
    with no_compile():
        yield


@pytest.fixture(scope="module")
def frozen():
    return get_model("frozen", preset="tiny")


# ----------------------------------------------------------------------------- sharding


def test_shard_by_length_balances_frames_and_covers_every_document_once():
    lengths = [100, 90, 80, 70, 10, 10, 10, 5, 5, 3]
    shards = shard_by_length(lengths, 3)
    assert sorted(i for s in shards for i in s) == list(range(len(lengths)))
    loads = [sum(lengths[i] for i in s) for s in shards]
    assert loads == [118, 115, 150]  # 100+10+5+3, 90+10+10+5, 80+70: each onto the least-loaded rank
    assert shards == shard_by_length(lengths, 3)  # deterministic: every rank computes the same


def test_shard_by_length_puts_the_longest_documents_on_different_ranks():
    shards = shard_by_length([5, 50, 1, 40, 2], 2)
    assert shards == [[1], [3, 0, 4, 2]]  # 50 alone; 40+5+2+1 = 48 next to it
    assert shard_by_length([7], 4) == [[0], [], [], []]


# ----------------------------------------------------------------------------- batching


def _score_all(scorer, docs, batch_size):
    batcher = BatchScorer(scorer, chunk_size=8, layout=StreamLayout())
    out = {}
    for i in range(0, len(docs), batch_size):
        results, _ = batcher.score(docs[i:i + batch_size])
        out.update({r.doc_id: r for r in results})
    return out


@pytest.mark.parametrize("model", ["frozen", "ttt"])
def test_batch_size_does_not_change_any_documents_nll(model):
    kwargs = {}
    if model == "ttt":  # fast weights are per-row streaming state: padding must not reach them either
        pytest.importorskip("ttt_bench.models.ttt")
        kwargs = {"layers": [1], "gate_init": 0.5, "mini_batch_size": 4}
    scorer = get_model(model, preset="tiny", **kwargs)
    docs = sorted(synthetic_documents(), key=lambda d: -d.n_frames)  # 48 .. 7 frames: lots of padding
    assert len({d.n_frames for d in docs[:4]}) == 4
    alone = _score_all(scorer, docs, 1)
    batched = _score_all(scorer, docs, 4)
    for doc in docs:
        a, b = alone[doc.doc_id].nll, batched[doc.doc_id].nll
        assert a.shape == b.shape == (8, doc.n_frames)
        assert np.array_equal(np.isnan(a), np.isnan(b)), doc.doc_id  # padding never adds a prediction
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-5, err_msg=doc.doc_id)


def test_padding_is_after_each_document(frozen):
    docs = synthetic_documents(names=["a/long", "f/tiny"])
    codes = pad_batch(docs)
    assert codes.shape == (2, 8, 48)
    assert torch.equal(codes[1, :, :7], docs[1].codes) and not codes[1, :, 7:].any()


def test_a_document_that_raises_inside_the_model_fails_alone():
    scorer = get_model("frozen_poisonable", preset="tiny")
    docs = synthetic_documents(names=["a/long", "poison", "c/short", "d/mid2"])
    results, fit = BatchScorer(scorer, 8, StreamLayout()).score(docs)
    by_id = {r.doc_id: r for r in results}
    assert isinstance(by_id["poison"], DocFailure) and "poisoned document" in by_id["poison"].error
    assert all(isinstance(by_id[d], DocRecord) for d in ("a/long", "c/short", "d/mid2"))
    assert fit == 4  # not a memory problem: the batch size stays


class _OOMAbove:
    """A scorer that runs out of memory on batches larger than ``limit`` (or always, limit 0)."""

    def __init__(self, inner, limit: int):
        self.inner, self.limit, self.lm, self.calls = inner, limit, inner.lm, []

    def score(self, codes, chunk_size=64, layout=None):
        self.calls.append(codes.shape[0])
        if codes.shape[0] > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.inner.score(codes, chunk_size=chunk_size, layout=layout)


def test_out_of_memory_retries_with_half_the_batch(frozen):
    docs = synthetic_documents(names=["a/long", "b/mid", "d/mid2", "g/mid3"])
    oom = _OOMAbove(frozen, limit=2)
    results, fit = BatchScorer(oom, 8, StreamLayout()).score(docs)
    assert oom.calls == [4, 2, 2] and fit == 2
    reference = _score_all(frozen, docs, 1)
    for r in results:
        np.testing.assert_allclose(r.nll, reference[r.doc_id].nll, rtol=0, atol=1e-5)


def test_out_of_memory_with_one_document_is_recorded_as_its_failure(frozen):
    docs = synthetic_documents(names=["a/long", "b/mid"])
    results, fit = BatchScorer(_OOMAbove(frozen, limit=0), 8, StreamLayout()).score(docs)
    assert [r.kind for r in results] == ["oom", "oom"] and fit == 1
    assert "out of memory" in results[0].error


class _NaNAt:
    def __init__(self, inner):
        self.inner, self.lm = inner, inner.lm

    def score(self, codes, chunk_size=64, layout=None):
        nll = self.inner.score(codes, chunk_size=chunk_size, layout=layout)
        nll[0, 0, 3] = float("nan")
        return nll


@pytest.mark.parametrize("strict", [False, True])
def test_non_finite_loss_fails_the_document_only_under_strict(frozen, strict):
    doc = synthetic_documents(names=["b/mid"])
    [result], _ = BatchScorer(_NaNAt(frozen), 8, StreamLayout(), strict=strict).score(doc)
    if strict:
        assert isinstance(result, DocFailure) and result.kind == "nonfinite" and "1 non-finite" in result.error
    else:
        assert isinstance(result, DocRecord) and np.isnan(result.nll[0, 3])  # kept; metrics flag it


def test_auto_batch_size_search_takes_the_largest_that_fits():
    assert largest_fitting(lambda b: b <= 5, cap=64) == 4
    assert largest_fitting(lambda b: b <= 100, cap=12) == 12
    assert largest_fitting(lambda b: False, cap=8) == 1


class _FakeCudaScorer:
    """Looks like a scorer on a CUDA device that holds at most ``capacity`` streams."""

    def __init__(self, capacity: int, context: int = 20):
        self.capacity, self.frames = capacity, []
        self.lm = type("LM", (), {"device": torch.device("cuda"), "context": context})()

    def score(self, codes, chunk_size=64, layout=None):
        self.frames.append(codes.shape[-1])
        if codes.shape[0] > self.capacity:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return torch.zeros(codes.shape, dtype=torch.float32)


def test_auto_batch_size_probes_the_device_with_the_longest_document(monkeypatch):
    monkeypatch.setattr("ttt_bench.evaluation.batching.free_memory", lambda: None)
    docs = synthetic_documents()
    fake = _FakeCudaScorer(capacity=5)
    assert auto_batch_size(fake, docs, chunk_size=8, layout=StreamLayout()) == 4
    assert set(fake.frames) == {20 + 2 * 8}  # context + 2 chunks of the longest (48-frame) document
    assert auto_batch_size(fake, docs[:3], chunk_size=8, layout=StreamLayout()) == 3  # no more than the docs
    assert auto_batch_size(get_model("frozen", preset="tiny"), docs, 8, StreamLayout()) == 1  # CPU: 1


# ----------------------------------------------------------------------------- record store


def _record(doc_id="1001/book/ch01", T=6, seconds=1.5):
    nll = np.arange(8 * T, dtype=np.float32).reshape(8, T)
    nll[1:, -1] = np.nan
    return DocRecord(doc_id, {"speaker": "1001", "duration_s": T / 12.5}, nll, seconds)


def test_store_round_trip_keeps_nll_meta_and_seconds(tmp_path):
    store = RecordStore(tmp_path, "abc")
    record = _record()
    store.save("task", "legacy(frozen)", record)
    done, failed = store.load_done([("task", "legacy(frozen)", record.doc_id, 6)])
    got = done[("task", "legacy(frozen)", record.doc_id)]
    assert got.meta == record.meta and got.seconds == 1.5
    assert np.array_equal(got.nll, record.nll, equal_nan=True) and got.nll.dtype == np.float32
    assert failed == {}
    assert store.load_done([("task", "legacy(frozen)", record.doc_id, 7)])[0] == {}  # other length: redo


def test_store_detects_truncated_records_and_log_lines(tmp_path):
    store = RecordStore(tmp_path, "abc")
    for i in range(3):
        store.save("t", "m", _record(f"doc{i}"))
    damaged = store.record_path("t", "m", "doc0")
    damaged.write_bytes(damaged.read_bytes()[:300])  # a record file cut short
    lines = store.log_path.read_bytes().rstrip(b"\n").split(b"\n")
    store.log_path.write_bytes(b"\n".join(lines[:2]) + b"\n" + lines[2][:25])  # doc2's line cut by a kill
    wanted = [("t", "m", f"doc{i}", 6) for i in range(3)]
    assert set(store.load_done(wanted)[0]) == {("t", "m", "doc1")}
    store.save("t", "m", _record("doc2"))  # appending after a cut line keeps the new line whole
    assert set(store.load_done(wanted)[0]) == {("t", "m", "doc1"), ("t", "m", "doc2")}


def test_a_record_moves_to_a_main_process_without_a_shared_file_system(tmp_path):
    worker, main = RecordStore(tmp_path / "node1", "abc", rank=1), RecordStore(tmp_path / "node0", "abc")
    entry = worker.save("t", "m", _record("d"))
    assert not main.has(main.index(), entry)
    main.import_entry(entry, worker.read_bytes(entry))
    assert main.has(main.index(), entry)
    got = main.load_done([("t", "m", "d", 6)])[0][("t", "m", "d")]
    assert np.array_equal(got.nll, _record("d").nll, equal_nan=True)
    with pytest.raises(ValueError, match="damaged"):
        main.import_entry(entry, b"not the record")


def test_store_ignores_records_of_another_config(tmp_path):
    RecordStore(tmp_path, "old").save("t", "m", _record("d"))
    assert RecordStore(tmp_path, "new").load_done([("t", "m", "d", 6)])[0] == {}


def test_failures_are_recorded_and_a_later_success_wins(tmp_path):
    store = RecordStore(tmp_path, "abc")
    store.save_failure("t", "m", DocFailure("d", 6, "oom", "CUDA out of memory"))
    _, failed = store.load_done([("t", "m", "d", 6)])
    assert failed[("t", "m", "d")].error == "CUDA out of memory"
    store.save("t", "m", _record("d"))
    done, failed = store.load_done([("t", "m", "d", 6)])
    assert ("t", "m", "d") in done and failed == {}


def test_record_names_stay_inside_the_output_directory(tmp_path):
    assert "/" not in safe_name("../../etc/passwd") and ".." not in safe_name("..")
    assert safe_name("a/b") != safe_name("a_b")
    store = RecordStore(tmp_path / "run", "abc")
    path = store.record_path("../../x", "../m", "../../../d")
    assert path.resolve().is_relative_to((tmp_path / "run").resolve())
    with pytest.raises(UnsafePathError):
        store._inside(tmp_path / "elsewhere.npz")


def test_resume_with_a_different_config_is_refused_naming_the_keys(tmp_path):
    old = {"models": ["frozen"], "chunk_size": 64, "task_configs": {"t": {"max_frames": 100}}}
    new = {"models": ["frozen"], "chunk_size": 32, "task_configs": {"t": {"max_frames": 200}}}
    RecordStore(tmp_path, config_hash(old)).write_config(old)
    RecordStore(tmp_path, config_hash(old)).check_config(old)  # same config: fine
    with pytest.raises(ConfigMismatchError) as err:
        RecordStore(tmp_path, config_hash(new)).check_config(new)
    message = str(err.value)
    assert "chunk_size: 64 (interrupted run) != 32 (now)" in message
    assert "task_configs.t.max_frames: 100" in message and "models" not in message


def test_batch_size_and_device_are_not_part_of_the_config_hash():
    class T:
        class config:
            @staticmethod
            def to_dict():
                return {"task": "t", "config_path": "/somewhere/t.yaml"}
    a = hashed_config(RunOptions(["frozen"], ["t"], batch_size=1, device="cpu"), {"t": T})
    b = hashed_config(RunOptions(["frozen"], ["t"], batch_size=8, device="cuda"), {"t": T})
    c = hashed_config(RunOptions(["frozen"], ["t"], seed=1), {"t": T})
    assert config_hash(a) == config_hash(b) != config_hash(c)
    assert "config_path" not in a["task_configs"]["t"]


# ----------------------------------------------------------------------------- signals


def test_a_signal_during_a_write_waits_for_the_write():
    guard = SignalGuard()
    written = []
    with guard.installed(), pytest.raises(Interrupted) as stop:
        with guard.arming():
            with guard.writing():
                os.kill(os.getpid(), signal.SIGTERM)
                written.append("record")  # still runs: the signal is held until the write ends
            written.append("never")
    assert written == ["record"] and stop.value.signum == signal.SIGTERM


def test_a_signal_while_disarmed_is_only_noted():
    guard = SignalGuard()
    before = signal.getsignal(signal.SIGINT)
    with guard.installed():
        os.kill(os.getpid(), signal.SIGINT)
    assert guard.stopped and guard.signum == signal.SIGINT
    assert signal.getsignal(signal.SIGINT) is before  # restored


# ----------------------------------------------------------------------------- whole runs in process


def _spec(out: Path, model: str, **kwargs) -> dict:
    return dict(models=[model], tasks=["synthetic_docs"], model_args={"preset": "tiny"}, chunk_size=8,
                output_path=str(out), command=f"ttt-bench --model {model} --model_args preset=tiny "
                f"--tasks synthetic_docs --output_path {out}", **kwargs)


def test_a_failing_document_is_recorded_and_the_others_still_produce_results(tmp_path):
    results = evaluate_run(**_spec(tmp_path, "frozen_poisonable", batch_size=4))
    assert results["complete"] is True
    metrics = results["results"]["synthetic_docs"]["frozen_poisonable"]
    assert metrics["n_docs"] == len(LENGTHS) - 1
    [failure] = results["failed"]["synthetic_docs"]["frozen_poisonable"]
    assert failure["doc_id"] == "poison" and "RuntimeError: poisoned document" in failure["error"]
    curves = np.load(tmp_path / "curves.npz")
    assert "poison" not in set(curves["synthetic_docs/frozen_poisonable/doc_ids"])


def test_on_error_fail_stops_and_writes_what_was_done(tmp_path):
    with pytest.raises(RunStopped) as stop:
        evaluate_run(**_spec(tmp_path, "frozen_poisonable", batch_size=1, on_error="fail"))
    assert stop.value.exit_code == 1 and "--resume" in stop.value.resume_command
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["complete"] is False
    done = results["results"]["synthetic_docs"]["frozen_poisonable"]["n_docs"]
    assert done == sum(n > LENGTHS["poison"] for n in LENGTHS.values())  # longest first, up to the poison
    assert not (tmp_path / "records" / "STOP").exists()


class _SigtermOnCall:
    """Sends SIGTERM to this process on the n-th call of ``score`` (the loss verification is call 1,
    the causality check calls 2 and 3)."""

    def __init__(self, n: int):
        self.n, self.calls = n, 0

    def __call__(self, original):
        def score(this, codes, chunk_size=64, layout=None):
            self.calls += 1
            if self.calls == self.n:
                os.kill(os.getpid(), signal.SIGTERM)
            return original(this, codes, chunk_size=chunk_size, layout=layout)
        return score


def test_sigterm_stops_with_partial_results_and_resume_completes(tmp_path, monkeypatch):
    reference = evaluate_run(**_spec(tmp_path / "ref", "frozen_slow", batch_size=2))
    hook = _SigtermOnCall(6)  # verifications, two batches, then SIGTERM in the third
    monkeypatch.setattr(runner_fixtures.SlowScorer, "score", hook(runner_fixtures.SlowScorer.score))
    with pytest.raises(RunStopped) as stop:
        evaluate_run(**_spec(tmp_path / "run", "frozen_slow", batch_size=2))
    assert stop.value.exit_code == 143
    partial = json.loads((tmp_path / "run" / "results.json").read_text())
    assert partial["complete"] is False and partial["resume_command"].endswith("--resume")
    assert partial["results"]["synthetic_docs"]["frozen_slow"]["n_docs"] == 4  # two batches of two
    monkeypatch.undo()
    resumed = evaluate_run(**_spec(tmp_path / "run", "frozen_slow", batch_size=2, resume=True))
    assert resumed["complete"] is True
    n_lines = len(RecordStore(tmp_path / "run", resumed["config_hash"]).log_entries())
    assert n_lines == len(LENGTHS)  # every document scored once over both runs
    evaluate_run(**_spec(tmp_path / "run", "frozen_slow", batch_size=2, resume=True))  # a finished run: nothing to do
    assert len(RecordStore(tmp_path / "run", resumed["config_hash"]).log_entries()) == n_lines
    strip = {"seconds", "frames_per_second"}
    for name in ("results", "failed", "skipped"):
        got, want = resumed[name], reference[name]
        if name == "results":
            got = {k: v for k, v in got["synthetic_docs"]["frozen_slow"].items() if k not in strip}
            want = {k: v for k, v in want["synthetic_docs"]["frozen_slow"].items() if k not in strip}
        assert got == want
