"""Checkpoints people have: Hub repos (cache or local copy), moshi-finetune LoRA and full
fine-tunes, in moshi's own argument names; each scored as moshi's loaders build it."""

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from moshi.models import loaders

from conftest import assert_exactly_equal
from hf_cache import (lora_trained_lm, write_finetune_checkpoint, write_tiny_checkpoint_files,
                      write_tiny_hf_checkpoint)
from ttt_bench.models.loading.checkpoints import CheckpointError, file_sha256, sha256_cache_path
from ttt_bench.models.frozen import FrozenScorer
from ttt_bench.registry import get_model

REPO = "ttt-bench-test/tiny-base"
CHUNK = 8


@pytest.fixture(scope="module")
def codes():
    torch.manual_seed(4)
    return torch.randint(0, 256, (2, 8, 40))


@pytest.fixture(scope="module")
def base(hf_hub_cache):
    """The tiny base as a Hub repo in the offline HF cache (its snapshot folder is returned)."""
    return write_tiny_hf_checkpoint(hf_hub_cache, REPO, seed=3)


@pytest.fixture(scope="module")
def lora_ckpt(base, tmp_path_factory):
    return write_finetune_checkpoint(tmp_path_factory.mktemp("lora_run") / "run", base, kind="lora")


@pytest.fixture(scope="module")
def full_ckpt(base, tmp_path_factory):
    return write_finetune_checkpoint(tmp_path_factory.mktemp("full_run") / "run", base, kind="full")


def moshi_built(ckpt: Path, kind: str, fuse_lora: bool = True):
    """The model moshi's own CheckpointInfo builds from a moshi-finetune checkpoint (as
    moshi-finetune's README runs it with moshi.server), scored by the frozen adapter."""
    consolidated = ckpt / "consolidated"
    info = loaders.CheckpointInfo.from_hf_repo(
        REPO, tokenizer=Path(os.devnull), config_path=consolidated / "config.json",
        lora_weights=consolidated / "lora.safetensors" if kind == "lora" else None,
        moshi_weights=consolidated / "consolidated.safetensors" if kind == "full" else None)
    return FrozenScorer(lm=info.get_moshi(device="cpu", dtype=torch.float32, fuse_lora=fuse_lora))


def test_hub_cache_and_a_plain_folder_give_identical_nll(base, tmp_path, codes):
    folder = write_tiny_checkpoint_files(tmp_path / "local_copy", seed=3)
    from_hub = get_model("frozen", hf_repo=REPO)
    from_folder = get_model("frozen", hf_repo=str(folder))
    old_name = get_model("frozen", pretrained=str(folder))
    assert from_hub.source.checkpoint.moshi_weights == base / "model.safetensors"
    nll = from_hub.score(codes, CHUNK)
    assert_exactly_equal(from_folder.score(codes, CHUNK), nll)
    assert_exactly_equal(old_name.score(codes, CHUNK), nll)


@pytest.mark.parametrize("fuse_lora", [True, False])
def test_lora_checkpoint_scores_as_moshi_builds_it(lora_ckpt, codes, fuse_lora):
    ours = get_model("frozen", checkpoint=str(lora_ckpt), hf_repo=REPO, fuse_lora=fuse_lora)
    assert ours.source.checkpoint.kind == "lora"
    reference = moshi_built(lora_ckpt, "lora", fuse_lora)
    torch.testing.assert_close(ours.score(codes, CHUNK), reference.score(codes, CHUNK), rtol=0, atol=1e-5,
                               equal_nan=True)


def test_lora_fused_equals_unfused_and_the_adapters_change_the_nll(base, lora_ckpt, codes):
    fused = get_model("frozen", checkpoint=str(lora_ckpt / "consolidated"), hf_repo=REPO).score(codes, CHUNK)
    unfused = get_model("frozen", checkpoint=str(lora_ckpt), hf_repo=REPO, fuse_lora=False).score(codes, CHUNK)
    torch.testing.assert_close(fused, unfused, rtol=0, atol=1e-4, equal_nan=True)
    base_nll = get_model("frozen", hf_repo=REPO).score(codes, CHUNK)
    assert (fused - base_nll).nan_to_num().abs().max() > 1e-2
    # the same LoRA model trained in memory (moshi's LoRA modules, before saving) scores the same
    trained = FrozenScorer(lm=lora_trained_lm(base)).score(codes, CHUNK)
    torch.testing.assert_close(fused, trained, rtol=0, atol=1e-4, equal_nan=True)


