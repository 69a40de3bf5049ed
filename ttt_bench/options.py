"""The run options, declared once.

``OPTIONS`` is the one declaration of what a run can be told (name, type, default, help). The
command line's flags (``cli.run_parser``), the keyword arguments of ``simple_evaluate`` and the
``config`` that results.json records (:class:`RunOptions`) are all made from it, and ``--config
FILE.yaml`` takes any of the command line's options from a file. ``model_args`` is parsed once
into :class:`ModelArgs`: per model, its loading arguments apart from its adapter options.

This module imports nothing from the rest of the package, so every layer can use it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import yaml

DEFAULT_TASKS = ("librilight_sample",)
DTYPE_CHOICES = ("float32", "bfloat16", "float16")


# ----------------------------------------------------------------------------- k=v text


def parse_value(text: str) -> Any:
    """Typed value of a ``k=v`` argument: int, float, bool, null, [list], else the string."""
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    if text.startswith("[") and text.endswith("]"):
        return [parse_value(str(v)) for v in yaml.safe_load(text)]
    return text


def split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets (so ``layers=[1,2],inner=mlp`` works)."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += char == "["
        depth -= char == "]"
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return [p for p in (p.strip() for p in parts) if p]


def parse_kv(text: str | None, flag: str) -> dict[str, Any]:
    result = {}
    for item in split_top_level(text or ""):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{flag} expects key=value pairs separated by commas, got {item!r}")
        result[key.strip()] = parse_value(value.strip())
    return result


def as_mapping(value: str | Mapping[str, Any] | None, flag: str) -> dict[str, Any]:
    """A dict as given, or ``k=v,...`` text parsed as the command line parses it."""
    if value is None:
        return {}
    if isinstance(value, str):
        return parse_kv(value, flag)
    if isinstance(value, Mapping):
        return dict(value)
    raise ValueError(f"{flag} must be k=v,... or a mapping, got {type(value).__name__}")


def as_names(value: str | Sequence[str] | None, what: str) -> list[str]:
    """Comma-separated text or a list of names."""
    names = split_top_level(value) if isinstance(value, str) else [str(v) for v in value or []]
    if not names:
        raise ValueError(f"give at least one {what}")
    return names


# ----------------------------------------------------------------------------- the declaration


def positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"expected a positive integer, got {value!r}")
    return value


def batch_size(value: Any) -> int | str:
    if value == "auto":
        return value
    try:
        return positive_int(int(value) if isinstance(value, str) else value)
    except ValueError:
        raise ValueError(f"expected a positive integer or 'auto', got {value!r}") from None


@dataclass(frozen=True)
class Option:
    """One run option. ``parse`` turns command-line text into its value and checks a value from
    code or a config file (raising ValueError); ``cli``/``api`` say where it can be given and
    ``recorded`` whether results.json keeps it under ``config``."""

    name: str
    default: Any
    help: str
    parse: Callable[[Any], Any] | None = None
    choices: tuple[str, ...] | None = None
    switch: bool = False  # a flag without a value (--strict)
    repeat: bool = False  # given several times (--include_path A --include_path B)
    cli: bool = True
    api: bool = True
    recorded: bool = True

    @property
    def flag(self) -> str:
        return f"--{self.name}"

    def check(self, value: Any) -> Any:
        """``value`` from code or a config file, checked (and normalised) like the flag's text."""
        if value is None or value == self.default:
            return value
        if self.switch and not isinstance(value, bool):
            raise ValueError(f"{self.name}: expected true or false, got {value!r}")
        if self.choices and value not in self.choices:
            raise ValueError(f"{self.name}: expected one of {', '.join(self.choices)}, got {value!r}")
        if self.parse is not None:
            try:
                return self.parse(value)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{self.name}: {exc}") from None
        return value


def _optional_int(value: Any) -> int | None:
    return None if value is None else positive_int(int(value) if isinstance(value, str) else value)


