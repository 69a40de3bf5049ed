"""The speed-up paths give exactly the plain path's numbers."""

import pytest
import torch
from conftest import assert_exactly_equal, tiny_lm

from ttt_bench.models.dyneval import DynEvalScorer
from ttt_bench.models.frozen import FrozenScorer
from ttt_bench.models.streaming import text_head_skipped
from ttt_bench.models.ttt import TTTScorer


@pytest.fixture(scope="module")
def codes():
    return torch.randint(0, 256, (2, 8, 70), generator=torch.Generator().manual_seed(3))


SCORERS = {
    "frozen": lambda: FrozenScorer(lm=tiny_lm(context=32)),
    "ttt": lambda: TTTScorer(lm=tiny_lm(context=32), layers="last 1", inner="mlp", mini_batch_size=4),
    "dyneval": lambda: DynEvalScorer(lm=tiny_lm(context=32), lr=1e-2, optimizer="adam"),
}


@pytest.mark.parametrize("name", SCORERS)
def test_skipping_the_text_head_changes_no_nll(name, codes):
    scorer = SCORERS[name]()
    head = scorer.lm.text_linear
    calls = []
    head.register_forward_hook(lambda *args: calls.append(1))
    skipped = scorer.score(codes, chunk_size=16)
    assert not calls, "the text head still ran"
    scorer.skip_text_head = False
    computed = scorer.score(codes, chunk_size=16)
    assert calls, "the plain path must compute the text head"
    assert_exactly_equal(skipped, computed)
    assert scorer.lm.text_linear is head


def test_text_head_is_put_back_after_an_error(lm32):
    head = lm32.text_linear
    with pytest.raises(RuntimeError, match="boom"):
        with text_head_skipped(lm32):
            assert lm32.text_linear is not head
            raise RuntimeError("boom")
    assert lm32.text_linear is head