def test_moshi_server_argument_names_load_the_same_lora_model(lora_ckpt, codes):
    consolidated = lora_ckpt / "consolidated"
    by_checkpoint = get_model("frozen", checkpoint=str(lora_ckpt), hf_repo=REPO).score(codes, CHUNK)
    by_files = get_model("frozen", hf_repo=REPO, lora_weight=str(consolidated / "lora.safetensors"),
                         config_path=str(consolidated / "config.json")).score(codes, CHUNK)
    assert_exactly_equal(by_files, by_checkpoint)


def test_hf_file_references_resolve_through_the_cache(base, codes):
    by_ref = get_model("frozen", hf_repo=REPO, moshi_weight=f"hf://{REPO}/model.safetensors",
                       mimi_weight=f"hf://{REPO}/tiny-mimi.safetensors")
    assert by_ref.source.checkpoint.moshi_weights == base / "model.safetensors"
    assert_exactly_equal(by_ref.score(codes, CHUNK), get_model("frozen", hf_repo=REPO).score(codes, CHUNK))


def test_full_checkpoint_scores_as_moshi_builds_it(base, full_ckpt, codes):
    ours = get_model("frozen", checkpoint=str(full_ckpt), hf_repo=REPO)
    assert ours.source.checkpoint.kind == "full"
    assert ours.source.checkpoint.mimi_weights.parent == base  # Mimi comes from the base
    nll = ours.score(codes, CHUNK)
    torch.testing.assert_close(nll, moshi_built(full_ckpt, "full").score(codes, CHUNK), rtol=0, atol=1e-5,
                               equal_nan=True)
    assert (nll - get_model("frozen", hf_repo=REPO).score(codes, CHUNK)).nan_to_num().abs().max() > 1e-2


def test_merged_weights_of_a_lora_run_get_no_fresh_adapters(base, tmp_path, lora_ckpt, codes):
    """moshi-finetune without save_adapters: consolidated.safetensors (merged) with lora: true in
    config.json. Loaded as is, moshi would add new random adapters on top."""
    merged = write_finetune_checkpoint(tmp_path / "run", base, kind="full", lora_in_config=True)
    nll = get_model("frozen", checkpoint=str(merged), hf_repo=REPO).score(codes, CHUNK)
    lora = get_model("frozen", checkpoint=str(lora_ckpt), hf_repo=REPO).score(codes, CHUNK)
    torch.testing.assert_close(nll, lora, rtol=0, atol=1e-4, equal_nan=True)
    readme_way = get_model("frozen", hf_repo=REPO, moshi_weight=str(merged / "consolidated/consolidated.safetensors"),
                           config_path=str(merged / "consolidated/config.json"))  # moshi-finetune's README
    assert_exactly_equal(readme_way.score(codes, CHUNK), nll)


def test_the_base_named_in_the_runs_args_yaml_is_used(base, tmp_path, lora_ckpt, codes, caplog):
    """moshi-finetune records its base in run_dir/args.yaml (moshi_paths): with no hf_repo given,
    the adapters go on that base, not on moshiko."""
    ckpt = write_finetune_checkpoint(tmp_path / "run", base, kind="lora", moshi_paths={"hf_repo_id": REPO})
    scorer = get_model("frozen", checkpoint=str(ckpt))
    assert scorer.source.pretrained == REPO
    assert scorer.info.options["checkpoint"]["files"]["training_args"]["path"] == str(tmp_path / "run" / "args.yaml")
    assert_exactly_equal(scorer.score(codes, CHUNK),
                         get_model("frozen", checkpoint=str(lora_ckpt), hf_repo=REPO).score(codes, CHUNK))
    copy = tmp_path / "base-weights.safetensors"
    copy.write_bytes((base / "model.safetensors").read_bytes())
    by_path = write_finetune_checkpoint(tmp_path / "run2", base, kind="lora",
                                        moshi_paths={"hf_repo_id": REPO, "moshi_path": str(copy)})
    assert get_model("frozen", checkpoint=str(by_path)).source.checkpoint.moshi_weights == copy
    copy.unlink()
    with pytest.raises(FileNotFoundError, match=f"args.yaml: the run was trained with moshi_path={copy}, which is not here"):
        get_model("frozen", checkpoint=str(by_path))
    write_tiny_hf_checkpoint(hf_hub_cache_dir(), "ttt-bench-test/another-base", seed=3)
    caplog.clear()
    get_model("frozen", checkpoint=str(ckpt), hf_repo="ttt-bench-test/another-base")
    assert f"was trained on {REPO}" in caplog.text


