"""The legacy adapter: a fresh LMModel.forward over a window per chunk, ignoring streamed state."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_lm
from ttt_bench.models.frozen import FrozenScorer
from ttt_bench.models.legacy import LegacyScorer, make_legacy
from ttt_bench.models.ttt import TTTScorer
from ttt_bench.registry import get_model

CONTEXT, CHUNK, T = 8, 6, 40


@pytest.fixture(scope="module")
def codes() -> torch.Tensor:
    torch.manual_seed(7)
    return torch.randint(0, 256, (2, 8, T))


def covering_window(lm) -> int:
    """Frames a window needs so that every scored frame sees exactly its streaming inputs: the
    chunk, the codebook delay, the receptive field of the stacked attention, and the two first
    steps of a window (initial tokens instead of real frames)."""
    return CHUNK + max(lm.delays) + len(lm.transformer.layers) * (lm.context - 1) + 2


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert torch.equal(a.isnan(), b.isnan())
    return float((a - b).nan_to_num().abs().max())


def test_frozen_legacy_equals_streaming_when_the_window_covers_the_context(codes):
    frozen = FrozenScorer(lm=tiny_lm(context=CONTEXT))
    window = covering_window(frozen.lm)
    assert window < T - CHUNK  # the window really slides
    streaming = frozen.score(codes, chunk_size=CHUNK)
    assert max_diff(make_legacy(frozen, window).score(codes, chunk_size=CHUNK), streaming) < 1e-4
    short = make_legacy(frozen, CHUNK + 4).score(codes, chunk_size=CHUNK)
    assert max_diff(short, streaming) > 1e-2  # a window shorter than the receptive field is not


def test_ttt_legacy_ignores_the_streamed_fast_weights(codes):
    scorer = TTTScorer(lm=tiny_lm(context=CONTEXT), layers="all", inner="linear", mini_batch_size=4,
                       gate_init=0.5)
    streaming = scorer.score(codes, chunk_size=CHUNK)
    legacy = make_legacy(scorer, covering_window(scorer.lm)).score(codes, chunk_size=CHUNK)
    late = slice(covering_window(scorer.lm), None)  # once windows stop starting at frame 0
    assert max_diff(legacy[..., late], streaming[..., late]) > 1e-2
    # a window holding the whole stream replays it from frame 0 and matches the streaming pass
    assert max_diff(make_legacy(scorer, T).score(codes, chunk_size=CHUNK), streaming) < 1e-4


def test_registry_labels_and_errors():
    scorer = get_model("legacy", base="frozen", preset="tiny", window="12")
    assert isinstance(scorer, LegacyScorer) and scorer.is_legacy and scorer.window == 12
    assert scorer.info.name == "legacy" and scorer.info.label.startswith("legacy")
    assert scorer.info.options["legacy"] is True and scorer.info.options["base"] == "frozen"
    assert get_model("legacy", preset="tiny", gate_init=0.0).base.name == "ttt"  # default base
    with pytest.raises(ValueError, match="window"):
        scorer.score(torch.randint(0, 256, (1, 8, 30)), chunk_size=16)


def test_default_window_is_the_context_before_each_chunk(codes):
    frozen = FrozenScorer(lm=tiny_lm(context=CONTEXT))
    default = make_legacy(frozen).score(codes, chunk_size=16)  # chunks longer than the context
    explicit = make_legacy(frozen, CONTEXT + 16 + max(frozen.lm.delays)).score(codes, chunk_size=16)
    full_chunks = slice(0, T // 16 * 16)  # the short last chunk's explicit window reaches further back
    assert torch.equal(default[..., full_chunks].nan_to_num(), explicit[..., full_chunks].nan_to_num())
    assert torch.equal(default.isnan(), explicit.isnan())
