"""``simple_evaluate``: evaluate models in code, the model in memory included (lm-eval's name and
argument names). The CLI is a thin layer over it.

Given a model it did not build (a moshi ``LMModel`` or a scorer), it leaves it as it found it:
training/eval mode of every module, ``requires_grad`` flags, no streaming state, and the random
number generators (torch CPU and CUDA, numpy, Python). Scoring never writes to the weights.
"""

from __future__ import annotations

import contextlib
import logging
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch

logger = logging.getLogger(__name__)

CODEC_ARGS = ("mimi", "preset", "pretrained", "seed")  # with moshi's loading arguments: an LMModel's Mimi
_CODECS: dict[tuple, Any] = {}  # loaded Mimi codecs, so repeated calls in a training loop load once


# ----------------------------------------------------------------------------- arguments


def parse_model_args(model_args: str | Mapping[str, Any] | None) -> dict[str, Any]:
    """A dict as given, or the CLI's ``k=v,...`` string parsed as the CLI does."""
    if model_args is None:
        return {}
    if isinstance(model_args, str):
        from .cli import parse_kv

        return parse_kv(model_args, "model_args")
    return dict(model_args)


def _names(value: str | Sequence[str] | None, what: str) -> list[str]:
    from .cli import split_top_level

    names = split_top_level(value) if isinstance(value, str) else list(value or [])
    if not names:
        raise ValueError(f"simple_evaluate: give at least one {what}")
    return names


def named_models(model: Any) -> dict[str, Any]:
    """Display name -> registered name, scorer or LMModel."""
    if isinstance(model, Mapping):
        if not model:
            raise ValueError("simple_evaluate: model={} names no model")
        return dict(model)
    if isinstance(model, (str, list, tuple)):
        return {name: name for name in _names(model, "model")}
    if is_lm(model):
        return {"model": model}
    if hasattr(model, "score"):
        return {getattr(model, "name", "model"): model}
    raise ValueError(f"simple_evaluate: model must be a registered name, a scorer, a moshi LMModel or a "
                     f"dict of display name -> one of these, got {type(model).__name__}")


def is_lm(obj: Any) -> bool:
    from moshi.models.lm import LMModel

    return isinstance(obj, LMModel)


def jsonable_args(args: Mapping[str, Any]) -> dict[str, Any]:
    """``model_args`` as results.json records them: objects (a MimiModel, an LMModel) by type."""
    plain = (str, int, float, bool, type(None), list, tuple)
    return {k: v if isinstance(v, plain) else f"<{type(v).__name__}>" for k, v in args.items()}


# ----------------------------------------------------------------------------- models and codec


def lm_device_dtype(lm) -> tuple[torch.device, torch.dtype]:
    param = next(lm.parameters())
    return param.device, param.dtype


def check_lm_device_dtype(name: str, lm, device: str | None, dtype: str | None) -> None:
    """An LMModel is scored where and as it is: moving or casting it would change the caller's model."""
    from .models.moshi import resolve_dtype

    have_device, have_dtype = lm_device_dtype(lm)
    if device not in (None, "auto") and torch.device(device) != have_device \
            and not (torch.device(device).type == have_device.type and torch.device(device).index is None):
        raise ValueError(f"model {name!r} is on {have_device}, not device={device!r}; move it yourself "
                         "(an LMModel is evaluated where it is, never moved)")
    if dtype is not None and resolve_dtype(dtype) != have_dtype:
        raise ValueError(f"model {name!r} is {have_dtype}, not dtype={dtype!r}; cast it yourself "
                         "(an LMModel is evaluated as it is, never cast)")


def wrap_lm(lm) -> Any:
    from .models.frozen import FrozenScorer

    return FrozenScorer(lm=lm)


def codec_args() -> tuple[str, ...]:
    """The model_args that say where an LMModel's Mimi comes from."""
    from .models.checkpoints import LoadArgs

    return CODEC_ARGS + LoadArgs.names()


def codec_source(args: Mapping[str, Any], seed: int):
    """The ModelSource whose Mimi encodes the audio for an LMModel: ``preset``, or moshi's loading
    arguments (``hf_repo``, ``checkpoint``, ``mimi_weight``, ...; moshiko's by default)."""
    from .models.moshi import ModelSource

    load_args = {k: v for k, v in args.items() if k not in ("mimi", "seed")}
    return ModelSource.make(seed=int(args.get("seed", seed)), **load_args)


