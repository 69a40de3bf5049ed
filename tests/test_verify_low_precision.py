"""The verification in bfloat16: rounding noise passes, real errors fail, each by a clear margin.

On a CPU the chunked and whole-window bf16 computations are bit-identical, so the errors are
injected through scorer subclasses on top of a correct streamed NLL, and the real
``verify_scorer`` judges them. The model is the tiny preset's shape in bf16 with its output heads
scaled so that its NLL varies by a trained model's 2-4 nats from one position to the next
(``benchmarks/common.py: scale_output_heads``): a misaligned frame then moves the loss by what
it would move a trained model's.
"""

import copy
import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_lm

from ttt_bench.evaluation.verify import LOW_PRECISION, VerificationError, compare_nll, verification_pair, verify_scorer
from ttt_bench.models.base import StreamLayout
from ttt_bench.models.frozen import FrozenScorer
from ttt_bench.models.legacy import LegacyScorer

CONTEXT = 160  # 160 frames x 8 codebooks: over 1000 NLL values, enough for the 99th percentile
CHUNK = 16
MARGIN = 2.0  # every case sits at least this factor away from the limit it is judged by


def load_common():
    spec = importlib.util.spec_from_file_location(
        "benchmark_common", Path(__file__).resolve().parents[1] / "benchmarks" / "common.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def codes():
    return torch.randint(0, 256, (8, CONTEXT + 40), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def lm(codes):
    model = tiny_lm(context=CONTEXT).to(torch.bfloat16)
    model.spread = load_common().scale_output_heads(model, codes[None, :, :64])
    return model


class Injected(FrozenScorer):
    """A correct streamed NLL with ``inject`` applied to it."""

    def __init__(self, lm, inject, adapts_weights=False):
        super().__init__(lm=lm)
        self.inject = inject
        self.adapts_weights = adapts_weights

    def score(self, codes, chunk_size=64, layout=None):
        return self.inject(super().score(codes, chunk_size, layout))


def rounding_noise(nll, std=0.03, outliers=0.001, outlier_size=0.5, seed=0):
    """The noise model the criterion must pass: Gaussian noise of ``std`` on every value, and
    ``outliers`` of the values (at least one) off by the full ``outlier_size``, either way."""
    generator = torch.Generator().manual_seed(seed)
    out = nll + std * torch.randn(nll.shape, generator=generator)
    finite = (~nll.isnan()).flatten().nonzero().squeeze(1)
    n_out = max(1, math.ceil(outliers * finite.numel()))
    picked = finite[torch.randperm(finite.numel(), generator=generator)[:n_out]]
    signs = torch.randint(0, 2, (n_out,), generator=generator) * 2 - 1
    out.view(-1)[picked] += outlier_size * signs
    return out


def misaligned(nll):
    """Each frame given its next frame's loss, the NaN mask kept (a roll within each codebook's
    predicted frames), so only the statistics can catch it."""
    out = nll.clone()
    for b in range(nll.shape[0]):
        for k in range(nll.shape[1]):
            n = int((~nll[b, k].isnan()).sum())
            out[b, k, :n] = nll[b, k, :n].roll(-1)
    return out


def verify(scorer, codes):
    return verify_scorer("model", scorer, "doc", codes, CHUNK, StreamLayout())


@pytest.fixture(scope="module")
def clean(lm, codes):
    """(streamed, reference) NLL of the correct model on the verification window, and on the
    first chunk only (what an adaptive scorer is verified on)."""
    return {adapts: verification_pair(Injected(lm, lambda nll: nll, adapts), codes, CHUNK, StreamLayout())
            for adapts in (False, True)}


def judged(clean, inject, dtype=torch.bfloat16, adapts_weights=False):
    """The record ``verify_scorer`` decides on for the correct streamed NLL with ``inject`` applied."""
    streamed, reference = clean[adapts_weights]
    return compare_nll("model", "doc", inject(streamed), reference, dtype)


def test_the_model_has_a_trained_models_spread(lm):
    assert 2.0 <= lm.spread["nll_std"] <= 4.0
    assert lm.spread["nll_max"] - lm.spread["nll_min"] > 10


def test_a_correct_bf16_model_passes_with_its_statistics_recorded(lm, codes):
    result = verify(FrozenScorer(lm=lm), codes).to_dict()
    assert result["passed"] and result["criterion"] == "robust" and result["dtype"] == "bfloat16"
    assert result["n_compared"] >= LOW_PRECISION.min_quantile_elements
    for key in ("max_abs_diff", "tolerance", "mean_abs_diff", "mean_diff", "quantile_abs_diff", "limits"):
        assert key in result
    assert set(result["limits"]) == {"abs_mean_diff", "mean_abs_diff", "quantile_abs_diff"}


def test_rounding_noise_passes_verify_scorer(lm, codes):
    assert verify(Injected(lm, rounding_noise), codes).passed


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_rounding_noise_passes_by_a_clear_margin(clean, seed):
    result = judged(clean, lambda nll: rounding_noise(nll, seed=seed))
    assert result.passed
    assert result.max_abs_diff >= 0.5, "the outliers must be in the window"
    assert abs(result.mean_diff) * MARGIN <= LOW_PRECISION.bias
    assert result.mean_abs_diff * MARGIN <= LOW_PRECISION.mean_abs
    assert result.quantile_abs_diff * MARGIN <= LOW_PRECISION.quantile_abs


def test_the_old_max_rule_would_have_failed_the_same_noise(clean):
    """Why the criterion changed: the largest of >1000 noisy differences is far over 5e-2."""
    assert judged(clean, rounding_noise).max_abs_diff > 5e-2


ERRORS = {
    # name: (injected error, the statistic that must catch it)
    "offset 0.05": (lambda nll: rounding_noise(nll) + 0.05, "abs_mean_diff"),
    "misaligned by one frame": (misaligned, "quantile_abs_diff"),
}


def test_an_offset_stops_the_run(lm, codes):
    with pytest.raises(VerificationError, match="differs from LMModel.forward.*abs_mean_diff over the limit"):
        verify(Injected(lm, ERRORS["offset 0.05"][0]), codes)


@pytest.mark.parametrize("name", ERRORS)
def test_an_injected_error_fails_by_a_clear_margin(clean, name):
    inject, statistic = ERRORS[name]
    result = judged(clean, inject)
    assert statistic in result.failed and "nan_mask" not in result.failed
    value = {"abs_mean_diff": abs(result.mean_diff), "quantile_abs_diff": result.quantile_abs_diff}[statistic]
    assert value >= MARGIN * result.limits[statistic]


def test_misalignment_also_fails_the_mean_absolute_difference(clean):
    result = judged(clean, misaligned)
    assert result.mean_abs_diff >= 10 * LOW_PRECISION.mean_abs


def test_a_separate_forward_pass_over_a_shorter_window_fails(lm, codes, clean):
    """The legacy method's loss: each chunk from a fresh LMModel.forward over the last 48 frames,
    so most frames of the 160-frame window lose context they had while streaming."""
    legacy = LegacyScorer(FrozenScorer(lm=lm), window=48)
    streamed, _ = verification_pair(legacy, codes, CHUNK, StreamLayout())
    result = judged(clean, lambda nll: streamed)
    assert {"mean_abs_diff", "quantile_abs_diff"} <= set(result.failed)
    assert result.mean_abs_diff >= MARGIN * LOW_PRECISION.mean_abs
    assert result.quantile_abs_diff >= MARGIN * LOW_PRECISION.quantile_abs


def test_float32_stays_strict(lm, codes, clean):
    lm32 = copy.deepcopy(lm).float()
    with pytest.raises(VerificationError, match="max_abs_diff over the limit"):
        verify(Injected(lm32, rounding_noise), codes)
    result = judged(clean, lambda nll: nll + 0.002, dtype=torch.float32)
    assert result.criterion == "max_abs" and result.failed == ["max_abs_diff"] and result.tolerance == 1e-3
    assert judged(clean, lambda nll: nll + 0.0009, dtype=torch.float32).passed


def test_few_values_judge_the_tail_by_the_largest_difference(clean):
    """Dynamic evaluation is verified on its first chunk only: ~120 values, too few for a 99th
    percentile. Noise still passes; one value off by 1.5 nats fails."""
    noise = judged(clean, lambda nll: rounding_noise(nll, outliers=0.0), adapts_weights=True)
    assert noise.n_compared < LOW_PRECISION.min_quantile_elements
    assert noise.passed and noise.quantile_abs_diff is None and "max_abs_diff" in noise.limits
    assert noise.tolerance == LOW_PRECISION.small_max_abs

    def one_bad(nll):
        out = rounding_noise(nll, outliers=0.0)
        out[0, 0, 3] += 1.5
        return out

    bad = judged(clean, one_bad, adapts_weights=True)
    assert bad.failed == ["max_abs_diff"]


def test_a_different_nan_mask_fails_whatever_the_statistics(clean):
    def hole(nll):
        out = nll.clone()
        out[0, 2, 5] = float("nan")
        return out

    result = judged(clean, hole)
    assert result.failed == ["nan_mask"] and not result.passed


if __name__ == "__main__":  # the margins, for the record: python tests/test_verify_low_precision.py
    from ttt_bench.evaluation.verify import describe

    words = torch.randint(0, 256, (8, CONTEXT + 40), generator=torch.Generator().manual_seed(5))
    model = tiny_lm(context=CONTEXT).to(torch.bfloat16)
    print("model", load_common().scale_output_heads(model, words[None, :, :64]))
    pairs = {a: verification_pair(Injected(model, lambda nll: nll, a), words, CHUNK, StreamLayout()) for a in (False, True)}
    legacy_nll = verification_pair(LegacyScorer(FrozenScorer(lm=model), window=48), words, CHUNK, StreamLayout())[0]
    cases = {"noise": rounding_noise, **{k: v[0] for k, v in ERRORS.items()}, "legacy window 48": lambda nll: legacy_nll}
    for label, inject in cases.items():
        print(f"{label}: {describe(judged(pairs, inject))}")
