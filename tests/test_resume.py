"""Interrupt a real ttt-bench process part-way (SIGINT, and separately SIGKILL), then --resume:
the final results equal an uninterrupted run, no finished document is scored again, and records
damaged by the kill are detected and redone (docs/design.md invariant 6)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from moshi.utils.compile import no_compile

from runner_fixtures import LENGTHS, SCRIPT, assert_same_results, log_lines, subprocess_env
from ttt_bench.evaluation.records import RecordStore
from evaluate_helper import evaluate_run

ARGS = ["--model", "frozen_slow", "--model_args", "preset=tiny", "--tasks", "synthetic_docs",
        "--chunk_size", "8", "--batch_size", "1"]
SLEEP = "0.5"  # seconds per scoring call: the run takes ~4 s, long enough to interrupt part-way


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run (in this process, eager like the subprocesses)."""
    out = tmp_path_factory.mktemp("reference")
    with no_compile():
        evaluate_run(["frozen_slow"], ["synthetic_docs"], model_args={"preset": "tiny"},
                     chunk_size=8, batch_size=1, output_path=str(out))
    return out


def start(out: Path, *extra: str, sleep: str = SLEEP) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(SCRIPT), *ARGS, "--output_path", str(out), *extra],
                            env=subprocess_env(TTT_BENCH_TEST_SLEEP=sleep), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for_records(out: Path, proc: subprocess.Popen, n: int, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while len(log_lines(out)) < n:
        assert proc.poll() is None, f"run ended before {n} documents were done:\n{proc.stderr.read()}"
        assert time.monotonic() < deadline, "timed out waiting for the first documents"
        time.sleep(0.05)


def resume(out: Path) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, str(SCRIPT), *ARGS, "--output_path", str(out), "--resume"],
                          env=subprocess_env(TTT_BENCH_TEST_SLEEP="0"), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_sigint_then_resume_equals_an_uninterrupted_run(tmp_path, reference):
    out = tmp_path / "run"
    proc = start(out)
    wait_for_records(out, proc, 2)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-3000:]
    partial = json.loads((out / "results.json").read_text())
    assert partial["complete"] is False
    assert f"--output_path {out}" in stderr and "--resume" in stderr  # the resume command is printed
    before = {line["doc_id"] for line in log_lines(out)}
    assert 2 <= len(before) < len(LENGTHS)
    assert partial["results"]["synthetic_docs"]["frozen_slow"]["n_docs"] == len(before)

    n_before = len(log_lines(out))
    resume(out)
    after = [line["doc_id"] for line in log_lines(out)[n_before:]]
    assert not set(after) & before  # nothing finished before the interrupt is scored again
    assert sorted(after) == sorted(set(LENGTHS) - before)  # and every other document exactly once
    assert_same_results(out, reference)


def test_sigkill_then_resume_redoes_damaged_records(tmp_path, reference):
    out = tmp_path / "run"
    proc = start(out)
    wait_for_records(out, proc, 4)
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "results.json").exists()

    lines = log_lines(out)
    intact, cut_line, cut_file = lines[1:-1], lines[-1], lines[0]
    log = out / "records" / "log.rank0.jsonl"
    raw = log.read_bytes().rstrip(b"\n")
    log.write_bytes(raw[:len(raw) - 40])  # the last line cut short, as a kill mid-write would leave it
    record = out / "records" / cut_file["file"]
    record.write_bytes(record.read_bytes()[:200])  # and a record file cut short
    (record.parent / ".stray.npz.123.tmp").write_bytes(b"partial")  # an unfinished atomic write

    n_before = len(log_lines(out))
    resume(out)
    redone = [line["doc_id"] for line in log_lines(out)[n_before:]]
    assert cut_line["doc_id"] in redone and cut_file["doc_id"] in redone  # detected and redone
    assert not set(redone) & {line["doc_id"] for line in intact}  # intact records are kept
    assert sorted(redone) == sorted(set(LENGTHS) - {line["doc_id"] for line in intact})
    assert_same_results(out, reference)
    chash = json.loads((out / "records" / "run.json").read_text())["config_hash"]
    store = RecordStore(out, chash)
    done, _ = store.load_done([("synthetic_docs", "frozen_slow", d, n) for d, n in LENGTHS.items()])
    assert len(done) == len(LENGTHS)
