"""Built-in verification (``verify_loss_computation``): re-score the start of a document with
one plain ``LMModel.forward`` and fail loudly if the streaming scorer disagrees.

The comparison (docs/design.md, "Verification in low precision"): in float32 the largest
difference must stay within 1e-3 nats. In bfloat16/float16 a chunk and a whole-window forward
round differently on a GPU, so the maximum of tens of thousands of differences says more about
rounding than about the measurement; there the decision rests on robust statistics of
d = streamed - reference: its mean (a systematic offset), its mean absolute value and its 99th
percentile (an error on more than 1% of the positions). Rounding noise passes (std 0.03 nats on
every element plus 0.1% of elements off by up to 0.5); a loss from the wrong pass, a misaligned
frame or an offset of 0.05 nats fails (tests/test_verify_low_precision.py).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

import torch

from ttt_bench.models.base import StreamingScorer, StreamLayout
from ttt_bench.models.streaming import audio_delays, forward_nll

logger = logging.getLogger(__name__)

TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-3}  # max |diff|, nats: the strict check
STRICT = "max_abs"  # the criterion's name in results.json


@dataclass(frozen=True)
class LowPrecisionLimits:
    """The low-precision criterion's thresholds (nats) and why they sit where they do.

    Noise it must pass (rounding; std 0.03 on every element, 0.1% of elements off by up to 0.5):
    |mean d| ~ 0.03 / sqrt(n) + 0.0005, mean |d| ~ 0.024, 99th percentile of |d| ~ 0.077.
    Errors it must catch: an offset of 0.05 (|mean d| = 0.05), a loss misaligned by one frame
    (mean |d| of the order of the NLL's frame-to-frame spread, nats), a separate forward pass over
    a shorter window (a different context for most frames). Each of the three limits sits a factor
    of 2.5 or more away from both sides; the small-window stand-in (max |d| <= 1) sits a factor of 2
    above the 0.5-nat outliers.
    """

    bias: float = 0.02  # |mean d|
    mean_abs: float = 0.1  # mean |d|
    quantile: float = 0.99
    quantile_abs: float = 0.25  # the 99th percentile of |d|
    min_quantile_elements: int = 1000  # a percentile needs >= 10 elements above it ...
    small_max_abs: float = 1.0  # ... below that, max |d| (twice the outliers' 0.5) stands in for it

    @property
    def name(self) -> str:
        return f"robust: |mean d| <= {self.bias:g}, mean |d| <= {self.mean_abs:g}, " \
               f"q{100 * self.quantile:g} |d| <= {self.quantile_abs:g}"


LOW_PRECISION = LowPrecisionLimits()
LOW_PRECISION_DTYPES = (torch.bfloat16, torch.float16)


class VerificationError(RuntimeError):
    """The streaming loss does not match a plain forward pass: the measurement is wrong."""


@dataclass
class Verification:
    model: str
    doc_id: str
    frames: int
    max_abs_diff: float
    tolerance: float  # the limit on the statistic that judges the tail (max |d|, or the quantile)
    passed: bool
    criterion: str = STRICT  # "max_abs" (float32) or "robust" (bfloat16, float16)
    dtype: str = "float32"
    n_compared: int = 0  # elements where both are finite
    mean_abs_diff: float = float("nan")
    mean_diff: float = float("nan")
    quantile: float = LOW_PRECISION.quantile
    quantile_abs_diff: float | None = None  # None: too few elements for the percentile
    limits: dict = field(default_factory=dict)  # statistic -> its limit, as decided on
    failed: list = field(default_factory=list)  # the statistics over their limits
    same_nan_mask: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


def verification_frames(scorer: StreamingScorer, n_frames: int, chunk_size: int) -> int:
    """How much of a document a plain forward pass can reproduce: the attention context (both
    apply the same mask), or only the first chunk for adapters that change their weights."""
    if scorer.adapts_weights:
        return min(n_frames, chunk_size)
    context = scorer.lm.context or n_frames
    return min(n_frames, context)


def verification_pair(scorer, codes: torch.Tensor, chunk_size: int,
                      layout: StreamLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """(streamed, reference) NLL [1, 8, frames] of the first ``verification_frames`` of ``codes``
    [8, T]: ``scorer.score`` and one plain ``LMModel.forward``, both float32 on the CPU."""
    frames = verification_frames(scorer, codes.shape[-1], chunk_size)
    window = codes[None, :, :frames]
    streamed = scorer.score(window, chunk_size=chunk_size, layout=layout)
    with torch.no_grad():
        reference = forward_nll(scorer.lm, window.to(scorer.lm.device), layout).float().cpu()
    return streamed, reference


def differences(streamed: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """d = streamed - reference where both are finite, flattened."""
    both = ~(streamed.isnan() | reference.isnan())
    return (streamed.float() - reference.float())[both]


def compare_nll(name: str, doc_id: str, streamed: torch.Tensor, reference: torch.Tensor,
                dtype: torch.dtype, limits: LowPrecisionLimits = LOW_PRECISION) -> Verification:
    """Judge streamed against reference NLL (same shape) for a model computing in ``dtype``:
    max |d| <= 1e-3 in float32, the robust statistics of :class:`LowPrecisionLimits` in
    bfloat16/float16. NaN masks must be equal in both. Returns the record; raises nothing."""
    same_mask = torch.equal(streamed.isnan(), reference.isnan())
    d = differences(streamed, reference).double()
    n = d.numel()
    absd = d.abs()
    max_abs = float(absd.max()) if n else float("nan")
    mean_abs = float(absd.mean()) if n else float("nan")
    mean = float(d.mean()) if n else float("nan")
    q = float(torch.quantile(absd, limits.quantile)) if n >= limits.min_quantile_elements else None
    record = Verification(name, doc_id, streamed.shape[-1], max_abs, 0.0, False,
                          dtype=str(dtype).removeprefix("torch."), n_compared=n, mean_abs_diff=mean_abs,
                          mean_diff=mean, quantile=limits.quantile, quantile_abs_diff=q, same_nan_mask=same_mask)
    if dtype in LOW_PRECISION_DTYPES:
        record.criterion = "robust"
        stats = {"abs_mean_diff": (abs(mean), limits.bias), "mean_abs_diff": (mean_abs, limits.mean_abs)}
        if q is not None:
            stats["quantile_abs_diff"] = (q, limits.quantile_abs)
        else:  # too few elements for a percentile: the largest difference stands in for it
            stats["max_abs_diff"] = (max_abs, limits.small_max_abs)
        record.tolerance = limits.quantile_abs if q is not None else limits.small_max_abs
    else:
        record.criterion = STRICT
        record.tolerance = TOLERANCE.get(dtype, TOLERANCE[torch.float32])
        stats = {"max_abs_diff": (max_abs, record.tolerance)}
    record.limits = {key: limit for key, (_, limit) in stats.items()}
    record.failed = [key for key, (value, limit) in stats.items() if not value <= limit]  # NaN fails
    if not same_mask:
        record.failed.append("nan_mask")
    record.passed = not record.failed
    return record


def describe(record: Verification) -> str:
    """The statistics a record decided on, for a log line or an error message."""
    q = "-" if record.quantile_abs_diff is None else f"{record.quantile_abs_diff:.3g}"
    return (f"{record.n_compared} NLL values ({record.dtype}, criterion {record.criterion}): max |d| "
            f"{record.max_abs_diff:.3g}, mean |d| {record.mean_abs_diff:.3g}, mean d {record.mean_diff:+.3g}, "
            f"q{100 * record.quantile:g} |d| {q}; limits {record.limits}")


def verify_scorer(name: str, scorer, doc_id: str, codes: torch.Tensor, chunk_size: int,
                  layout: StreamLayout) -> Verification:
    """Compare ``scorer.score`` with ``LMModel.forward`` on the first frames of ``codes`` [8, T]."""
    streamed, reference = verification_pair(scorer, codes, chunk_size, layout)
    result = compare_nll(name, doc_id, streamed, reference, scorer.lm.dtype)
    if not result.passed:
        raise VerificationError(
            f"{name}: streaming NLL differs from LMModel.forward on the first {result.frames} frames of {doc_id} "
            f"({', '.join(result.failed)} over the limit; {describe(result)}; NaN masks equal: "
            f"{result.same_nan_mask}). The loss is not being measured correctly; do not trust this run.")
    logger.info("verified %s on %s: %d frames, %s", name, doc_id, result.frames, describe(result))
    return result


# ----------------------------------------------------------------------------- causality

CAUSALITY_FRAMES = 128  # frames of the first document checked (at least two chunks)
CAUSALITY_TOLERANCE = 1e-6  # nats; a causal model built from deterministic kernels changes nothing at all


class CausalityError(VerificationError):
    """The loss at a frame depends on later frames (look-ahead)."""


@dataclass
class CausalityCheck:
    model: str
    doc_id: str
    frames: int  # scored twice: as it is, and with every frame from perturbed_from on changed
    perturbed_from: int
    max_abs_change_before: float  # largest NLL change where no later frame may reach
    max_abs_change_after: float  # the perturbation's own effect (> 0: the check had teeth)
    tolerance: float
    passed: bool
    lookahead_allowed: bool

    def to_dict(self) -> dict:
        return asdict(self)


def causality_probe(n_frames: int, chunk_size: int) -> tuple[int, int]:
    """(frames scored, first perturbed frame p).

    Frame p first enters the model at input step p + 1, and the NLL of frame t comes from step t,
    so a look-ahead inside a block of steps (a chunk, a TTT mini-batch) is only visible if that
    block holds step p + 1 and some step < p. The cut puts p + 1 at offset 6 of every block of 8
    steps, hence at an offset >= 2 of any power-of-two block of 4 or more steps."""
    frames = min(n_frames, max(2 * chunk_size, CAUSALITY_FRAMES))
    start = frames // 2 + 5
    start -= (start + 1 - 6) % 8
    return frames, max(1, min(frames - 1, start))


def perturb_from(codes: torch.Tensor, start: int, card: int, seed: int = 0) -> torch.Tensor:
    """``codes`` with every code at frames >= ``start`` replaced by a different one."""
    generator = torch.Generator().manual_seed(seed)
    shift = torch.randint(1, card, codes[..., start:].shape, generator=generator)
    other = codes.clone()
    other[..., start:] = (codes[..., start:] + shift) % card
    return other


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest |a - b|; NaN in only one of them counts as infinite."""
    if a.numel() == 0:
        return 0.0
    if not torch.equal(a.isnan(), b.isnan()):
        return float("inf")
    both = ~a.isnan()
    return float((a[both] - b[both]).abs().max()) if both.any() else 0.0


def verify_causality(name: str, scorer, doc_id: str, codes: torch.Tensor, chunk_size: int,
                     layout: StreamLayout, allow_lookahead: bool = False) -> CausalityCheck:
    """Score the start of ``codes`` [8, T], change every frame from p on, score again: the NLL of
    codebook k at frames < p - delay_k (the frames that do not see frame p through the codebook
    delays) must not move. Raises :class:`CausalityError` unless ``allow_lookahead``."""
    lm = scorer.lm
    frames, start = causality_probe(codes.shape[-1], chunk_size)
    window = codes[None, :, :frames]
    base = scorer.score(window, chunk_size=chunk_size, layout=layout)
    changed = scorer.score(perturb_from(window, start, lm.card), chunk_size=chunk_size, layout=layout)
    delays = audio_delays(lm)
    before = max(_max_abs_diff(base[:, k, :max(0, start - d)], changed[:, k, :max(0, start - d)])
                 for k, d in enumerate(delays))
    after = _max_abs_diff(base[..., start:].nan_to_num(), changed[..., start:].nan_to_num())
    passed = before <= CAUSALITY_TOLERANCE
    result = CausalityCheck(name, doc_id, frames, start, before, after, CAUSALITY_TOLERANCE, passed,
                            allow_lookahead)
    if not passed and not allow_lookahead:
        raise CausalityError(
            f"{name}: the loss at a frame depends on later frames: changing frames {start}..{frames - 1} of "
            f"{doc_id} moved the NLL of earlier frames by up to {before:.3g} nats (> {CAUSALITY_TOLERANCE:g}). "
            "The model looks ahead, so its loss is not a prediction; pass --allow_lookahead to measure it "
            "anyway (its rows are flagged 'lookahead').")
    log = logger.info if passed else logger.warning
    log("causality %s on %s: frames %d.. changed, earlier NLL moved by %.2e (%s)", name, doc_id, start,
        before, "causal" if passed else "LOOK-AHEAD, allowed")
    return result
