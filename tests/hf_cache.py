"""Write tiny Moshi checkpoints in the Hugging Face cache layout, so tests load them by repo id
through moshi's real loaders with HF_HUB_OFFLINE=1."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from ttt_bench.models.loading.moshi import TINY_LM_CONFIG, TINY_MIMI_CONFIG, ModelSource, load_lm, load_mimi

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


LORA_RANK = 4
LORA_SCALING = 2.0


def tiny_base_config() -> dict:
    """The config.json of the tiny base written by ``write_tiny_checkpoint_files``."""
    return {**TINY_LM_CONFIG, "moshi_name": "model.safetensors", "mimi_name": MIMI_FILE,
            "mimi_config_name": "mimi_config.json"}


def lora_trained_lm(base_dir: Path, seed: int = 1):
    """The tiny base of ``base_dir`` with moshi's LoRA modules in every linear layer, as
    moshi-finetune trains it, with random non-zero adapters (float32)."""
    import torch
    from moshi.models import loaders
    from moshi.modules.lora import LoRALinear

    config = {**tiny_base_config(), "lora": True, "lora_rank": LORA_RANK, "lora_scaling": LORA_SCALING}
    for key in ("moshi_name", "mimi_name", "mimi_config_name"):
        config.pop(key)
    lm = loaders.get_moshi_lm(Path(base_dir) / "model.safetensors", lm_kwargs=config, device="cpu",
                              dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in lm.modules():
            if isinstance(module, LoRALinear):
                for adapter in (module.lora_A, module.lora_B):
                    adapter.weight.copy_(torch.randn(adapter.weight.shape, generator=generator) * 0.05)
    return lm


def write_finetune_checkpoint(run_dir: Path, base_dir: Path, kind: str = "lora", step: int = 10,
                              seed: int = 1, lora_in_config: bool | None = None,
                              moshi_paths: dict | None = None) -> Path:
    """A kyutai moshi-finetune checkpoint of the tiny base: ``run_dir/checkpoints/checkpoint_NNNNNN/
    consolidated/`` with config.json (the base's config plus the LoRA fields) and
    ``lora.safetensors`` (the adapters: every module whose parameters all train) or
    ``consolidated.safetensors`` (every weight, adapters merged). An ``optimizer_state.pt`` that is
    not a valid pickle sits beside them, as moshi-finetune leaves one: it must never be opened.
    moshi_paths: the run's base as moshi-finetune records it in ``run_dir/args.yaml``.
    Returns the checkpoint_NNNNNN folder."""
    from moshi.modules.lora import replace_lora_with_linear

    lm = lora_trained_lm(base_dir, seed)
    folder = Path(run_dir) / "checkpoints" / f"checkpoint_{step:06d}"
    consolidated = folder / "consolidated"
    consolidated.mkdir(parents=True)
    if kind == "lora":
        adapters = {k: v for k, v in _tensors(lm).items() if ".lora_A." in k or ".lora_B." in k}
        save_file(adapters, str(consolidated / "lora.safetensors"))
    else:
        replace_lora_with_linear(lm)
        save_file(_tensors(lm), str(consolidated / "consolidated.safetensors"))
    lora = kind == "lora" if lora_in_config is None else lora_in_config
    config = {**tiny_base_config(), "lora": lora, "lora_rank": LORA_RANK, "lora_scaling": LORA_SCALING}
    (consolidated / "config.json").write_text(json.dumps(config, indent=4))
    if moshi_paths is not None:
        import yaml

        (Path(run_dir) / "args.yaml").write_text(yaml.safe_dump({"run_dir": str(run_dir), "moshi_paths": moshi_paths}))
    (consolidated / "optimizer_state.pt").write_bytes(b"\x80\x04 not a pickle anyone should open")
    return folder
