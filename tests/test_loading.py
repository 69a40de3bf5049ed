"""Loading goes through moshi's real loaders: by repo id from an offline HF cache, or a local dir."""

import pytest
import torch

from conftest import assert_exactly_equal
from hf_cache import write_tiny_checkpoint_files, write_tiny_hf_checkpoint
from ttt_bench.registry import get_model


@pytest.fixture(scope="module")
def codes():
    torch.manual_seed(3)
    return torch.randint(0, 256, (1, 8, 30))


def test_load_by_repo_id_from_offline_hf_cache(hf_hub_cache, codes):
    write_tiny_hf_checkpoint(hf_hub_cache, "ttt-bench-test/tiny-moshi", seed=5)
    from_hub = get_model("frozen", pretrained="ttt-bench-test/tiny-moshi")
    from_preset = get_model("frozen", preset="tiny", seed=5)
    assert from_hub.source.pretrained == "ttt-bench-test/tiny-moshi"
    assert_exactly_equal(from_hub.score(codes, chunk_size=8), from_preset.score(codes, chunk_size=8))


def test_load_from_local_directory(tmp_path, codes):
    write_tiny_checkpoint_files(tmp_path / "ckpt", seed=5)
    local = get_model("frozen", pretrained=str(tmp_path / "ckpt"))
    assert_exactly_equal(local.score(codes, chunk_size=8),
                         get_model("frozen", preset="tiny", seed=5).score(codes, chunk_size=8))


def test_missing_repo_says_where_it_looked(hf_hub_cache):
    from ttt_bench.models.loading.checkpoints import CheckpointError

    with pytest.raises(CheckpointError, match="not-there/nothing.*HF_HUB_OFFLINE"):
        get_model("frozen", pretrained="not-there/nothing")


def test_missing_weights_file_in_local_dir_is_named(tmp_path):
    ckpt = write_tiny_checkpoint_files(tmp_path / "ckpt")
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        get_model("frozen", pretrained=str(ckpt))


def test_pickled_weights_are_refused(tmp_path):
    import json

    ckpt = write_tiny_checkpoint_files(tmp_path / "ckpt")
    (ckpt / "model.pt").write_bytes(b"not a pickle we would ever open")
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "moshi_name": "model.pt"}))
    with pytest.raises(ValueError, match="never unpickles"):
        get_model("frozen", pretrained=str(ckpt))


def test_preset_and_lm_are_exclusive():
    from conftest import tiny_lm

    with pytest.raises(ValueError):
        get_model("frozen", lm=tiny_lm(), preset="tiny")
