"""Documents, skipped inputs and the Task base class."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ttt_bench.config import StreamTaskConfig, TaskConfig
from ttt_bench.metrics import MetricsConfig, StreamMetrics, TaskMetrics


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
        self.source_spec: dict[str, Any] = dict(config.source)  # the source as resolved (results.json)

    def use_models(self, scorers: dict[str, Any]) -> None:
        """Hook for tasks whose documents depend on the models (recall: the gap is their reach)."""

    def documents(self, codec: Any, limit: int | None = None, on_bad_input: str = "skip") -> list[Document]:
        raise NotImplementedError

    def metrics(self, lm: Any) -> TaskMetrics:
        """The metrics of this task for a model shaped like ``lm`` (its card and delays)."""
        return stream_metrics(self.config, lm)


def stream_metrics(config: Any, lm: Any) -> StreamMetrics:
    """The long-stream metrics configured by a :class:`StreamTaskConfig`."""
    return StreamMetrics(MetricsConfig(
        positions=config.positions, window=config.window, early_late_frames=config.early_late_frames,
        slope_range=config.slope_range, segments=config.segments, bootstrap_iters=config.bootstrap_iters,
        card=lm.card, delays=audio_delays(lm), targets=config.targets))


def audio_delays(lm: Any) -> list[int]:
    """The delays of Moshi's own audio codebooks (the ones scored)."""
    return list(lm.delays[lm.audio_offset:lm.audio_offset + lm.dep_q])
