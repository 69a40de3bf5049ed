"""Loading Moshi and Mimi through moshi's own loaders, plus the built-in presets.

``pretrained`` is a Hugging Face repo id (resolved through the HF cache, so an offline cache
works with ``HF_HUB_OFFLINE=1``) or a local directory laid out like such a repo
(``config.json``, the LM weights, the Mimi weights). ``preset="tiny"`` builds a Moshi-shaped
model with random weights and a tiny Mimi: a smoke-test model, not a measurement.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from moshi.models import loaders
from moshi.models.compression import MimiModel
from moshi.models.lm import LMModel

logger = logging.getLogger(__name__)

DEFAULT_PRETRAINED = loaders.DEFAULT_REPO  # kyutai/moshiko-pytorch-bf16
NUM_AUDIO_CODEBOOKS = 8
SAMPLE_RATE = loaders.SAMPLE_RATE  # 24 kHz
FRAME_RATE = loaders.FRAME_RATE  # 12.5 Hz
FRAME_SIZE = int(SAMPLE_RATE / FRAME_RATE)  # 1920 samples

# Tiny Mimi: the real hop (1920 samples at 24 kHz, 12.5 Hz) with small channels.
TINY_MIMI_CONFIG: dict[str, Any] = {
    "sample_rate": SAMPLE_RATE,
    "channels": 1,
    "frame_rate": FRAME_RATE,
    "seanet": {**loaders._seanet_kwargs, "dimension": 32, "n_filters": 4},
    "quantizer": {**loaders._quantizer_kwargs, "dimension": 16, "n_q": 8, "bins": 256,
                  "input_dimension": 32, "output_dimension": 32},
    "transformer": {**loaders._transformer_kwargs, "d_model": 32, "num_heads": 2, "num_layers": 1,
                    "dim_feedforward": 64, "input_dimension": 32, "output_dimensions": [32]},
}

# Tiny Moshi: the real 17-stream layout, delays, gating and norms, at toy size.
TINY_LM_CONFIG: dict[str, Any] = {
    **loaders._lm_kwargs,
    "dim": 64,
    "text_card": 64,
    "card": TINY_MIMI_CONFIG["quantizer"]["bins"],
    "num_heads": 4,
    "num_layers": 2,
    "hidden_scale": 2,
    "context": 64,
    "depformer_dim": 32,
    "depformer_dim_feedforward": 64,
    "depformer_num_heads": 2,
    "depformer_num_layers": 1,
}

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {"lm": TINY_LM_CONFIG, "mimi": TINY_MIMI_CONFIG},
}

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


@dataclass(frozen=True)
class ModelSource:
    """Where a Moshi model comes from: exactly one of ``preset`` or ``pretrained``."""

    preset: str | None = None
    pretrained: str | None = None
    seed: int = 0  # random init of presets

    @classmethod
    def make(cls, preset: str | None = None, pretrained: str | None = None, seed: int = 0) -> "ModelSource":
        if preset is not None and pretrained is not None:
            raise ValueError("give either preset= or pretrained=, not both")
        if preset is None and pretrained is None:
            pretrained = DEFAULT_PRETRAINED
        if preset is not None and preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; available: {', '.join(PRESETS)}")
        return cls(preset=preset, pretrained=pretrained, seed=seed)

    @property
    def label(self) -> str:
        return f"preset={self.preset}" if self.preset else f"pretrained={self.pretrained}"


def _require_safetensors(path: Path, what: str) -> None:
    if not loaders._is_safetensors(path):
        raise ValueError(f"{what} {path} is not a .safetensors file; ttt-bench never unpickles weights")


def checkpoint_info(pretrained: str) -> loaders.CheckpointInfo:
    """Resolve ``pretrained`` (HF repo id or local directory) with moshi's CheckpointInfo.

    ttt-bench never reads text, so the text tokenizer is not fetched.
    """
    local = Path(pretrained).expanduser()
    no_tokenizer = Path(os.devnull)
    if local.is_dir():
        config_path = local / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"local Moshi checkpoint {local}: config.json not found (looked for {config_path})")
        config = json.loads(config_path.read_text())
        files = {"moshi_weights": config.get("moshi_name", loaders.MOSHI_NAME),
                 "mimi_weights": config.get("mimi_name", loaders.MIMI_NAME)}
        for key, name in files.items():
            if not (local / name).is_file():
                raise FileNotFoundError(f"local Moshi checkpoint {local}: {key} file {name} not found (looked for {local / name})")
        mimi_config = config.get("mimi_config_name")
        if mimi_config is not None and not (local / mimi_config).is_file():
            raise FileNotFoundError(f"local Moshi checkpoint {local}: mimi_config_name file {mimi_config} not found")
        return loaders.CheckpointInfo.from_hf_repo(
            str(local), moshi_weights=local / files["moshi_weights"], mimi_weights=local / files["mimi_weights"],
            tokenizer=no_tokenizer, config_path=config_path,
            mimi_config_path=local / mimi_config if mimi_config else None)
    try:
        return loaders.CheckpointInfo.from_hf_repo(pretrained, tokenizer=no_tokenizer)
    except Exception as exc:  # huggingface_hub raises several types for missing files / offline
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        hint = (" HF_HUB_OFFLINE is set: the files must already be in the HF cache "
                f"({os.environ.get('HF_HUB_CACHE') or os.environ.get('HF_HOME') or '~/.cache/huggingface'})."
                if offline else "")
        raise FileNotFoundError(f"could not load Moshi checkpoint {pretrained!r}: {exc}.{hint}") from exc


def load_lm(source: ModelSource, device: str | torch.device = "cpu",
            dtype: str | torch.dtype | None = None) -> LMModel:
    """Build the Moshi LM of ``source`` in eval mode."""
    dtype = resolve_dtype(dtype)
    if source.preset:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(source.seed)
            lm = loaders.get_moshi_lm(None, lm_kwargs=copy.deepcopy(PRESETS[source.preset]["lm"]),
                                      device=device, dtype=dtype)
        return lm.eval()
    info = checkpoint_info(source.pretrained)
    _require_safetensors(info.moshi_weights, "Moshi weights")
    return info.get_moshi(device=device, dtype=dtype).eval()


def load_mimi(source: ModelSource, device: str | torch.device = "cpu") -> MimiModel:
    """Build the Mimi codec that belongs with ``source``'s LM (8 codebooks)."""
    if source.preset:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(source.seed + 1)
            mimi = loaders.get_mimi(None, copy.deepcopy(PRESETS[source.preset]["mimi"]), device=device,
                                    num_codebooks=NUM_AUDIO_CODEBOOKS)
            _randomize_codebooks(mimi)
        return mimi.eval()
    info = checkpoint_info(source.pretrained)
    _require_safetensors(info.mimi_weights, "Mimi weights")
    return info.get_mimi(device=device).eval()


def _randomize_codebooks(mimi: MimiModel) -> None:
    """Give an untrained Mimi random codebooks (moshi initialises them to zeros, which maps
    every frame to code 0 and would make the tiny preset's streams constant)."""
    from moshi.quantization.core_vq import EuclideanCodebook

    for codebook in mimi.modules():
        if isinstance(codebook, EuclideanCodebook):
            codebook.embedding_sum.data.normal_(0.0, 0.02)
            codebook.cluster_usage.data.fill_(1.0)
            codebook._initialized.data.fill_(1.0)
            codebook._embedding = None


def module_hash(module: torch.nn.Module, extra: str = "") -> str:
    """A short content hash of a module's weights (and ``extra`` settings)."""
    digest = hashlib.sha256(extra.encode())
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]
