"""``simple_evaluate``: evaluate models in code, the model in memory included (lm-eval's name and
argument names). The CLI is a thin layer over it.

Given a model it did not build (a moshi ``LMModel`` or a scorer), it leaves it as it found it:
training/eval mode of every module, ``requires_grad`` flags, no streaming state, and the random
number generators (torch CPU and CUDA, numpy, Python). Scoring never writes to the weights.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import random
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from moshi.models.lm import LMModel

from ttt_bench.reporting import trackers
from ttt_bench.audio.cache import CodeCache
from ttt_bench.audio.codec import MimiCodec
from ttt_bench.evaluation.distributed import Dist
from ttt_bench.models.base import StreamingScorer
from ttt_bench.models.frozen import FrozenScorer
from ttt_bench.models.loading.series import expand_series
from ttt_bench.models.series import build_series, check_runs, series_args
from ttt_bench.models.loading.moshi import LOAD_ARG_NAMES, ModelSource, resolve_dtype
from ttt_bench.options import API_OPTIONS, DEFAULT_TASKS, ModelArgs, RunOptions, as_mapping, as_names, check_options
from ttt_bench.registry import add_task_config_dir, check_model_args, expand_tasks, get_model, get_task
from ttt_bench.evaluation.runner import Evaluation, open_store

logger = logging.getLogger(__name__)

CODEC_ARGS = LOAD_ARG_NAMES + ("seed", "mimi")  # where a model's weights and Mimi come from; mimi: a MimiModel
_CODECS: dict[tuple, Any] = {}  # loaded Mimi codecs, so repeated calls in a training loop load once


# ----------------------------------------------------------------------------- arguments


def named_models(model: Any) -> dict[str, Any]:
    """Display name -> registered name, scorer or LMModel."""
    if isinstance(model, Mapping):
        if not model:
            raise ValueError("simple_evaluate: model={} names no model")
        return dict(model)
    if isinstance(model, (str, list, tuple)):
        return {name: name for name in as_names(model, "model")}
    if is_lm(model):
        return {"model": model}
    if isinstance(model, StreamingScorer):
        return {model.name: model}
    raise ValueError(f"simple_evaluate: model must be a registered name, a scorer (a subclass of "
                     f"ttt_bench.models.base.StreamingScorer), a moshi LMModel or a dict of display name -> "
                     f"one of these, got {type(model).__name__}")


def is_lm(obj: Any) -> bool:
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
    have_device, have_dtype = lm_device_dtype(lm)
    if device not in (None, "auto") and torch.device(device) != have_device \
            and not (torch.device(device).type == have_device.type and torch.device(device).index is None):
        raise ValueError(f"model {name!r} is on {have_device}, not device={device!r}; move it yourself "
                         "(an LMModel is evaluated where it is, never moved)")
    if dtype is not None and resolve_dtype(dtype) != have_dtype:
        raise ValueError(f"model {name!r} is {have_dtype}, not dtype={dtype!r}; cast it yourself "
                         "(an LMModel is evaluated as it is, never cast)")


def codec_source(args: Mapping[str, Any], seed: int) -> ModelSource:
    """The ModelSource whose Mimi encodes the audio for an LMModel: ``preset``, or moshi's loading
    arguments (``hf_repo``, ``checkpoint``, ``mimi_weight``, ...; moshiko's by default)."""
    load_args = {k: v for k, v in args.items() if k not in ("mimi", "seed")}
    return ModelSource.make(seed=int(args.get("seed", seed)), **load_args)


def load_codec(source: ModelSource, device: torch.device) -> MimiCodec:
    """The MimiCodec of ``source`` on ``device``, loaded once per process (per Mimi, not per model)."""
    key = (source.codec_identity(), str(device))
    if key not in _CODECS:
        _CODECS[key] = MimiCodec.from_source(source, device=device)
    return _CODECS[key]


def shared_source(sources: dict[str, ModelSource]) -> ModelSource:
    """The one model source whose Mimi encodes the audio. Models on the same Mimi (the same
    weights file content and config, e.g. a base and a fine-tune of it) share it; different
    Mimi codecs are refused."""
    codecs: dict[str, list[str]] = {}
    for name, src in sources.items():
        codecs.setdefault(src.codec_identity(), []).append(name)
    if len(codecs) > 1:
        groups = "; ".join(f"{', '.join(names)}: {sources[names[0]].label}" for names in codecs.values())
        raise ValueError(f"models use different Mimi codecs ({groups}), so their codes would differ; "
                         "evaluate them in separate runs")
    return next(iter(sources.values()))


def codec_for(entries: dict[str, Any], per_model: dict[str, ModelArgs], scorers: dict[str, StreamingScorer],
              device: torch.device, seed: int) -> MimiCodec:
    """The one Mimi codec every model's codes come from (a given ``mimi=``, or a loaded one)."""
    mimis = {id(a.load["mimi"]): a.load["mimi"] for a in per_model.values() if a.load.get("mimi") is not None}
    if len(mimis) > 1:
        raise ValueError("model_args: several different mimi= codecs; evaluate models of different codecs "
                         "in separate calls")
    if mimis:
        return MimiCodec(next(iter(mimis.values())), device=device, cache=CodeCache(), label="mimi=<MimiModel>")
    sources = {name: scorer.source for name, scorer in scorers.items()}
    for name, entry in entries.items():
        if is_lm(entry) or sources[name] is None:
            sources[name] = codec_source(per_model[name].load, seed)
    return load_codec(shared_source(sources), device)


def check_models(entries: dict[str, Any], per_model: dict[str, ModelArgs], spec: RunOptions) -> None:
    """Every model named, its ``model_args`` and the chunk size, refused before anything loads."""
    for name, entry in entries.items():
        args = per_model[name]
        if isinstance(entry, str):
            check_model_args(entry, {k: v for k, v in args.kwargs().items() if k not in ("mimi", "seed")},
                             spec.chunk_size)
        elif is_lm(entry):
            check_lm_device_dtype(name, entry, spec.device, spec.dtype)
            if args.options:
                raise ValueError(f"model_args {', '.join(sorted(args.options))}: model {name!r} is an LMModel you "
                                 f"built; its model_args only say where its Mimi comes from ({', '.join(CODEC_ARGS)})")
        else:
            entry.check_chunk_size(spec.chunk_size)


def run_dtype(entries: dict[str, Any], dtype: str | None) -> str:
    """The dtype the run scores in: ``dtype`` for models built from names (float32 by default),
    the model's own for a model given in memory."""
    dtypes = {dtype or "float32" if isinstance(entry, str) else
              str(lm_device_dtype(entry if is_lm(entry) else entry.lm)[1]).removeprefix("torch.")
              for entry in entries.values()}
    return dtypes.pop() if len(dtypes) == 1 else "float32"


def build_scorers(entries: dict[str, Any], per_model: dict[str, ModelArgs], device: torch.device,
                  spec: RunOptions, series: dict[str, list] | None = None) -> dict[str, StreamingScorer]:
    """series: the checked checkpoints of each training run; each run's model is built once."""
    prebuilt: dict[str, StreamingScorer] = {}
    for checked in (series or {}).values():
        def build_first(first, name=checked[0].member.name):
            return build_scorers({name: entries[name]}, {name: series_args(per_model[name], first)}, device, spec)[name]
        prebuilt.update(build_series(build_first, checked))
    scorers = {}
    for name, entry in entries.items():
        if name in prebuilt:
            scorers[name] = prebuilt[name]
            continue
        if isinstance(entry, str):
            kwargs = {k: v for k, v in per_model[name].kwargs().items() if k != "mimi"}
            kwargs.setdefault("seed", spec.seed)
            logger.info("loading model %s (%s) %s", name, entry, jsonable_args(kwargs))
            if "lm" in kwargs:  # the caller's LMModel: evaluated where and as it is
                check_lm_device_dtype(name, kwargs["lm"], None, spec.dtype)
                scorers[name] = get_model(entry, **kwargs)
            else:
                scorers[name] = get_model(entry, device=device, dtype=spec.dtype or "float32", **kwargs)
        elif is_lm(entry):
            scorers[name] = FrozenScorer(lm=entry)
        else:
            scorers[name] = entry
        scorers[name].check_chunk_size(spec.chunk_size)  # e.g. a fork checkpoint's look-ahead mini-batch
    return scorers


def given_modules(entries: dict[str, Any], per_model: dict[str, ModelArgs]) -> list[torch.nn.Module]:
    """The caller's modules: LMModels, scorers' models, and a ``mimi=`` codec."""
    modules = []
    for name, entry in entries.items():
        if is_lm(entry):
            modules.append(entry)
        elif not isinstance(entry, str) and isinstance(getattr(entry, "lm", None), torch.nn.Module):
            modules.append(entry.lm)
        for value in per_model[name].kwargs().values():
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


def simple_evaluate(model: Any, model_args: str | Mapping[str, Any] | None = None,
                    tasks: str | Sequence[str] = DEFAULT_TASKS, **options: Any) -> dict[str, Any] | None:
    """Evaluate ``model`` on ``tasks``; return results.json's dict (None on ranks other than 0).

    model: a registered name (``"frozen"``, or several: ``"frozen,ttt"``), a scorer, a moshi
        ``LMModel`` you hold, or a dict of display name -> any of these.
    model_args: dict or ``"k=v,..."`` (``name.k=v`` for one model). For an LMModel they say where
        its Mimi codec comes from: ``hf_repo`` (default moshiko's), ``preset="tiny"``, or
        ``mimi=`` a MimiModel.
    options: the run options (``ttt_bench.options.OPTIONS``, the command line's flags; see
        ``inspect.signature(simple_evaluate)``): limit, batch_size, chunk_size, device, dtype, seed,
        task_args, include_path, output_path (without it nothing is written but the Mimi code
        cache), overwrite, resume, baseline, strict, on_bad_input, on_error, allow_lookahead,
        distributed (None joins an initialised torch.distributed group, False runs alone),
        wandb_args / wandb_run, tensorboard_dir / tensorboard_writer and step (also log the
        results to Weights & Biases and TensorBoard at training step ``step``).

    Everything that can be checked without weights or audio is checked first (task names and
    configs, model names and model_args, the chunk size, the output directory and a resumed
    run's configuration); then the scorers, the codec and the tasks are built, once.
    """
    spec = RunOptions(model=[], tasks=as_names(tasks, "task"), model_args=as_mapping(model_args, "model_args"),
                      **check_options(options))
    trackers.require(wandb=spec.wandb_args is not None or spec.wandb_run is not None,
                     tensorboard=spec.tensorboard_dir is not None or spec.tensorboard_writer is not None)
    if spec.resume and spec.output_path is None:
        raise ValueError("simple_evaluate: resume=True needs the output_path of the run to continue")
    include = spec.include_path
    for path in [include] if isinstance(include, (str, Path)) else include or []:
        add_task_config_dir(path)
    task_names, groups = expand_tasks(spec.tasks)
    built_tasks = {name: get_task(name, **(spec.task_args or {})) for name in task_names}
    entries = named_models(model)
    per_model = {name: ModelArgs.split(args, CODEC_ARGS)
                 for name, args in ModelArgs.per_model(list(entries), spec.model_args).items()}
    asked = list(entries)
    entries, per_model, runs = expand_series(entries, per_model)  # a training run: one model per checkpoint
    check_models(entries, per_model, spec)
    series, skipped_checkpoints = check_runs(runs, per_model, spec.seed, spec.on_error)
    for skipped in skipped_checkpoints:
        entries.pop(skipped["model"])
        per_model.pop(skipped["model"])
    lm_entries = [e for e in entries.values() if is_lm(e)]
    device = lm_device_dtype(lm_entries[0])[0] if lm_entries else resolve_device(spec.device)
    dist = Dist.join(device, spec.distributed)

    with tempfile.TemporaryDirectory(prefix="ttt_bench_") as scratch, \
            preserved(given_modules(entries, per_model)):
        spec = spec.replace(model=asked, device=str(dist.device), dtype=run_dtype(entries, spec.dtype),
                            output_path=str(spec.output_path) if spec.output_path is not None else scratch)
        out, store = open_store(spec, built_tasks, dist)
        torch.manual_seed(spec.seed)
        scorers = build_scorers(entries, per_model, dist.device, spec, series)
        codec = codec_for(entries, per_model, scorers, dist.device, spec.seed)
        results = Evaluation(spec, built_tasks, groups, scorers, codec, dist, store, out,
                             skipped_checkpoints=skipped_checkpoints).run()
        if results is None:
            return None
        if options.get("output_path") is None:
            results["config"]["output_path"] = None
        trackers.log_all(results, out, wandb_args=spec.wandb_args, wandb_run=spec.wandb_run,
                         tensorboard_dir=spec.tensorboard_dir, tensorboard_writer=spec.tensorboard_writer,
                         step=spec.step)
    return results


def _signature() -> inspect.Signature:
    """``simple_evaluate``'s signature as ``OPTIONS`` declares it (what help() and IDEs show)."""
    P = inspect.Parameter
    head = [P("model", P.POSITIONAL_OR_KEYWORD), P("model_args", P.POSITIONAL_OR_KEYWORD, default=None),
            P("tasks", P.POSITIONAL_OR_KEYWORD, default=DEFAULT_TASKS)]
    return inspect.Signature(head + [P(o.name, P.KEYWORD_ONLY, default=o.default) for o in API_OPTIONS])


simple_evaluate.__signature__ = _signature()  # type: ignore[attr-defined]


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    return torch.device(device)


def clear_codec_cache() -> None:
    """Forget the Mimi codecs loaded by earlier calls (they stay in memory otherwise)."""
    _CODECS.clear()