def load_codec(source, device: torch.device):
    """The MimiCodec of ``source`` on ``device``, loaded once per process (per Mimi, not per model)."""
    from .audio.codec import MimiCodec

    key = (source.codec_identity(), str(device))
    if key not in _CODECS:
        _CODECS[key] = MimiCodec.from_source(source, device=device)
    return _CODECS[key]


def codec_for(entries: dict[str, Any], per_model: dict[str, dict[str, Any]], scorers: dict[str, Any],
              device: torch.device, seed: int):
    """The one Mimi codec every model's codes come from (a given ``mimi=``, or a loaded one)."""
    from .audio.cache import CodeCache
    from .audio.codec import MimiCodec

    mimis = {id(a["mimi"]): a["mimi"] for a in per_model.values() if a.get("mimi") is not None}
    if len(mimis) > 1:
        raise ValueError("model_args: several different mimi= codecs; evaluate models of different codecs "
                         "in separate calls")
    if mimis:
        return MimiCodec(next(iter(mimis.values())), device=device, cache=CodeCache(), label="mimi=<MimiModel>")
    from .runner import shared_source

    sources = {name: getattr(s, "source", None) for name, s in scorers.items()}
    for name, entry in entries.items():
        if is_lm(entry) or sources[name] is None:
            sources[name] = codec_source(per_model[name], seed)
    holders = {name: _SourceOf(source) for name, source in sources.items()}
    return load_codec(shared_source(holders), device)


class _SourceOf:
    """What ``runner.shared_source`` reads of a scorer: its model source."""

    def __init__(self, source):
        self.source = source


def build_scorers(entries: dict[str, Any], per_model: dict[str, dict[str, Any]], device: torch.device,
                  dtype: str | None, seed: int) -> dict[str, Any]:
    from .registry import get_model

    scorers = {}
    for name, entry in entries.items():
        args = per_model[name]
        if isinstance(entry, str):
            kwargs = {k: v for k, v in args.items() if k != "mimi"}
            kwargs.setdefault("seed", seed)
            logger.info("loading model %s (%s) %s", name, entry, jsonable_args(kwargs))
            if "lm" in kwargs:  # the caller's LMModel: evaluated where and as it is
                check_lm_device_dtype(name, kwargs["lm"], None, dtype)
                scorers[name] = get_model(entry, **kwargs)
            else:
                scorers[name] = get_model(entry, device=device, dtype=dtype or "float32", **kwargs)
        elif is_lm(entry):
            check_lm_device_dtype(name, entry, None, dtype)
            scorers[name] = wrap_lm(entry)
        else:
            scorers[name] = entry
    return scorers


def given_modules(entries: dict[str, Any], per_model: dict[str, dict[str, Any]]) -> list[torch.nn.Module]:
    """The caller's modules: LMModels, scorers' models, and a ``mimi=`` codec."""
    modules = []
    for name, entry in entries.items():
        if is_lm(entry):
            modules.append(entry)
        elif not isinstance(entry, str) and isinstance(getattr(entry, "lm", None), torch.nn.Module):
            modules.append(entry.lm)
        for value in per_model[name].values():
            if isinstance(value, torch.nn.Module):
                modules.append(value)
    return modules


# ----------------------------------------------------------------------------- leaving things as found


@contextlib.contextmanager
def preserved(modules: Sequence[torch.nn.Module]) -> Iterator[None]:
    """Restore the modules' train/eval modes and ``requires_grad`` flags, and every random number
    generator, on the way out (a training run after an evaluation is the run it would have been)."""
    modes = [(m, m.training) for module in modules for m in module.modules()]
    grads = [(p, p.requires_grad) for module in modules for p in module.parameters()]
    py_state, np_state = random.getstate(), np.random.get_state()
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=cuda):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        for m, training in modes:
            m.training = training
        for p, flag in grads:
            p.requires_grad_(flag)
    for module in modules:
        leftover = [n for n, m in module.named_modules() if getattr(m, "_streaming_state", None) is not None]
        if leftover:
            raise RuntimeError(f"streaming state left in {leftover[:3]} after evaluation (a bug in ttt-bench)")


# ----------------------------------------------------------------------------- the API


