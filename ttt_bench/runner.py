"""The evaluation loop: build scorers and the codec, load each task's documents, shard them
across processes (Accelerate), score, gather on the main process and write the outputs."""

from __future__ import annotations

import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from .metrics import DocRecord, MetricsConfig, raise_on_flags
from .models.base import StreamLayout
from .registry import get_model, get_task
from .tasks.base import Document
from .verify import verify_scorer

logger = logging.getLogger(__name__)

OUTPUT_FILES = ("results.json", "curves.npz", "leaderboard.md", "loss_vs_position.png")


@dataclass
class RunSpec:
    """Everything a run depends on (the CLI flags)."""

    models: list[str]
    tasks: list[str]
    model_args: dict[str, Any] = field(default_factory=dict)
    task_overrides: dict[str, Any] = field(default_factory=dict)
    limit: int | None = None
    batch_size: int = 1
    chunk_size: int = 64
    device: str = "auto"
    dtype: str = "float32"
    seed: int = 0
    output_path: str | None = None
    overwrite: bool = False
    resume: bool = False
    baseline: str | None = None
    strict: bool = False
    on_bad_input: str = "skip"
    command: str = ""

    def output_dir(self) -> Path:
        if self.output_path:
            return Path(self.output_path)
        return Path("results") / f"{'+'.join(self.models)}__{'+'.join(self.tasks)}"


class OutputExistsError(FileExistsError):
    pass


def prepare_output_dir(spec: RunSpec) -> Path:
    out = spec.output_dir()
    if (out / "results.json").exists() or (out / "records").exists():
        if spec.overwrite:
            for name in OUTPUT_FILES + ("records", "samples.jsonl", "loss_vs_position.svg"):
                path = out / name
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        elif not spec.resume:
            raise OutputExistsError(
                f"{out} already holds a run; pass --overwrite to replace it, --resume to continue it, "
                "or --output_path to write elsewhere")
    out.mkdir(parents=True, exist_ok=True)
    return out


