"""Loading Moshi and Mimi through moshi's own loaders, plus the built-in presets.

Checkpoints are named with moshi's own loading arguments and found by ``checkpoints.py``
(Hub repo ids through the HF cache, so an offline cache works with ``HF_HUB_OFFLINE=1``; local
folders; moshi-finetune LoRA and full checkpoints). ``preset="tiny"`` builds a Moshi-shaped
model with random weights and a tiny Mimi: a smoke-test model, not a measurement.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Any

import torch
from moshi.models import loaders
from moshi.models.compression import MimiModel
from moshi.models.lm import LMModel

from ttt_bench.constants import FRAME_RATE, FRAME_SIZE, N_CODEBOOKS as NUM_AUDIO_CODEBOOKS, SAMPLE_RATE
from ttt_bench.models.loading.checkpoints import CheckpointError, LoadArgs, ResolvedCheckpoint, resolve_checkpoint

logger = logging.getLogger(__name__)

DEFAULT_PRETRAINED = loaders.DEFAULT_REPO  # kyutai/moshiko-pytorch-bf16

# Tiny Mimi: the real hop (1920 samples at 24 kHz, 12.5 Hz) with small channels.
TINY_MIMI_CONFIG: dict[str, Any] = {
    "sample_rate": SAMPLE_RATE,
    "channels": 1,
    "frame_rate": FRAME_RATE,
    "seanet": {**loaders._seanet_kwargs, "dimension": 32, "n_filters": 4},
    "quantizer": {**loaders._quantizer_kwargs, "dimension": 16, "n_q": NUM_AUDIO_CODEBOOKS, "bins": 256,
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

# Where a model's weights (and so its Mimi codec) come from, beside its adapter's own options.
LOAD_ARG_NAMES = ("preset", "pretrained", *LoadArgs.names())

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
    """Where a Moshi model comes from: a built-in ``preset``, or a checkpoint found on disk or on
    the Hub (``checkpoint``, from moshi's loading arguments, see ``checkpoints.LoadArgs``)."""

    preset: str | None = None
    seed: int = 0  # random init of presets
    checkpoint: ResolvedCheckpoint | None = None

    @classmethod
    def make(cls, preset: str | None = None, pretrained: str | None = None, seed: int = 0,
             **load_args: Any) -> "ModelSource":
        """``preset=``, or moshi's loading arguments (``hf_repo``, ``moshi_weight``, ``mimi_weight``,
        ``lora_weight``, ``config_path``, ``fuse_lora``, ``checkpoint``); ``pretrained`` is
        ``hf_repo``'s older name. Nothing given: moshiko from the Hub."""
        unknown = sorted(set(load_args) - set(LoadArgs.names()))
        if unknown:
            raise ValueError(f"unknown model argument(s) {unknown}; loading arguments are preset, "
                             f"{', '.join(LoadArgs.names())} (pretrained: an alias of hf_repo)")
        if pretrained is not None:
            if load_args.get("hf_repo") not in (None, pretrained):
                raise ValueError(f"pretrained={pretrained!r} and hf_repo={load_args['hf_repo']!r} name two "
                                 "models; pretrained is hf_repo's older name: give one")
            load_args["hf_repo"] = pretrained
        args = LoadArgs(**{k: (str(v) if v is not None and k != "fuse_lora" else v) for k, v in load_args.items()})
        if preset is not None:
            if args.given():
                raise ValueError(f"give either preset= or a checkpoint ({', '.join(args.given())}), not both")
            if preset not in PRESETS:
                raise ValueError(f"unknown preset {preset!r}; available: {', '.join(PRESETS)}")
            return cls(preset=preset, seed=seed)
        return cls(seed=seed, checkpoint=resolve_checkpoint(args))

    @property
    def pretrained(self) -> str | None:
        """The base repo id or folder (``hf_repo``)."""
        return self.checkpoint.hf_repo if self.checkpoint else None

    @property
    def label(self) -> str:
        if self.preset:
            return f"preset={self.preset}"
        return ",".join(f"{k}={v}" for k, v in ({"hf_repo": self.pretrained} | self.checkpoint.args.given()).items())

    @property
    def short_name(self) -> str | None:
        """The checkpoint's name for a leaderboard row; None for presets and the default model."""
        if self.checkpoint is None or self.checkpoint.is_default:
            return None
        return self.checkpoint.short_name

    def codec_identity(self) -> str:
        """Equal for two sources exactly when they share one Mimi codec."""
        if self.preset:
            return json.dumps({"preset": self.preset, "seed": self.seed})
        return self.checkpoint.codec_identity()

    def describe(self) -> dict[str, Any]:
        """What results.json records: the preset, or the load arguments and files with their sha256."""
        if self.preset:
            return {"preset": self.preset, "seed": self.seed}
        return self.checkpoint.describe()


def load_lm(source: ModelSource, device: str | torch.device = "cpu",
            dtype: str | torch.dtype | None = None) -> LMModel:
    """Build the Moshi LM of ``source`` in eval mode (moshi's loaders, LoRA included)."""
    dtype = resolve_dtype(dtype)
    if source.preset:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(source.seed)
            lm = loaders.get_moshi_lm(None, lm_kwargs=copy.deepcopy(PRESETS[source.preset]["lm"]),
                                      device=device, dtype=dtype)
        return lm.eval()
    checkpoint = source.checkpoint
    if checkpoint.ttt_fork:
        raise CheckpointError(
            f"checkpoint {checkpoint.directory or checkpoint.lora_weights or checkpoint.moshi_weights} holds the "
            f"TTT layers of the moshi-finetune TTT fork ({checkpoint.ttt_fork}); only the ttt model builds "
            "them, and no model loads the checkpoint without them: evaluate it with --model ttt "
            "--model_args checkpoint=DIR (without ttt_checkpoint)")
    lm = checkpoint.checkpoint_info().get_moshi(device=device, dtype=dtype, **checkpoint.moshi_kwargs())
    return lm.eval()


def load_mimi(source: ModelSource, device: str | torch.device = "cpu") -> MimiModel:
    """Build the Mimi codec that belongs with ``source``'s LM (8 codebooks)."""
    if source.preset:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(source.seed + 1)
            mimi = loaders.get_mimi(None, copy.deepcopy(PRESETS[source.preset]["mimi"]), device=device,
                                    num_codebooks=NUM_AUDIO_CODEBOOKS)
            _randomize_codebooks(mimi)
        return mimi.eval()
    checkpoint = source.checkpoint
    try:
        mimi = checkpoint.checkpoint_info().get_mimi(device=device)
    except RuntimeError as exc:  # load_state_dict: weights that do not fit the Mimi config
        if "state_dict" not in str(exc):
            raise
        summary = " ".join(str(exc).split())[:400]
        raise CheckpointError(f"Mimi weights {checkpoint.mimi_weights} do not fit the Mimi config "
                              f"{checkpoint.mimi_config_path or '(moshi default)'}: {summary}") from None
    return mimi.eval()


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
