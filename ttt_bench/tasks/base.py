"""Documents and the Task base class."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Document:
    """One long recording as Mimi codes.

    doc_id: stable id (for LibriLight: ``<speaker>/<book>/<file>``).
    codes: LongTensor [8, T].
    meta: source, duration_s, n_frames, files (and whatever the source knows: speaker, book, snr).
    """

    doc_id: str
    codes: torch.Tensor
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_frames(self) -> int:
        return int(self.codes.shape[-1])


@dataclass
class Skipped:
    """A document that was not evaluated, and why (reported in results.json, never silent)."""

    doc_id: str
    reason: str