def split_model_args(models: list[str], model_args: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``key=v`` applies to every model, ``name.key=v`` only to model ``name``."""
    shared = {k: v for k, v in model_args.items() if "." not in k}
    per_model = {name: dict(shared) for name in models}
    for key, value in model_args.items():
        if "." in key:
            name, _, sub = key.partition(".")
            if name not in per_model:
                raise ValueError(f"--model_args {key}: {name!r} is not one of the models {models}")
            per_model[name][sub] = value
    return per_model


def build_scorers(spec: RunSpec, device: torch.device) -> dict[str, Any]:
    scorers = {}
    for name, kwargs in split_model_args(spec.models, spec.model_args).items():
        kwargs.setdefault("seed", spec.seed)
        logger.info("loading model %s %s", name, kwargs)
        scorers[name] = get_model(name, device=device, dtype=spec.dtype, **kwargs)
    return scorers


def shared_source(scorers: dict[str, Any]):
    """The one model source whose Mimi encodes the audio; every model must use the same codec."""
    sources = {name: getattr(s, "source", None) for name, s in scorers.items()}
    known = {(src.preset, src.pretrained) for src in sources.values() if src is not None}
    if not known:
        raise ValueError("no model names a checkpoint (preset= or pretrained=), so there is no Mimi codec "
                         "to encode the audio with")
    if len(known) > 1:
        raise ValueError(f"models use different Moshi checkpoints and so different Mimi codecs: "
                         f"{ {n: s.label for n, s in sources.items() if s} }; evaluate them in separate runs")
    return next(src for src in sources.values() if src is not None)


def layout_for(config, codec) -> StreamLayout:
    silence = codec.silence_frame() if config.user_stream == "silence" else None
    return StreamLayout(config.text_stream, config.user_stream, silence)


def metrics_config(task_config, lm) -> MetricsConfig:
    return MetricsConfig(
        positions=task_config.positions, window=task_config.window,
        early_late_frames=task_config.early_late_frames,
        slope_range=task_config.slope_range, segments=task_config.segments,
        bootstrap_iters=task_config.bootstrap_iters, card=lm.card,
        delays=lm.delays[lm.audio_offset:lm.audio_offset + lm.dep_q], targets=task_config.targets)


def batches_by_length(docs: list[Document], batch_size: int) -> list[list[Document]]:
    ordered = sorted(docs, key=lambda d: (-d.n_frames, d.doc_id))
    return [ordered[i:i + batch_size] for i in range(0, len(ordered), batch_size)]


def mask_past_end(nll: torch.Tensor, delays: list[int]) -> torch.Tensor:
    """NaN where a stream of this length has no prediction, as if it had been scored alone
    (in a padded batch, the padding supplies a prediction for the last delayed frames)."""
    T = nll.shape[-1]
    for k, delay in enumerate(delays):
        if delay:
            nll[k, max(T - delay, 0):] = float("nan")
    return nll


def score_documents(name: str, scorer, docs: list[Document], spec: RunSpec,
                    layout: StreamLayout, show_progress: bool = True) -> list[DocRecord]:
    """Score ``docs`` in length-grouped batches; padding is causal-safe (after each document's
    end) and trimmed away."""
    lm = scorer.lm
    delays = lm.delays[lm.audio_offset:lm.audio_offset + lm.dep_q]
    records = []
    total = sum(d.n_frames for d in docs)
    with tqdm(total=total, unit="frame", desc=name, disable=not show_progress, leave=False) as bar:
        for batch in batches_by_length(docs, spec.batch_size):
            length = batch[0].n_frames
            codes = torch.zeros(len(batch), batch[0].codes.shape[0], length, dtype=torch.long)
            for i, doc in enumerate(batch):
                codes[i, :, :doc.n_frames] = doc.codes
            start = time.perf_counter()
            nll = scorer.score(codes, chunk_size=spec.chunk_size, layout=layout)
            elapsed = time.perf_counter() - start
            frames = sum(d.n_frames for d in batch)
            for i, doc in enumerate(batch):
                doc_nll = mask_past_end(nll[i, :, :doc.n_frames].clone(), delays)
                records.append(DocRecord(doc.doc_id, doc.meta, doc_nll.numpy().astype(np.float32),
                                         elapsed * doc.n_frames / frames))
            bar.update(frames)
    return records


def environment() -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version(), "platform": platform.platform()}
    for package in ("ttt-bench", "torch", "moshi", "accelerate", "datasets", "numpy"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    versions["cuda"] = torch.version.cuda if torch.cuda.is_available() else None
    return versions


def git_hash() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def wrap_legacy(scorers: dict[str, Any], window: int | None) -> dict[str, Any]:
    """``use_fixed_method: false``: score every model with the old separate-forward-pass method."""
    from .models.legacy import make_legacy

    return {f"legacy({name})" if not getattr(s, "is_legacy", False) else name:
            (s if getattr(s, "is_legacy", False) else make_legacy(s, window)) for name, s in scorers.items()}


def evaluate(spec: RunSpec) -> dict[str, Any]:
    """Run every model on every task; returns the results dict that was written to results.json."""
    from .audio.codec import MimiCodec
    from .report import write_outputs

    out = prepare_output_dir(spec)
    torch.manual_seed(spec.seed)
    device = torch.device("cuda" if spec.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if spec.device == "auto" else spec.device))
    scorers = build_scorers(spec, device)
    source = shared_source(scorers)
    codec = MimiCodec.from_source(source, device=device)

    records: dict[str, dict[str, list[DocRecord]]] = {}
    cfg_by_task: dict[str, MetricsConfig] = {}
    task_info: dict[str, Any] = {}
    skipped: dict[str, list[dict]] = {}
    model_info: dict[str, Any] = {}
    verifications: dict[str, list[dict]] = {}
    first_lm = next(iter(scorers.values())).lm
    for task_name in spec.tasks:
        task = get_task(task_name, **spec.task_overrides)
        config = task.config
        docs = task.documents(codec, limit=spec.limit, on_bad_input=spec.on_bad_input)
        skipped[task_name] = [asdict(s) for s in task.skipped]
        if task.skipped:
            logger.warning("%s: skipped %d input(s): %s", task_name, len(task.skipped),
                           "; ".join(f"{s.doc_id}: {s.reason}" for s in task.skipped))
        if not docs:
            raise RuntimeError(f"task {task_name}: no documents to evaluate "
                               f"({len(task.skipped)} skipped); see the reasons above")
        layout = layout_for(config, codec)
        task_scorers = scorers if config.use_fixed_method else wrap_legacy(scorers, config.legacy_window)
        cfg_by_task[task_name] = metrics_config(config, first_lm)
        task_info[task_name] = {
            "config": config.to_dict(), "layout": {"text_stream": layout.text_stream,
                                                   "user_stream": layout.user_stream},
            "data": {"source": config.source, "doc_ids": [d.doc_id for d in docs],
                     "n_frames": [d.n_frames for d in docs]},
            "codec": codec.hash,
        }
        records[task_name] = {}
        verifications[task_name] = []
        for name, scorer in task_scorers.items():
            if config.verify_loss_computation:
                verifications[task_name].append(
                    verify_scorer(name, scorer, docs[0].doc_id, docs[0].codes, spec.chunk_size, layout).to_dict())
            records[task_name][name] = score_documents(name, scorer, docs, spec, layout)
            info = scorer.info
            model_info[name] = {"label": info.label, "legacy": bool(getattr(scorer, "is_legacy", False)),
                                "options": info.options}
    baseline = spec.baseline or ("frozen" if "frozen" in spec.models else None)
    run = {
        "config": {**asdict(spec), "output_path": str(out)},
        "command": spec.command,
        "environment": environment(),
        "git_hash": git_hash(),
        "complete": True,
        "skipped": skipped,
        "models": model_info,
        "tasks": task_info,
        "verification": verifications,
        "baseline": baseline,
    }
    write_outputs(out, run, records, cfg_by_task)
    results = __import__("json").loads((out / "results.json").read_text())
    if spec.strict:
        raise_on_flags(results["results"])
    return results
