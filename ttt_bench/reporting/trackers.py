"""Send a run's results where experiments are tracked: Weights & Biases and TensorBoard, both
optional extras (``pip install "ttt-bench[wandb]"``, ``"ttt-bench[tensorboard]"``).

Both get every numeric metric as a scalar named ``ttt_bench/<task>/<model>/<metric>`` at the
caller's training step, the loss-versus-position curves (x = position in frames) and the plot
images; W&B also gets the leaderboard as a table and results.json as an artifact.
"""

from __future__ import annotations

import importlib
import logging
import math
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from ttt_bench.reporting.series import step_scalars

logger = logging.getLogger(__name__)

PREFIX = "ttt_bench"
MAX_CURVE_POINTS = 500  # curves are averaged into at most this many bins before logging
EXTRAS = {"wandb": ("wandb", "Weights & Biases logging"),
          "tensorboard": ("tensorboard", "TensorBoard logging")}


class MissingExtraError(ImportError):
    """An optional tracker was asked for but its package is not installed."""


def require(wandb: bool = False, tensorboard: bool = False) -> None:
    """Fail before any slow work when an asked-for tracker's package is missing."""
    for extra, wanted in (("wandb", wandb), ("tensorboard", tensorboard)):
        if wanted:
            _import(extra)


def _import(extra: str):
    module, what = EXTRAS[extra]
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtraError(f"{what} needs the {module} package: pip install \"ttt-bench[{extra}]\"") from None


# ----------------------------------------------------------------------------- what is logged


def scalars(results: Mapping[str, Any]) -> dict[str, float]:
    """Every numeric metric of every task (and task group) and model (nested keys joined by '/');
    booleans, lists and non-finite values are left out."""
    out: dict[str, float] = {}
    tables = {**(results.get("results") or {}), **(results.get("groups") or {})}
    for task, models in tables.items():
        for model, metrics in models.items():
            for path, value in _numbers(metrics):
                out[f"{PREFIX}/{task}/{model}/{path}"] = value
    return out


