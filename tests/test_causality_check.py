"""Causality checked on every run (verify_causality): the NLL of a frame must not depend on later
frames. Causal adapters pass; an adapter that peeks ahead stops the run with exit 3, or is measured
and flagged 'lookahead' under --allow_lookahead."""

import copy
import json

import pytest
import torch

from ttt_bench import names, registry
from ttt_bench.cli import main
from ttt_bench.models.base import StreamLayout
from ttt_bench.models.frozen import FrozenScorer
from ttt_bench.registry import get_model
from ttt_bench.evaluation.verify import CausalityError, causality_probe, perturb_from, verify_causality


class BlockPeekScorer(FrozenScorer):
    """Leaks like a TTT layer that updates on a whole mini-batch before predicting it: the NLL of
    every frame of a block of ``block`` frames depends (slightly) on the block's last frame."""

    name = "peeking"

    def __init__(self, block: int = 16, **kwargs):
        super().__init__(**kwargs)
        self.block = block

    def score(self, codes, chunk_size=64, layout=None):
        nll = super().score(codes, chunk_size, layout)
        t = torch.arange(codes.shape[-1])
        last = ((t // self.block + 1) * self.block - 1).clamp(max=codes.shape[-1] - 1)
        # >= 1e-3 / card (3.9e-6 nats) for any change of the block's last code: above the check's 1e-6
        return nll + 1e-3 * codes[:, :1, last].float() / self.lm.card


@pytest.fixture(scope="module")
def codes():
    torch.manual_seed(7)
    return torch.randint(0, 256, (8, 90))


def test_probe_is_bounded_and_cuts_inside_chunks_and_mini_batches():
    assert causality_probe(30000, 64) == (128, 69)
    assert causality_probe(90, 8) == (90, 45)
    assert causality_probe(10, 64) == (10, 5)
    frames, start = causality_probe(25000, 256)
    assert frames == 512
    # frame p enters at step p + 1: it must not open a block, nor be its second step
    for n_frames in (30, 90, 100, 128, 300, 25000):
        frames, start = causality_probe(n_frames, 64)
        assert all((start + 1) % b not in (0, 1) for b in (4, 8, 16, 32, 64)), (n_frames, start)


def test_perturbation_changes_every_code_from_the_cut_on(codes):
    other = perturb_from(codes, 40, 256)
    assert torch.equal(other[..., :40], codes[..., :40])
    assert (other[..., 40:] != codes[..., 40:]).all() and other.max() < 256


@pytest.mark.parametrize("model,kwargs", [("frozen", {}), ("dyneval", {"lr": 1e-2}),
                                          ("ttt", {"layers": [1], "gate_init": 0.5, "mini_batch_size": 16}),
                                          ("ttt", {"layers": [1], "inner": "mlp", "gate_init": 0.5,
                                                   "mini_batch_size": 8})])
def test_causal_adapters_pass(lm32, codes, model, kwargs):
    scorer = get_model(model, lm=copy.deepcopy(lm32), **kwargs)
    check = verify_causality(model, scorer, "doc", codes, 16, StreamLayout())
    assert check.passed and check.max_abs_change_before == 0.0
    assert check.max_abs_change_after > 0.1  # the later frames were really changed


@pytest.mark.parametrize("block", [4, 8, 16, 64])
def test_a_leak_inside_a_block_is_caught(lm32, codes, block):
    leaky = BlockPeekScorer(block=block, lm=lm32)
    with pytest.raises(CausalityError, match="the loss at a frame depends on later frames"):
        verify_causality("leaky", leaky, "doc", codes, 16, StreamLayout())
    check = verify_causality("leaky", leaky, "doc", codes, 16, StreamLayout(), allow_lookahead=True)
    assert not check.passed and check.lookahead_allowed and check.max_abs_change_before > 1e-6


@pytest.fixture
def peeking_model(monkeypatch):
    registry.list_models()  # built-ins first, then the test adapter beside them
    monkeypatch.setitem(names._MODELS, "peeking", lambda **kw: BlockPeekScorer(block=16, **kw))


RUN = ["--model", "frozen,peeking", "--model_args", "preset=tiny", "--tasks", "librilight_sample",
       "--task_args", "max_frames=300", "--limit", "1"]


def test_a_leaky_model_stops_the_run_with_exit_3(peeking_model, tmp_path, capsys):
    out = tmp_path / "out"
    assert main([*RUN, "--output_path", str(out)]) == 3
    err = capsys.readouterr().err
    assert "peeking: the loss at a frame depends on later frames" in err and "--allow_lookahead" in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_allow_lookahead_measures_it_and_flags_its_rows(peeking_model, tmp_path, capsys):
    out = tmp_path / "out"
    assert main([*RUN, "--output_path", str(out), "--allow_lookahead"]) == 0
    results = json.loads((out / "results.json").read_text())
    checks = {c["model"]: c for c in results["causality"]["librilight_sample"]}
    assert checks["frozen"]["passed"] and not checks["peeking"]["passed"]
    assert checks["peeking"]["lookahead_allowed"] and checks["frozen"]["max_abs_change_before"] == 0.0
    rows = results["results"]["librilight_sample"]
    assert [f["code"] for f in rows["peeking"]["flags"]].count("lookahead") == 1
    assert "lookahead" not in [f["code"] for f in rows["frozen"]["flags"]]
    assert "peeking: lookahead" in (out / "leaderboard.md").read_text()


def test_verify_causality_false_skips_the_check(peeking_model, tmp_path):
    out = tmp_path / "out"
    run = [*RUN[:-4], "--task_args", "max_frames=300,verify_causality=false", "--limit", "1"]
    assert main([*run, "--output_path", str(out)]) == 0
    assert json.loads((out / "results.json").read_text())["causality"] == {"librilight_sample": []}


@pytest.mark.parametrize("n_frames,mini_batch", [(100, 4), (100, 8), (128, 16)])
def test_the_probe_sees_a_mini_batch_look_ahead_at_any_document_length(n_frames, mini_batch):
    """The moshi-finetune fork's causal=false TTT reads its mini-batch's future in the hidden state,
    not in the loss itself: the probe's cut must fall where that shows (100 frames, C=4 or 8 used
    to cut at a mini-batch start and miss it)."""
    from conftest import tiny_lm

    from ttt_bench.models.ttt import TTTScorer

    codes = torch.randint(0, 256, (8, n_frames), generator=torch.Generator().manual_seed(1))
    scorer = TTTScorer(lm=tiny_lm(context=32), arch="moshi_finetune_ttt", layers="all",
                       mini_batch_size=mini_batch, base_lr=20.0, gate_init=0.5, causal=False)
    with torch.no_grad():  # learning-rate gates and biases away from their zero init, as trained
        for name, p in scorer.lm.named_parameters():
            if ".seq_modeling_block." in name and name.endswith(("bias", "lr_weight")):
                p.normal_(0.0, 0.3)
    with pytest.raises(CausalityError, match="depends on later frames"):
        verify_causality("fork", scorer, "doc", codes, 2 * mini_batch, StreamLayout())