OPTIONS: tuple[Option, ...] = (
    Option("limit", None, "evaluate at most N documents per task (pairs for the pair tasks)", _optional_int),
    Option("batch_size", 1, "documents scored together (grouped by length), or 'auto': the largest that "
           "fits on the GPU", batch_size),
    Option("chunk_size", 64, "frames per streaming call (any value gives the same NLL)",
           lambda v: positive_int(int(v) if isinstance(v, str) else v)),
    Option("device", "auto", "cpu, cuda, cuda:N, or auto (CUDA when available)", str),
    Option("dtype", None, "model dtype of models built from names (default float32; a model given in "
           "memory is scored in its own)", choices=DTYPE_CHOICES),
    Option("seed", 0, "seed for random presets and the bootstrap", lambda v: int(v)),
    Option("task_args", None, "k=v,... overriding task config keys (max_frames=2000, ...)",
           lambda v: as_mapping(v, "task_args")),
    Option("include_path", None, "directory of extra YAML task configs (repeatable)", repeat=True),
    Option("output_path", None, "run directory (command line default: results/<models>__<tasks>; from "
           "code: nothing is written)", str),
    Option("overwrite", False, "replace an existing run in --output_path", switch=True),
    Option("resume", False, "continue an interrupted run in --output_path", switch=True),
    Option("baseline", None, "model the deltas compare to (default: frozen when present)", str),
    Option("strict", False, "fail the run when a sanity flag is raised", switch=True),
    Option("on_bad_input", "skip", "unreadable, empty or too-short audio: skip it (reported) or fail",
           choices=("skip", "fail")),
    Option("on_error", None, "a document that fails (out of memory, model error, non-finite loss under "
           "--strict): record it and go on (skip, the default), or stop after saving everything done (fail); "
           "a training run's checkpoint that cannot be loaded stops the run before scoring (exit 2) unless "
           "skip is given, then it is left out and listed", choices=("skip", "fail")),
    Option("allow_lookahead", False, "measure a model whose loss depends on later frames (it fails the "
           "causality check otherwise, exit 3) and flag its rows 'lookahead'", switch=True),
    Option("wandb_args", None, "k=v,... passed to wandb.init (project=...,name=...): also log the results to "
           "Weights & Biases (pip install \"ttt-bench[wandb]\")", lambda v: as_mapping(v, "wandb_args"),
           recorded=False),
    Option("tensorboard_dir", None, "also log the results to TensorBoard event files in this directory "
           "(pip install \"ttt-bench[tensorboard]\")", str, recorded=False),
    Option("distributed", None, "None: join an initialised torch.distributed group (documents sharded over "
           "its ranks, rank 0 gets the results), else run alone; False: always alone", cli=False,
           recorded=False),
    Option("wandb_run", None, "your wandb run to log into (at step)", cli=False, recorded=False),
    Option("tensorboard_writer", None, "your TensorBoard SummaryWriter to log into (at step)", cli=False,
           recorded=False),
    Option("step", None, "the training step the trackers log at", cli=False, recorded=False),
    Option("command", "", "the command line, as results.json records it", cli=False),
)

BY_NAME = {option.name: option for option in OPTIONS}
API_OPTIONS = tuple(o for o in OPTIONS if o.api)
CLI_OPTIONS = tuple(o for o in OPTIONS if o.cli)
RECORDED = tuple(o.name for o in OPTIONS if o.recorded)


