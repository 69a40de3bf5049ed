"""Loss-versus-position plots (matplotlib, Agg): NLL per model with bootstrap bands, the delta
to the baseline, one panel per codebook group, minutes on a second axis.

Curves are binned to at most ``max_points`` points (block mean over ``ceil(T / max_points)``
frames) and smoothed by a centred moving average over ``smooth_bins`` bins. The band is a
bootstrap over documents at each binned position (documents resampled with replacement,
fixed seed), computed as weighted sums so long curves stay cheap.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ttt_bench.constants import FRAME_RATE  # noqa: E402
from ttt_bench.metrics import BOOTSTRAP_SEED, CI_LEVEL, GROUPS, DocSummary  # noqa: E402

logger = logging.getLogger(__name__)


@dataclass
class Band:
    x: np.ndarray      # bin centres, frames
    mean: np.ndarray
    low: np.ndarray
    high: np.ndarray


def _binned(curves: Sequence[np.ndarray], width: int, n_bins: int
            ) -> tuple[np.ndarray, np.ndarray]:
    """Per document, sum and count of finite values in each bin: two [n_docs, n_bins]."""
    s = np.zeros((len(curves), n_bins))
    c = np.zeros((len(curves), n_bins))
    for i, curve in enumerate(curves):
        padded = np.full(n_bins * width, np.nan)
        padded[: curve.size] = curve[: n_bins * width]
        blocks = padded.reshape(n_bins, width)
        ok = np.isfinite(blocks)
        s[i] = np.where(ok, blocks, 0.0).sum(axis=1)
        c[i] = ok.sum(axis=1)
    return s, c


def _smooth(a: np.ndarray, bins: int) -> np.ndarray:
    """Centred moving sum over ``bins`` bins along the last axis (sums and counts alike)."""
    half = bins // 2
    if half <= 0:
        return a
    padded = np.pad(a, [(0, 0), (half, half)])
    csum = np.cumsum(padded, axis=1)
    csum = np.concatenate([np.zeros((a.shape[0], 1)), csum], axis=1)
    return csum[:, 2 * half + 1:] - csum[:, : -2 * half - 1]


def _doc_means(s: np.ndarray, c: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(c > 0, s / np.maximum(c, 1e-300), np.nan)


def band(curves: Sequence[np.ndarray], max_points: int = 500,
         smooth_bins: int = 5, iters: int = 200) -> Band | None:
    """Mean over documents (equal weight) of binned, smoothed curves, with a bootstrap band."""
    t_max = max((c.size for c in curves), default=0)
    if not t_max:
        return None
    width = max(1, math.ceil(t_max / max_points))
    n_bins = math.ceil(t_max / width)
    s, c = _binned(curves, width, n_bins)
    reached = c > 0  # smoothing must not extend a document past its end
    s, c = _smooth(s, smooth_bins), _smooth(c, smooth_bins)
    per_doc = np.where(reached, _doc_means(s, c), np.nan)   # [n_docs, n_bins]
    have = np.isfinite(per_doc)
    vals = np.where(have, per_doc, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = vals.sum(0) / have.sum(0)
    low = high = np.full(n_bins, np.nan)
    n = len(curves)
    if n >= 2 and iters >= 2:
        rng = np.random.default_rng(BOOTSTRAP_SEED)
        idx = rng.integers(0, n, size=(iters, n))
        w = np.bincount((idx + n * np.arange(iters)[:, None]).ravel(),
                        minlength=iters * n).reshape(iters, n).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            reps = (w @ vals) / (w @ have)
        alpha = (1 - CI_LEVEL) / 2
        with warnings.catch_warnings():  # bins no resampled document reaches: NaN, no band
            warnings.simplefilter("ignore", RuntimeWarning)
            low, high = np.nanquantile(reps, [alpha, 1 - alpha], axis=0)
    x = (np.arange(n_bins) + 0.5) * width
    return Band(x=x, mean=mean, low=np.asarray(low), high=np.asarray(high))


def save_png_svg(fig, stem: Path) -> list[Path]:
    """Write ``fig`` as ``stem.png`` (100 dpi) and ``stem.svg``, close it, return both paths."""
    fig.tight_layout()
    paths = [stem.with_suffix(".png"), stem.with_suffix(".svg")]
    fig.savefig(paths[0], dpi=100)
    fig.savefig(paths[1])
    plt.close(fig)
    return paths


def _draw(ax, b: Band | None, label: str, color) -> None:
    if b is None:
        return
    ax.plot(b.x, b.mean, label=label, color=color, lw=1.2)
    if np.isfinite(b.low).any():
        ax.fill_between(b.x, b.low, b.high, color=color, alpha=0.2, lw=0)


def _minutes_axis(ax, frame_rate: float) -> None:
    sec = ax.secondary_xaxis("top", functions=(lambda f: f / frame_rate / 60.0,
                                               lambda m: m * 60.0 * frame_rate))
    sec.set_xlabel("minutes")


def _delta_curves(model: Sequence[DocSummary], base: Sequence[DocSummary], group: str
                  ) -> list[np.ndarray]:
    by_id = {s.doc_id: s for s in base}
    out = []
    for s in model:
        if s.doc_id in by_id:
            b = by_id[s.doc_id].curves[group]
            n = min(b.size, s.curves[group].size)
            out.append(s.curves[group][:n] - b[:n])
    return out


def plot_loss_vs_position(stem: Path, summaries: dict[str, dict[str, list[DocSummary]]],
                          baselines: dict[str, str | None], labels: dict[str, str]) -> list[Path]:
    """Write ``stem.png`` and ``stem.svg``; two rows per task (NLL, delta to the baseline),
    one column per codebook group. Returns the written paths."""
    tasks = list(summaries)
    fig, axes = plt.subplots(2 * max(len(tasks), 1), len(GROUPS), squeeze=False,
                             figsize=(5 * len(GROUPS), 3.6 * 2 * max(len(tasks), 1)))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ti, task in enumerate(tasks):
        base = baselines.get(task)
        models = summaries[task]
        for gi, group in enumerate(GROUPS):
            ax, dax = axes[2 * ti, gi], axes[2 * ti + 1, gi]
            for mi, (model, docs) in enumerate(models.items()):
                color = colors[mi % len(colors)]
                label = labels.get(model, model)
                _draw(ax, band([d.curves[group] for d in docs]), label, color)
                if base is not None and model != base and base in models:
                    _draw(dax, band(_delta_curves(docs, models[base], group)), label, color)
            ax.set_title(f"{task}: {group}")
            ax.set_ylabel("NLL (nats)")
            dax.axhline(0.0, color="grey", lw=0.8)
            dax.set_title(f"{task}: {group}, delta to {base}" if base else
                          f"{task}: {group} (no baseline)")
            dax.set_ylabel("NLL - baseline (nats)")
            for a in (ax, dax):
                a.set_xlabel("position (frames)")
                _minutes_axis(a, FRAME_RATE)
                if a.get_legend_handles_labels()[0]:
                    a.legend(fontsize=8)
    return save_png_svg(fig, stem)
