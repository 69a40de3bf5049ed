"""The dyneval adapter: lr 0 == frozen exactly, causality, per-document reset, bounded graph."""

from __future__ import annotations

import pytest
import torch

import ttt_bench.models.dyneval as dyneval
from conftest import tiny_lm
from ttt_bench.models.dyneval import DynEvalScorer, select_parameters
from ttt_bench.models.frozen import FrozenScorer
from ttt_bench.registry import get_model

CONTEXT, CHUNK = 8, 4


@pytest.fixture(scope="module")
def passage() -> torch.Tensor:
    torch.manual_seed(5)
    return torch.randint(0, 256, (1, 8, 20))


@pytest.fixture(scope="module")
def repeated(passage) -> torch.Tensor:
    return torch.cat([passage, passage], dim=-1)  # the repeat is far outside the receptive field


@pytest.fixture(scope="module")
def frozen_nll(repeated) -> torch.Tensor:
    return FrozenScorer(lm=tiny_lm(context=CONTEXT)).score(repeated, chunk_size=CHUNK)


def nan_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_lr_zero_is_frozen_exactly(optimizer, repeated, frozen_nll):
    scorer = DynEvalScorer(lm=tiny_lm(context=CONTEXT), lr=0.0, optimizer=optimizer)
    assert nan_equal(scorer.score(repeated, chunk_size=CHUNK), frozen_nll)


def test_learns_a_repeated_passage(repeated, frozen_nll):
    scorer = get_model("dyneval", lm=tiny_lm(context=CONTEXT), lr=1e-2, optimizer="adam")
    nll = scorer.score(repeated, chunk_size=CHUNK)
    repeat = slice(20, None)
    assert nll[..., repeat].nanmean() < frozen_nll[..., repeat].nanmean() - 0.3
    # and the weights are back to the original ones afterwards
    assert nan_equal(FrozenScorer(lm=scorer.lm).score(repeated, chunk_size=CHUNK), frozen_nll)


def test_documents_do_not_learn_from_each_other(passage, repeated):
    scorer = DynEvalScorer(lm=tiny_lm(context=CONTEXT), lr=0.5, optimizer="sgd")
    alone = scorer.score(repeated, chunk_size=CHUNK)
    other = torch.randint(0, 256, repeated.shape)
    # in a batch, the document comes after another one: same result as alone
    assert nan_equal(scorer.score(torch.cat([other, repeated]), chunk_size=CHUNK)[1:], alone)


def test_causality(repeated, frozen_nll):
    scorer = DynEvalScorer(lm=tiny_lm(context=CONTEXT), lr=0.5, optimizer="sgd")
    delays = scorer.lm.delays[1:9]
    base = scorer.score(repeated, chunk_size=CHUNK)
    assert (base - frozen_nll).nan_to_num().abs().max() > 0.1  # the updates matter
    for t in (6, 25):
        other = repeated.clone()
        other[..., t + 1:] = torch.randint(0, 256, other[..., t + 1:].shape)
        nll = scorer.score(other, chunk_size=CHUNK)
        for k, d in enumerate(delays):  # frames <= t less the codebook delay
            assert nan_equal(nll[:, k, :t + 1 - d], base[:, k, :t + 1 - d]), (t, k)


class StateProbe(DynEvalScorer):
    """Records, after each chunk, whether any streaming state still holds an autograd graph."""

    def score_chunk(self, delayed, start, end):
        nll = super().score_chunk(delayed, start, end)
        self.graphs_kept.append(any(
            t.requires_grad for state in self.lm.get_streaming_state().values()
            for t in _state_tensors(state)))
        return nll


def _state_tensors(state) -> list[torch.Tensor]:
    kv = getattr(state, "kv_cache", None)
    tensors = [kv.cache] if kv is not None else []
    return tensors + [v for v in vars(state).values() if isinstance(v, torch.Tensor)]


def test_streaming_state_keeps_no_graph(repeated, monkeypatch):
    probe = StateProbe(lm=tiny_lm(context=CONTEXT), lr=1e-3)
    probe.graphs_kept = []
    probe.score(repeated, chunk_size=CHUNK)
    assert len(probe.graphs_kept) == 10 and not any(probe.graphs_kept)
    # without the detach, the cache carries the previous chunk's graph into the next step
    monkeypatch.setattr(dyneval, "detach_streaming_state", lambda lm: None)
    with pytest.raises(RuntimeError, match="backward through the graph a second time|modified by an inplace"):
        probe.score(repeated, chunk_size=CHUNK)


def test_parameter_selection():
    lm = tiny_lm(context=CONTEXT)
    norms = select_parameters(lm, "norms")
    assert norms and all("norm" in name for name, _ in norms)
    assert [n for n, _ in select_parameters(lm, r"^linears\.0\.")] == ["linears.0.weight"]
    with pytest.raises(ValueError, match="selects no parameter"):
        select_parameters(lm, "no_such_parameter")
    with pytest.raises(ValueError, match="optimizer"):
        DynEvalScorer(lm=lm, optimizer="lbfgs")
    scorer = DynEvalScorer(lm=lm, lr=1e-3, params="norms")
    before = {n: p.requires_grad for n, p in lm.named_parameters()}
    scorer.score(torch.randint(0, 256, (1, 8, 10)), chunk_size=CHUNK)
    assert {n: p.requires_grad for n, p in lm.named_parameters()} == before
