"""The prepared GPU check runs here: benchmarks/gpu_check.py on tiny shapes on the CPU writes every
field of its report (the CUDA-only ones marked as not measured), keeps to its time budget and
says what it skipped; benchmarks/gpu/run.sh runs it; benchmarks/gpu/prepare.sh writes nothing
outside its folder."""

import importlib.util
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
GPU = ROOT / "benchmarks" / "gpu"
SECTIONS = ["setup", "verification", "causality", "adapters", "rng", "speed", "batch", "adapter_speed", "mimi",
            "long_document"]
FIELDS = {  # section -> the fields its report must carry
    "setup": ["device", "dtype", "params_billion", "context", "gflop_per_frame", "matmul_tflops", "heads", "compile",
              "probe"],
    "verification": ["frames", "chunks", "nll", "passed"],
    "causality": ["perturbed_from", "max_abs_change_before", "max_abs_change_after", "tolerance", "passed"],
    "adapters": ["variants", "dyneval lr=0 is frozen", "passed"],
    "rng": ["cuda_rng_unchanged", "cpu_rng_unchanged", "weights_unchanged", "verification", "causality", "passed"],
    "speed": ["chunks", "best_chunk", "frames_per_s", "seconds_33_min_recording", "peak_gib"],
    "batch": ["largest_batch", "frames_per_s", "tflops", "pct_of_matmul", "peak_gib", "seconds_per_33_min_recording"],
    "adapter_speed": ["ttt-linear", "ttt-mlp", "dyneval all"],
    "mimi": ["x_real_time"],
    "long_document": ["batch", "peak_gib", "frames_per_s"],
}
CUDA_ONLY = [("rng", "cuda_rng_unchanged"), ("speed", "peak_gib"), ("batch", "largest_batch"),
             ("batch", "peak_gib"), ("long_document", "peak_gib")]
