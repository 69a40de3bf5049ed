"""The scorer contract every model adapter implements (docs/design.md, "The scorer contract")."""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Mapping

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
    """The scorer contract (docs/design.md, "The scorer contract"): every hook the evaluation
    calls, each with a default, so an adapter declares only what differs.

    ``score(codes [B, 8, T], chunk_size) -> nll [B, 8, T]`` in nats, NaN exactly where a
    position has no prediction (the codebook delays at the end of the stream). Every call
    starts from a fresh state.
    """

    name: ClassVar[str] = "scorer"
    is_legacy: ClassVar[bool] = False  # the old separate-forward-pass method (reported as such)
    adapts_weights: ClassVar[bool] = False  # weights change while scoring: only the first chunk
    #                                         can be checked against a plain forward pass
    attention_only: bool = False  # no memory but attention's (the recall task checks that such a
    #                               model gains nothing past its reach)
    lookahead: bool = False  # the loss at a frame depends on later frames by construction
    #                          (measured, and its rows flagged, without --allow_lookahead)
    source: Any = None  # the models.moshi.ModelSource it was loaded from (None: given in memory);
    #                     its Mimi codec encodes the audio
    step: int | None = None  # a training run's checkpoint: its training step ...
    series: str | None = None  # ... and the model name its run was given (``ttt`` of ``ttt@1500``)

    lm: Any  # the moshi LMModel being scored

    @abstractmethod
    def score(self, codes: torch.Tensor, chunk_size: int = 64,
              layout: StreamLayout | None = None) -> torch.Tensor:
        ...

    @property
    def info(self) -> ScorerInfo:
        """The leaderboard label and the options results.json records."""
        return ScorerInfo(name=self.name, label=self.name)

    def check_chunk_size(self, chunk_size: int) -> None:
        """Refuse (ValueError) a chunk size this model cannot be scored with."""

    def begin_document(self, batch_size: int) -> None:
        """Reset per-document state; run inside ``lm.streaming`` before the first chunk."""

    def record_source(self) -> dict[str, Any] | None:
        """The files the model was loaded from, with their sha256 (None: nothing loaded)."""
        return None

    def activate(self) -> None:
        """Make ``lm`` hold this model's weights before it is used without ``score`` (a training
        run's checkpoints share one ``lm`` and swap their tensors in)."""

    def weights_changed(self) -> None:
        """``lm``'s weights were replaced in place (the next checkpoint of a series): drop
        anything kept from the old ones."""

    @classmethod
    def check_args(cls, args: Mapping[str, Any], chunk_size: int) -> None:
        """Refuse, before anything is loaded, ``model_args`` this adapter does not take and chunk
        sizes it cannot score (ValueError naming them). By default: the keyword arguments of the
        constructors along the class hierarchy, plus ``accepted_args``."""
        accepted = cls.accepted_args()
        unknown = sorted(set(args) - accepted)
        if unknown:
            raise ValueError(f"model {cls.name!r}: unknown model_args {', '.join(unknown)}; it takes "
                             f"{', '.join(sorted(accepted))}")

    @classmethod
    def accepted_args(cls) -> set[str]:
        names: set[str] = set()
        for klass in cls.__mro__:
            init = klass.__dict__.get("__init__")
            if init is not None:
                names |= {p.name for p in inspect.signature(init).parameters.values()
                          if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self"}
        return names - {"device", "dtype"}


def check_score_args(codes: torch.Tensor, chunk_size: int) -> None:
    if codes.dim() != 3:
        raise ValueError(f"codes must be [B, 8, T], got shape {tuple(codes.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
