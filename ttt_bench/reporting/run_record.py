"""The run's metadata, as the evaluation hands it to reporting: typed, so a field that is missing
or misspelt fails where the record is made, not as a silent ``None`` where a table reads it.

``RunRecord.to_dict()`` is the top of ``results.json`` (before the results themselves); its keys
and their order are those results.json has always had. Reading a results.json back (``ttt-bench
leaderboard``, merging runs) works on the JSON itself: old files need no migration.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ttt_bench.metrics import ModelShape
from ttt_bench.version import __version__


@dataclass
class ModelRecord:
    """What results.json records of one model (``models[name]``)."""

    label: str
    legacy: bool = False         # the legacy evaluation mode (a separate forward pass)
    lookahead: bool = False      # looks ahead by construction (ttt with causal=false)
    attention_only: bool = False  # its only memory of the past is attention (frozen Moshi)
    options: dict[str, Any] = field(default_factory=dict)
    shape: ModelShape | None = None  # card and delays its rows are computed with (None: the task's)
    step: int | None = None  # a training run's checkpoint: its step (results.json only has it then)
    series: str | None = None  # ... and the run's model name

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["shape"] = None if self.shape is None else {"card": self.shape.card, "delays": list(self.shape.delays)}
        for key in ("step", "series"):
            if out[key] is None:
                del out[key]
        return out


@dataclass
class RunRecord:
    """Everything results.json says about how a run was made, besides its results."""

    config: dict[str, Any]                     # the run options as recorded (RunOptions.recorded)
    command: str | None = None
    environment: dict[str, Any] = field(default_factory=dict)
    git_hash: str | None = None
    complete: bool = True
    config_hash: str | None = None
    num_processes: int = 1
    skipped: dict[str, list] = field(default_factory=dict)           # task -> skipped inputs
    failed: dict[str, dict[str, list]] = field(default_factory=dict)  # task -> model -> failures
    models: dict[str, ModelRecord] = field(default_factory=dict)
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)    # task -> source, layout, config
    verification: dict[str, Any] = field(default_factory=dict)
    causality: dict[str, list] = field(default_factory=dict)
    baseline: str | None = None
    group_subtasks: dict[str, list[str]] = field(default_factory=dict)
    group_metrics: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, Any] = field(default_factory=dict)            # task -> its config's version
    ttt_bench_version: str = __version__
    resume_command: str | None = None  # only for a run that did not finish
    skipped_checkpoints: list[dict[str, Any]] = field(default_factory=list)  # of a training run (--on_error skip)

    def shape_of(self, model: str) -> ModelShape | None:
        record = self.models.get(model)
        return None if record is None else record.shape

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["models"] = {name: m.to_dict() for name, m in self.models.items()}
        if self.resume_command is None:
            del out["resume_command"]
        return out
