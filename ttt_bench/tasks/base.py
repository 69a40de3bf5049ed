"""Documents, skipped inputs and the Task base class."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ttt_bench.config import StreamTaskConfig, TaskConfig
from ttt_bench.metrics import ModelShape, StreamMetrics, TaskMetrics
from ttt_bench.models.streaming import audio_delays

ON_BAD_INPUT = ("skip", "fail")


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


class Task:
    """A task class: builds its documents from its config and owns the config keys it accepts
    (``config_class``) and the metrics it reports (``metrics``). Register one with
    ``@register_task("name")``; YAML configs name it in their ``class:`` key."""

    config_class: ClassVar[type[TaskConfig]] = StreamTaskConfig
    standalone: ClassVar[bool] = False  # finds its data without a config: listed as a task of its own name

    def __init__(self, config: TaskConfig):
        self.config = config
        self.name: str = config.task
        self.skipped: list[Skipped] = []
        self._on_bad_input = "skip"
        self.source_spec: dict[str, Any] = dict(config.source)  # the source as resolved (results.json)

    def use_models(self, scorers: dict[str, Any]) -> None:
        """Hook for tasks whose documents depend on the models (recall: the gap is their reach)."""

    def documents(self, codec: Any, limit: int | None = None, on_bad_input: str = "skip") -> list[Document]:
        raise NotImplementedError

    def start_documents(self, limit: int | None, on_bad_input: str, unit: str = "documents") -> None:
        """The checks every ``documents`` makes first (``limit``, ``on_bad_input``), and a fresh
        list of skipped inputs."""
        if on_bad_input not in ON_BAD_INPUT:
            raise ValueError(f"on_bad_input={on_bad_input!r}; choose one of {', '.join(ON_BAD_INPUT)}")
        if limit is not None and limit < 1:
            raise ValueError(f"limit={limit}: give a positive number of {unit} (or None for all)")
        self.skipped, self._on_bad_input = [], on_bad_input

    def metrics(self, lm: Any) -> TaskMetrics:
        """The metrics of this task for a model shaped like ``lm`` (its card and delays)."""
        return StreamMetrics(self.config, shape_of(lm))


def voice_sources(docs: list[Document]) -> dict[str, Any] | None:
    """Where the documents' voiced segments came from (``tasks[task]["voice_activity"]`` in
    results.json): ``source`` (``librilight_json``, ``energy``, or ``mixed``) and ``n_docs`` per
    source; None when no document carries voice activity (pair tasks)."""
    counts: dict[str, int] = {}
    for d in docs:
        if "voice_source" in d.meta:
            counts[d.meta["voice_source"]] = counts.get(d.meta["voice_source"], 0) + 1
    if not counts:
        return None
    return {"source": next(iter(counts)) if len(counts) == 1 else "mixed", "n_docs": counts}


def shape_of(lm: Any) -> ModelShape:
    """The shape the metrics need of a moshi ``LMModel``: its card and its audio codebooks' delays."""
    return ModelShape(card=int(lm.card), delays=tuple(audio_delays(lm)))
