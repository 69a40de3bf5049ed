"""Checkpoints of the moshi-finetune TTT fork (``--model ttt --model_args checkpoint=DIR``): written
here in the fork's exact key layout at tiny dims, loaded by ttt-bench and scored as the model
they were saved from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_cache import LORA_RANK, LORA_SCALING, lora_trained_lm, tiny_base_config, write_tiny_hf_checkpoint
from ttt_bench.models.loading.checkpoints import CheckpointError
from ttt_bench.models.frozen import FrozenScorer
from ttt_bench.models.ttt import TTTOptions, insert_ttt_layers
from ttt_bench.registry import get_model

REPO = "ttt-bench-test/tiny-fork-base"
TTT_LAYER, C = 1, 4
TTT_SECTION = {  # the fork's TTTArgs, as its training_config.json holds them
    "enable": True, "layers": str(TTT_LAYER), "base_lr": 10.0, "mini_batch_size": C, "persistent_states": True,
    "initial_gating_alpha": 0.1, "override_gating_alpha_on_resume": False, "ttt_layer_context": 8,
    "non_ttt_layer_context": 16, "weight_lr_multiplier": 10.0, "alpha_lr_multiplier": 100.0,
    "log_inner_loop_losses": False, "inner_loop_log_interval": 1, "save_inner_loop_plots": False,
    "inner_loop_plot_dir": "./evaluation_plots/inner_loop", "optimize_chunk_size": True, "chunk_size": None,
    "max_chunk_size": 50, "prefer_efficiency": True, "ttt_mlp_layers": 3, "ttt_mlp_hidden_dims": None,
    "ttt_mlp_expansion_factor": 2.0, "normalize_ttt_output": False, "target_output_norm": 25.0,
    "use_rope": True, "rope_theta": 10000.0, "unfrozen_attention_layers": "none",
    "enable_training_diagnostics": False, "training_diagnostic_frequency": 100}
DEAD = ("ttt_layer.ttt.wo.weight", "ttt_layer.ttt.wo.bias", "ttt_layer.ttt.post_norm.weight",
        "ttt_layer.ttt.post_norm.bias", "backward_ssm_gating.gating_alpha")


@pytest.fixture(scope="module")
def base(hf_hub_cache):
    return write_tiny_hf_checkpoint(hf_hub_cache, REPO, seed=2)


def trained_fork_model(base: Path):
    """The tiny base with LoRA adapters and the fork's TTT layer as that fork trains them, every
    TTT parameter moved away from its init (a stand-in for training)."""
    lm = lora_trained_lm(base)
    options = TTTOptions(arch="moshi_finetune_ttt", layers=[TTT_LAYER], mini_batch_size=C, base_lr=10.0,
                         mlp_layers=3, mlp_expansion_factor=2.0, use_rope=True, gate_init=0.5)
    insert_ttt_layers(lm, options, seed=3)
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if ".seq_modeling_block." in name:
                p.add_(torch.randn(p.shape, generator=generator) * 0.2)
    for index, layer in enumerate(lm.transformer.layers):
        layer.self_attn.context = 8 if index == TTT_LAYER else 16
    return lm.eval()


def in_fork_layout(state: dict[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    """ttt-bench's names -> the fork's: the TTT layer's own weights under original_layer. (full
    checkpoints: under seq_modeling_block.original_layer. as well), plus its dead keys."""
    wrapped, out = f"transformer.layers.{TTT_LAYER}.", {}
    for key, tensor in state.items():
        if key.startswith(wrapped) and ".seq_modeling_block." not in key:
            rest = key[len(wrapped):]
            out[f"{wrapped}original_layer.{rest}"] = tensor
            if kind == "full":
                out[f"{wrapped}seq_modeling_block.original_layer.{rest}"] = tensor.clone()  # the fork clones each
        else:
            out[key] = tensor
    dim = tiny_base_config()["dim"]
    for name in DEAD:
        shape = (dim, dim) if name.endswith("wo.weight") else (dim,)
        out[f"{wrapped}seq_modeling_block.{name}"] = torch.randn(shape)
    return out


def write_fork_checkpoint(folder: Path, lm, kind: str, ttt: dict | None = None) -> Path:
    """checkpoint_NNNNNN/consolidated/ as the fork's Checkpointer writes it (one process)."""
    from moshi.modules.lora import replace_lora_with_linear

    consolidated = folder / "consolidated"
    consolidated.mkdir(parents=True)
    state = {k: v.detach().clone().contiguous() for k, v in lm.state_dict().items()}
    if kind == "lora":  # every module whose parameters all train: adapters and TTT
        state = {k: v for k, v in state.items() if ".lora_" in k or ".seq_modeling_block." in k}
        save_file(in_fork_layout(state, kind), str(consolidated / "lora.safetensors"))
    else:
        import copy
        merged = copy.deepcopy(lm)
        replace_lora_with_linear(merged)
        state = {k: v.detach().clone().contiguous() for k, v in merged.state_dict().items()}
        save_file(in_fork_layout(state, kind), str(consolidated / "consolidated.safetensors"))
    config = {**tiny_base_config(), "lora": True, "lora_rank": LORA_RANK, "lora_scaling": LORA_SCALING}
    (consolidated / "config.json").write_text(json.dumps(config, indent=4))
    training = {"run_dir": "/runs/ttt", "seed": 0, "duration_sec": 10.0, "param_dtype": "float32",
                "lora": {"enable": True, "rank": LORA_RANK, "scaling": LORA_SCALING, "ft_embed": False},
                "full_finetuning": False, "rope_continuous": False, "ttt": ttt or TTT_SECTION}
    (consolidated / "training_config.json").write_text(json.dumps(training, indent=4))
    return folder