def hf_hub_cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def test_ttt_layers_on_a_finetuned_base(lora_ckpt, tmp_path, codes):
    from ttt_bench.models.ttt import save_ttt_checkpoint

    frozen = get_model("frozen", checkpoint=str(lora_ckpt), hf_repo=REPO)
    gate0 = get_model("ttt", checkpoint=str(lora_ckpt), hf_repo=REPO, layers="last 1", gate_init=0.0)
    assert_exactly_equal(gate0.score(codes, CHUNK), frozen.score(codes, CHUNK))
    trained = get_model("ttt", checkpoint=str(lora_ckpt), hf_repo=REPO, layers="last 1", gate_init=0.5, seed=2)
    saved = save_ttt_checkpoint(trained.lm, trained.ttt_options, tmp_path / "ttt",
                                base={"checkpoint": str(lora_ckpt), "hf_repo": REPO})
    nll = trained.score(codes, CHUNK)
    both = get_model("ttt", checkpoint=str(lora_ckpt), hf_repo=REPO, ttt_checkpoint=str(saved))
    from_config = get_model("ttt", ttt_checkpoint=str(saved))  # the base named in ttt_config.json
    assert_exactly_equal(both.score(codes, CHUNK), nll)
    assert_exactly_equal(from_config.score(codes, CHUNK), nll)
    assert (nll - frozen.score(codes, CHUNK)).nan_to_num().abs().max() > 1e-3


def test_repo_without_config_json_is_moshi_7b_with_moshis_warning(tmp_path, hf_hub_cache, caplog):
    """As moshi's loader: no config.json means Moshi 7B with the default file names; the tiny
    weights then do not fit, and the error lists the first keys that differ."""
    folder = tmp_path / "moshiko-copy"
    write_tiny_checkpoint_files(folder)
    (folder / "config.json").unlink()
    (folder / "tiny-mimi.safetensors").rename(folder / loaders.MIMI_NAME)
    snapshot = write_tiny_hf_checkpoint(hf_hub_cache, "ttt-bench-test/no-config")
    (snapshot / "config.json").unlink()
    (snapshot / "tiny-mimi.safetensors").rename(snapshot / loaders.MIMI_NAME)
    for where in (str(folder), "ttt-bench-test/no-config"):
        caplog.clear()
        with pytest.raises(CheckpointError, match=r"Moshi 7B defaults.*missing: depformer.*of another shape: depformer"):
            get_model("frozen", hf_repo=where)
        warnings = [r for r in caplog.records if "Moshi 7B" in r.getMessage() and "config.json" in r.getMessage()]
        assert len(warnings) == 1, caplog.text


def test_models_on_one_base_share_one_codec_and_other_mimi_is_refused(lora_ckpt, full_ckpt, hf_hub_cache):
    from ttt_bench.api import shared_source as shared

    def shared_source(scorers):
        return shared({name: scorer.source for name, scorer in scorers.items()})

    scorers = {"frozen": get_model("frozen", hf_repo=REPO),
               "lora": get_model("frozen", checkpoint=str(lora_ckpt), hf_repo=REPO),
               "full": get_model("dyneval", checkpoint=str(full_ckpt), hf_repo=REPO)}
    assert shared_source(scorers).pretrained == REPO
    write_tiny_hf_checkpoint(hf_hub_cache, "ttt-bench-test/other-mimi", seed=4)
    scorers["other"] = get_model("frozen", hf_repo="ttt-bench-test/other-mimi")
    with pytest.raises(ValueError, match="different Mimi codecs.*other"):
        shared_source(scorers)