VARIANTS = ["ttt-linear", "ttt-mlp", "fork causal=true", "fork causal=false"]


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("benchmark_gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def quick_report(gpu_check, tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    code = gpu_check.main(["--device", "cpu", "--quick", "--out", str(out)])
    assert torch.is_grad_enabled(), "gpu_check must not leave autograd switched off"
    return code, json.loads((out / "gpu_check.json").read_text()), (out / "gpu_check.md").read_text()


def test_quick_run_passes_and_writes_every_field(quick_report, gpu_check):
    code, report, md = quick_report
    assert code == 0 and report["checks_passed"] and not report["failed_checks"] and not report["skipped"]
    assert list(report["sections"]) == SECTIONS
    for name, fields in FIELDS.items():
        section = report["sections"][name]
        assert section["status"] == "done", (name, section.get("error"))
        missing = [f for f in fields if f not in section]
        assert not missing, (name, missing)
    for name, key in CUDA_ONLY:
        assert report["sections"][name][key] == gpu_check.NOT_MEASURED
    verification = report["sections"]["verification"]
    for entry in verification["chunks"].values():
        assert entry["decision"]["criterion"] == "robust" and entry["decision"]["passed"]
        assert all(v["caught"] for v in entry["injected"].values())
        assert {"max_abs", "mean_abs", "p99_abs", "p99.9_abs"} <= set(entry["differences"])
    assert "legacy pass, window 2 chunks" in next(iter(verification["chunks"].values()))["injected"]
    assert sorted(report["sections"]["adapters"]["variants"]) == sorted(VARIANTS)
    assert report["sections"]["rng"]["cpu_rng_unchanged"] is True
    assert report["meta"]["versions"]["moshi"] != "not installed"
    for row in ("verification, ", "causality, cut at", "fork causal=false", "dyneval lr=0 == frozen",
                "frames/s, one recording (batch 1)", "a 33-minute recording", "Mimi encoding", "--batch_size auto"):
        assert row in md, row


def sleeper(ctx):
    """A section that would run far past any budget."""
    time.sleep(120)
    return {}


def test_a_small_budget_stops_early_and_says_what_it_skipped(gpu_check, tmp_path, monkeypatch):
    """--budget 20 with Python started 14 s ago leaves 6 s: the real sections run while their
    estimates fit, and the last one (made to outlast any budget, so that the run cannot fit
    however fast the machine) is skipped by its estimate or stopped when the budget ends; every
    section not done is listed with its reason, and the run ends within the budget."""
    monkeypatch.setattr(gpu_check, "START", time.monotonic() - 14)
    monkeypatch.setattr(gpu_check, "long_document", sleeper)
    code = gpu_check.main(["--device", "cpu", "--quick", "--budget", "20", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert code == 0 and report["budget_s"] == 20 and report["checks_passed"]
    assert report["elapsed_s"] < 20 + 3, "the budget must bound the run"
    skipped = {item["section"]: item["reason"] for item in report["skipped"]}
    assert "long_document" in skipped and all(skipped.values())
    assert list(report["sections"]) == SECTIONS
    for name, section in report["sections"].items():
        assert section["status"] in ("done", "skipped", "stopped"), (name, section)
        assert (section["status"] != "done") == (name in skipped), name
    md = (tmp_path / "gpu_check.md").read_text()
    assert f"| long_document | not run: {skipped['long_document']} |" in md


def test_a_section_running_when_the_budget_ends_is_stopped_and_the_rest_skipped(gpu_check, tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "START", time.monotonic() - 17)
    monkeypatch.setattr(gpu_check, "setup", sleeper)
    begin = time.monotonic()
    code = gpu_check.main(["--device", "cpu", "--quick", "--budget", "20", "--out", str(tmp_path)])
    assert time.monotonic() - begin < 3 + 3
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert code == 0 and report["sections"]["setup"]["status"] == "stopped"
    assert report["sections"]["setup"]["reason"].startswith("the budget of 20 s ended after")
    assert [item["section"] for item in report["skipped"]] == SECTIONS
    assert all(item["reason"] == "the budget ended" for item in report["skipped"][1:])
    assert torch.is_grad_enabled()


def test_a_section_whose_estimate_overruns_the_budget_is_skipped_unrun(gpu_check, monkeypatch):
    monkeypatch.setattr(gpu_check, "START", time.monotonic())
    ctx = SimpleNamespace(args=SimpleNamespace(budget=20.0), device=torch.device("cpu"))
    report = {"sections": {}, "skipped": []}

    def must_not_run(ctx):
        raise AssertionError("a section over the budget ran")

    assert gpu_check.run_section(ctx, report, "speed", must_not_run, 100.0, False)
    entry = report["sections"]["speed"]
    assert entry["status"] == "skipped" and entry["reason"].startswith("estimated 100 s, ")
    assert report["skipped"] == [{"section": "speed", "reason": entry["reason"]}]


def test_run_sh_runs_gpu_check_here(tmp_path):
    """run.sh against this Python (which imports moshi, so nothing is installed), the output
    under $OUT as on the device, extra arguments passed through."""
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "GPU_CHECK_SITE": str(tmp_path / "site")}
    proc = subprocess.run(["bash", str(GPU / "run.sh"), "--device", "cpu", "--quick", "--sections", "causality",
                           "--budget", "20"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.log", "gpu_check.md"]
    report = json.loads((out / "gpu_check.json").read_text())
    assert list(report["sections"]) == ["setup", "causality"] and report["elapsed_s"] < 20 + 3
    if report["sections"]["setup"]["status"] == "done":  # unless a loaded machine spent the budget on it
        assert report["sections"]["causality"]["status"] == "done" and report["checks_passed"]
    assert "--sections causality --budget 20" in report["meta"]["command"]
    assert "gpu_check on CPU" in (out / "gpu_check.log").read_text()
    assert not (tmp_path / "site").exists(), "nothing is installed when this Python has the packages"


def fake_wheel(folder: Path, filename: str) -> None:
    """A minimal valid wheel named ``filename`` (name, version and tags from the name)."""
    name, version = filename.split("-")[:2]
    info = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(folder / filename, "w") as whl:
        whl.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        whl.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        whl.writestr(f"{info}/RECORD", "")


PINNED = ["moshi-0.2.13-py3-none-any.whl", "soundfile-0.14.0-py2.py3-none-manylinux_2_28_x86_64.whl",
          "soxr-1.1.0-cp312-abi3-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl",
          "cffi-2.1.1-cp312-cp312-manylinux2014_x86_64.manylinux_2_17_x86_64.whl", "pycparser-3.12-py3-none-any.whl"]


def git_status() -> str:
    return subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--ignored", "--untracked-files=all"],
                          capture_output=True, text=True, check=True).stdout


def test_prepare_sh_writes_only_into_its_folder(tmp_path):
    """Offline (--find-links, the pinned versions as minimal wheels, a stale one among them): the
    destination ends up with exactly the pinned wheels, and nothing else appears anywhere: not in
    the repository, the home folder or the temporary folder."""
    links = tmp_path / "links"
    links.mkdir()
    for filename in PINNED + ["moshi-0.2.12-py3-none-any.whl"]:
        fake_wheel(links, filename)
    home, tmp, dest = tmp_path / "home", tmp_path / "tmp", tmp_path / "dest"
    home.mkdir()
    tmp.mkdir()
    (dest).mkdir()
    fake_wheel(dest, "moshi-0.2.12-py3-none-any.whl")  # a stale download of another version
    before = git_status()
    env = {**os.environ, "HOME": str(home), "TMPDIR": str(tmp), "PYTHON": sys.executable}
    for flag in ("--dry-run", None):
        args = ["bash", str(GPU / "prepare.sh"), "--find-links", str(links), "--dest", str(dest)]
        proc = subprocess.run(args + ([flag] if flag else []), env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        if flag:
            assert "would run:" in proc.stdout and "moshi==0.2.13" in proc.stdout
            assert [p.name for p in dest.iterdir()] == ["moshi-0.2.12-py3-none-any.whl"]
    assert sorted(p.name for p in dest.iterdir()) == sorted(PINNED)
    assert "5 wheels" in proc.stdout
    assert not list(home.iterdir()) and not list(tmp.iterdir())
    assert git_status() == before
