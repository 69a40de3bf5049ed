"""Shared set-up for the benchmarks: the benchmark models and round-robin timing.

Timing on a shared machine: every case runs once per round, rounds repeat, and a ratio is the
median over rounds of the ratio measured within one round. A burst of load from another process
then slows the cases of that round alike, and the median drops the rounds it hit unevenly.
"""

from __future__ import annotations

import copy
import os
import platform
import resource
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from moshi.models import loaders

from ttt_bench.models.base import StreamLayout
from ttt_bench.models.loading.moshi import TINY_LM_CONFIG
from ttt_bench.models.streaming import forward_nll

# dim 512, 8 layers, 8 heads, card 2048, text vocab 32000, depformer 256 wide and 4 deep, context 3000
BENCH_LM_CONFIG = {
    **copy.deepcopy(loaders._lm_kwargs),
    "dim": 512, "num_layers": 8, "num_heads": 8, "card": 2048, "text_card": 32000,
    "depformer_dim": 256, "depformer_num_layers": 4, "depformer_num_heads": 4,
    "depformer_dim_feedforward": int(4.125 * 256), "context": 3000,
}
QUICK_CONTEXT = 24  # the tiny preset's shape, with a context that a short --quick stream passes


def bench_lm(context: int | None = None, seed: int = 0, dtype=torch.float32, quick: bool = False,
             device: str | torch.device = "cpu"):
    """The ~100M-parameter benchmark model, or with ``quick`` the tiny preset's shape."""
    torch.manual_seed(seed)
    base = TINY_LM_CONFIG if quick else BENCH_LM_CONFIG
    config = {**copy.deepcopy(base), "context": context or (QUICK_CONTEXT if quick else base["context"])}
    return loaders.get_moshi_lm(None, lm_kwargs=config, device=device, dtype=dtype).eval()


TRAINED_NLL_STD = 2.5  # nats: the per-position spread of a trained Moshi's NLL (2-4 nats)


def scale_output_heads(lm, codes: torch.Tensor, nll_std: float = TRAINED_NLL_STD, rounds: int = 4) -> dict:
    """Scale the audio output heads (``lm.linears``, the depformer's projections to the codebooks)
    of a random-weight ``lm`` in place until the NLL of ``codes`` [B, 8, T] varies from position to
    position with a standard deviation of ``nll_std`` nats, as a trained model's does.

    Random heads give logits of about +-0.5: every NLL sits near ln(card) with almost no spread,
    so rounding in bfloat16 is far smaller than in a trained model, and a loss taken from the
    wrong frame changes little. Scaled heads give logits of a trained model's size (a few units,
    the largest near 10) and an NLL that differs by nats from one position to the next. Its mean
    stays above ln(card): random weights cannot predict random codes. Returns the NLL's
    statistics after scaling and the factor applied."""
    factor = 1.0
    with torch.no_grad():
        for _ in range(rounds):
            nll = forward_nll(lm, codes.to(lm.device), StreamLayout()).float()
            std = float(nll[~nll.isnan()].std())
            step = nll_std / std
            for head in lm.linears:
                head.weight.mul_(step)
            factor *= step
        nll = forward_nll(lm, codes.to(lm.device), StreamLayout()).float()
        values = nll[~nll.isnan()]
    return {"factor": factor, "nll_mean": float(values.mean()), "nll_std": float(values.std()),
            "nll_min": float(values.min()), "nll_max": float(values.max())}


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass
class Case:
    """One timed thing: ``run()`` processes ``work`` units (frames, seconds of audio)."""

    run: Callable[[], object]
    work: float = 1.0


def round_robin(cases: dict[str, Case], repeats: int,
                clock: Callable[[Callable[[], object]], float] | None = None) -> dict[str, list[float]]:
    """Speed (work per second) of every case in every round; a round runs each case once."""
    clock = clock or (lambda run: timed(run)[1])
    speeds: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, case in cases.items():
            speeds[name].append(case.work / clock(case.run))
    return speeds


def median_speed(speeds: dict[str, list[float]], name: str) -> float:
    return statistics.median(speeds[name])


def paired_ratio(speeds: dict[str, list[float]], num: str, den: str) -> tuple[float, float, float]:
    """Median, min and max over rounds of speed[num] / speed[den] taken in the same round."""
    ratios = [a / b for a, b in zip(speeds[num], speeds[den])]
    return statistics.median(ratios), min(ratios), max(ratios)


def format_ratio(ratio: tuple[float, float, float], digits: int = 2) -> str:
    median, low, high = ratio
    return f"{median:.{digits}f}x (rounds: {low:.{digits}f}-{high:.{digits}f})"


def machine_line() -> str:
    """What a result line needs to be compared: commit, torch, CPU, threads, load."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    load = "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"commit {commit}, torch {torch.__version__}, {cpu_name()} ({os.cpu_count()} cores), "
            f"{torch.get_num_threads()} threads, {load}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
