"""A checkpoint that cannot be loaded ends the CLI with one line naming the file and what to do,
exit code 2, no traceback and no run directory."""

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_cache import write_finetune_checkpoint, write_tiny_hf_checkpoint
from ttt_bench.cli import main

REPO = "ttt-bench-test/tiny-errors"


@pytest.fixture(scope="module")
def base(hf_hub_cache):
    return write_tiny_hf_checkpoint(hf_hub_cache, REPO, seed=2)


@pytest.fixture
def lora(base, tmp_path):
    return write_finetune_checkpoint(tmp_path / "run", base, kind="lora") / "consolidated"


@pytest.fixture
def full(base, tmp_path):
    return write_finetune_checkpoint(tmp_path / "run", base, kind="full") / "consolidated"


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def drop_keys(path: Path, part: str) -> None:
    tensors = load_file(str(path))
    save_file({k: v for k, v in tensors.items() if part not in k}, str(path))


def missing_weights(ckpt):
    (ckpt / "lora.safetensors").unlink()
    return [f"checkpoint={ckpt}"], "neither lora.safetensors nor consolidated.safetensors found"


def truncated_lora(ckpt):
    truncate(ckpt / "lora.safetensors")
    return [f"checkpoint={ckpt}"], "lora.safetensors is truncated or not a safetensors file"


def pickle_as_safetensors(ckpt):
    torch.save({"model": {}}, ckpt / "lora.safetensors")
    return [f"checkpoint={ckpt}"], "lora.safetensors is truncated or not a safetensors file.*PyTorch pickle"


def pickle_weight_file(ckpt):
    torch.save({"model": {}}, ckpt / "model.pt")
    return [f"moshi_weight={ckpt / 'model.pt'}"], r"model.pt is not a .safetensors file \(a PyTorch pickle\)"


def config_not_json(ckpt):
    (ckpt / "config.json").write_text("{lora: true,")
    return [f"checkpoint={ckpt}"], "config.json is not valid JSON"


def config_does_not_build(ckpt):
    edit_json(ckpt / "config.json", not_a_setting=1)
    return [f"checkpoint={ckpt}"], "config.json does not build a Moshi LM.*not_a_setting"


def lora_of_another_rank(ckpt):
    edit_json(ckpt / "config.json", lora_rank=8)
    return [f"checkpoint={ckpt}"], r"lora.safetensors do not fit .*of another shape: .*lora_A.weight \(4, \d+\) \(model: \(8, \d+\)\)"


def lora_keys_missing(ckpt):
    drop_keys(ckpt / "lora.safetensors", "depformer")
    return [f"checkpoint={ckpt}"], "lora.safetensors do not fit .*missing: depformer"


def lora_without_lora_config(ckpt):
    edit_json(ckpt / "config.json", lora=False)
    return [f"hf_repo={REPO}", f"lora_weight={ckpt / 'lora.safetensors'}", f"config_path={ckpt / 'config.json'}"], \
        "does not enable LoRA"


def only_a_pickle(ckpt):
    (ckpt / "lora.safetensors").rename(ckpt / "consolidated.pt")
    return [f"checkpoint={ckpt}"], "found consolidated.pt, optimizer_state.pt: ttt-bench never unpickles weights"


def mimi_that_does_not_fit(ckpt):
    return [f"mimi_weight={ckpt / 'lora.safetensors'}"], "Mimi weights .*lora.safetensors do not fit the Mimi config"


def lora_config_without_adapters(ckpt):
    return [f"config_path={ckpt / 'config.json'}"], "enables LoRA .* but no LoRA weights were given"


def fuse_lora_not_a_bool(ckpt):
    return [f"checkpoint={ckpt}", "fuse_lora=maybe"], "fuse_lora must be true or false, got 'maybe'"


def missing_folder(ckpt):
    return [f"checkpoint={ckpt / 'nowhere'}"], "nowhere: no such folder"


CASES = [missing_weights, truncated_lora, pickle_as_safetensors, pickle_weight_file, config_not_json,
         config_does_not_build, lora_of_another_rank, lora_keys_missing, lora_without_lora_config, only_a_pickle,
         mimi_that_does_not_fit, lora_config_without_adapters, fuse_lora_not_a_bool,
         missing_folder]


def truncated_full(ckpt):
    truncate(ckpt / "consolidated.safetensors")
    return [f"checkpoint={ckpt}"], "consolidated.safetensors is truncated or not a safetensors file"


def full_keys_missing(ckpt):
    drop_keys(ckpt / "consolidated.safetensors", "transformer.layers.1.")
    return [f"checkpoint={ckpt}"], "consolidated.safetensors do not fit .*missing: transformer.layers.1"


FULL_CASES = [truncated_full, full_keys_missing]


def run_fails(tmp_path, capsys, model_args: list[str], model: str = "frozen") -> str:
    out = tmp_path / "out"
    code = main(["--model", model, "--model_args", ",".join([*model_args]), "--tasks", "librilight_sample",
                 "--limit", "1", "--output_path", str(out)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("ttt-bench:")]
    assert len(errors) == 1 and errors[0].startswith("ttt-bench: error: "), err
    assert not out.exists()
    return errors[0]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.__name__)
