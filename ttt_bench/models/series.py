"""The checkpoints of a training run as scorers sharing one loaded model (docs/design.md, data flow).

:func:`build_series` builds the series' model once, from its first checkpoint, and gives one
:class:`CheckpointScorer` per checkpoint. A checkpoint scorer swaps its own tensors into the
shared model before it scores (``loading/series.py``): only one checkpoint is in memory at a
time, and its NLL is what evaluating that checkpoint alone gives (with LoRA unfused).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Any, Iterator

import torch

from ttt_bench.models.base import ScorerInfo, StreamLayout, StreamingScorer
from ttt_bench.models.loading.series import CheckedCheckpoint, load_in_place

logger = logging.getLogger(__name__)


class SharedModel:
    """The one built scorer of a series and which checkpoint's tensors it holds now."""

    def __init__(self, scorer: StreamingScorer, active: CheckedCheckpoint):
        self.scorer = scorer
        self.active = active
        self.swaps = 0  # checkpoints swapped in after the first (what the benchmark and tests count)

    def _inner(self) -> list[StreamingScorer]:
        """The scorer and, for legacy, the scorer it wraps (both record the source)."""
        base = getattr(self.scorer, "base", None)
        return [self.scorer] + ([base] if isinstance(base, StreamingScorer) else [])

    def activate(self, checked: CheckedCheckpoint) -> None:
        if self.active is checked:
            return
        logger.info("series: swapping in %s (%s)", checked.member.name, checked.path)
        load_in_place(self.scorer.lm, checked)
        self.active = checked
        self.swaps += 1
        for scorer in self._inner():
            self._describe_as(scorer, checked)
        self.scorer.weights_changed()  # (legacy passes it on to the scorer it wraps)

    @staticmethod
    def _describe_as(scorer: StreamingScorer, checked: CheckedCheckpoint) -> None:
        scorer.source = checked.source
        if checked.fork_info is not None and getattr(scorer, "fork_checkpoint", None) is not None:
            scorer.fork_checkpoint = {**scorer.fork_checkpoint, **checked.fork_info,
                                      "training_config": str(checked.source.checkpoint.training_config_path)}

    @contextlib.contextmanager
    def describing(self, checked: CheckedCheckpoint) -> Iterator[StreamingScorer]:
        """The scorer describing ``checked`` (its source, files, label), weights untouched."""
        saved = [(s, s.source, getattr(s, "fork_checkpoint", None)) for s in self._inner()]
        try:
            for scorer in self._inner():
                self._describe_as(scorer, checked)
            yield self.scorer
        finally:
            for scorer, source, fork in saved:
                scorer.source = source
                if fork is not None:
                    scorer.fork_checkpoint = fork


class CheckpointScorer(StreamingScorer):
    """One checkpoint of a series: the shared model with this checkpoint's tensors swapped in."""

    def __init__(self, shared: SharedModel, checked: CheckedCheckpoint):
        self.shared = shared
        self.checked = checked
        self.name = shared.scorer.name
        self.step = checked.member.step
        self.series = checked.member.series
        self.source = checked.source

    @property
    def lm(self) -> Any:  # type: ignore[override]
        return self.shared.scorer.lm

    @property
    def is_legacy(self) -> bool:  # type: ignore[override]
        return self.shared.scorer.is_legacy

    @property
    def adapts_weights(self) -> bool:  # type: ignore[override]
        return self.shared.scorer.adapts_weights

    @property
    def attention_only(self) -> bool:  # type: ignore[override]
        return self.shared.scorer.attention_only

    @property
    def lookahead(self) -> bool:  # type: ignore[override]
        return self.shared.scorer.lookahead

    def check_chunk_size(self, chunk_size: int) -> None:
        self.shared.scorer.check_chunk_size(chunk_size)

    def activate(self) -> None:
        self.shared.activate(self.checked)

    def score(self, codes: torch.Tensor, chunk_size: int = 64,
              layout: StreamLayout | None = None) -> torch.Tensor:
        self.activate()
        return self.shared.scorer.score(codes, chunk_size, layout)

    @property
    def info(self) -> ScorerInfo:
        with self.shared.describing(self.checked) as scorer:
            info = scorer.info
        label, name = info.label, self.checked.member.name
        if label == scorer.name or label.startswith((f"{scorer.name} ", f"{scorer.name}[")):
            label = name + label[len(scorer.name):]
        else:
            label = f"{name} {label}"
        options = {**info.options, "step": self.step, "series": self.series}
        return ScorerInfo(name=info.name, label=label, options=options)

    def record_source(self) -> dict[str, Any] | None:
        with self.shared.describing(self.checked) as scorer:
            return scorer.record_source()


def build_series(build: Any, checked: list[CheckedCheckpoint]) -> dict[str, CheckpointScorer]:
    """One scorer per checked checkpoint, on one model that ``build(first)`` builds (the base
    loaded once)."""
    scorer = build(checked[0])
    shared = SharedModel(scorer, checked[0])
    for scorer_ in shared._inner():
        SharedModel._describe_as(scorer_, checked[0])
    return {c.member.name: CheckpointScorer(shared, c) for c in checked}


def check_runs(runs: dict[str, Any], per_model: dict[str, Any], seed: int, on_error: str | None
               ) -> tuple[dict[str, list[CheckedCheckpoint]], list[dict[str, Any]]]:
    """Every checkpoint of every series checked before anything loads. A bad one (missing,
    truncated or mis-shaped files, or one that cannot share the series' model) stops the run
    with every bad one named (CheckpointError), as a single bad checkpoint does, unless
    ``on_error="skip"`` was given: then it is left out and returned as skipped."""
    from ttt_bench.models.loading.checkpoints import CheckpointError
    from ttt_bench.models.loading.moshi import ModelSource
    from ttt_bench.models.loading.series import check_series

    def make_source(member):
        load = {k: v for k, v in per_model[member.name].load.items() if k not in ("mimi", "seed") and v is not None}
        source = ModelSource.make(seed=int(per_model[member.name].load.get("seed", seed)), **load)
        if source.checkpoint is not None and source.checkpoint.kind == "lora" and source.checkpoint.fuse_lora:
            # a series swaps adapters, so they stay apart from the base weights (moshi's LoRALinear)
            source.checkpoint.fuse_lora = False
            source.checkpoint.args = dataclasses.replace(source.checkpoint.args, fuse_lora=False)
        return source

    checked: dict[str, list[CheckedCheckpoint]] = {}
    skipped: list[dict[str, Any]] = []
    for name, run in runs.items():
        good, bad = check_series(run, make_source)
        for b in bad:
            logger.warning("checkpoint %s (%s) cannot be evaluated: %s", b["path"], b["model"], b["reason"])
        if bad and on_error != "skip":
            raise CheckpointError(f"model {name!r}: {len(bad)} of {len(run.members)} checkpoints cannot be loaded: "
                                  + "; ".join(f"{b['path']}: {b['reason']}" for b in bad)
                                  + " (--on_error skip evaluates the others and lists these)")
        if not good:
            raise CheckpointError(f"model {name!r}: none of its {len(run.members)} checkpoints can be loaded "
                                  f"(first: {bad[0]['path']}: {bad[0]['reason']})")
        checked[name] = good
        skipped += bad
    return checked, skipped


def series_args(args: Any, first: CheckedCheckpoint) -> Any:
    """The model_args that build a series' model from its first checkpoint (LoRA unfused)."""
    if first.source.checkpoint is not None and first.source.checkpoint.kind == "lora":
        return dataclasses.replace(args, load={**args.load, "fuse_lora": False})
    return args
