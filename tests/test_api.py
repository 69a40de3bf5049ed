"""``simple_evaluate`` on a model in memory: the CLI's numbers, the model and the random number
generators left exactly as found (docs/design.md invariant 10), nothing written without
``output_path``, and inside a 2-process gloo ``torch.distributed`` job."""

from __future__ import annotations

import importlib
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from hf_cache import write_tiny_checkpoint_files
from runner_fixtures import REPO, _assert_close, subprocess_env
import ttt_bench
from ttt_bench import api, simple_evaluate
from ttt_bench.cli import main
from ttt_bench.models.loading.moshi import ModelSource, load_lm

TASK = "librilight_sample"
TASK_ARGS = {"max_frames": 90}
LIMIT = 2


def trained_tiny_lm(seed: int = 5) -> torch.nn.Module:
    """The tiny preset's LM, moved off its random init the way a training step would, and left in
    a mixed state a training loop might have: training mode, a frozen embedding."""
    lm = load_lm(ModelSource.make(preset="tiny", seed=seed))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lm.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 1e-2)
    lm.train()
    lm.transformer.layers[0].eval()
    lm.text_emb.weight.requires_grad_(False)
    return lm


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    """The in-memory LM and the same weights saved as a local Moshi checkpoint (with its Mimi)."""
    lm = trained_tiny_lm()
    directory = write_tiny_checkpoint_files(tmp_path_factory.mktemp("ckpt") / "tiny", seed=5)
    save_file({k: v.detach().contiguous().clone() for k, v in lm.state_dict().items()},
              str(directory / "model.safetensors"))
    return lm, directory