def test_bad_lora_checkpoint(case, lora, tmp_path, capsys):
    args, message = case(lora)
    assert re.search(message, run_fails(tmp_path, capsys, [f"hf_repo={REPO}", *args]))


@pytest.mark.parametrize("case", FULL_CASES, ids=lambda c: c.__name__)
def test_bad_full_checkpoint(case, full, tmp_path, capsys):
    args, message = case(full)
    assert re.search(message, run_fails(tmp_path, capsys, [f"hf_repo={REPO}", *args]))


def write_ttt_fork_checkpoint(base, folder: Path) -> Path:
    """A checkpoint of the moshi-finetune TTT fork (its layout, tiny dims): config.json, a
    training_config.json with a ttt section, and TTT keys of a wrapped layer."""
    folder.mkdir(parents=True)
    config = json.loads((base / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "lora": False, "lora_rank": 4, "lora_scaling": 2.0}))
    (folder / "training_config.json").write_text(json.dumps({"ttt": {"enable": True, "layers": "1"}}))
    prefix = "transformer.layers.1.seq_modeling_block."
    save_file({prefix + "ttt_layer.ttt.wq.weight": torch.zeros(64, 64),
               prefix + "forward_ssm_gating.gating_alpha": torch.zeros(64)}, str(folder / "lora.safetensors"))
    return folder


@pytest.mark.parametrize("model", ["frozen", "dyneval"])
@pytest.mark.parametrize("evidence", ["training_config.json", "keys"])
def test_a_ttt_fork_checkpoint_is_refused_not_half_loaded(base, tmp_path, capsys, model, evidence):
    fork = write_ttt_fork_checkpoint(base, tmp_path / "fork" / "consolidated")
    if evidence == "keys":
        (fork / "training_config.json").unlink()
    line = run_fails(tmp_path, capsys, [f"hf_repo={REPO}", f"checkpoint={fork.parent}"], model)
    assert "TTT layers of the moshi-finetune TTT fork" in line and "--model ttt" in line
    assert ("training_config.json has a 'ttt' section" if evidence != "keys"
            else "holds TTT-fork keys such as transformer.layers.1.seq_modeling_block.") in line


def test_a_ttt_fork_checkpoint_missing_keys_are_named(base, tmp_path, capsys):
    fork = write_ttt_fork_checkpoint(base, tmp_path / "fork" / "consolidated")
    line = run_fails(tmp_path, capsys, [f"hf_repo={REPO}", f"checkpoint={fork.parent}"], "ttt")
    assert "does not fit" in line and " missing: " in line
    assert "seq_modeling_block.ttt_layer.ttt.learnable_ttt_lr_bias" in line


def test_a_ttt_fork_checkpoint_without_training_config_says_so(base, tmp_path, capsys):
    fork = write_ttt_fork_checkpoint(base, tmp_path / "fork" / "consolidated")
    (fork / "training_config.json").unlink()
    line = run_fails(tmp_path, capsys, [f"hf_repo={REPO}", f"checkpoint={fork.parent}"], "ttt")
    assert "training_config.json not found" in line and "TTT settings" in line


@pytest.fixture
def ttt_ckpt(base, tmp_path):
    from ttt_bench.models.ttt import save_ttt_checkpoint
    from ttt_bench.registry import get_model

    scorer = get_model("ttt", hf_repo=REPO, layers="last 1", gate_init=0.5)
    return save_ttt_checkpoint(scorer.lm, scorer.ttt_options, tmp_path / "ttt", base={"hf_repo": REPO})


def test_a_ttt_checkpoint_given_as_checkpoint_says_where_it_goes(ttt_ckpt, tmp_path, capsys):
    line = run_fails(tmp_path, capsys, [f"checkpoint={ttt_ckpt}"], "ttt")
    assert "is a ttt-bench TTT checkpoint" in line and "ttt_checkpoint=" in line


def test_truncated_ttt_weights(ttt_ckpt, tmp_path, capsys):
    truncate(ttt_ckpt / "ttt.safetensors")
    line = run_fails(tmp_path, capsys, [f"ttt_checkpoint={ttt_ckpt}"], "ttt")
    assert "ttt.safetensors is truncated or not a safetensors file" in line


def test_ttt_weights_that_do_not_fit(ttt_ckpt, tmp_path, capsys):
    tensors = load_file(str(ttt_ckpt / "ttt.safetensors"))
    name = sorted(tensors)[0]
    save_file({**tensors, name: torch.zeros(3, 3)}, str(ttt_ckpt / "ttt.safetensors"))
    line = run_fails(tmp_path, capsys, [f"ttt_checkpoint={ttt_ckpt}"], "ttt")
    assert f"does not fit the model: 1 of another shape: {name} (3, 3)" in line


def test_ttt_config_not_json(ttt_ckpt, tmp_path, capsys):
    (ttt_ckpt / "ttt_config.json").write_text("not json")
    assert "ttt_config.json is not valid JSON" in run_fails(tmp_path, capsys, [f"ttt_checkpoint={ttt_ckpt}"], "ttt")