def simple_evaluate(
    model: Any,
    model_args: str | Mapping[str, Any] | None = None,
    tasks: str | Sequence[str] = ("librilight_sample",),
    *,
    limit: int | None = None,
    batch_size: int | str = 1,
    chunk_size: int = 64,
    device: str | None = None,
    dtype: str | None = None,
    seed: int = 0,
    task_args: str | Mapping[str, Any] | None = None,
    include_path: str | Sequence[str] | None = None,
    output_path: str | Path | None = None,
    overwrite: bool = False,
    resume: bool = False,
    baseline: str | None = None,
    strict: bool = False,
    on_bad_input: str = "skip",
    on_error: str = "skip",
    allow_lookahead: bool = False,
    distributed: bool | None = None,
    wandb_args: str | Mapping[str, Any] | None = None,
    wandb_run: Any = None,
    tensorboard_dir: str | Path | None = None,
    tensorboard_writer: Any = None,
    step: int | None = None,
    command: str = "",
) -> dict[str, Any] | None:
    """Evaluate ``model`` on ``tasks``; return results.json's dict (None on ranks other than 0).

    model: a registered name (``"frozen"``, or several: ``"frozen,ttt"``), a scorer, a moshi
        ``LMModel`` you hold, or a dict of display name -> any of these.
    model_args: dict or ``"k=v,..."`` (``name.k=v`` for one model). For an LMModel they say where
        its Mimi codec comes from: ``hf_repo`` (default moshiko's), ``preset="tiny"``, or
        ``mimi=`` a MimiModel.
    device, dtype: for models built from names (default: CUDA when available, float32). An
        LMModel is evaluated where and as it is.
    output_path: write results.json and the other outputs there; without it nothing is written
        but the Mimi code cache.
    distributed: None joins an initialised torch.distributed group (documents sharded over its
        ranks, rank 0 gets the result) and otherwise runs alone; False always runs alone.
    wandb_args / wandb_run, tensorboard_dir / tensorboard_writer, step: also log the results to
        Weights & Biases (a new run from ``wandb.init(**wandb_args)``, or yours) and TensorBoard
        (a new writer on the directory, or yours), at training step ``step``.
    """
    from . import trackers
    from .distributed import Dist
    from .registry import add_task_config_dir
    from .runner import RunSpec, evaluate, split_model_args

    trackers.require(wandb=wandb_args is not None or wandb_run is not None,
                     tensorboard=tensorboard_dir is not None or tensorboard_writer is not None)
    if resume and output_path is None:
        raise ValueError("simple_evaluate: resume=True needs the output_path of the run to continue")
    for path in [include_path] if isinstance(include_path, (str, Path)) else include_path or []:
        add_task_config_dir(path)
    entries = named_models(model)
    args = parse_model_args(model_args)
    per_model = split_model_args(list(entries), args)
    for name, entry in entries.items():
        if is_lm(entry):
            check_lm_device_dtype(name, entry, device, dtype)
            per_model[name] = {k: v for k, v in per_model[name].items() if k in codec_args()}
    lm_entries = [e for e in entries.values() if is_lm(e)]
    run_device = lm_device_dtype(lm_entries[0])[0] if lm_entries else resolve_device(device)
    dist = Dist.join(run_device, distributed)

    with tempfile.TemporaryDirectory(prefix="ttt_bench_") as scratch, \
            preserved(given_modules(entries, per_model)):
        torch.manual_seed(seed)
        scorers = build_scorers(entries, per_model, dist.device, dtype, seed)
        codec = codec_for(entries, per_model, scorers, dist.device, seed)
        spec = RunSpec(
            models=list(entries), tasks=_names(tasks, "task"), model_args=jsonable_args(args),
            task_overrides=parse_model_args(task_args), limit=limit, batch_size=batch_size,
            chunk_size=chunk_size, device=str(dist.device), dtype=dtype or _dtype_name(scorers), seed=seed,
            output_path=str(output_path) if output_path is not None else scratch, overwrite=overwrite,
            resume=resume, baseline=baseline, strict=strict, on_bad_input=on_bad_input, on_error=on_error,
            allow_lookahead=allow_lookahead, command=command)
        results = evaluate(spec, scorers=scorers, codec=codec, dist=dist)
        if results is None:
            return None
        if output_path is None:
            results["config"]["output_path"] = None
        out = Path(spec.output_path)
        trackers.log_all(results, out, wandb_args=wandb_args, wandb_run=wandb_run,
                         tensorboard_dir=tensorboard_dir, tensorboard_writer=tensorboard_writer, step=step)
    return results


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        if torch.cuda.is_available():
            import os

            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    return torch.device(device)


def _dtype_name(scorers: dict[str, Any]) -> str:
    dtypes = {str(s.lm.dtype).removeprefix("torch.") for s in scorers.values() if hasattr(s, "lm")}
    return dtypes.pop() if len(dtypes) == 1 else "float32"


def clear_codec_cache() -> None:
    """Forget the Mimi codecs loaded by earlier calls (they stay in memory otherwise)."""
    _CODECS.clear()
