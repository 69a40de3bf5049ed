"""Built-in verification (``verify_loss_computation``): re-score the start of a document with
one plain ``LMModel.forward`` and fail loudly if the streaming scorer disagrees."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import torch

from .models.base import StreamLayout
from .models.streaming import forward_nll

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


def verification_frames(scorer, n_frames: int, chunk_size: int) -> int:
    """How much of a document a plain forward pass can reproduce: the attention context (both
    apply the same mask), or only the first chunk for adapters that change their weights."""
    if getattr(scorer, "adapts_weights", False):
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
