"""Built-in verification: the streaming loss is re-computed with LMModel.forward before a run is trusted."""

import pytest
import torch

from ttt_bench.models.base import StreamLayout
from ttt_bench.models.frozen import FrozenScorer
from ttt_bench.evaluation.verify import VerificationError, verification_frames, verify_scorer


class SeparatePassScorer(FrozenScorer):
    """The old bug in miniature: the loss of each chunk comes from a pass over only that chunk."""

    def score(self, codes, chunk_size=64, layout=None):
        parts = [super(SeparatePassScorer, self).score(codes[..., s:s + chunk_size], chunk_size, layout)
                 for s in range(0, codes.shape[-1], chunk_size)]
        return torch.cat(parts, dim=-1)


@pytest.fixture(scope="module")
def codes():
    torch.manual_seed(4)
    return torch.randint(0, 256, (8, 90))


def test_frozen_passes(lm32, codes):
    result = verify_scorer("frozen", FrozenScorer(lm=lm32), "doc", codes, 8, StreamLayout())
    assert result.passed and result.frames == lm32.context
    assert result.max_abs_diff <= 1e-4


def test_a_scorer_that_loses_its_context_fails_loudly(lm32, codes):
    with pytest.raises(VerificationError, match="differs from LMModel.forward"):
        verify_scorer("broken", SeparatePassScorer(lm=lm32), "doc", codes, 8, StreamLayout())


def test_adaptive_scorers_are_checked_on_their_first_chunk(lm32):
    class Adaptive(FrozenScorer):
        adapts_weights = True

    assert verification_frames(Adaptive(lm=lm32), 90, 8) == 8
    assert verification_frames(FrozenScorer(lm=lm32), 90, 8) == lm32.context
    assert verification_frames(FrozenScorer(lm=lm32), 20, 8) == 20


def test_dynamic_evaluation_verifies_on_its_first_chunk(lm32, codes):
    import copy

    from ttt_bench.registry import get_model

    dyneval = get_model("dyneval", lm=copy.deepcopy(lm32), lr=1e-2)
    assert dyneval.adapts_weights
    result = verify_scorer("dyneval", dyneval, "doc", codes, 8, StreamLayout())
    assert result.passed and result.frames == 8
