"""The scorer contract every model adapter implements (docs/design.md, "Contract")."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch


@dataclass(frozen=True)
class StreamLayout:
    """What goes on Moshi's streams besides the recording (which is on its own audio stream).

    text_stream: "pad" (the model's text padding token) or "zero" (-1, no input).
    user_stream: "zero" (-1, no input) or "silence" (Mimi codes of silence, ``silence_frame``).
    """

    text_stream: Literal["pad", "zero"] = "pad"
    user_stream: Literal["zero", "silence"] = "zero"
    silence_frame: tuple[int, ...] | None = None  # 8 Mimi codes of steady-state silence

    def __post_init__(self):
        if self.text_stream not in ("pad", "zero"):
            raise ValueError(f"text_stream must be 'pad' or 'zero', got {self.text_stream!r}")
        if self.user_stream not in ("zero", "silence"):
            raise ValueError(f"user_stream must be 'zero' or 'silence', got {self.user_stream!r}")
        if self.user_stream == "silence" and self.silence_frame is None:
            raise ValueError("user_stream='silence' needs silence_frame (the Mimi codes of silence)")


@dataclass
class ScorerInfo:
    """What results.json records about a scorer."""

    name: str
    label: str
    options: dict[str, Any] = field(default_factory=dict)


class StreamingScorer(ABC):
    """Scores long streams of Mimi codes with teacher-forced next-frame NLL.

    ``score(codes [B, 8, T], chunk_size) -> nll [B, 8, T]`` in nats, NaN exactly where a
    position has no prediction (the codebook delays at the end of the stream). Every call
    starts from a fresh state.
    """

    name: ClassVar[str] = "scorer"
    is_legacy: ClassVar[bool] = False
    adapts_weights: ClassVar[bool] = False  # weights change while scoring: only the first chunk
    #                                         can be checked against a plain forward pass
    attention_only: ClassVar[bool] = False  # no memory but attention's (the recall task checks
    #                                         that such a model gains nothing past its reach)

    lm: Any  # the moshi LMModel being scored

    @abstractmethod
    def score(self, codes: torch.Tensor, chunk_size: int = 64,
              layout: StreamLayout | None = None) -> torch.Tensor:
        ...

    @property
    def info(self) -> ScorerInfo:
        return ScorerInfo(name=self.name, label=self.name)


def check_score_args(codes: torch.Tensor, chunk_size: int) -> None:
    if codes.dim() != 3:
        raise ValueError(f"codes must be [B, 8, T], got shape {tuple(codes.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
