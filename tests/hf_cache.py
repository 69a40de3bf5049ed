"""Write tiny Moshi checkpoints in the Hugging Face cache layout, so tests load them by repo id
through moshi's real loaders with HF_HUB_OFFLINE=1."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from ttt_bench.models.moshi import TINY_LM_CONFIG, TINY_MIMI_CONFIG, ModelSource, load_lm, load_mimi

COMMIT = "0123456789abcdef0123456789abcdef01234567"
MIMI_FILE = "tiny-mimi.safetensors"


def _tensors(module) -> dict:
    return {k: v.detach().contiguous().clone() for k, v in module.state_dict().items()}


def write_tiny_checkpoint_files(directory: Path, seed: int = 0) -> Path:
    """The files of a moshi repo (config.json, model.safetensors, Mimi weights and config) for the
    tiny preset with ``seed``: loading them gives the same weights as ``preset="tiny", seed=seed``."""
    directory.mkdir(parents=True, exist_ok=True)
    source = ModelSource.make(preset="tiny", seed=seed)
    save_file(_tensors(load_lm(source)), str(directory / "model.safetensors"))
    save_file(_tensors(load_mimi(source)), str(directory / MIMI_FILE))
    (directory / "mimi_config.json").write_text(json.dumps(TINY_MIMI_CONFIG))
    config = {**TINY_LM_CONFIG, "moshi_name": "model.safetensors", "mimi_name": MIMI_FILE,
              "mimi_config_name": "mimi_config.json"}
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def write_tiny_hf_checkpoint(cache_dir: Path, repo_id: str, seed: int = 0) -> Path:
    """``<cache_dir>/models--org--name/{refs/main, snapshots/<commit>/...}``; returns the snapshot."""
    repo_dir = Path(cache_dir) / f"models--{repo_id.replace('/', '--')}"
    snapshot = write_tiny_checkpoint_files(repo_dir / "snapshots" / COMMIT, seed)
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(COMMIT)
    return snapshot
