"""Registry of model adapters and tasks.

Models and tasks register by name with a decorator; third-party packages can add their own
through the entry-point groups ``ttt_bench.models`` and ``ttt_bench.tasks``. Task configs are
YAML files (data only) found in the built-in ``task_configs/`` and any ``--include_path``.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import logging
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Callable

logger = logging.getLogger(__name__)

_MODELS: dict[str, Callable[..., Any]] = {}
_TASK_CLASSES: dict[str, type] = {}


def _builtin_task_config_dir() -> Path:
    """The built-in task configs: ``task_configs/`` at the top of a source checkout (editable
    install), installed as the data package ``ttt_bench/task_configs`` by a wheel."""
    installed = Path(__file__).parent / "task_configs"
    return installed if installed.is_dir() else Path(__file__).resolve().parent.parent / "task_configs"


_TASK_CONFIG_DIRS: list[Path] = [_builtin_task_config_dir()]

# Built-in adapters and task classes by module path: a module is imported (and registers itself)
# only when its name is asked for, so the registry imports none of them.
BUILTIN_MODELS = {"frozen": "ttt_bench.models.frozen", "ttt": "ttt_bench.models.ttt",
                  "legacy": "ttt_bench.models.legacy", "dyneval": "ttt_bench.models.dyneval"}
BUILTIN_TASK_CLASSES = {"librilight_stream": "ttt_bench.tasks.librilight_stream",
                        "librilight_stream_book": "ttt_bench.tasks.librilight_stream",
                        "pair_likelihood": "ttt_bench.tasks.pairs", "librilight_recall": "ttt_bench.tasks.recall"}
_plugins_loaded = False


class UnknownNameError(KeyError):
    """A model, task or task class name that is not registered."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it readable
        return str(self.args[0])


def register_model(name: str) -> Callable:
    """Decorator: ``@register_model("frozen")`` on a class or factory returning a scorer."""

    def wrap(factory):
        if name in _MODELS and _MODELS[name] is not factory:
            raise ValueError(f"model {name!r} is already registered by {_MODELS[name]!r}")
        _MODELS[name] = factory
        return factory

    return wrap


def register_task(name: str) -> Callable:
    """Decorator: ``@register_task("librilight_stream")`` on a Task class.

    The name is the task *class*; YAML configs name it in their ``class:`` key. A class
    registered this way is also a task of its own name with the class defaults.
    """

    def wrap(cls):
        if name in _TASK_CLASSES and _TASK_CLASSES[name] is not cls:
            raise ValueError(f"task class {name!r} is already registered by {_TASK_CLASSES[name]!r}")
        _TASK_CLASSES[name] = cls
        return cls

    return wrap


def add_task_config_dir(path: str | Path) -> None:
    """Make YAML task configs in ``path`` available (``--include_path``)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"--include_path {path}: not a directory")
    if path not in _TASK_CONFIG_DIRS:
        _TASK_CONFIG_DIRS.insert(0, path)  # user configs shadow built-in ones


def _load_plugins() -> None:
    """Third-party adapters and tasks, from the entry-point groups (once per process)."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for group in ("ttt_bench.models", "ttt_bench.tasks"):
        for ep in entry_points(group=group):
            try:
                ep.load()
            except Exception as exc:  # a broken plugin must not break the harness
                logger.warning("could not load %s entry point %r: %s", group, ep.name, exc)


def _lookup(table: dict[str, Any], builtins: dict[str, str], name: str) -> Any | None:
    """``table[name]``, importing the built-in module that registers it, or the plugins."""
    if name not in table and name in builtins:
        importlib.import_module(builtins[name])
    if name not in table:
        _load_plugins()
    return table.get(name)


def _unknown(kind: str, name: str, known: list[str]) -> UnknownNameError:
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.4)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return UnknownNameError(f"unknown {kind} {name!r}.{hint} Available: {', '.join(sorted(known))}")


def list_models() -> list[str]:
    _load_plugins()
    return sorted(set(BUILTIN_MODELS) | set(_MODELS))


