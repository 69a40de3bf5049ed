"""Built-in verification (``verify_loss_computation``): re-score the start of a document with
one plain ``LMModel.forward`` and fail loudly if the streaming scorer disagrees."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import torch

from ttt_bench.models.base import StreamingScorer, StreamLayout
from ttt_bench.models.streaming import audio_delays, forward_nll

logger = logging.getLogger(__name__)

TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 5e-2, torch.float16: 5e-2}  # max |diff|, nats


class VerificationError(RuntimeError):
    """The streaming loss does not match a plain forward pass: the measurement is wrong."""


@dataclass
class Verification:
    model: str
    doc_id: str
    frames: int
    max_abs_diff: float
    tolerance: float
    passed: bool

    def to_dict(self) -> dict:
        return asdict(self)


def verification_frames(scorer: StreamingScorer, n_frames: int, chunk_size: int) -> int:
    """How much of a document a plain forward pass can reproduce: the attention context (both
    apply the same mask), or only the first chunk for adapters that change their weights."""
    if scorer.adapts_weights:
        return min(n_frames, chunk_size)
    context = scorer.lm.context or n_frames
    return min(n_frames, context)


def verify_scorer(name: str, scorer, doc_id: str, codes: torch.Tensor, chunk_size: int,
                  layout: StreamLayout) -> Verification:
    """Compare ``scorer.score`` with ``LMModel.forward`` on the first frames of ``codes`` [8, T]."""
    frames = verification_frames(scorer, codes.shape[-1], chunk_size)
    window = codes[None, :, :frames]
    streamed = scorer.score(window, chunk_size=chunk_size, layout=layout)
    with torch.no_grad():
        reference = forward_nll(scorer.lm, window.to(scorer.lm.device), layout).float().cpu()
    both = ~(streamed.isnan() | reference.isnan())
    same_mask = torch.equal(streamed.isnan(), reference.isnan())
    diff = float((streamed[both] - reference[both]).abs().max()) if both.any() else float("nan")
    tolerance = TOLERANCE.get(scorer.lm.dtype, 5e-2)
    result = Verification(name, doc_id, frames, diff, tolerance, same_mask and diff <= tolerance)
    if not result.passed:
        raise VerificationError(
            f"{name}: streaming NLL differs from LMModel.forward on the first {frames} frames of {doc_id} "
            f"(max |diff| {diff:.3g} > {tolerance:g}, NaN masks equal: {same_mask}). The loss is not being "
            "measured correctly; do not trust this run.")
    logger.info("verified %s on %s: %d frames, max |diff| %.2e", name, doc_id, frames, diff)
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
