"""Shared set-up for the benchmarks: the ~100M-parameter Moshi-shaped benchmark model."""

from __future__ import annotations

import copy
import resource
import time

import torch
from moshi.models import loaders

# dim 512, 8 layers, 8 heads, card 2048, text vocab 32000, depformer 256 wide and 4 deep, context 3000
BENCH_LM_CONFIG = {
    **copy.deepcopy(loaders._lm_kwargs),
    "dim": 512, "num_layers": 8, "num_heads": 8, "card": 2048, "text_card": 32000,
    "depformer_dim": 256, "depformer_num_layers": 4, "depformer_num_heads": 4,
    "depformer_dim_feedforward": int(4.125 * 256), "context": 3000,
}


def bench_lm(context: int = 3000, seed: int = 0, dtype=torch.float32):
    torch.manual_seed(seed)
    config = {**BENCH_LM_CONFIG, "context": context}
    return loaders.get_moshi_lm(None, lm_kwargs=config, device="cpu", dtype=dtype).eval()


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
