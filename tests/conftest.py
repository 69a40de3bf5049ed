import copy
import os
import sys
import tempfile
from pathlib import Path

# Before anything imports huggingface_hub (it reads these once): no network, and a private cache.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="ttt_bench_test_hf_")
os.environ.pop("HF_HUB_CACHE", None)
# moshi compiles a few helpers lazily; on CPU that costs ~17 s per process and nothing else.
os.environ["NO_TORCH_COMPILE"] = "1"

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # test helper modules (moshi_reference, hf_cache)
torch.set_num_threads(min(2, torch.get_num_threads()))


def tiny_lm(context: int = 32, seed: int = 0, **overrides):
    """A tiny random Moshi-shaped LM (float32, CPU) with a short attention context."""
    from moshi.models import loaders

    from ttt_bench.models.loading.moshi import TINY_LM_CONFIG

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


@pytest.fixture(scope="session")
def hf_hub_cache() -> Path:
    """The (private, offline) Hugging Face hub cache the tests' loaders read."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def assert_exactly_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    """Bit-for-bit equal, NaN where the other is NaN (``torch.equal`` is False for any NaN)."""
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@pytest.fixture(scope="module")
def mimi():
    """The tiny preset's Mimi (test modules may override this fixture with their own)."""
    from ttt_bench.models.loading.moshi import ModelSource, load_mimi

    return load_mimi(ModelSource.make(preset="tiny"))


@pytest.fixture
def codec(mimi, tmp_path):
    """A Mimi codec over ``mimi`` with a private code cache, encoding 2 s per call."""
    from ttt_bench.audio.cache import CodeCache
    from ttt_bench.audio.codec import MimiCodec

    return MimiCodec(mimi, cache=CodeCache(tmp_path / "cache"), chunk_frames=25)