def model_factory(name: str) -> Callable[..., Any]:
    """The class or factory registered as model ``name`` (unknown: the closest names)."""
    factory = _lookup(_MODELS, BUILTIN_MODELS, name)
    if factory is None:
        raise _unknown("model", name, list_models())
    return factory


def check_model_args(name: str, args: dict[str, Any], chunk_size: int) -> None:
    """Refuse an unknown model, ``model_args`` it does not take, or a chunk size it cannot score,
    without building it (the adapter's ``check_args``; a plain factory: its signature)."""
    factory = model_factory(name)
    check = getattr(factory, "check_args", None)
    if check is not None:
        check(args, chunk_size)
        return
    parameters = inspect.signature(factory).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return
    accepted = {p.name for p in parameters} - {"device", "dtype"}
    unknown = sorted(set(args) - accepted)
    if unknown:
        raise ValueError(f"model {name!r}: unknown model_args {', '.join(unknown)}; it takes {', '.join(sorted(accepted))}")


def get_model(name: str, **kwargs) -> Any:
    """Build the scorer registered as ``name`` with ``kwargs`` (docs/design.md, "Contract")."""
    return model_factory(name)(**kwargs)


def task_config_files() -> dict[str, Path]:
    """Task name -> YAML path; earlier directories (``--include_path``) win."""
    found: dict[str, Path] = {}
    for directory in reversed(_TASK_CONFIG_DIRS):
        for path in sorted(directory.glob("*.yaml")) + sorted(directory.glob("*.yml")):
            found[path.stem] = path
    return found


def list_tasks() -> list[str]:
    """Runnable tasks: the task configs (YAML), and task classes that need no config to find
    their data (``standalone``); a class that only reads a config's source is not a task."""
    _load_plugins()
    standalone = {name for name, cls in _TASK_CLASSES.items() if getattr(cls, "standalone", False)}
    return sorted(set(task_config_files()) | standalone)


def list_task_classes() -> list[str]:
    _load_plugins()
    return sorted(set(BUILTIN_TASK_CLASSES) | set(_TASK_CLASSES))


def get_task_class(name: str) -> type:
    cls = _lookup(_TASK_CLASSES, BUILTIN_TASK_CLASSES, name)
    if cls is None:
        raise _unknown("task class", name, list_task_classes())
    return cls


def get_group(name: str) -> Any:
    """The ``GroupConfig`` of the task group ``name``, or None if ``name`` is not a group."""
    from ttt_bench.config import is_group_file, load_group_config

    path = task_config_files().get(name)
    return load_group_config(path) if path is not None and is_group_file(path) else None


def expand_tasks(names: list[str]) -> tuple[list[str], dict[str, Any]]:
    """Task names with every group replaced by its members (recursively, each task once, in
    order), and the groups met on the way (name -> ``GroupConfig``), members before their group."""
    tasks: list[str] = []
    groups: dict[str, Any] = {}

    def visit(name: str, path: tuple[str, ...]) -> None:
        if name in path:
            raise ValueError(f"task group {name!r} contains itself ({' -> '.join(path + (name,))})")
        group = get_group(name)
        if group is None:
            if name not in tasks:
                tasks.append(name)
            return
        for member in group.task:
            visit(member, path + (name,))
        groups.setdefault(name, group)

    for name in names:
        visit(name, ())
    return tasks, groups


def get_task(name: str, **overrides) -> Any:
    """Build the task ``name`` from its YAML config, with keys overridden by ``overrides``."""
    from ttt_bench.config import load_task_config, TaskConfig

    files = task_config_files()
    if get_group(name) is not None:
        raise ValueError(f"{name} is a group of tasks ({files[name]}); expand it with expand_tasks, or "
                         f"give it to --tasks, which runs its members")
    if name in files:
        config = load_task_config(files[name], overrides)
    elif _lookup(_TASK_CLASSES, BUILTIN_TASK_CLASSES, name) is not None:
        config = TaskConfig.from_dict({"task": name, "class": name, **overrides}, source=f"<task class {name}>")
    else:
        raise _unknown("task", name, list_tasks())
    return get_task_class(config.task_class)(config)
