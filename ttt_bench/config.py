"""Task configs: YAML (data only, ``yaml.safe_load``) -> a validated config dataclass.

Every task class declares its config dataclass (``config_class``): :class:`TaskConfig` holds the
keys every task has (name, class, source, stream layout, how models are scored and verified,
bootstrap, targets); a class adds its own keys in a subclass (the long-stream keys are in
:class:`StreamTaskConfig`). A key the task's class does not declare is refused with the valid
keys listed.

A config is validated once, when it is read (``from_dict``), targets included: every class's
targets name a metric it reports (``metric_names``) and follow the one target grammar
(``ttt_bench.metrics.parse_target``). The task's metrics read their settings from the config
itself; nothing is copied into a second settings object.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from ttt_bench.metrics import metric_names as stream_metric_names, parse_target
from ttt_bench.names import UnknownNameError, get_task_class
from ttt_bench.options import yaml_error_line


class ConfigError(ValueError):
    """A task config that is not valid; the message names the file, the key and what was expected."""


DEFAULT_TASK_CLASS = "librilight_stream"


@dataclass
class TaskConfig:
    """The keys of every task. ``from_dict`` on this base builds the config class of the task
    class named in ``class``; on a subclass it builds that subclass."""

    task: str
    task_class: str = DEFAULT_TASK_CLASS
    version: int | float | None = None  # raised whenever what the task measures changes
    description: str = ""
    source: dict[str, Any] = field(default_factory=dict)
    bootstrap_iters: int = 1000
    text_stream: str = "pad"
    user_stream: str = "zero"
    use_fixed_method: bool = True
    verify_loss_computation: bool = True
    verify_causality: bool = True  # the loss at a frame must not depend on later frames (checked on the first document)
    legacy_window: int | None = None  # frames of context for the legacy method (default: the model's context)
    targets: dict[str, str] = field(default_factory=dict)
    config_path: str | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>") -> "TaskConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: a task config must be a mapping of keys to values, got {type(data).__name__}")
        data = dict(data)
        if "class" in data:
            data["task_class"] = data.pop("class")
        if cls is TaskConfig:
            config_class = config_class_of(data.get("task_class", DEFAULT_TASK_CLASS), source)
            if config_class is not TaskConfig:
                return config_class.from_dict(data, source)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown key(s) {', '.join(unknown)} for a task of class "
                              f"{data.get('task_class', DEFAULT_TASK_CLASS)!r}; valid keys: "
                              f"{', '.join(sorted((known - {'task_class', 'config_path'}) | {'class'}))}")
        if "task" not in data:
            raise ConfigError(f"{source}: missing key 'task' (the task's name)")
        config = cls(**data, **({"config_path": source} if "config_path" not in data else {}))
        config.validate(source)
        check_targets(config, source)
        return config

    def validate(self, source: str) -> None:
        fail = _failer(source)
        checks: list[tuple[str, Any, type | tuple[type, ...], str]] = [
            ("task", self.task, str, "a string"),
            ("class", self.task_class, str, "a registered task class name"),
            ("source", self.source, dict, "a mapping (type, path/repo, ...)"),
            ("use_fixed_method", self.use_fixed_method, bool, "true or false"),
            ("verify_loss_computation", self.verify_loss_computation, bool, "true or false"),
            ("verify_causality", self.verify_causality, bool, "true or false"),
            ("targets", self.targets, dict, "a mapping of metric to condition like '< 2.25'"),
        ]
        for key, value, kind, expected in checks:
            if not isinstance(value, kind):
                fail(key, expected, value)
        if self.version is not None and (not isinstance(self.version, (int, float)) or isinstance(self.version, bool)):
            fail("version", "a number (raise it whenever what the task measures changes)", self.version)
        check_positive_int(fail, self, "bootstrap_iters")
        if self.text_stream not in ("pad", "zero"):
            fail("text_stream", "'pad' or 'zero'", self.text_stream)
        if self.user_stream not in ("zero", "silence"):
            fail("user_stream", "'zero' or 'silence'", self.user_stream)
        if self.legacy_window is not None and (not isinstance(self.legacy_window, int) or self.legacy_window < 1):
            fail("legacy_window", "null or a positive integer", self.legacy_window)

    def metric_names(self) -> list[str] | None:
        """The metrics a task of this class reports (what ``targets`` may name); None: not known
        before the run (a class that does not say)."""
        return None

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["class"] = data.pop("task_class")
        return data


@dataclass
class StreamTaskConfig(TaskConfig):
    """Long-stream tasks: which recordings make documents, and the per-position metrics."""

    min_duration_s: float = 600.0
    max_frames: int = 25000
    concat_book: bool = False
    positions: list[int] = field(default_factory=lambda: [8000, 16000, 24000])
    window: int = 500
    early_late_frames: int = 1000
    slope_range: list[int] | None = None
    segments: list[list[int]] = field(default_factory=lambda: [[4000, 8000], [8000, 16000], [16000, 24000]])
    select: dict[str, Any] = field(default_factory=dict)  # speakers, books, files, max_chapters
    split: str | None = None  # Hub LibriLight: small | large (sets the source's shards)

    def validate(self, source: str) -> None:
        super().validate(source)
        fail = _failer(source)
        check_select_and_split(source, self)
        if not isinstance(self.concat_book, bool):
            fail("concat_book", "true or false", self.concat_book)
        for key in ("max_frames", "window", "early_late_frames"):
            check_positive_int(fail, self, key)
        if not isinstance(self.min_duration_s, (int, float)) or isinstance(self.min_duration_s, bool) \
                or self.min_duration_s < 0:
            fail("min_duration_s", "a number of seconds >= 0", self.min_duration_s)
        if not isinstance(self.positions, list) or not all(isinstance(p, int) and p >= 0 for p in self.positions):
            fail("positions", "a list of frame indices (integers >= 0)", self.positions)
        if not isinstance(self.segments, list) or not all(_is_range(s) for s in self.segments):
            fail("segments", "a list of [start, end] frame ranges with end - start >= 2 (a slope needs two "
                             "frames)", self.segments)
        if self.slope_range is not None and not _is_range(self.slope_range):
            fail("slope_range", "null or [start, end] with end - start >= 2 (a slope needs two frames)",
                 self.slope_range)

    def metric_names(self) -> list[str]:
        return stream_metric_names(self)


def check_select_and_split(source: str, config: Any) -> None:
    """``select:`` and ``split`` of a task reading LibriLight recordings."""
    from ttt_bench.audio.sources import LIBRILIGHT_SPLITS, Selection, librilight_split_source

    try:
        Selection.from_spec(config.select)
    except ValueError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    if config.split is None:
        return
    if config.split not in LIBRILIGHT_SPLITS:
        _failer(source)("split", f"one of {', '.join(LIBRILIGHT_SPLITS)}", config.split)
    try:
        librilight_split_source(config.source, config.split)
    except ValueError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def check_targets(config: TaskConfig, source: str) -> None:
    """Each target names a metric the task's class reports and holds a condition of the one target
    grammar (``ttt_bench.metrics.parse_target``), for every task class alike."""
    known = config.metric_names()
    for metric, condition in config.targets.items():
        if known is not None and metric not in known:
            raise ConfigError(f"{source}: key 'targets.{metric}': unknown metric {metric!r} for a task of class "
                              f"{config.task_class!r}; known: {', '.join(known)}")
        try:
            parse_target(condition)
        except ValueError as exc:
            raise ConfigError(f"{source}: key 'targets.{metric}': {exc}") from None


def _failer(source: str) -> Callable[[str, str, Any], None]:
    def fail(key: str, expected: str, value: Any) -> None:
        raise ConfigError(f"{source}: key {key!r} must be {expected}, got {value!r}")

    return fail


def check_positive_int(fail: Callable[[str, str, Any], None], config: Any, key: str) -> None:
    value = getattr(config, key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        fail(key, "a positive integer", value)


def config_class_of(task_class: Any, source: str) -> type[TaskConfig]:
    """The config dataclass the task class ``task_class`` declares (``config_class``)."""
    if not isinstance(task_class, str):
        raise ConfigError(f"{source}: key 'class' must be a registered task class name, got {task_class!r}")
    try:
        cls = get_task_class(task_class)
    except UnknownNameError as exc:
        raise ConfigError(f"{source}: key 'class': {exc}") from None
    return getattr(cls, "config_class", StreamTaskConfig)


def _is_range(value: Any) -> bool:
    return (isinstance(value, (list, tuple)) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value) and value[1] - value[0] >= 2)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML file that must hold a mapping (a task config or a group)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: {yaml_error_line(exc)}") from None
    if data is None:
        raise ConfigError(f"{path}: the file is empty")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a task config must be a mapping of keys to values")
    return data


def load_task_config(path: str | Path, overrides: dict[str, Any] | None = None) -> TaskConfig:
    """Read a YAML task config; ``overrides`` replace its keys (CLI flags, ``get_task`` kwargs)."""
    data = read_yaml(path)
    data.setdefault("task", Path(path).stem)
    return TaskConfig.from_dict({**data, **(overrides or {})}, source=str(path))


@dataclass
class GroupConfig:
    """A group of tasks, as lm-eval has them: ``group`` (its name), ``task`` (member tasks or
    groups) and ``aggregate_metric_list`` (the metrics whose mean over the members it reports;
    a member group counts as one member, with its own mean)."""

    group: str
    task: list[str]
    aggregate_metric_list: list[dict[str, Any]] = field(default_factory=lambda: [{"metric": "acc"}])
    description: str = ""
    config_path: str | None = None

    @property
    def metrics(self) -> list[str]:
        return [m["metric"] for m in self.aggregate_metric_list]

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str) -> "GroupConfig":
        known = {f.name for f in dataclasses.fields(cls)} - {"config_path"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown key(s) {', '.join(unknown)} for a task group; valid keys: "
                              f"{', '.join(sorted(known))}")
        fail = _failer(source)
        tasks = data.get("task")
        if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) for t in tasks):
            fail("task", "a non-empty list of task or group names", tasks)
        metrics = data.get("aggregate_metric_list", [{"metric": "acc"}])
        if not isinstance(metrics, list) or not metrics:
            fail("aggregate_metric_list", "a list of {metric: NAME}", metrics)
        for entry in metrics:
            if not isinstance(entry, dict) or not isinstance(entry.get("metric"), str):
                fail("aggregate_metric_list", "a list of {metric: NAME}", metrics)
            extra = {k: v for k, v in entry.items() if k != "metric"}
            if extra not in ({}, {"aggregation": "mean"}, {"weight_by_size": False},
                             {"aggregation": "mean", "weight_by_size": False}):
                fail("aggregate_metric_list", "entries with aggregation: mean and weight_by_size: false "
                                              "(the only aggregation ttt-bench computes)", entry)
        return cls(**data, config_path=source)


def is_group_file(path: str | Path) -> bool:
    return "group" in read_yaml(path)


def load_group_config(path: str | Path) -> GroupConfig:
    return GroupConfig.from_dict(read_yaml(path), source=str(path))
