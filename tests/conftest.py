import copy
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # test helper modules (moshi_reference, hf_cache)
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


def tiny_lm(context: int = 32, seed: int = 0, **overrides):
    """A tiny random Moshi-shaped LM (float32, CPU) with a short attention context."""
    from moshi.models import loaders

    from ttt_bench.models.moshi import TINY_LM_CONFIG

    config = {**copy.deepcopy(TINY_LM_CONFIG), "context": context, **overrides}
    torch.manual_seed(seed)
    return loaders.get_moshi_lm(None, lm_kwargs=config, device="cpu", dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def lm32():
    return tiny_lm(context=32)


@pytest.fixture(autouse=True)
def _isolated_caches(tmp_path_factory, monkeypatch):
    """No test reads or writes the user's caches, and none can reach the network."""
    monkeypatch.setenv("TTT_BENCH_CACHE", str(tmp_path_factory.getbasetemp() / "ttt_bench_cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
