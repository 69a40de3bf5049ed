"""``accelerate launch`` with 2 CPU processes (gloo) on the packaged sample with the tiny preset:
the same metrics and curves as one process, every document scored exactly once, and a resume
may use a different number of processes (docs/design.md invariant 4).

On a machine without GPUs, ``accelerate launch --multi_gpu --num_processes 2`` starts 2 CPU
processes over gloo (``--cpu --num_processes 2`` starts only one, without an MPI hostfile).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from moshi.utils.compile import no_compile

from runner_fixtures import LENGTHS, REPO, SCRIPT, assert_same_results, log_lines, subprocess_env
from evaluate_helper import evaluate_run

TASK = "librilight_sample"
ARGS = ["--model", "frozen", "--model_args", "preset=tiny", "--tasks", TASK, "--task_args", "max_frames=160",
        "--limit", "3", "--batch_size", "2", "--chunk_size", "32"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(out: Path, *extra: str, processes: int = 2) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), "-m", "ttt_bench", *ARGS, "--output_path", str(out), *extra]
    done = subprocess.run(command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    """The single-process run (in this process, eager like the launched ones)."""
    out = tmp_path_factory.mktemp("one_process")
    with no_compile():
        evaluate_run(models=["frozen"], tasks=[TASK], model_args={"preset": "tiny"},
                         task_overrides={"max_frames": 160}, limit=3, batch_size=2, chunk_size=32,
                         output_path=str(out))
    return out


def doc_ids(run_dir: Path) -> list[str]:
    return json.loads((run_dir / "results.json").read_text())["tasks"][TASK]["data"]["doc_ids"]


def test_two_processes_give_the_single_process_results(tmp_path, one_process):
    out = tmp_path / "two"
    done = launch(out)
    assert done.stdout.splitlines().count("librilight_sample") == 1  # the table's title: the main process only
    results = json.loads((out / "results.json").read_text())
    assert results["num_processes"] == 2 and results["complete"] is True
    by_rank = {path.name: len(path.read_text().splitlines())
               for path in sorted((out / "records").glob("log.rank*.jsonl"))}
    assert set(by_rank) == {"log.rank0.jsonl", "log.rank1.jsonl"} and all(by_rank.values())
    scored = [line["doc_id"] for line in log_lines(out)]
    assert sorted(scored) == sorted(doc_ids(one_process)) and len(doc_ids(one_process)) == 3  # each once
    assert_same_results(out, one_process)


def test_resume_with_another_number_of_processes(tmp_path, one_process):
    """A single-process run stopped after one document, finished by two processes."""
    out = tmp_path / "resumed"
    shutil.copytree(one_process, out)
    (out / "results.json").unlink()
    log = out / "records" / "log.rank0.jsonl"
    first, *rest = log.read_text().splitlines()
    log.write_text(first + "\n")  # as if the run had stopped after its first document
    launch(out, "--resume")
    new = [line["doc_id"] for line in log_lines(out)][1:]
    assert sorted(new) == sorted(json.loads(line)["doc_id"] for line in rest)  # the two others, once each
    assert json.loads(first)["doc_id"] not in new
    assert_same_results(out, one_process)


def test_ctrl_c_stops_every_process_and_one_process_resumes(tmp_path):
    """Ctrl-C reaches the launcher and both workers (one process group): each finishes its
    write, the main process writes partial results, and a single process completes the run."""
    out, reference = tmp_path / "run", tmp_path / "reference"
    args = ["--model", "frozen_slow", "--model_args", "preset=tiny", "--tasks", "synthetic_docs", "--chunk_size", "8"]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), str(SCRIPT), *args, "--output_path", str(out)]
    proc = subprocess.Popen(command, env=subprocess_env(TTT_BENCH_TEST_SLEEP="1.0"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 300
    while len(log_lines(out)) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:] if proc.poll() else ""
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "--resume" in stderr
    partial = json.loads((out / "results.json").read_text())
    before = {line["doc_id"] for line in log_lines(out)}
    assert partial["complete"] is False and 2 <= len(before) < len(LENGTHS)

    spec = dict(models=["frozen_slow"], tasks=["synthetic_docs"], model_args={"preset": "tiny"}, chunk_size=8)
    with no_compile():
        evaluate_run(**spec, output_path=str(reference))
        evaluate_run(**spec, output_path=str(out), resume=True)
    scored = [line["doc_id"] for line in log_lines(out)]
    assert sorted(scored) == sorted(LENGTHS)  # every document exactly once over both runs
    assert_same_results(out, reference)


def test_a_failed_verification_stops_every_process(tmp_path):
    """Verification runs on the main process only; the others must stop too, not wait forever."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), str(SCRIPT), *ARGS, "--model", "separate_pass",
               "--output_path", str(tmp_path / "out")]
    done = subprocess.run(command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert done.stderr.count("differs from LMModel.forward") >= 2  # both processes say why
    assert not (tmp_path / "out" / "records").exists()