@pytest.fixture(scope="module")
def trained(base):
    return trained_fork_model(base)


@pytest.fixture(scope="module")
def codes():
    torch.manual_seed(6)
    return torch.randint(0, 256, (1, 8, 30))


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_fork_checkpoint_scores_as_the_model_it_was_saved_from(base, trained, codes, tmp_path, kind):
    folder = write_fork_checkpoint(tmp_path / "checkpoints" / "checkpoint_000100", trained, kind)
    expected = FrozenScorer(lm=trained).score(codes, chunk_size=C)  # its layers hold the TTT blocks
    scorer = get_model("ttt", hf_repo=REPO, checkpoint=str(folder))
    nll = scorer.score(codes, chunk_size=C)
    assert float((nll - expected).nan_to_num().abs().max()) <= 1e-5
    assert scorer.ttt_options.use_rope and scorer.ttt_options.mlp_layers == 3 and scorer.ttt_options.causal
    assert [layer.self_attn.context for layer in scorer.lm.transformer.layers] == [16, 8]
    unused = scorer.info.options["fork_checkpoint"]["unused_keys"]
    assert sorted(unused) == sorted(f"transformer.layers.{TTT_LAYER}.seq_modeling_block.{k}" for k in DEAD)
    assert "moshi_finetune_ttt, causal=true" in scorer.info.label
    lookahead = get_model("ttt", hf_repo=REPO, checkpoint=str(folder), causal=False)
    assert lookahead.lookahead and float((lookahead.score(codes, chunk_size=C) - nll).nan_to_num().abs().max()) > 1e-4


def test_a_wrong_shape_or_a_missing_key_is_named(base, trained, tmp_path):
    folder = write_fork_checkpoint(tmp_path / "checkpoint_000100", trained, "lora")
    weights = folder / "consolidated" / "lora.safetensors"
    tensors = load_file(str(weights))
    prefix = f"transformer.layers.{TTT_LAYER}.seq_modeling_block."
    tensors[prefix + "ttt_layer.ttt.wq.weight"] = torch.zeros(3, 3)
    del tensors[prefix + "forward_ssm_gating.gating_alpha"]
    adapter = next(k for k in tensors if k.startswith(f"transformer.layers.{TTT_LAYER}.original_layer.")
                   and ".lora_A." in k)
    del tensors[adapter]
    save_file(tensors, str(weights))
    with pytest.raises(CheckpointError) as error:
        get_model("ttt", hf_repo=REPO, checkpoint=str(folder))
    message = str(error.value)
    assert prefix + "ttt_layer.ttt.wq.weight (3, 3)" in message
    assert prefix + "forward_ssm_gating.gating_alpha" in message
    assert adapter.replace("original_layer.", "") in message


def test_settings_it_cannot_reproduce_are_refused_by_name(base, trained, tmp_path):
    folder = write_fork_checkpoint(tmp_path / "checkpoint_000100", trained, "lora",
                                   ttt={**TTT_SECTION, "ssm_layer": "ttt_linear"})
    with pytest.raises(CheckpointError, match="'ssm_layer'"):
        get_model("ttt", hf_repo=REPO, checkpoint=str(folder))
    with pytest.raises(ValueError, match=r"\['mini_batch_size'\].*only causal= can be chosen"):
        get_model("ttt", hf_repo=REPO, checkpoint=str(write_fork_checkpoint(
            tmp_path / "checkpoint_000200", trained, "lora")), mini_batch_size=8)


def test_cli_records_the_unused_keys_and_the_lookahead(base, trained, tmp_path, capsys):
    from ttt_bench.cli import main

    folder = write_fork_checkpoint(tmp_path / "run" / "checkpoints" / "checkpoint_000100", trained, "lora")
    out = tmp_path / "out"
    assert main(["--model", "ttt", "--model_args", f"hf_repo={REPO},checkpoint={folder},causal=false",
                 "--tasks", "librilight_sample", "--task_args", "max_frames=128", "--limit", "1",
                 "--chunk_size", "8", "--output_path", str(out)]) == 0
    info = json.loads((out / "results.json").read_text())["models"]["ttt"]
    assert info["lookahead"] and "causal=false" in info["label"] and "checkpoint_000100" in info["label"]
    assert len(info["options"]["fork_checkpoint"]["unused_keys"]) == len(DEAD)