def check_options(given: Mapping[str, Any], where: str = "simple_evaluate") -> dict[str, Any]:
    """Every option's value: ``given`` (checked) over the declared defaults. An unknown name is
    refused with the closest ones."""
    unknown = sorted(set(given) - {o.name for o in API_OPTIONS})
    if unknown:
        import difflib

        hints = {name: difflib.get_close_matches(name, list(BY_NAME), n=1) for name in unknown}
        said = ", ".join(f"{name!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                         for name, hint in hints.items())
        raise TypeError(f"{where}: unknown option(s) {said}; options: {', '.join(o.name for o in API_OPTIONS)}")
    values = {o.name: o.default for o in API_OPTIONS}
    for name, value in given.items():
        values[name] = BY_NAME[name].check(value)
    return values


class _RunOptionsMethods:
    """What every :class:`RunOptions` can do with its fields."""

    HASHED = ("model", "model_args", "tasks", "task_args", "limit", "dtype", "seed", "chunk_size", "strict")

    def output_dir(self) -> Path:
        if self.output_path:
            return Path(self.output_path)
        return default_output_dir(self.model, self.tasks)

    def recorded(self) -> dict[str, Any]:
        """The ``config`` of results.json: the models, tasks and every recorded option."""
        plain = (str, int, float, bool, type(None), list, tuple, dict)
        config: dict[str, Any] = {
            "model": list(self.model), "tasks": list(self.tasks),
            "model_args": {k: v if isinstance(v, plain) else f"<{type(v).__name__}>" for k, v in self.model_args.items()}}
        config.update({name: getattr(self, name) for name in RECORDED})
        config["task_args"] = dict(config["task_args"] or {})
        return config

    def hashed(self) -> dict[str, Any]:
        """What the persisted records depend on (``--resume`` refuses a run where it differs)."""
        recorded = self.recorded()
        return {key: recorded[key] for key in self.HASHED}

    def replace(self, **changes: Any) -> "RunOptions":
        return dataclasses.replace(self, **changes)


# What a run was asked, made from OPTIONS: the models, the tasks, their arguments and every option
# that code can give (results.json keeps the recorded ones as ``config``).
RunOptions = dataclasses.make_dataclass(
    "RunOptions",
    [("model", list), ("tasks", list), ("model_args", dict, field(default_factory=dict))]
    + [(o.name, Any, field(default=o.default)) for o in API_OPTIONS],
    bases=(_RunOptionsMethods,), namespace={"__module__": __name__})


def default_output_dir(models: Sequence[str], tasks: Sequence[str]) -> Path:
    """results/<models>__<tasks>, as the README says."""
    return Path("results") / f"{'+'.join(models)}__{'+'.join(tasks)}"


# ----------------------------------------------------------------------------- --config FILE.yaml


def yaml_error_line(exc: yaml.YAMLError) -> str:
    """A YAML syntax error in one line, with where it was found."""
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    context = getattr(exc, "context", None)
    context_mark = getattr(exc, "context_mark", None)
    if context and context_mark is not None:
        problem += f" ({context} that starts at line {context_mark.line + 1}, column {context_mark.column + 1})"
    return f"not valid YAML{where}: {problem}"




CONFIG_FILE_KEYS = ("model", "tasks", "model_args") + tuple(o.name for o in CLI_OPTIONS) + ("verbosity",)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """``--config FILE.yaml``: a mapping of command-line option names to values (lists and
    mappings allowed where the flag takes comma-separated text)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ValueError(f"--config {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"--config {path}: {yaml_error_line(exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: must be a mapping of option names to values")
    unknown = sorted(set(data) - set(CONFIG_FILE_KEYS))
    if unknown:
        raise ValueError(f"--config {path}: unknown option(s) {', '.join(unknown)}; options: "
                         f"{', '.join(CONFIG_FILE_KEYS)}")
    return data


# ----------------------------------------------------------------------------- model_args


MODEL_OBJECT_ARGS = ("lm", "mimi")  # objects from code: the caller's LMModel and MimiModel


@dataclass
class ModelArgs:
    """One model's ``model_args``, parsed once: ``load`` says where its weights (and so its
    Mimi codec) come from, ``options`` configure its adapter."""

    load: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)

    def kwargs(self) -> dict[str, Any]:
        """What the adapter's constructor receives."""
        return {**self.load, **self.options}

    @classmethod
    def split(cls, args: Mapping[str, Any], load_names: Sequence[str]) -> "ModelArgs":
        return cls({k: v for k, v in args.items() if k in load_names},
                   {k: v for k, v in args.items() if k not in load_names})

    @staticmethod
    def per_model(models: Sequence[str], model_args: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
        """``key=v`` applies to every model, ``name.key=v`` only to model ``name``."""
        shared = {k: v for k, v in model_args.items() if "." not in k}
        per_model = {name: dict(shared) for name in models}
        for key, value in model_args.items():
            if "." in key:
                name, _, sub = key.partition(".")
                if name not in per_model:
                    raise ValueError(f"model_args {key}: {name!r} is not one of the models {list(models)}")
                per_model[name][sub] = value
        return per_model
