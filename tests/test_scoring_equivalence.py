"""Invariant 1: chunked scoring == frame-by-frame stepping == LMModel.forward, past the context."""

import pytest
import torch

from moshi_reference import stepwise_nll
from ttt_bench.models.base import StreamLayout
from ttt_bench.models.frozen import FrozenScorer
from ttt_bench.models.streaming import forward_nll

T = 150  # the tiny model's context is 32 frames: the ring wraps several times


@pytest.fixture(scope="module")
def setup(lm32):
    torch.manual_seed(1)
    codes = torch.randint(0, lm32.card, (2, 8, T))
    return FrozenScorer(lm=lm32), codes, stepwise_nll(lm32, codes)


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 33])
def test_chunked_equals_frame_by_frame(setup, chunk_size):
    scorer, codes, reference = setup
    nll = scorer.score(codes, chunk_size=chunk_size)
    assert nll.shape == (2, 8, T) and nll.dtype == torch.float32
    assert torch.equal(nll.isnan(), reference.isnan())
    torch.testing.assert_close(nll, reference, atol=1e-4, rtol=0, equal_nan=True)


def test_chunk_larger_than_context_is_exact(setup, lm32):
    scorer, codes, reference = setup
    assert lm32.context < 40
    torch.testing.assert_close(scorer.score(codes, chunk_size=40), reference, atol=1e-4, rtol=0, equal_nan=True)


def test_naive_ring_cache_diverges_past_context(setup, monkeypatch):
    """The trap of docs/design.md is real: without the wider ring, chunks lose keys once it wraps."""
    import ttt_bench.models.frozen as frozen

    scorer, codes, reference = setup
    monkeypatch.setattr(frozen, "widen_kv_caches", lambda *args: None)
    naive = scorer.score(codes, chunk_size=7)
    before_wrap = scorer.lm.context - 7  # chunks that end before the ring first wraps
    assert torch.allclose(naive[..., :before_wrap], reference[..., :before_wrap], atol=1e-4, equal_nan=True)
    assert (naive - reference).nan_to_num().abs().max() > 1e-2


def test_chunked_equals_lm_forward(setup, lm32):
    scorer, codes, reference = setup
    with torch.no_grad():
        full = forward_nll(lm32, codes, StreamLayout())
    torch.testing.assert_close(scorer.score(codes, chunk_size=64), full, atol=1e-4, rtol=0, equal_nan=True)


def test_nan_mask_is_exactly_the_delays(setup, lm32):
    scorer, codes, _ = setup
    nll = scorer.score(codes, chunk_size=16)
    delays = lm32.delays[1:9]
    for k, delay in enumerate(delays):
        expected = torch.zeros(T, dtype=torch.bool)
        if delay:
            expected[-delay:] = True
        assert torch.equal(nll[:, k].isnan(), expected.expand(2, T)), k
    assert torch.isfinite(nll[~nll.isnan()]).all()


def test_every_call_starts_fresh(setup):
    scorer, codes, reference = setup
    scorer.score(torch.randint(0, scorer.lm.card, (2, 8, 50)), chunk_size=9)
    torch.testing.assert_close(scorer.score(codes, chunk_size=9), reference, atol=1e-4, rtol=0, equal_nan=True)


def test_layout_options_change_the_context_not_the_shape(setup, lm32):
    scorer, codes, _ = setup
    pad = scorer.score(codes[:, :, :40], chunk_size=8)
    zero = scorer.score(codes[:, :, :40], chunk_size=8, layout=StreamLayout(text_stream="zero"))
    silence = scorer.score(codes[:, :, :40], chunk_size=8,
                           layout=StreamLayout(user_stream="silence", silence_frame=tuple(range(8))))
    assert not torch.allclose(pad, zero, equal_nan=True)
    assert not torch.allclose(pad, silence, equal_nan=True)
    with torch.no_grad():
        ref = forward_nll(lm32, codes[:, :, :40], StreamLayout(user_stream="silence", silence_frame=tuple(range(8))))
    torch.testing.assert_close(silence, ref, atol=1e-4, rtol=0, equal_nan=True)


def test_bfloat16_runs_and_stays_close(lm32):
    import copy

    lm16 = copy.deepcopy(lm32).to(torch.bfloat16)
    codes = torch.randint(0, lm32.card, (1, 8, 40))
    nll16 = FrozenScorer(lm=lm16).score(codes, chunk_size=16)
    nll32 = FrozenScorer(lm=lm32).score(codes, chunk_size=16)
    assert nll16.dtype == torch.float32
    assert (nll16 - nll32).nan_to_num().abs().mean() < 0.05


def test_rejects_bad_codes(setup):
    scorer, codes, _ = setup
    with pytest.raises(ValueError, match=r"\[B, 8, T\]"):
        scorer.score(codes[0], chunk_size=4)
    with pytest.raises(ValueError, match="codebooks"):
        scorer.score(codes[:, :4], chunk_size=4)
