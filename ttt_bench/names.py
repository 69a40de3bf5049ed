"""Names of model adapters and task classes: what ``@register_model`` and ``@register_task``
record, the built-in ones by module path (imported when first named), and the plugins of the
entry-point groups ``ttt_bench.models`` and ``ttt_bench.tasks``.

It imports nothing from the package, so the task configs (``config.py``) and the registry of
tasks and models (``registry.py``) can both look names up here.
"""

from __future__ import annotations

import difflib
import importlib
import logging
from importlib.metadata import entry_points
from typing import Any, Callable

logger = logging.getLogger(__name__)

_MODELS: dict[str, Callable[..., Any]] = {}
_TASK_CLASSES: dict[str, type] = {}


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


def _register(table: dict[str, Any], kind: str, name: str, obj: Any) -> Any:
    if name in table and table[name] is not obj:
        raise ValueError(f"{kind} {name!r} is already registered by {table[name]!r}")
    table[name] = obj
    return obj


def register_model(name: str) -> Callable:
    """Decorator: ``@register_model("frozen")`` on a class or factory returning a scorer."""
    return lambda factory: _register(_MODELS, "model", name, factory)


def register_task(name: str) -> Callable:
    """Decorator: ``@register_task("librilight_stream")`` on a Task class.

    The name is the task *class*; YAML configs name it in their ``class:`` key. A class
    registered this way is also a task of its own name with the class defaults.
    """
    return lambda cls: _register(_TASK_CLASSES, "task class", name, cls)


def load_plugins() -> None:
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
        load_plugins()
    return table.get(name)


def unknown_name(kind: str, name: str, known: list[str]) -> UnknownNameError:
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.4)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return UnknownNameError(f"unknown {kind} {name!r}.{hint} Available: {', '.join(sorted(known))}")


def list_models() -> list[str]:
    load_plugins()
    return sorted(set(BUILTIN_MODELS) | set(_MODELS))


def model_factory(name: str) -> Callable[..., Any]:
    """The class or factory registered as model ``name`` (unknown: the closest names)."""
    factory = _lookup(_MODELS, BUILTIN_MODELS, name)
    if factory is None:
        raise unknown_name("model", name, list_models())
    return factory


def list_task_classes() -> list[str]:
    load_plugins()
    return sorted(set(BUILTIN_TASK_CLASSES) | set(_TASK_CLASSES))


def get_task_class(name: str) -> type:
    cls = _lookup(_TASK_CLASSES, BUILTIN_TASK_CLASSES, name)
    if cls is None:
        raise unknown_name("task class", name, list_task_classes())
    return cls


def find_task_class(name: str) -> type | None:
    """The task class registered as ``name``, or None."""
    return _lookup(_TASK_CLASSES, BUILTIN_TASK_CLASSES, name)


def task_classes() -> dict[str, type]:
    """The task classes registered so far (built-in ones once imported), by name."""
    load_plugins()
    return dict(_TASK_CLASSES)
