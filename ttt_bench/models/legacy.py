"""The legacy adapter: the old, broken measurement, kept to quantify what it got wrong.

Each chunk's loss comes from a fresh, non-streaming ``LMModel.forward`` over the last ``window``
frames, so nothing accumulated while streaming (TTT fast weights, attention beyond the window)
reaches the loss. The window ends ``max_delay`` frames after the chunk (those frames are only
targets, never inputs: with moshi's delays they are where the chunk's last acoustic codes are
predicted), so every frame of the chunk gets a prediction.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ttt_bench.registry import check_model_args, get_model, register_model
from ttt_bench.models.base import ScorerInfo, StreamLayout, StreamingScorer, check_score_args
from ttt_bench.models.streaming import forward_nll

logger = logging.getLogger(__name__)


class LegacyScorer(StreamingScorer):
    """Wraps any scorer with a moshi ``lm`` and scores it the legacy way.

    window: frames per forward, ending ``max_delay`` frames after the chunk; None (default):
    the model's attention context before the chunk, plus the chunk and the delay frames.
    """

    name = "legacy"
    is_legacy = True

    def __init__(self, base: StreamingScorer, window: int | None = None):
        self.base = base
        self.lm = base.lm
        self.source = base.source  # the checkpoint (and so the Mimi codec) of the base
        self.window = int(window) if window is not None else None
        if self.window is not None and self.window < 1:
            raise ValueError(f"legacy window must be >= 1 frame, got {self.window}")

    @property
    def info(self) -> ScorerInfo:
        base = self.base.info
        window = self.window if self.window is not None else "context + chunk"
        return ScorerInfo(name=self.name, label=f"legacy[{base.label}]",
                          options={"legacy": True, "window": window, "base": base.name, "base_options": base.options})

    def record_source(self) -> dict[str, Any] | None:
        return self.base.record_source()  # the legacy method scores its base's weights

    def weights_changed(self) -> None:
        self.base.weights_changed()

    def score(self, codes: torch.Tensor, chunk_size: int = 64,
              layout: StreamLayout | None = None) -> torch.Tensor:
        check_score_args(codes, chunk_size)
        self.base.activate()  # the base's weights (a training run's checkpoint: swapped in)
        layout = layout or StreamLayout()
        codes = codes.to(self.lm.device, torch.long)
        T = codes.shape[-1]
        lead = max(self.lm.delays)
        nll = torch.full(codes.shape, float("nan"), dtype=torch.float32, device=codes.device)
        for start in range(0, T, chunk_size):
            end = min(start + chunk_size, T)
            nll[..., start:end] = self.window_nll(codes, layout, start, end, min(end + lead, T))
        return nll.cpu()

    def window_nll(self, codes: torch.Tensor, layout: StreamLayout, start: int, end: int,
                   stop: int) -> torch.Tensor:
        """NLL of frames start..end-1 from one fresh forward over frames stop - window..stop-1."""
        if self.window is None:  # default: the attention context before the chunk, then the chunk
            first = max(0, start - int(self.lm.context or 3000))
        else:
            first = max(0, stop - self.window)
        if first > start:
            raise ValueError(f"legacy window {self.window} is shorter than a chunk plus the codebook "
                             f"delays ({stop - start} frames); use a larger window or smaller chunks")
        with torch.no_grad():
            window = forward_nll(self.lm, codes[..., first:stop], layout)
        return window[..., start - first:end - first].float()


def legacy_name(model: str) -> str:
    """The name a model is reported under when ``use_fixed_method: false`` scores it the legacy way."""
    return f"legacy({model})"


def make_legacy(scorer: StreamingScorer, window: int | None = None) -> LegacyScorer:
    """The legacy version of ``scorer`` (what ``use_fixed_method: false`` runs)."""
    if isinstance(scorer, LegacyScorer):
        return scorer
    return LegacyScorer(scorer, window)


@register_model("legacy")
def legacy(base: str = "ttt", window: int | None = None, **kwargs: Any) -> LegacyScorer:
    """The old method, kept for comparison: each chunk scored by a fresh LMModel.forward over recent frames.

    ``get_model("legacy", base="ttt", window=W, **base_kwargs)``."""
    if base == "legacy":
        raise ValueError("legacy base cannot be legacy itself")
    return make_legacy(get_model(base, **kwargs), window)


def _check_legacy_args(args: dict[str, Any], chunk_size: int) -> None:
    """``base`` and ``window``; the rest are the base model's arguments."""
    base = args.get("base", "ttt")
    if base == "legacy":
        raise ValueError("legacy base cannot be legacy itself")
    check_model_args(str(base), {k: v for k, v in args.items() if k not in ("base", "window")}, chunk_size)


legacy.check_args = _check_legacy_args  # type: ignore[attr-defined]
