"""Registry of model adapters and tasks.

Models and tasks register by name with a decorator; third-party packages can add their own
through the entry-point groups ``ttt_bench.models`` and ``ttt_bench.tasks``. Task configs are
YAML files (data only) found in the built-in ``task_configs/`` and any ``--include_path``.
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import Any

from ttt_bench.config import TaskConfig, is_group_file, load_group_config, load_task_config
from ttt_bench.names import (BUILTIN_MODELS, BUILTIN_TASK_CLASSES, UnknownNameError, find_task_class,  # noqa: F401
                             get_task_class, list_models, list_task_classes, model_factory, register_model,
                             register_task, task_classes, unknown_name)

logger = logging.getLogger(__name__)

def _builtin_task_config_dir() -> Path:
    """The built-in task configs: ``task_configs/`` at the top of a source checkout (editable
    install), installed as the data package ``ttt_bench/task_configs`` by a wheel."""
    installed = Path(__file__).parent / "task_configs"
    return installed if installed.is_dir() else Path(__file__).resolve().parent.parent / "task_configs"


_TASK_CONFIG_DIRS: list[Path] = [_builtin_task_config_dir()]

def add_task_config_dir(path: str | Path) -> None:
    """Make YAML task configs in ``path`` available (``--include_path``)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"--include_path {path}: not a directory")
    if path not in _TASK_CONFIG_DIRS:
        _TASK_CONFIG_DIRS.insert(0, path)  # user configs shadow built-in ones


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
    standalone = {name for name, cls in task_classes().items() if getattr(cls, "standalone", False)}
    return sorted(set(task_config_files()) | standalone)


def get_group(name: str) -> Any:
    """The ``GroupConfig`` of the task group ``name``, or None if ``name`` is not a group."""
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
    files = task_config_files()
    if get_group(name) is not None:
        raise ValueError(f"{name} is a group of tasks ({files[name]}); expand it with expand_tasks, or "
                         f"give it to --tasks, which runs its members")
    if name in files:
        config = load_task_config(files[name], overrides)
    elif find_task_class(name) is not None:
        config = TaskConfig.from_dict({"task": name, "class": name, **overrides}, source=f"<task class {name}>")
    else:
        raise unknown_name("task", name, list_tasks())
    return get_task_class(config.task_class)(config)