def test_results_record_files_with_sha256_and_a_short_label(lora_ckpt):
    scorer = get_model("frozen", checkpoint=str(lora_ckpt), hf_repo=REPO)
    assert scorer.info.label == "frozen (run/checkpoint_000010 lora)"
    legacy = get_model("legacy", base="frozen", checkpoint=str(lora_ckpt), hf_repo=REPO)
    assert legacy.info.label == "legacy[frozen (run/checkpoint_000010 lora)]"
    assert get_model("frozen", hf_repo=REPO).info.label == f"frozen ({REPO})"
    files = scorer.info.options["checkpoint"]["files"]
    assert set(files) == {"moshi_weights", "mimi_weights", "lora_weights", "config", "mimi_config"}
    for entry in files.values():
        assert entry["sha256"] == hashlib.sha256(Path(entry["path"]).read_bytes()).hexdigest()


def test_sha256_is_cached_per_path_size_and_mtime(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"a" * 1000)
    first = file_sha256(path)
    stat = path.stat()
    path.write_bytes(b"b" * 1000)  # same size; restore the mtime: the cached hash is used
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert file_sha256(path) == first
    assert str(path.resolve()) in json.loads(sha256_cache_path().read_text())
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert file_sha256(path) == hashlib.sha256(b"b" * 1000).hexdigest()


def test_cli_ttt_on_a_finetuned_base(lora_ckpt, tmp_path, capsys):
    """``--model ttt --model_args checkpoint=FT_DIR,ttt_checkpoint=TTT_DIR`` next to frozen on the
    same checkpoint: one codec, files and sha256 on record, the checkpoint named in the rows."""
    from ttt_bench.cli import main
    from ttt_bench.models.ttt import save_ttt_checkpoint

    trained = get_model("ttt", checkpoint=str(lora_ckpt), hf_repo=REPO, layers="last 1", gate_init=0.5)
    ttt_dir = save_ttt_checkpoint(trained.lm, trained.ttt_options, tmp_path / "ttt",
                                  base={"checkpoint": str(lora_ckpt), "hf_repo": REPO})
    out = tmp_path / "out"
    code = main(["--model", "frozen,ttt", "--model_args",
                 f"checkpoint={lora_ckpt},hf_repo={REPO},ttt.ttt_checkpoint={ttt_dir}",
                 "--tasks", "librilight_sample", "--task_args", "max_frames=100", "--limit", "1",
                 "--output_path", str(out)])
    assert code == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    for model in ("frozen", "ttt"):
        checkpoint = results["models"][model]["options"]["checkpoint"]
        assert checkpoint["kind"] == "lora"
        lora = checkpoint["files"]["lora_weights"]
        assert lora["sha256"] == hashlib.sha256(Path(lora["path"]).read_bytes()).hexdigest()
    scores = results["results"]["librilight_sample"]
    assert scores["frozen"]["mean_nll"] != scores["ttt"]["mean_nll"]
    table = (out / "leaderboard.md").read_text()
    assert "frozen (run/checkpoint_000010 lora)" in table and "ttt (run/checkpoint_000010 lora)" in table


def test_resume_refuses_model_files_that_changed(tmp_path, capsys):
    """A resumed run continues with the same model, not a checkpoint saved again at its path."""
    from ttt_bench.cli import main

    folder = write_tiny_checkpoint_files(tmp_path / "base", seed=3)
    out = tmp_path / "out"
    args = ["--model", "frozen", "--model_args", f"hf_repo={folder}", "--tasks", "librilight_sample",
            "--task_args", "max_frames=50", "--limit", "1", "--output_path", str(out)]
    assert main(args) == 0
    assert main([*args, "--resume"]) == 0
    other = write_tiny_checkpoint_files(tmp_path / "other", seed=4)
    (folder / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes())
    capsys.readouterr()
    assert main([*args, "--resume"]) == 2
    assert "other model files (frozen.moshi_weights: the sha256 differs)" in capsys.readouterr().err