def _numbers(tree: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, float]]:
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from _numbers(value, f"{name}/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            yield name, float(value)


def leaderboard_rows(results: Mapping[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """One row per task (and task group) and model: its top-level numeric metrics (columns in
    first-seen order)."""
    rows = []
    columns: list[str] = []
    tables = {**(results.get("results") or {}), **(results.get("groups") or {})}
    for task, models in tables.items():
        for model, metrics in models.items():
            values = {k: float(v) for k, v in metrics.items()
                      if isinstance(v, (int, float)) and not isinstance(v, bool)}
            columns += [k for k in values if k not in columns]
            rows.append((task, model, values))
    return ["task", "model", *columns], [[t, m, *(v.get(c) for c in columns)] for t, m, v in rows]


def curves(out_dir: Path, results: Mapping[str, Any]) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """task -> model -> (positions, mean NLL) from curves.npz, averaged into at most
    MAX_CURVE_POINTS bins; bins without any prediction are left out."""
    out: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    with np.load(Path(out_dir) / "curves.npz") as npz:
        for task, models in (results.get("results") or {}).items():
            for model in models:
                key = f"{task}/{model}/mean"
                if key in npz.files:
                    out.setdefault(task, {})[model] = _binned(npz[key].astype(np.float64))
    return out


def _binned(curve: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    width = max(1, math.ceil(len(curve) / MAX_CURVE_POINTS))
    starts = np.arange(0, len(curve), width)
    xs, ys = [], []
    for start in starts:
        part = curve[start:start + width]
        part = part[np.isfinite(part)]
        if part.size:
            xs.append(int(start))
            ys.append(float(part.mean()))
    return np.asarray(xs, dtype=np.int64), np.asarray(ys)


# ----------------------------------------------------------------------------- Weights & Biases


def log_wandb(results: Mapping[str, Any], out_dir: Path, run: Any = None,
              wandb_args: Mapping[str, Any] | None = None, step: int | None = None) -> None:
    """Log into ``run`` (the caller's), or a run started with ``wandb.init(**wandb_args)`` and
    finished here."""
    wandb = _import("wandb")
    own = run is None
    if own:
        run = wandb.init(**dict(wandb_args or {}))
    try:
        data: dict[str, Any] = dict(scalars(results))
        columns, rows = leaderboard_rows(results)
        data[f"{PREFIX}/leaderboard"] = wandb.Table(columns=columns, data=rows)
        for task, models in curves(out_dir, results).items():
            names = list(models)
            data[f"{PREFIX}/{task}/loss_vs_position"] = wandb.plot.line_series(
                xs=[models[m][0].tolist() for m in names], ys=[models[m][1].tolist() for m in names],
                keys=names, title=f"{task}: mean NLL vs position", xname="position (frames)")
        for image in sorted(Path(out_dir).glob("*.png")):  # loss_vs_position, and a task's own plots
            data[f"{PREFIX}/{image.stem}"] = wandb.Image(str(image))
        run.log(data, step=step)
        for at, values in step_scalars(results).items():  # a training run's checkpoints, each at its step
            run.log(values, step=at)
        artifact = wandb.Artifact(name=f"{PREFIX}-results", type="evaluation",
                                  metadata={"step": step, "tasks": list(results.get("results") or {})})
        artifact.add_file(str(Path(out_dir) / "results.json"), name="results.json")
        run.log_artifact(artifact)
    finally:
        if own:
            run.finish()


# ----------------------------------------------------------------------------- TensorBoard


def log_tensorboard(results: Mapping[str, Any], out_dir: Path, writer: Any = None,
                    log_dir: str | Path | None = None, step: int | None = None) -> None:
    """Log with ``writer`` (the caller's SummaryWriter), or one opened on ``log_dir`` and closed here.

    The curves are scalars whose step is the position in frames, one tag per evaluation step
    (``.../loss_vs_position/step_N``), so they never mix with the training-step axis."""
    _import("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    own = writer is None
    if own:
        writer = SummaryWriter(log_dir=str(log_dir))
    try:
        for tag, value in scalars(results).items():
            writer.add_scalar(tag, value, global_step=step)
        for at, values in step_scalars(results).items():  # a training run's checkpoints, each at its step
            for tag, value in values.items():
                writer.add_scalar(tag, value, global_step=at)
        suffix = f"/step_{step}" if step is not None else ""
        for task, models in curves(out_dir, results).items():
            for model, (xs, ys) in models.items():
                for x, y in zip(xs.tolist(), ys.tolist()):
                    writer.add_scalar(f"{PREFIX}/{task}/{model}/loss_vs_position{suffix}", y, global_step=x)
        for image in sorted(Path(out_dir).glob("*.png")):  # loss_vs_position, and a task's own plots
            import matplotlib.image

            pixels = matplotlib.image.imread(str(image))[..., :3]
            writer.add_image(f"{PREFIX}/{image.stem}", pixels, global_step=step, dataformats="HWC")
        board = Path(out_dir) / "leaderboard.md"
        if board.exists():
            writer.add_text(f"{PREFIX}/leaderboard", board.read_text(), global_step=step)
        writer.flush()
    finally:
        if own:
            writer.close()


def log_all(results: Mapping[str, Any], out_dir: Path, wandb_args=None, wandb_run=None, tensorboard_dir=None,
            tensorboard_writer=None, step: int | None = None) -> None:
    if wandb_args is not None or wandb_run is not None:
        if isinstance(wandb_args, str):
            from ttt_bench.options import parse_kv

            wandb_args = parse_kv(wandb_args, "wandb_args")
        log_wandb(results, out_dir, run=wandb_run, wandb_args=wandb_args, step=step)
    if tensorboard_dir is not None or tensorboard_writer is not None:
        log_tensorboard(results, out_dir, writer=tensorboard_writer, log_dir=tensorboard_dir, step=step)
