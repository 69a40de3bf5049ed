"""A training run's checkpoints as a series: found, selected, checked, and swapped into one model.

``checkpoint=`` names a series when it is a run folder (holding ``checkpoints/``), a
``checkpoints/`` folder, or a glob of ``checkpoint_NNNNNN`` folders; each checkpoint is then one
model, ``<model>@<step>``, and ``steps=`` selects some (:func:`parse_steps`). A single checkpoint
folder is not a series and loads as before.

Every checkpoint of a series is resolved and checked (files, safetensors headers, keys and
shapes) before the first is scored (:func:`check_series`). The base is then built once, from the
first checkpoint; the others are swapped in by copying only their own tensors into the model in
place, one tensor at a time (:func:`load_in_place`): LoRA adapters (applied unfused, moshi's
``LoRALinear``), the TTT fork's TTT layers and adapters, or every weight of a full fine-tune.
Checkpoints of one series must hold the same keys, so a swap leaves nothing of the previous one.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ttt_bench.models.loading.checkpoints import CheckpointError, ResolvedCheckpoint, safetensors_shapes

CHECKPOINT_DIR = re.compile(r"^checkpoint_(\d+)$")
STEPS_HELP = "give a list [500,1500], a range 1000:3000 (either end may be left out), every:K or last:K"


# ----------------------------------------------------------------------------- finding


def is_glob(text: str) -> bool:
    return any(char in text for char in "*?[")


def find_series(value: Any) -> list[tuple[int, Path]] | None:
    """The (step, folder) of each checkpoint ``checkpoint=value`` names, by step; None when it
    names a single checkpoint (or nothing a series could be: single-checkpoint loading reports it).
    A run folder or ``checkpoints/`` folder without any checkpoint, or a glob matching none, is a
    ValueError (one line)."""
    text = str(value)
    if is_glob(text) and not Path(text).expanduser().exists():  # runs/exp[1] as written, not a glob
        paths = [Path(p) for p in glob.glob(os.path.expanduser(text))]
        found = [(int(m.group(1)), p) for p in paths if p.is_dir() and (m := CHECKPOINT_DIR.match(p.name))]
        if not found:
            raise ValueError(f"checkpoint={text}: the glob matches no checkpoint_NNNNNN folder")
        return _by_step(found, text)
    path = Path(text).expanduser()
    if not path.is_dir() or CHECKPOINT_DIR.match(path.name) or path.name == "consolidated" \
            or (path / "config.json").is_file():
        return None
    run_folder = (path / "checkpoints").is_dir()
    folder = path / "checkpoints" if run_folder else path
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := CHECKPOINT_DIR.match(p.name))]
    if not found:
        if run_folder or path.name == "checkpoints":
            raise ValueError(f"checkpoint={text}: {folder} holds no checkpoint_NNNNNN folder (has the run saved "
                             "a checkpoint yet?)")
        return None
    return _by_step(found, text)


def _by_step(found: list[tuple[int, Path]], text: str) -> list[tuple[int, Path]]:
    found = sorted(found)
    steps = [step for step, _ in found]
    twice = sorted({s for s in steps if steps.count(s) > 1})
    if twice:
        raise ValueError(f"checkpoint={text}: several checkpoints of step {twice[0]} "
                         f"({', '.join(str(p) for s, p in found if s == twice[0])}); name one run")
    return found


# ----------------------------------------------------------------------------- steps=


def parse_steps(value: Any) -> Callable[[list[int]], list[int]]:
    """``steps=`` -> a function from the run's steps (ascending) to the chosen ones. ValueError
    (naming the value) for anything else than the forms of ``STEPS_HELP``."""
    if isinstance(value, bool):
        raise ValueError(f"steps={value!r}: {STEPS_HELP}")
    if isinstance(value, int):
        value = [value]
    if isinstance(value, (list, tuple)):
        try:
            wanted = [int(v) for v in value if not isinstance(v, bool)]
        except (TypeError, ValueError):
            wanted = []
        if not wanted or len(wanted) != len(value):
            raise ValueError(f"steps={value!r}: {STEPS_HELP}")

        def listed(steps: list[int]) -> list[int]:
            missing = [s for s in wanted if s not in steps]
            if missing:
                raise ValueError(f"steps={value!r}: the run has no checkpoint of step {', '.join(map(str, missing))} "
                                 f"(its steps: {', '.join(map(str, steps))})")
            return sorted(set(wanted))
        return listed
    text = str(value).strip()
    kind, sep, rest = text.partition(":")
    if sep and kind in ("every", "last"):
        try:
            k = int(rest)
        except ValueError:
            k = 0
        if k < 1:
            raise ValueError(f"steps={text}: {kind}:K needs a positive integer K")
        return (lambda steps: steps[::k]) if kind == "every" else (lambda steps: steps[-k:])
    if sep:
        try:
            low = int(kind) if kind.strip() else None
            high = int(rest) if rest.strip() else None
        except ValueError:
            raise ValueError(f"steps={text}: {STEPS_HELP}") from None
        if low is not None and high is not None and low > high:
            raise ValueError(f"steps={text}: the range is empty ({low} > {high})")
        return lambda steps: [s for s in steps if (low is None or s >= low) and (high is None or s <= high)]
    raise ValueError(f"steps={text}: {STEPS_HELP}")


def select_steps(found: list[tuple[int, Path]], steps: Any, where: str) -> list[tuple[int, Path]]:
    if steps is None:
        return found
    chosen = set(parse_steps(steps)([s for s, _ in found]))
    kept = [(s, p) for s, p in found if s in chosen]
    if not kept:
        raise ValueError(f"{where}: steps={steps} selects none of the run's checkpoints "
                         f"(steps {', '.join(str(s) for s, _ in found)})")
    return kept


# ----------------------------------------------------------------------------- the series of a run


@dataclass
class SeriesMember:
    """One checkpoint of a series, before anything is loaded."""

    name: str  # <series>@<step>
    series: str  # the model's display name
    step: int
    folder: Path


@dataclass
class Series:
    """Every checkpoint ``checkpoint=`` named for one model, in step order."""

    name: str
    entry: str  # the registered model name
    members: list[SeriesMember]
    skipped: list[dict[str, Any]] = field(default_factory=list)  # {"model", "step", "path", "reason"}


def expand_series(entries: dict[str, Any], per_model: dict[str, Any]) -> tuple[dict, dict, dict[str, Series]]:
    """Replace each model whose ``checkpoint=`` names a run by one model per checkpoint
    (``<name>@<step>``, its ``checkpoint`` that folder, ``steps`` taken out). Only folders are
    looked at: nothing is loaded. Returns (entries, per_model, series by model name)."""
    out_entries: dict[str, Any] = {}
    out_args: dict[str, Any] = {}
    series: dict[str, Series] = {}
    for name, entry in entries.items():
        args = per_model[name]
        steps = args.options.get("steps")
        checkpoint = args.load.get("checkpoint")
        found = find_series(checkpoint) if isinstance(entry, str) and checkpoint is not None else None
        if found is None:
            if "steps" in args.options:
                raise ValueError(f"model_args steps={steps}: model {name!r} has no training run to choose from; "
                                 "give checkpoint= a run folder, its checkpoints/ folder or a glob of "
                                 "checkpoint_NNNNNN folders")
            out_entries[name], out_args[name] = entry, args
            continue
        chosen = select_steps(found, steps, f"model {name!r}, checkpoint={checkpoint}")
        members = [SeriesMember(f"{name}@{step}", name, step, folder) for step, folder in chosen]
        taken = [m.name for m in members if m.name in entries or m.name in out_entries]
        if taken:
            raise ValueError(f"model {name!r}, checkpoint={checkpoint}: its checkpoint {taken[0]!r} has the name of "
                             "another model of this run; rename that model")
        series[name] = Series(name, entry, members)
        options = {k: v for k, v in args.options.items() if k != "steps"}
        for member in members:
            out_entries[member.name] = entry
            out_args[member.name] = dataclasses.replace(args, load={**args.load, "checkpoint": str(member.folder)},
                                                        options=dict(options))
    return out_entries, out_args, series


# ----------------------------------------------------------------------------- checking and swapping


@dataclass
class CheckedCheckpoint:
    """A checkpoint of a series, resolved and checked: its source and the tensors a swap copies."""

    member: SeriesMember
    source: Any  # ModelSource
    path: Path  # the safetensors file whose tensors are swapped in
    mapping: dict[str, str]  # model key -> key in ``path``
    shapes: dict[str, tuple[int, ...]]  # model key -> shape
    fork_info: dict[str, Any] | None = None  # the TTT fork's unused / duplicate keys


def swap_tensors(resolved: ResolvedCheckpoint) -> tuple[Path, dict[str, str], dict[str, Any] | None]:
    """The file whose tensors make this checkpoint, model key -> file key, and (TTT fork) what
    results.json records about its unused keys."""
    if resolved.kind not in ("lora", "full"):
        raise CheckpointError(f"checkpoint {resolved.directory}: holds neither LoRA adapters nor full weights")
    path = resolved.lora_weights if resolved.kind == "lora" else resolved.moshi_weights
    shapes = safetensors_shapes(path, "lora weights" if resolved.kind == "lora" else "consolidated weights")
    if resolved.ttt_fork:
        from ttt_bench.models.loading.ttt_fork_checkpoint import map_fork_keys

        mapping, dead, duplicates = map_fork_keys(shapes)
        return path, mapping, {"unused_keys": dead, "duplicate_keys": len(duplicates)}
    return path, {k: k for k in shapes}, None


def compatibility(first: ResolvedCheckpoint, other: ResolvedCheckpoint) -> str | None:
    """Why ``other`` cannot be swapped into the model built from ``first`` (None: it can)."""
    checks = (("kind", first.kind, other.kind), ("base", first.hf_repo, other.hf_repo),
              ("config.json", first.lm_config, other.lm_config),
              ("TTT fork", bool(first.ttt_fork), bool(other.ttt_fork)),
              ("TTT settings", (first.training_config or {}).get("ttt"), (other.training_config or {}).get("ttt")))
    if first.kind == "lora":
        checks += (("base weights", str(first.moshi_weights), str(other.moshi_weights)),)
    for what, a, b in checks:
        if a != b:
            return f"its {what} differs from that of {first.directory} ({b!r} vs {a!r}), so it cannot share its loaded base"
    return None


def check_series(series: Series, make_source: Callable[[SeriesMember], Any]
                 ) -> tuple[list[CheckedCheckpoint], list[dict[str, Any]]]:
    """Resolve and check every checkpoint of ``series`` (nothing is loaded but headers and configs).
    Returns the good ones and, for each bad one, {"model", "step", "path", "reason"}."""
    good: list[CheckedCheckpoint] = []
    bad: list[dict[str, Any]] = []
    for member in series.members:
        try:
            source = make_source(member)
            resolved = source.checkpoint
            path, mapping, fork_info = swap_tensors(resolved)
            shapes = safetensors_shapes(path)
            model_shapes = {k: shapes[f] for k, f in mapping.items()}
            if good:
                reason = compatibility(good[0].source.checkpoint, resolved)
                if reason is None and model_shapes != good[0].shapes:
                    diff = sorted(set(model_shapes) ^ set(good[0].shapes)) or sorted(
                        k for k in model_shapes if model_shapes[k] != good[0].shapes[k])
                    reason = (f"{path} holds other keys or shapes than {good[0].path} (first: {diff[0]}), so "
                              "evaluating it after that one would leave tensors of the other behind")
                if reason:
                    raise CheckpointError(reason)
            good.append(CheckedCheckpoint(member, source, path, mapping, model_shapes, fork_info))
        except (CheckpointError, FileNotFoundError, ValueError, OSError) as exc:
            bad.append({"model": member.name, "step": member.step, "path": str(member.folder),
                        "reason": " ".join(str(exc).split())})
    return good, bad


def load_in_place(lm: torch.nn.Module, checked: CheckedCheckpoint) -> None:
    """Copy the checkpoint's tensors into ``lm``, one at a time (never a second copy of the
    model), cast to each weight's dtype as moshi's loaders cast them."""
    from safetensors import safe_open

    state = lm.state_dict()
    missing = sorted(set(checked.mapping) - set(state))
    if missing:
        raise CheckpointError(f"{checked.path}: keys {missing[:5]} are not in the model built from the series' "
                              "first checkpoint")
    with safe_open(str(checked.path), framework="pt", device="cpu") as f, torch.no_grad():
        for model_key, file_key in checked.mapping.items():
            state[model_key].copy_(f.get_tensor(file_key))