def snapshot(lm: torch.nn.Module) -> dict:
    return {"params": {k: v.detach().clone() for k, v in lm.state_dict().items()},
            "modes": {n: m.training for n, m in lm.named_modules()},
            "grads": {n: p.requires_grad for n, p in lm.named_parameters()},
            "torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def assert_unchanged(lm: torch.nn.Module, before: dict) -> None:
    after = snapshot(lm)
    assert after["params"].keys() == before["params"].keys()
    for name, value in before["params"].items():
        assert torch.equal(after["params"][name], value), f"{name} changed"
    assert after["modes"] == before["modes"]
    assert after["grads"] == before["grads"]
    assert torch.equal(after["torch"], before["torch"])
    assert after["numpy"][0] == before["numpy"][0] and np.array_equal(after["numpy"][1], before["numpy"][1]) \
        and after["numpy"][2:] == before["numpy"][2:]
    assert after["python"] == before["python"]
    streaming = [n for n, m in lm.named_modules() if getattr(m, "_streaming_state", None) is not None]
    assert not streaming


def evaluate_in_memory(lm, directory: Path, **kwargs) -> dict:
    return simple_evaluate(model={"frozen": lm}, model_args={"hf_repo": str(directory)}, tasks=[TASK],
                           task_args=TASK_ARGS, limit=LIMIT, chunk_size=16, **kwargs)


def test_in_memory_model_gives_the_cli_metrics_and_is_left_as_found(checkpoint, tmp_path, monkeypatch):
    lm, directory = checkpoint
    torch.manual_seed(123)
    np.random.seed(7)
    random.seed(11)
    torch.rand(3)  # RNG states somewhere a training loop might have left them
    before = snapshot(lm)
    # torch imports torch._dynamo lazily, and that import writes a module template into the temp
    # dir: torch's file, not ttt-bench's, so it is imported before the temp dir is watched
    importlib.import_module("torch._dynamo")
    monkeypatch.chdir(tmp_path)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(scratch))

    first = evaluate_in_memory(lm, directory)
    assert_unchanged(lm, before)
    [codec] = [c for c in api._CODECS.values() if str(directory) in c.label]
    encoded = codec.n_encoded
    second = evaluate_in_memory(lm, directory)
    assert codec.n_encoded == encoded  # the second call found every recording in the code cache
    assert_unchanged(lm, before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tmp"], list(tmp_path.iterdir())
    assert not any(scratch.iterdir()), list(scratch.rglob("*"))  # nothing written
    assert first["config"]["output_path"] is None
    _assert_close(second["results"], first["results"], 0.0, "second call")

    out = tmp_path / "cli"
    assert main(["--model", "frozen", "--model_args", f"pretrained={directory}", "--tasks", TASK, "--task_args",
                 "max_frames=90", "--limit", str(LIMIT), "--chunk_size", "16", "--output_path", str(out)]) == 0
    cli = json.loads((out / "results.json").read_text())
    _assert_close(first["results"], cli["results"], 1e-6, "simple_evaluate vs CLI")
    assert first["tasks"][TASK]["data"] == cli["tasks"][TASK]["data"]
    assert first["versions"] == cli["versions"] == {TASK: 1}
    assert first["ttt_bench_version"] == cli["ttt_bench_version"] == ttt_bench.__version__


def test_output_path_writes_the_run_and_the_string_model_args_work(checkpoint, tmp_path):
    lm, directory = checkpoint
    results = simple_evaluate(model=lm, model_args=f"hf_repo={directory}", tasks=TASK, task_args=TASK_ARGS,
                              limit=1, output_path=tmp_path / "run")
    written = json.loads((tmp_path / "run" / "results.json").read_text())
    assert written["results"] == results["results"] and set(results["results"][TASK]) == {"model"}
    assert (tmp_path / "run" / "loss_vs_position.png").stat().st_size > 0


def test_an_lm_is_never_moved_or_cast(checkpoint):
    lm, directory = checkpoint
    with pytest.raises(ValueError, match="float32, not dtype='bfloat16'.*cast it yourself"):
        evaluate_in_memory(lm, directory, dtype="bfloat16")
    assert next(lm.parameters()).dtype == torch.float32


# ----------------------------------------------------------------------------- torch.distributed


WORKER = r"""
import json, sys, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[5])
from test_api import trained_tiny_lm, TASK, TASK_ARGS
from ttt_bench import simple_evaluate
rank, world, store, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
lm = trained_tiny_lm()
result = simple_evaluate(lm, "preset=tiny", [TASK], task_args=TASK_ARGS, limit=3, chunk_size=16)
assert dist.is_initialized(), "the caller's process group was torn down"
alone = simple_evaluate(lm, "preset=tiny", [TASK], task_args=TASK_ARGS, limit=1, chunk_size=16, distributed=False)
total = torch.tensor([1.0])
dist.all_reduce(total)  # the group still works after the call
with open(f"{out}/rank{rank}.json", "w") as fh:
    json.dump({"rank": rank, "result": result, "ranks": total.item(), "alone": alone["num_processes"]}, fh)
dist.destroy_process_group()
"""


def test_every_rank_of_a_gloo_job_calls_it_and_rank0_gets_the_one_process_result(tmp_path):
    store = str(tmp_path / "rendezvous")  # a file store: no TCP port another process could take first
    tests = str(Path(__file__).parent)
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(rank), "2", store, str(tmp_path), tests],
                              cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for rank in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-4000:]
    got = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert got[1]["result"] is None and got[0]["ranks"] == got[1]["ranks"] == 2.0
    assert got[0]["alone"] == got[1]["alone"] == 1  # distributed=False: each rank on its own
    two = got[0]["result"]
    assert two["num_processes"] == 2

    one = simple_evaluate(trained_tiny_lm(), "preset=tiny", [TASK], task_args=TASK_ARGS, limit=3,
                          chunk_size=16)
    assert one["num_processes"] == 1 and two["results"][TASK]["model"]["n_docs"] == 3
    _assert_close(two["results"], one["results"], 1e-6, "2 ranks vs 1")
    assert two["tasks"][TASK]["data"] == one["tasks"][TASK]["data"]
