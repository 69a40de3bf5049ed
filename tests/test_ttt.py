"""The ttt adapter (invariants 2, 3, 5 of docs/design.md), its reset, and TTT checkpoints."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_lm
from hf_cache import write_tiny_hf_checkpoint
from ttt_bench.models.frozen import FrozenScorer
from ttt_bench.models.ttt import (CONFIG_NAME, WEIGHTS_NAME, TTTOptions, TTTScorer, parse_layers,
                                  save_ttt_checkpoint)
from ttt_bench.models.layers.ttt_layers import TTTBase, TTTInputs, TTTLinear, TTTMLP, head_layer_norm
from ttt_bench.registry import get_model

CONTEXT, T, B_MINI = 8, 30, 4  # the stream is well past the attention context


def ttt_scorer(inner: str = "linear", gate_init: float = 0.5, **options) -> TTTScorer:
    return TTTScorer(lm=tiny_lm(context=CONTEXT), layers="all", inner=inner, mini_batch_size=B_MINI,
                     gate_init=gate_init, **options)


@pytest.fixture(scope="module")
def codes() -> torch.Tensor:
    torch.manual_seed(3)
    return torch.randint(0, 256, (1, 8, T))


@pytest.fixture(scope="module")
def frozen_nll(codes) -> torch.Tensor:
    return FrozenScorer(lm=tiny_lm(context=CONTEXT)).score(codes, chunk_size=8)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert torch.equal(a.isnan(), b.isnan())
    return float((a - b).nan_to_num().abs().max())


@pytest.mark.parametrize("inner", ["linear", "mlp"])
def test_chunk_size_invariance(inner, codes, frozen_nll):
    scorer = ttt_scorer(inner)
    results = {c: scorer.score(codes, chunk_size=c) for c in (1, 5, B_MINI, 3 * B_MINI + 1)}
    for chunk, nll in results.items():
        assert max_diff(nll, results[B_MINI]) < 1e-4, f"chunk {chunk} differs from chunk {B_MINI}"
    assert max_diff(results[B_MINI], frozen_nll) > 0.1  # the TTT branch matters
    static = ttt_scorer(inner, base_lr=0.0).score(codes, chunk_size=B_MINI)
    assert max_diff(results[B_MINI], static) > 0.1  # and so do the fast-weight updates


@pytest.mark.parametrize("inner", ["linear", "mlp"])
def test_gate_zero_is_frozen_exactly(inner, codes, frozen_nll):
    nll = ttt_scorer(inner, gate_init=0.0).score(codes, chunk_size=8)
    assert torch.equal(nll.nan_to_num(-1.0), frozen_nll.nan_to_num(-1.0))


def test_reset_between_documents_and_batch_independence(codes):
    scorer = ttt_scorer("mlp")
    other = torch.randint(0, 256, (1, 8, T))
    alone = ttt_scorer("mlp").score(codes, chunk_size=7)
    scorer.score(other, chunk_size=7)
    assert torch.equal(scorer.score(codes, chunk_size=7).nan_to_num(), alone.nan_to_num())
    batched = scorer.score(torch.cat([other, codes]), chunk_size=7)
    assert max_diff(batched[1:], alone) < 1e-5


# -- causality --------------------------------------------------------------------------

def non_causal(cls: type[TTTBase]) -> type[TTTBase]:
    """Deliberately leaky TTT: update on the whole mini-batch so far, then predict each of its
    tokens with the updated weights."""

    def inner_dual(self, weights, mb, first, complete):
        _, updated = cls.inner_dual(self, weights, mb, 0, True)
        frozen_mb = TTTInputs(mb.q, mb.k, mb.v, torch.zeros_like(mb.lr))  # no further update
        out, _ = cls.inner_dual(self, updated, frozen_mb, first, False)
        return out, (updated if complete else weights)

    return type(f"NonCausal{cls.__name__}", (cls,), {"inner_dual": inner_dual})


NonCausalTTTLinear, NonCausalTTTMLP = non_causal(TTTLinear), non_causal(TTTMLP)


def make_non_causal(scorer: TTTScorer) -> TTTScorer:
    for module in scorer.lm.modules():
        if isinstance(module, TTTBase):
            module.__class__ = NonCausalTTTLinear if isinstance(module, TTTLinear) else NonCausalTTTMLP
    return scorer


def causality_violations(scorer, codes: torch.Tensor, chunk: int) -> dict[int, float]:
    """For a few t: max |NLL change| at frames <= t - delay[k] of each codebook k when every
    frame after t changes (moshi predicts an acoustic code after the next semantic one)."""
    delays = scorer.lm.delays[1:9]
    base = scorer.score(codes, chunk_size=chunk)
    changes = {}
    for t in (5, 12, 17, 24, 26):
        other = codes.clone()
        other[..., t + 1:] = torch.randint(0, 256, other[..., t + 1:].shape)
        nll = scorer.score(other, chunk_size=chunk)
        changes[t] = max(max_diff(nll[:, k, :t + 1 - d], base[:, k, :t + 1 - d]) for k, d in enumerate(delays))
    return changes


@pytest.mark.parametrize("inner", ["linear", "mlp"])
def test_causality(inner, codes):
    assert causality_violations(ttt_scorer(inner), codes, chunk=2 * B_MINI) == {5: 0.0, 12: 0.0, 17: 0.0, 24: 0.0, 26: 0.0}


@pytest.mark.parametrize("inner", ["linear", "mlp"])
def test_causality_test_catches_a_non_causal_update(inner, codes):
    leaky = make_non_causal(ttt_scorer(inner))
    # the causal layers change nothing at all (above); the leak shows where frame t + 1 shares
    # a mini-batch with the steps that predict frames <= t (t % b in {0, 1}: t = 5, 12, 17, 24)
    violations = causality_violations(leaky, codes, chunk=2 * B_MINI)
    assert [t for t, change in violations.items() if change > 1e-5] == [5, 12, 17, 24]


def test_non_causal_variant_really_uses_the_updated_weights():
    layer = NonCausalTTTLinear(8, 2, mini_batch_size=3, base_lr=5.0)
    x = torch.randn(1, 3, 8)
    with torch.no_grad():
        inputs = layer.project(x)
        _, updated = TTTLinear.inner_dual(layer, layer.initial_weights(1), inputs, 0, True)
        ln_w, ln_b = layer.ln_params()
        expected = inputs.q + head_layer_norm(inputs.q @ updated["W1"] + updated["b1"], ln_w, ln_b)
        torch.testing.assert_close(layer(x), layer.finish(expected, x.dtype))


# -- options and checkpoints -------------------------------------------------------------

def test_layer_specs():
    assert parse_layers("last 2", 8) == [6, 7] and parse_layers("last3", 8) == [5, 6, 7]
    assert parse_layers("1;3", 8) == [1, 3] and parse_layers([3, -1], 8) == [3, 7] and parse_layers(2, 8) == [2]
    assert parse_layers("all", 2) == [0, 1]
    for bad in ("last 9", [8], "1;1", "first 2"):
        with pytest.raises(ValueError):
            parse_layers(bad, 8)
    assert TTTOptions(mini_batch_size="8", gate_init="0.25").mini_batch_size == 8  # CLI strings


def test_parameters_live_under_ttt_branch():
    scorer = TTTScorer(lm=tiny_lm(context=CONTEXT), layers=[1], inner="mlp", num_heads=2)
    names = [n for n, _ in scorer.lm.named_parameters() if ".ttt_branch." in n]
    assert names and all(n.startswith("transformer.layers.1.ttt_branch.") for n in names)
    assert scorer.lm.transformer.layers[1].ttt_branch.ttt.num_heads == 2
    assert scorer.info.options["inner"] == "mlp" and scorer.info.options["layers"] == [1]


def test_save_load_and_score_through_offline_hf_cache(tmp_path, hf_hub_cache, codes):
    repo = "ttt-bench-test/tiny-moshi-for-ttt"
    write_tiny_hf_checkpoint(hf_hub_cache, repo, seed=2)

    trained = TTTScorer(pretrained=repo, layers="last 1", inner="mlp", mini_batch_size=B_MINI, gate_init=0.3)
    with torch.no_grad():  # stand-in for training: move every TTT parameter
        for name, p in trained.lm.named_parameters():
            if ".ttt_branch." in name:
                p.add_(torch.randn_like(p) * 0.05)
    ckpt = save_ttt_checkpoint(trained.lm, trained.ttt_options, tmp_path / "ckpt", base={"pretrained": repo})
    assert sorted(p.name for p in ckpt.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])

    loaded = get_model("ttt", ttt_checkpoint=str(ckpt))  # base model from the config, via the HF cache
    assert loaded.info.options["inner"] == "mlp" and loaded.info.options["layers"] == [1]
    expected = trained.score(codes, chunk_size=8)
    assert torch.equal(loaded.score(codes, chunk_size=8).nan_to_num(), expected.nan_to_num())
    fresh = TTTScorer(pretrained=repo, layers="last 1", inner="mlp", mini_batch_size=B_MINI, gate_init=0.3)
    assert max_diff(fresh.score(codes, chunk_size=8), expected) > 1e-3  # the weights were loaded

    with pytest.raises(ValueError, match="conflict"):
        get_model("ttt", ttt_checkpoint=str(ckpt), inner="linear")


def test_checkpoint_mismatch_lists_the_keys(tmp_path):
    from safetensors.torch import load_file, save_file

    scorer = TTTScorer(lm=tiny_lm(context=CONTEXT), layers=[0], inner="linear")
    ckpt = save_ttt_checkpoint(scorer.lm, scorer.ttt_options, tmp_path / "ckpt", base={"preset": "tiny"})
    tensors = load_file(str(ckpt / WEIGHTS_NAME))
    tensors.pop("transformer.layers.0.ttt_branch.ttt.W1")
    tensors["transformer.layers.0.ttt_branch.alpha"] = torch.zeros(3)
    tensors["transformer.layers.0.ttt_branch.extra"] = torch.zeros(1)
    save_file(tensors, str(ckpt / WEIGHTS_NAME))
    with pytest.raises(ValueError) as error:
        TTTScorer(lm=tiny_lm(context=CONTEXT), ttt_checkpoint=ckpt)
    message = str(error.value)
    assert "ttt.W1" in message and "ttt_branch.extra" in message and "ttt_branch.alpha" in message
