"""Checkpoints of the moshi-finetune TTT fork (``checkpoint=DIR``), loaded as that fork trained them.

A fork checkpoint folder (``checkpoint_NNNNNN/consolidated/``) holds ``config.json`` (the Moshi LM
config with the LoRA fields), ``training_config.json`` (the ``ttt`` section: which layers, the
mini-batch size, learning rate, inner MLP depth, RoPE, attention contexts) and either
``lora.safetensors`` (the trained modules only) or ``consolidated.safetensors`` (every weight).
A layer with TTT was wrapped in training, so its own weights and LoRA adapters are saved under
``transformer.layers.<i>.original_layer.`` (and, in full checkpoints, again under
``...seq_modeling_block.original_layer.``) and its TTT under ``...seq_modeling_block.``.

Here the base LM is built with moshi's loaders (LoRA modules included), the fork's TTT blocks
are inserted (``arch=moshi_finetune_ttt``, names as in the checkpoint), and the checkpoint's
tensors are mapped back to moshi's own names and loaded; keys the fork's forward never reads
(``wo``, ``post_norm``, ``backward_ssm_gating``) are accepted and reported as unused. A missing,
unexpected or mis-shaped key is an error listing them.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import Any

import torch
from moshi.models.lm import LMModel
from moshi.modules.lora import replace_lora_with_linear

from ttt_bench.models.loading.checkpoints import CheckpointError, ResolvedCheckpoint, key_mismatch, load_safetensors
from ttt_bench.models.loading.moshi import resolve_dtype

logger = logging.getLogger(__name__)

# The ttt section of training_config.json (the fork's TTTArgs) with its defaults: the settings the
# forward reads, and those it never reads (training, logging and evaluation settings).
FORWARD_DEFAULTS: dict[str, Any] = {
    "layers": "middle", "base_lr": 1.0, "mini_batch_size": 16, "ttt_mlp_layers": 2,
    "ttt_mlp_hidden_dims": None, "ttt_mlp_expansion_factor": 4.0, "use_rope": False, "rope_theta": 10000.0,
    "ttt_layer_context": None, "non_ttt_layer_context": None}
NO_FORWARD_EFFECT = {
    "enable", "initial_gating_alpha", "persistent_states", "override_gating_alpha_on_resume",
    "weight_lr_multiplier", "alpha_lr_multiplier", "log_inner_loop_losses", "inner_loop_log_interval",
    "save_inner_loop_plots", "inner_loop_plot_dir", "optimize_chunk_size", "chunk_size", "max_chunk_size",
    "prefer_efficiency", "unfrozen_attention_layers", "enable_training_diagnostics",
    "training_diagnostic_frequency",
    "normalize_ttt_output", "target_output_norm"}  # stored by the fork, read by no forward
WRAPPED = re.compile(r"^(transformer\.layers\.\d+\.)(?:seq_modeling_block\.)?original_layer\.(.*)$")
DEAD = re.compile(r"\.seq_modeling_block\.(ttt_layer\.ttt\.(wo|post_norm)\.|backward_ssm_gating\.)")


@dataclasses.dataclass
class ForkSettings:
    """What the ttt section of training_config.json says about the forward."""

    layers: list[int]
    options: dict[str, Any]  # TTTOptions fields
    ttt_layer_context: int | None
    non_ttt_layer_context: int | None


def fork_layers(spec: Any, num_layers: int, where: str) -> list[int]:
    """The fork's layer spec ("all", "middle", "none", "29,30,31") -> sorted indices."""
    text = str(spec).strip()
    if text == "all":
        return list(range(num_layers))
    if text == "middle":
        return list(range(num_layers // 4, 3 * num_layers // 4))
    if text == "none":
        raise CheckpointError(f"{where}: ttt.layers is 'none': this checkpoint has no TTT layers; "
                              "evaluate it with --model frozen")
    try:
        indices = sorted({int(part) for part in text.split(",")})
    except ValueError:
        raise CheckpointError(f"{where}: ttt.layers={spec!r} is not 'all', 'middle' or indices like '29,30,31'") from None
    bad = [i for i in indices if not 0 <= i < num_layers]
    if bad:
        raise CheckpointError(f"{where}: ttt.layers {bad} out of range for the {num_layers}-layer model of config.json")
    return indices


def fork_settings(checkpoint: ResolvedCheckpoint, num_layers: int, causal: bool) -> ForkSettings:
    """TTT settings of a fork checkpoint, refusing any the forward would read and ttt-bench does
    not reproduce (by name)."""
    if checkpoint.training_config_path is None:
        raise CheckpointError(f"checkpoint {checkpoint.directory or checkpoint.lora_weights or checkpoint.moshi_weights} "
                              "holds the moshi-finetune TTT fork's TTT layers, but training_config.json not found: "
                              "the fork saves its TTT settings there; put it back beside config.json")
    where = str(checkpoint.training_config_path)
    ttt = (checkpoint.training_config or {}).get("ttt")
    if not isinstance(ttt, dict):
        raise CheckpointError(f"{where}: no 'ttt' section; this is not a checkpoint of the moshi-finetune "
                              "TTT fork with TTT enabled")
    unknown = sorted(set(ttt) - set(FORWARD_DEFAULTS) - NO_FORWARD_EFFECT)
    if unknown:
        raise CheckpointError(f"{where}: ttt setting(s) {unknown} unknown to ttt-bench, which cannot tell whether "
                              "they change the forward; it reproduces only "
                              f"{sorted(FORWARD_DEFAULTS)} (plus settings without effect on the forward)")
    if ttt.get("enable") is False:
        raise CheckpointError(f"{where}: ttt.enable is false: the model was trained without TTT layers")
    s = {**FORWARD_DEFAULTS, **{k: v for k, v in ttt.items() if k in FORWARD_DEFAULTS}}
    mlp_layers = int(s["ttt_mlp_layers"])
    options = {"arch": "moshi_finetune_ttt", "inner": "mlp", "causal": causal,
               "mini_batch_size": int(s["mini_batch_size"]), "base_lr": float(s["base_lr"]),
               "mlp_layers": mlp_layers, "use_rope": bool(s["use_rope"]), "rope_theta": float(s["rope_theta"]),
               # the fork's 2-layer MLP is always 4x wide: only 3+ layers read these two
               "mlp_hidden_dims": s["ttt_mlp_hidden_dims"] if mlp_layers > 2 else None,
               "mlp_expansion_factor": float(s["ttt_mlp_expansion_factor"]) if mlp_layers > 2 else 4.0,
               "gate_init": float(ttt.get("initial_gating_alpha", 0.1))}
    layers = fork_layers(s["layers"], num_layers, where)
    return ForkSettings(layers, {**options, "layers": layers}, s["ttt_layer_context"], s["non_ttt_layer_context"])


def build_base(checkpoint: ResolvedCheckpoint, device, dtype) -> LMModel:
    """The LM before its TTT layers, built by moshi's loaders: the base repo's weights with
    fresh LoRA modules (lora.safetensors), or the config's model without weights (full)."""
    base = dataclasses.replace(checkpoint, lora_weights=None).checkpoint_info()
    dtype = resolve_dtype(dtype)
    if checkpoint.kind == "full":
        return base.get_moshi(device=device, dtype=dtype, load_weight=False,
                              lm_kwargs_overrides={"lora": False}).eval()
    return base.get_moshi(device=device, dtype=dtype, fuse_lora=False).eval()


def set_attention_contexts(lm: LMModel, settings: ForkSettings) -> None:
    """The fork's per-layer attention contexts (None: the config's)."""
    for index, layer in enumerate(lm.transformer.layers):
        context = settings.ttt_layer_context if index in settings.layers else settings.non_ttt_layer_context
        if context is not None:
            layer.self_attn.context = int(context)


def map_fork_keys(shapes: dict[str, tuple[int, ...]]) -> tuple[dict[str, str], list[str], list[str]]:
    """(model key -> checkpoint key, unused dead keys, duplicate keys) for a fork checkpoint."""
    mapping: dict[str, str] = {}
    dead, duplicates = [], []
    for key in sorted(shapes, key=lambda k: ".seq_modeling_block.original_layer." in k):
        if DEAD.search(key):
            dead.append(key)
            continue
        wrapped = WRAPPED.match(key)
        target = f"{wrapped.group(1)}{wrapped.group(2)}" if wrapped else key
        if target in mapping:  # a full checkpoint saves a wrapped layer under both of its names
            duplicates.append(key)
            continue
        mapping[target] = key
    return mapping, dead, duplicates


def load_fork_weights(lm: LMModel, checkpoint: ResolvedCheckpoint) -> dict[str, Any]:
    """Load the fork checkpoint's tensors into ``lm`` (TTT blocks inserted); returns what
    results.json records about unused keys."""
    path = checkpoint.moshi_weights if checkpoint.kind == "full" else checkpoint.lora_weights
    role = "consolidated weights" if checkpoint.kind == "full" else "lora weights"
    tensors = load_safetensors(path, role)
    mapping, dead, duplicates = map_fork_keys({k: tuple(v.shape) for k, v in tensors.items()})
    state = lm.state_dict()
    expected = {k: tuple(v.shape) for k, v in state.items()}
    if checkpoint.kind == "full":
        required = set(expected)
    else:
        required = {k for k in expected if ".seq_modeling_block." in k or ".lora_A." in k or ".lora_B." in k}
    loaded = {model_key: tuple(tensors[key].shape) for model_key, key in mapping.items()}
    problem = key_mismatch(loaded, expected, required)
    if problem:
        raise CheckpointError(f"moshi-finetune TTT checkpoint {path} does not fit the model built from "
                              f"{checkpoint.config_path} and {checkpoint.training_config_path} (names as in "
                              f"ttt-bench's model, where transformer.layers.<i>.original_layer.* is "
                              f"transformer.layers.<i>.*): {problem}. Check that both configs are the ones "
                              "saved with the weights, and the base model (hf_repo)")
    with torch.no_grad():
        for model_key, key in mapping.items():
            state[model_key].copy_(tensors[key])
    if dead:
        logger.info("fork checkpoint %s: %d keys the fork's forward never reads (wo, post_norm, "
                    "backward gating) are not used", path, len(dead))
    return {"unused_keys": dead, "duplicate_keys": len(duplicates)}


def fuse_lora(lm: LMModel, checkpoint: ResolvedCheckpoint) -> None:
    """Merge the LoRA adapters into their layers (moshi's own fusion), as ``fuse_lora`` asks."""
    if checkpoint.kind == "lora" and checkpoint.fuse_lora:
        replace_lora_with_linear(lm)
