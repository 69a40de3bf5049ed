"""Per-position statistics, metrics, bootstrap intervals and sanity checks.

The settings come from the task's config (``ttt_bench.config``: ``positions``, ``window``,
``early_late_frames``, ``slope_range``, ``segments``, ``bootstrap_iters``, ``targets``, validated
once when the config is read) and, from the model that scored, only its :class:`ModelShape`
(``card``, ``delays``).

Input: one :class:`DocRecord` per document and model, holding that document's NLL
``[n_codebooks, T]`` (nats, NaN where a position has no prediction).

Conventions (stable; documented here and in the README):

* Prediction mask. Codebook ``k`` has no prediction at positions ``t >= T - delays[k]``
  (the model's ``ModelShape.delays``, Moshi's ``[0, 1, 1, 1, 1, 1, 1, 1]``). NaN there is expected and
  excluded ("no prediction", counted in ``n_no_prediction``). Any other non-finite value (Inf
  anywhere, NaN at a predicted position) is a failure: excluded from every mean, counted in
  ``n_nonfinite`` and raised as the ``nonfinite`` flag. A failure never becomes ``0.0``.
* Per-document curves. For each document and codebook group (``all`` = codebooks 0-7,
  ``semantic`` = 0, ``acoustic`` = 1-7) the curve at position ``t`` is the mean over the
  group's codebooks, defined where every codebook of the group has a prediction.
* ``mean_nll``: mean over every predicted (codebook, position) value of every document
  (frame-weighted: longer documents weigh more). ``nll_cb{k}`` likewise over codebook ``k``;
  ``nll_semantic``/``nll_acoustic``: mean of their group curves over every defined position.
* ``nll@P``: window of positions ``P - window//2 .. P + window//2`` (inclusive, so
  ``window + 1`` frames, centred on P). Only documents with ``T > P + window//2`` (that cover
  the whole window) count; per-document mean over the window first, then the mean over
  documents (documents weigh equally).
* ``early_nll``/``late_nll``: mean of the first / last ``early_late_frames`` frames of each
  document; only documents with ``T >= 2 * early_late_frames``; documents weigh equally.
  ``improvement = early_nll - late_nll`` (positive = the loss went down).
* ``slope`` (nats per frame): pooled within-document least squares of the ``all`` curve against
  position, i.e. ``sum_d Sxy_d / sum_d Sxx_d`` with each document centred on its own mean
  (document fixed effects: offsets between documents of different lengths do not bias it; with
  documents of equal length it equals the slope of the mean curve). Range ``slope_range``:
  ``None`` = each document's whole length; ``(a, b)`` = positions ``a <= t < b``, only documents
  with ``T >= b`` (``b = None``: up to each document's end). ``slope_{a}_{b}`` for each segment
  in ``segments`` (half-open, documents must cover it).
* Voiced frames. A document whose ``meta["voice_activity"]`` lists its voiced segments
  (``[[start_s, end_s], ...]`` in document time: LibriLight's ``.json``, or the energy detector of
  ``ttt_bench.audio.voice``) has a voiced mask: frame ``t`` covers ``[t / 12.5, (t + 1) / 12.5)``
  seconds and is voiced when at least half of that span (``VOICED_SHARE``) lies inside a segment
  (:func:`voiced_frames`). ``voiced_mean_nll`` / ``silence_mean_nll``: ``mean_nll`` over the voiced /
  silent frames only (frame-weighted); ``voiced_nll@P``, ``voiced_early_nll``, ``voiced_late_nll``,
  ``voiced_improvement``: as above, the windows' means taken over their voiced frames only (a
  window without one does not count); ``voiced_fraction``: voiced frames / frames. Reported when
  some document carries voice activity; documents without it do not contribute.
* Bootstrap. Every metric above is a ratio ``sum_d num_d / sum_d den_d`` over its contributing
  documents (``den_d > 0``). Documents are resampled with replacement (``bootstrap_iters``
  draws, fixed seed ``BOOTSTRAP_SEED``) among the contributing documents; percentile interval at ``CI_LEVEL``
  and standard error = std of the replicates. Fewer than 2 contributing documents: interval and
  standard error are ``None`` (unavailable, never 0).
* Deltas (:func:`compare_to_baseline`): ``model - baseline`` on the documents both scored
  (paired by ``doc_id``), paired bootstrap (the same resampled documents for both).

Schema of :func:`compute_model_metrics` (``results[task][model]`` in results.json)::

    {
      "mean_nll": 5.43, "nll@8000": 5.1 | null, ..., "early_nll", "late_nll", "improvement",
      "slope", "slope_4000_8000", ..., "nll_semantic", "nll_acoustic", "nll_cb0" .. "nll_cb7",
      "ci":     {metric: [low, high] | null},
      "stderr": {metric: float | null},
      "n":      {metric: documents contributing},
      "n_docs": int, "n_frames": int, "n_nonfinite": int, "n_no_prediction": int,
      "seconds": float, "frames_per_second": float | null,
      "ci_level": 0.95, "bootstrap_iters": 1000,
      "flags":   [{"code": str, "message": str}],
      "targets": {metric: {"target": "< 2.25", "value": float | null, "pass": bool | null}},
      "delta_vs_baseline": {...}   # added by report.write_outputs for non-baseline models
    }

``delta_vs_baseline`` (:func:`compare_to_baseline` plus ``"baseline": name``)::

    {"baseline": "frozen", "n_docs": paired docs, "n_unpaired": docs in only one of the two,
     "delta": {metric: float | null}, "ci": {...}, "stderr": {...}, "n": {...},
     "significant": {metric: bool | null},   # interval excludes 0
     "mde": {metric: float | null},          # minimum detectable effect (power(): 80%, two-sided 5%)
     "docs_needed": {metric: int | null},    # per target: documents to detect the target's size
     "underpowered": {metric: bool | null}}  # per target: interval includes 0, mde > target's size
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import operator
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable, Sequence

import numpy as np

from ttt_bench.constants import FRAME_RATE, N_CODEBOOKS

logger = logging.getLogger(__name__)

GROUPS = ("all", "semantic", "acoustic")

# Fixed settings of the statistics (not task config keys; results.json records them).
BOOTSTRAP_SEED = 0   # the bootstrap's random generator
CI_LEVEL = 0.95      # the intervals' coverage
DEGENERATE_TOL = 1e-3      # |NLL - ln(n)| counted as "at ln(n)"
DEGENERATE_MAX_N = 64      # n = 1 .. this for the ln(n) signature
DEGENERATE_SPREAD = 0.05   # std below this = "almost no spread"
DEGENERATE_FRACTION = 0.5  # this share of values at ln(n) = clustered
CARD_TOL = 0.05            # mean NLL >= ln(card) - this = near uniform
POWER = 0.8          # the power the minimum detectable effect is computed for
POWER_Z = 1.959963984540054 + 0.8416212335729143  # z_0.975 + z_0.8 (two-sided 5%, power 80%)
VOICED_SHARE = 0.5  # a frame is voiced when at least this share of its span is in a voiced segment
VOICED_EPS = 1e-9   # seconds: float slack on that share (a segment ending exactly mid-frame counts)


@dataclass
class DocRecord:
    """One document scored by one model.

    nll: float [n_codebooks, T] in nats, NaN at positions without a prediction.
    meta: source, duration_s, n_frames, files, speaker, book, ...
    seconds: wall-clock spent scoring this document with this model.
    """

    doc_id: str
    meta: dict
    nll: np.ndarray
    seconds: float = 0.0


_TARGET_RE = re.compile(r"^\s*(<=|>=|<|>)\s*([-+0-9.eE]+)\s*$")
_TARGET_OPS: dict[str, Callable[[float, float], bool]] = {
    "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}


def parse_target(spec: Any) -> tuple[str, float]:
    """The one grammar of a target: ``"< 2.25"`` -> ``("<", 2.25)``; raises ValueError naming
    the spec. Task configs are checked with it (``ttt_bench.config``) and targets evaluated by it."""
    m = _TARGET_RE.match(spec) if isinstance(spec, str) else None
    try:
        return m.group(1), float(m.group(2))  # type: ignore[union-attr]
    except (AttributeError, ValueError):
        raise ValueError(f"target {spec!r}: expected '<', '<=', '>' or '>=' and a number, "
                         "e.g. '< 2.25'") from None


@dataclass(frozen=True)
class ModelShape:
    """What the metrics need to know about the model that scored (not about the task): its
    codebook size ``card`` (the uniform guess is ln(card)) and its codebooks' ``delays`` (where
    a codebook has no prediction). ``ttt_bench.tasks.base.shape_of(lm)`` reads them off a model."""

    card: int = 2048
    delays: tuple[int, ...] = (0, 1, 1, 1, 1, 1, 1, 1)

    def __post_init__(self) -> None:
        object.__setattr__(self, "delays", tuple(int(d) for d in self.delays))
        if not self.delays or min(self.delays) < 0:
            raise ValueError(f"delays {list(self.delays)}: one delay >= 0 per codebook")

    @property
    def n_codebooks(self) -> int:
        return len(self.delays)

    def group_codebooks(self, group: str) -> list[int]:
        k = self.n_codebooks
        return {"all": list(range(k)), "semantic": [0], "acoustic": list(range(1, k))}[group]


def metric_names(cfg: Any, n_codebooks: int = N_CODEBOOKS, voiced: bool = True) -> list[str]:
    """Every long-stream metric of a task config ``cfg`` (a :class:`ttt_bench.config.StreamTaskConfig`),
    in the stable order used in results.json and the leaderboard; ``voiced``: with the voiced-frame
    metrics (documents that carry voice activity)."""
    names = ["mean_nll"] + [f"nll@{p}" for p in cfg.positions]
    names += ["early_nll", "late_nll", "improvement", "slope"]
    names += [f"slope_{a}_{b}" for a, b in cfg.segments]
    names += ["nll_semantic", "nll_acoustic"] + [f"nll_cb{k}" for k in range(n_codebooks)]
    return names + (voiced_metric_names(cfg) if voiced else [])


def voiced_metric_names(cfg: Any) -> list[str]:
    """The metrics restricted to voiced (or silent) frames: reported for documents that carry voice
    activity (``meta["voice_activity"]``)."""
    return (["voiced_mean_nll", "silence_mean_nll", "voiced_fraction"]
            + [f"voiced_nll@{p}" for p in cfg.positions]
            + ["voiced_early_nll", "voiced_late_nll", "voiced_improvement"])


# ----------------------------------------------------------------------------- per document


@dataclass
class DocSummary:
    """Everything the metrics need from one document, computed once."""

    doc_id: str
    meta: dict
    n_frames: int
    seconds: float
    curves: dict[str, np.ndarray]   # group -> float64 [T], NaN where undefined
    cb_sum: np.ndarray              # [K] sum of finite predicted values per codebook
    cb_count: np.ndarray            # [K]
    n_nonfinite: int
    n_no_prediction: int
    value_count: int                # finite predicted values
    value_mean: float
    value_m2: float                 # sum of squared deviations from value_mean
    near_ln: np.ndarray             # [max_n + 1] values within tol of ln(n)
    voiced: np.ndarray | None = None  # bool [T]: voiced frames (None: no voice activity known)
    voiced_sum: float = 0.0         # sum and count of finite predicted values at voiced frames
    voiced_count: int = 0
    silence_sum: float = 0.0        # ... at silent frames
    silence_count: int = 0


def prediction_mask(n_frames: int, delays: Sequence[int]) -> np.ndarray:
    """Bool [K, T]: True where codebook k has a prediction (t < T - delays[k])."""
    t = np.arange(n_frames)
    return t[None, :] < (n_frames - np.asarray(delays))[:, None]


def merge_segments(segments: Iterable[Sequence[float]]) -> list[tuple[float, float]]:
    """Sorted, non-overlapping ``(start, end)`` seconds; empty and reversed segments dropped,
    overlapping or touching ones joined."""
    merged: list[tuple[float, float]] = []
    for start, end in sorted((float(a), float(b)) for a, b in segments):
        if end <= start:
            continue
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def voiced_frames(segments: Iterable[Sequence[float]], n_frames: int,
                  frame_rate: float = FRAME_RATE) -> np.ndarray:
    """Bool [n_frames]: frame t, covering ``[t / frame_rate, (t + 1) / frame_rate)`` seconds, is
    voiced when at least ``VOICED_SHARE`` of that span lies inside the voiced ``segments``
    (``[[start_s, end_s], ...]``, as LibriLight's ``voice_activity``)."""
    merged = merge_segments(segments)
    if not merged or n_frames <= 0:
        return np.zeros(max(n_frames, 0), dtype=bool)
    knots = np.array(merged).reshape(-1)  # s0, e0, s1, e1, ...: voiced time before x, linear between
    lengths = np.array([e - s for s, e in merged])
    before = np.concatenate([[0.0], np.cumsum(lengths)])
    values = np.stack([before[:-1], before[1:]], axis=1).reshape(-1)
    edges = np.arange(n_frames + 1) / frame_rate
    inside = np.diff(np.interp(edges, knots, values, left=0.0, right=float(before[-1])))
    return inside >= VOICED_SHARE / frame_rate - VOICED_EPS


def _near_ln_counts(values: np.ndarray) -> np.ndarray:
    """How many values lie within ``DEGENERATE_TOL`` of ln(n), for n = 0 .. DEGENERATE_MAX_N."""
    counts = np.zeros(DEGENERATE_MAX_N + 1, dtype=np.int64)
    v = values.astype(np.float32)
    v = v[(v > -DEGENERATE_TOL) & (v < math.log(DEGENERATE_MAX_N) + DEGENERATE_TOL)]
    if v.size:
        n = np.clip(np.rint(np.exp(v)), 1, DEGENERATE_MAX_N).astype(np.int64)
        table = np.log(np.arange(1, DEGENERATE_MAX_N + 1, dtype=np.float32))
        hit = np.abs(v - table[n - 1]) <= DEGENERATE_TOL
        counts += np.bincount(n[hit], minlength=DEGENERATE_MAX_N + 1)
    return counts


def summarize(record: DocRecord, shape: ModelShape = ModelShape()) -> DocSummary:
    """Per-document curves and counts (the only pass over the raw NLL) of a model of ``shape``."""
    nll = np.asarray(record.nll, dtype=np.float64)
    if nll.ndim != 2 or nll.shape[0] != shape.n_codebooks:
        raise ValueError(f"document {record.doc_id!r}: nll has shape {nll.shape}, expected "
                         f"[{shape.n_codebooks}, T] (one row per codebook: the model's delays)")
    k, t = nll.shape
    pred = prediction_mask(t, shape.delays)
    finite = np.isfinite(nll)
    good = pred & finite
    curves = {}
    for group in GROUPS:
        cbs = shape.group_codebooks(group)
        if not cbs:
            curves[group] = np.full(t, np.nan)
            continue
        defined = pred[cbs].all(axis=0)
        cnt = good[cbs].sum(axis=0)
        tot = np.where(good[cbs], nll[cbs], 0.0).sum(axis=0)
        curves[group] = np.where(defined & (cnt > 0), tot / np.maximum(cnt, 1), np.nan)
    flat = nll[good]
    mean = float(flat.mean()) if flat.size else math.nan
    return DocSummary(
        doc_id=str(record.doc_id), meta=dict(record.meta or {}), n_frames=t,
        seconds=float(record.seconds or 0.0), curves=curves,
        cb_sum=np.where(good, nll, 0.0).sum(axis=1), cb_count=good.sum(axis=1),
        n_nonfinite=int((~finite & pred).sum() + (np.isinf(nll) & ~pred).sum()),
        n_no_prediction=int((~pred).sum()), value_count=int(flat.size), value_mean=mean,
        value_m2=float(((flat - mean) ** 2).sum()) if flat.size else 0.0,
        near_ln=_near_ln_counts(flat), **_voiced_sums(record.meta, nll, good))


def _voiced_sums(meta: dict | None, nll: np.ndarray, good: np.ndarray) -> dict[str, Any]:
    """The voiced mask of a document whose ``meta`` carries ``voice_activity``, and the sums and
    counts of its finite predicted values at voiced and at silent frames."""
    segments = (meta or {}).get("voice_activity")
    if segments is None:
        return {}
    voiced = voiced_frames(segments, nll.shape[-1])
    values = np.where(good, nll, 0.0)
    return {"voiced": voiced,
            "voiced_sum": float(values[:, voiced].sum()), "voiced_count": int(good[:, voiced].sum()),
            "silence_sum": float(values[:, ~voiced].sum()), "silence_count": int(good[:, ~voiced].sum())}


def summarize_all(records: Iterable[DocRecord], shape: ModelShape = ModelShape()) -> list[DocSummary]:
    return [summarize(r, shape) for r in records]


# ----------------------------------------------------------------------------- metric terms


def _window_mean(curve: np.ndarray, lo: int, hi: int) -> float:
    seg = curve[max(lo, 0):hi]
    seg = seg[np.isfinite(seg)]
    return float(seg.mean()) if seg.size else math.nan


def _sxy_sxx(curve: np.ndarray, lo: int, hi: int) -> tuple[float, float]:
    y = curve[lo:hi]
    t = np.arange(lo, lo + y.size, dtype=np.float64)
    ok = np.isfinite(y)
    if ok.sum() < 2:
        return 0.0, 0.0
    t, y = t[ok], y[ok]
    tc = t - t.mean()
    return float((tc * (y - y.mean())).sum()), float((tc * tc).sum())


def _slope_bounds(s: DocSummary, rng: tuple[int, int | None] | None) -> tuple[int, int] | None:
    if rng is None:
        return 0, s.n_frames
    a, b = rng
    if b is None:
        return (a, s.n_frames) if s.n_frames - a >= 2 else None
    return (a, b) if s.n_frames >= b else None


def _ratio_term(value: float) -> tuple[float, float]:
    return (value, 1.0) if math.isfinite(value) else (0.0, 0.0)


def doc_terms(s: DocSummary, cfg: Any) -> dict[str, tuple[float, float]]:
    """Per-document (numerator, denominator) of every metric; den 0 = does not contribute.
    ``cfg``: the task's config (:class:`ttt_bench.config.StreamTaskConfig`)."""
    c = s.curves["all"]
    terms: dict[str, tuple[float, float]] = {}
    terms["mean_nll"] = (float(s.cb_sum.sum()), float(s.cb_count.sum()))
    terms.update(_position_terms(c, s.n_frames, cfg))
    bounds = _slope_bounds(s, cfg.slope_range)
    terms["slope"] = _sxy_sxx(c, *bounds) if bounds else (0.0, 0.0)
    for a, b in cfg.segments:
        terms[f"slope_{a}_{b}"] = _sxy_sxx(c, a, b) if s.n_frames >= b else (0.0, 0.0)
    for group in ("semantic", "acoustic"):
        g = s.curves[group]
        gok = np.isfinite(g)
        terms[f"nll_{group}"] = (float(g[gok].sum()), float(gok.sum()))
    for k in range(s.cb_sum.size):
        terms[f"nll_cb{k}"] = (float(s.cb_sum[k]), float(s.cb_count[k]))
    terms.update(_voiced_terms(s, cfg))
    return terms


def _voiced_terms(s: DocSummary, cfg: Any) -> dict[str, tuple[float, float]]:
    """The voiced-frame metrics of one document: the definitions above, restricted to voiced
    frames (``silence_mean_nll``: to silent ones); den 0 for a document without voice activity."""
    names = voiced_metric_names(cfg)
    if s.voiced is None:
        return {name: (0.0, 0.0) for name in names}
    c = np.where(s.voiced, s.curves["all"], np.nan)
    terms = {"voiced_mean_nll": (s.voiced_sum, float(s.voiced_count)),
             "silence_mean_nll": (s.silence_sum, float(s.silence_count)),
             "voiced_fraction": (float(s.voiced.sum()), float(s.n_frames))}
    terms.update(_position_terms(c, s.n_frames, cfg, prefix="voiced_"))
    return terms


def _position_terms(c: np.ndarray, n_frames: int, cfg: Any,
                    prefix: str = "") -> dict[str, tuple[float, float]]:
    """``nll@P``, ``early_nll``, ``late_nll`` and ``improvement`` of one document's per-frame
    curve ``c`` (NaN = frame left out), each name with ``prefix``."""
    terms: dict[str, tuple[float, float]] = {}
    half = cfg.window // 2
    for p in cfg.positions:
        reach = n_frames > p + half
        terms[f"{prefix}nll@{p}"] = _ratio_term(_window_mean(c, p - half, p + half + 1) if reach
                                                else math.nan)
    n = cfg.early_late_frames
    if n_frames >= 2 * n:
        early, late = _window_mean(c, 0, n), _window_mean(c, n_frames - n, n_frames)
    else:
        early = late = math.nan
    terms[f"{prefix}early_nll"], terms[f"{prefix}late_nll"] = _ratio_term(early), _ratio_term(late)
    terms[f"{prefix}improvement"] = _ratio_term(early - late)
    return terms


def has_voice_activity(summaries: Sequence[DocSummary]) -> bool:
    """Whether any document carries voice activity (then the voiced metrics are reported)."""
    return any(s.voiced is not None for s in summaries)


def term_arrays(summaries: Sequence[DocSummary], cfg: Any, shape: ModelShape = ModelShape()
                ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """metric -> (num [n_docs], den [n_docs])."""
    per_doc = [doc_terms(s, cfg) for s in summaries]
    out = {}
    for name in metric_names(cfg, shape.n_codebooks, voiced=has_voice_activity(summaries)):
        num = np.array([t[name][0] for t in per_doc], dtype=np.float64)
        den = np.array([t[name][1] for t in per_doc], dtype=np.float64)
        out[name] = (num, den)
    return out


# ----------------------------------------------------------------------------- bootstrap


def _uniforms(n_docs: int, iters: int) -> np.ndarray:
    """[iters, n_docs] uniforms from the fixed seed; column j drives the j-th resampled doc."""
    return np.random.default_rng(BOOTSTRAP_SEED).random((iters, n_docs))


def _resample_idx(contrib: np.ndarray, u: np.ndarray) -> np.ndarray:
    m = contrib.size
    return contrib[np.minimum((u[:, :m] * m).astype(np.int64), m - 1)]


def _interval(reps: np.ndarray, level: float) -> tuple[list[float] | None, float | None]:
    reps = reps[np.isfinite(reps)]
    if reps.size < 2:
        return None, None
    alpha = (1 - level) / 2
    lo, hi = np.quantile(reps, [alpha, 1 - alpha])
    return [float(lo), float(hi)], float(reps.std(ddof=1))


def bootstrap_ratio(num: np.ndarray, den: np.ndarray, iters: int,
                    u: np.ndarray | None = None) -> dict[str, Any]:
    """Value, interval, stderr and n of ``sum(num)/sum(den)`` over documents with den > 0;
    ``iters`` bootstrap draws (the task's ``bootstrap_iters``)."""
    contrib = np.flatnonzero(den > 0)
    value = float(num[contrib].sum() / den[contrib].sum()) if contrib.size else None
    out = {"value": value, "ci": None, "stderr": None, "n": int(contrib.size)}
    if contrib.size < 2 or iters < 2:
        return out
    u = _uniforms(num.size, iters) if u is None else u
    idx = _resample_idx(contrib, u)
    reps = num[idx].sum(axis=1) / den[idx].sum(axis=1)
    out["ci"], out["stderr"] = _interval(reps, CI_LEVEL)
    return out


def bootstrap_delta(num_a: np.ndarray, den_a: np.ndarray, num_b: np.ndarray,
                    den_b: np.ndarray, iters: int, paired: bool = True,
                    u: np.ndarray | None = None) -> dict[str, Any]:
    """``ratio(a) - ratio(b)`` over documents contributing to both (arrays aligned by doc).

    paired=True resamples the same documents for a and b (the right thing for two models on
    the same recordings); paired=False resamples them independently (for comparison only).
    """
    contrib = np.flatnonzero((den_a > 0) & (den_b > 0))
    out = {"value": None, "ci": None, "stderr": None, "n": int(contrib.size)}
    if not contrib.size:
        return out
    out["value"] = float(num_a[contrib].sum() / den_a[contrib].sum()
                         - num_b[contrib].sum() / den_b[contrib].sum())
    if contrib.size < 2 or iters < 2:
        return out
    u = _uniforms(num_a.size, iters) if u is None else u
    ia = _resample_idx(contrib, u)
    if paired:
        ib = ia
    else:
        u2 = np.random.default_rng(BOOTSTRAP_SEED + 1).random(u.shape)
        ib = _resample_idx(contrib, u2)
    reps = (num_a[ia].sum(axis=1) / den_a[ia].sum(axis=1)
            - num_b[ib].sum(axis=1) / den_b[ib].sum(axis=1))
    out["ci"], out["stderr"] = _interval(reps, CI_LEVEL)
    return out


# ----------------------------------------------------------------------------- power


def paired_differences(num_a: np.ndarray, den_a: np.ndarray, num_b: np.ndarray, den_b: np.ndarray
                       ) -> np.ndarray:
    """Per-document ``a - b`` of a metric (each document's own value ``num / den``), over the
    documents contributing to both (arrays aligned by document)."""
    both = (den_a > 0) & (den_b > 0)
    return num_a[both] / den_a[both] - num_b[both] / den_b[both]


def minimum_detectable_effect(diffs: np.ndarray) -> float | None:
    """The smallest true difference a paired comparison over ``diffs.size`` documents detects with
    power ``POWER`` at two-sided level ``1 - CI_LEVEL`` (normal approximation):
    ``(z_0.975 + z_0.8) * sd(diffs) / sqrt(n)``; None with fewer than 2 documents."""
    diffs = np.asarray(diffs, dtype=np.float64)
    if diffs.size < 2:
        return None
    return float(POWER_Z * diffs.std(ddof=1) / math.sqrt(diffs.size))


def documents_needed(diffs: np.ndarray, size: float) -> int | None:
    """How many documents a paired comparison needs to detect a difference of ``size`` (same power
    and level as :func:`minimum_detectable_effect`, the sd of these ``diffs``):
    ``ceil(((z_0.975 + z_0.8) * sd / size) ** 2)``, at least 2; None without an sd or for size 0."""
    diffs = np.asarray(diffs, dtype=np.float64)
    if diffs.size < 2 or size == 0:
        return None
    return max(2, math.ceil((POWER_Z * float(diffs.std(ddof=1)) / abs(size)) ** 2))


def power(terms_a: dict[str, tuple[np.ndarray, np.ndarray]], terms_b: dict[str, tuple[np.ndarray, np.ndarray]],
          significant: dict[str, bool | None], targets: dict[str, str]) -> dict[str, Any]:
    """``mde`` of every delta, and for each metric with a target: ``docs_needed`` to detect a
    difference of the target's size (its bound, e.g. 0.05 for ``improvement > 0.05``) and
    ``underpowered``: the interval includes 0 while the MDE exceeds that size (a null result that
    says nothing about an effect of that size); None where it cannot be told."""
    diffs = {name: paired_differences(*terms_a[name], *terms_b[name]) for name in terms_a if name in terms_b}
    out: dict[str, Any] = {"mde": {name: minimum_detectable_effect(d) for name, d in diffs.items()},
                           "docs_needed": {}, "underpowered": {}}
    for name, spec in targets.items():
        if name not in diffs:
            continue
        size = abs(parse_target(spec)[1])
        mde = out["mde"][name]
        out["docs_needed"][name] = documents_needed(diffs[name], size)
        out["underpowered"][name] = (None if mde is None or significant.get(name) is None
                                     else bool(not significant[name] and mde > size))
    return out


# ----------------------------------------------------------------------------- sanity flags


def _pooled_values(summaries: Sequence[DocSummary]) -> tuple[int, float, float]:
    """Count, mean and std of every finite predicted value (Chan's parallel combination)."""
    n = sum(s.value_count for s in summaries)
    if not n:
        return 0, math.nan, math.nan
    mean = sum(s.value_count * s.value_mean for s in summaries if s.value_count) / n
    m2 = sum(s.value_m2 + s.value_count * (s.value_mean - mean) ** 2
             for s in summaries if s.value_count)
    return n, mean, math.sqrt(m2 / n)


def _flag(code: str, message: str) -> dict[str, str]:
    return {"code": code, "message": message}


def _nonfinite_flags(summaries: Sequence[DocSummary]) -> list[dict[str, str]]:
    flags = []
    bad = [s for s in summaries if s.n_nonfinite]
    if bad:
        total = sum(s.n_nonfinite for s in bad)
        ids = ", ".join(s.doc_id for s in bad[:5]) + (" ..." if len(bad) > 5 else "")
        flags.append(_flag("nonfinite", f"{total} non-finite NLL values at predicted positions "
                                        f"(Inf, or NaN where the model predicts) in {len(bad)} "
                                        f"document(s): {ids}; excluded from the means"))
    empty = [s for s in summaries if not s.value_count]
    if empty:
        ids = ", ".join(s.doc_id for s in empty[:5]) + (" ..." if len(empty) > 5 else "")
        flags.append(_flag("empty_document", f"{len(empty)} document(s) without a single "
                                             f"finite predicted NLL: {ids}"))
    return flags


def _degenerate_flags(summaries: Sequence[DocSummary], shape: ModelShape) -> list[dict[str, str]]:
    n, mean, std = _pooled_values(summaries)
    if not n:
        return []
    flags = []
    near = np.sum([s.near_ln for s in summaries], axis=0)
    for k in range(1, DEGENERATE_MAX_N + 1):
        ln_k = math.log(k)
        close_mean = abs(mean - ln_k) <= DEGENERATE_TOL and std <= DEGENERATE_SPREAD
        share = near[k] / n
        if close_mean or share >= DEGENERATE_FRACTION:
            flags.append(_flag("degenerate", (
                f"NLL clustered at ln({k}) = {ln_k:.4f} (mean {mean:.4f}, std {std:.4f}, "
                f"{100 * share:.0f}% of values within {DEGENERATE_TOL:g}): the loss of a "
                f"uniform guess over {k} classes, not a measurement of the model")))
    ln_card = math.log(shape.card)
    if mean >= ln_card - CARD_TOL:
        what = "worse than" if mean > ln_card + CARD_TOL else "close to"
        flags.append(_flag("near_uniform", (
            f"mean NLL {mean:.4f} is {what} ln(card) = ln({shape.card}) = {ln_card:.4f}: the "
            "model predicts no better than a uniform guess over the codebook")))
    return flags


def _flat_flags(summaries: Sequence[DocSummary]) -> list[dict[str, str]]:
    n, mean, std = _pooled_values(summaries)
    curve = mean_curves_from_summaries(summaries)["all"]["mean"]
    curve = curve[np.isfinite(curve)]
    if n >= 2 and (std <= 1e-9 or (curve.size >= 2 and float(curve.std()) <= 1e-12)):
        return [_flag("flat_curve", f"the NLL does not vary at all (std {std:.2e} over {n} "
                                    f"values, constant {mean:.4f}): not a model's loss")]
    return []


def flags_from_summaries(summaries: Sequence[DocSummary], shape: ModelShape = ModelShape()
                         ) -> list[dict[str, str]]:
    """Sanity flags of one model's documents; ``shape``: that model's (ln(card) is its uniform guess)."""
    if not summaries:
        return [_flag("no_documents", "no documents were scored")]
    return (_nonfinite_flags(summaries) + _degenerate_flags(summaries, shape)
            + _flat_flags(summaries))


def sanity_flags(records: Sequence[DocRecord], shape: ModelShape = ModelShape()) -> list[dict[str, str]]:
    """Non-finite values, ln(n) / ln(card) signatures, flat curve."""
    return flags_from_summaries(summarize_all(records, shape), shape)


class SanityError(RuntimeError):
    """Raised under ``--strict`` when any sanity flag is set."""


def raise_on_flags(results: dict[str, dict[str, dict]]) -> None:
    """``--strict``: raise SanityError listing every flag in ``results[task][model]``."""
    lines = [f"{task}/{model}: {f['code']}: {f['message']}"
             for task, models in results.items() for model, m in models.items()
             for f in m.get("flags", [])]
    if lines:
        raise SanityError("sanity checks failed (--strict):\n  " + "\n  ".join(lines))


# ----------------------------------------------------------------------------- aggregation


def mean_curves_from_summaries(summaries: Sequence[DocSummary]
                               ) -> dict[str, dict[str, np.ndarray]]:
    t_max = max((s.n_frames for s in summaries), default=0)
    return {group: _mean_curve(summaries, group, t_max) for group in GROUPS}


def _mean_curve(summaries: Sequence[DocSummary], group: str, t_max: int) -> dict[str, np.ndarray]:
    total = np.zeros(t_max)
    count = np.zeros(t_max, dtype=np.int64)
    for s in summaries:
        c = s.curves[group]
        ok = np.isfinite(c)
        total[: c.size] += np.where(ok, c, 0.0)
        count[: c.size] += ok
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    return {"mean": mean, "count": count}


def mean_voiced_curve(summaries: Sequence[DocSummary]) -> dict[str, np.ndarray]:
    """``{"mean", "count"}`` of the "all" curve restricted to voiced frames: at each position the
    mean over the documents voiced there (equal weight), and how many are."""
    voiced = [dataclasses.replace(s, curves={"all": np.where(s.voiced, s.curves["all"], np.nan)})
              for s in summaries if s.voiced is not None]
    t_max = max((s.n_frames for s in summaries), default=0)
    return _mean_curve(voiced, "all", t_max)


def mean_curves(records: Sequence[DocRecord], shape: ModelShape = ModelShape()
                ) -> dict[str, dict[str, np.ndarray]]:
    """Per group ("all", "semantic", "acoustic"): ``{"mean": float [T_max], "count": int
    [T_max]}``; the mean over documents (equal weight) of each document's curve at each
    position, and how many documents have a value there (NaN mean where none does)."""
    return mean_curves_from_summaries(summarize_all(records, shape))


def evaluate_targets(values: dict[str, float | None], targets: dict[str, str]
                     ) -> dict[str, dict[str, Any]]:
    out = {}
    for name, spec in targets.items():
        op, bound = parse_target(spec)
        v = values.get(name)
        out[name] = {"target": spec, "value": v,
                     "pass": None if v is None else bool(_TARGET_OPS[op](v, bound))}
    return out


def metrics_from_summaries(summaries: Sequence[DocSummary], cfg: Any, shape: ModelShape = ModelShape()
                           ) -> dict[str, Any]:
    terms = term_arrays(summaries, cfg, shape)
    u = _uniforms(len(summaries), cfg.bootstrap_iters) if cfg.bootstrap_iters >= 2 else None
    out: dict[str, Any] = {}
    ci, se, n = {}, {}, {}
    for name, (num, den) in terms.items():
        b = bootstrap_ratio(num, den, cfg.bootstrap_iters, u)
        out[name], ci[name], se[name], n[name] = b["value"], b["ci"], b["stderr"], b["n"]
    seconds = float(sum(s.seconds for s in summaries))
    n_frames = int(sum(s.n_frames for s in summaries))
    out.update({
        "ci": ci, "stderr": se, "n": n,
        "n_docs": len(summaries), "n_frames": n_frames,
        "n_nonfinite": int(sum(s.n_nonfinite for s in summaries)),
        "n_no_prediction": int(sum(s.n_no_prediction for s in summaries)),
        "seconds": seconds, "frames_per_second": n_frames / seconds if seconds > 0 else None,
        "ci_level": CI_LEVEL, "bootstrap_iters": cfg.bootstrap_iters,
        "flags": flags_from_summaries(summaries, shape),
    })
    out["targets"] = evaluate_targets(out, cfg.targets)
    return out


def compute_model_metrics(records: Sequence[DocRecord], cfg: Any, shape: ModelShape = ModelShape()
                          ) -> dict[str, Any]:
    """All metrics of one model (of ``shape``) on one task configured by ``cfg`` (schema in the
    module docstring)."""
    return metrics_from_summaries(summarize_all(records, shape), cfg, shape)


def deltas_from_summaries(model: Sequence[DocSummary], base: Sequence[DocSummary],
                          cfg: Any, shape: ModelShape = ModelShape()) -> dict[str, Any]:
    by_id = {s.doc_id: s for s in base}
    common = [s.doc_id for s in model if s.doc_id in by_id]
    mine = {s.doc_id: s for s in model}
    ta = term_arrays([mine[d] for d in common], cfg, shape)
    tb = term_arrays([by_id[d] for d in common], cfg, shape)
    u = _uniforms(len(common), cfg.bootstrap_iters) if cfg.bootstrap_iters >= 2 else None
    out: dict[str, Any] = {"n_docs": len(common),
                           "n_unpaired": len(mine) + len(by_id) - 2 * len(common)}
    # the voiced metrics only where both carry voice activity (a run resumed across versions can
    # hold one model's records without it)
    one_sided = sorted(set(ta) ^ set(tb))
    if one_sided:
        logger.warning("no delta for %s: only one of the two models' documents carries voice activity "
                       "(records from an older ttt-bench? rerun with --overwrite)", ", ".join(one_sided))
    res = {name: bootstrap_delta(*ta[name], *tb[name], cfg.bootstrap_iters, paired=True, u=u)
           for name in ta if name in tb}
    out["delta"] = {k: r["value"] for k, r in res.items()}
    out["ci"] = {k: r["ci"] for k, r in res.items()}
    out["stderr"] = {k: r["stderr"] for k, r in res.items()}
    out["n"] = {k: r["n"] for k, r in res.items()}
    out["significant"] = {k: None if r["ci"] is None else not r["ci"][0] <= 0 <= r["ci"][1]
                          for k, r in res.items()}
    out.update(power(ta, tb, out["significant"], cfg.targets))
    return out


def compare_to_baseline(records_model: Sequence[DocRecord],
                        records_baseline: Sequence[DocRecord],
                        cfg: Any, shape: ModelShape = ModelShape()) -> dict[str, Any]:
    """Paired bootstrap of ``model - baseline`` for every metric on the shared doc ids."""
    return deltas_from_summaries(summarize_all(records_model, shape),
                                 summarize_all(records_baseline, shape), cfg, shape)


def per_document_metrics(s: DocSummary, cfg: Any) -> dict[str, float | None]:
    """That document's own value of every metric (None where it does not contribute)."""
    out = {}
    skip = set() if s.voiced is not None else set(voiced_metric_names(cfg))
    for name, (num, den) in doc_terms(s, cfg).items():
        if name not in skip:
            out[name] = num / den if den > 0 else None
    out["n_nonfinite"] = s.n_nonfinite
    return out


# ----------------------------------------------------------------------------- task metrics


def _matches(pattern: str, name: str) -> bool:
    return name.startswith(pattern[:-1]) if pattern.endswith("*") else name == pattern


class TaskMetrics(ABC):
    """How one task turns the documents each model scored into results. A task class builds one
    (``Task.metrics``) from its config and the shape of the model that scores (card, delays), and
    so owns its metrics: what goes into ``results[task][model]``, the deltas to the baseline, the
    leaderboard columns, the direction of each metric, the curves, the per-document lines and
    its figure.

    ``summarize`` is the one pass over a model's records; every other method takes its output.
    """

    unit: ClassVar[str] = "documents"   # what the bootstrap resamples (leaderboard footnote)
    count_key: ClassVar[str] = "n_docs"  # the metric counting them
    count_header: ClassVar[str] = "docs"  # its leaderboard column
    note: str = ""  # what the leaderboard's footnote says about the columns
    column_notes: ClassVar[dict[str, str]] = {}  # column pattern -> footnote, when such a column is shown
    columns: ClassVar[tuple[str, ...]] = ()        # leaderboard columns; "name*" = every "name..."
    delta_columns: ClassVar[tuple[str, ...]] = ()  # metrics shown as Δ vs the baseline
    headline: ClassVar[str | None] = None  # the delta whose MDE the footnote states (None: the first)
    loss_curves: ClassVar[bool] = False  # its documents go into the loss-vs-position plot
    # metric (or "name*" pattern) -> True: higher is better, False: lower is better. Every metric
    # with an estimate and an interval has one; counts and speeds have none.
    higher_is_better: ClassVar[dict[str, bool]] = {}
    shape: ModelShape = ModelShape()  # the model whose records are summarised (for_model)

    @abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """The settings, for ``metrics_config[task]`` in results.json."""

    @abstractmethod
    def summarize(self, records: Sequence[DocRecord]) -> Any:
        ...

    @abstractmethod
    def model_metrics(self, summary: Any) -> dict[str, Any]:
        ...

    @abstractmethod
    def deltas(self, summary: Any, base: Any) -> dict[str, Any]:
        """``model - baseline`` on what both scored, paired: ``delta``, ``ci``, ``significant``..."""

    def for_model(self, shape: ModelShape) -> "TaskMetrics":
        """These metrics for a model of ``shape`` (its own card and delays): a copy, so every model
        of a run is summarised and flagged against its own shape."""
        if shape == self.shape:
            return self
        other = copy.copy(self)
        other.shape = shape
        return other

    def direction(self, metric: str) -> bool | None:
        """True: higher is better; False: lower is better; None: no direction (a count)."""
        return next((v for k, v in self.higher_is_better.items() if _matches(k, metric)), None)

    def config_key(self, metric: str) -> str | None:
        """The task config key(s) that decide which documents reach ``metric`` (named when no
        document reached it)."""
        return None

    def curve_arrays(self, key: str, summary: Any) -> dict[str, np.ndarray]:
        return {}

    def model_flags(self, metrics: dict[str, Any], model_info: Any) -> list[dict[str, str]]:
        """Sanity flags that depend on what the model is (``model_info``: its
        :class:`ttt_bench.reporting.run_record.ModelRecord`, ``models[name]`` in results.json)."""
        return []

    def sample_lines(self, summary: Any) -> Iterable[dict[str, Any]]:
        return ()

    def plot(self, path: Any, task: str, summaries: dict[str, Any], labels: dict[str, str]) -> bool:
        """The task's own figure at ``path`` (``<task>.png``), from every model's summary; returns
        whether it drew one. Default: none (long-stream tasks share ``loss_vs_position.png``)."""
        return False

    def leaderboard_spec(self) -> dict[str, Any]:
        """What the leaderboard shows (stored in results.json, so merged runs render alike)."""
        return {"columns": list(self.columns), "delta_columns": list(self.delta_columns), "unit": self.unit,
                "count_key": self.count_key, "count_header": self.count_header, "note": self.note,
                "column_notes": dict(self.column_notes),
                "headline": self.headline or next(iter(self.delta_columns), None)}


class StreamMetrics(TaskMetrics):
    """The long-stream metrics of this module (loss per position), configured by the task's
    :class:`ttt_bench.config.StreamTaskConfig` (``positions``, ``window``, ``early_late_frames``,
    ``slope_range``, ``segments``, ``bootstrap_iters``, ``targets``)."""

    columns = ("mean_nll", "voiced_mean_nll", "silence_mean_nll", "nll@*", "early_nll", "late_nll",
               "voiced_late_nll", "improvement", "voiced_improvement", "slope", "voiced_fraction")
    delta_columns = ("mean_nll", "voiced_mean_nll", "late_nll", "voiced_late_nll", "improvement",
                     "voiced_improvement", "slope")
    note = "(n=k): only k documents reach that position; slopes in nats per frame"
    column_notes = {"voiced_*": ("voiced_* / silence_*: the same metric over the voiced / silent frames "
                                 "only (the documents' voice activity); voiced_fraction: their share of "
                                 "voiced frames")}
    loss_curves = True
    headline = "improvement"  # does the loss go down over the stream, more than the baseline's?
    # voiced_fraction describes the recordings, not the model: it has no direction
    higher_is_better = {"improvement": True, "mean_nll": False, "nll@*": False, "early_nll": False,
                        "late_nll": False, "slope*": False, "nll_*": False, "voiced_improvement": True,
                        "voiced_mean_nll": False, "silence_mean_nll": False, "voiced_nll@*": False,
                        "voiced_early_nll": False, "voiced_late_nll": False}
    _config_keys = {"nll@*": "positions (or window)", "early_nll": "early_late_frames",
                    "late_nll": "early_late_frames", "improvement": "early_late_frames",
                    "slope_*": "segments", "slope": "slope_range", "voiced_nll@*": "positions (or window)",
                    "voiced_early_nll": "early_late_frames", "voiced_late_nll": "early_late_frames",
                    "voiced_improvement": "early_late_frames"}

    def __init__(self, config: Any, shape: ModelShape = ModelShape()):
        self.config = config
        self.shape = shape

    def to_dict(self) -> dict[str, Any]:
        c = self.config
        return {"positions": list(c.positions), "window": c.window, "early_late_frames": c.early_late_frames,
                "slope_range": None if c.slope_range is None else list(c.slope_range),
                "segments": [list(s) for s in c.segments], "bootstrap_iters": c.bootstrap_iters,
                "seed": BOOTSTRAP_SEED, "ci_level": CI_LEVEL, "card": self.shape.card,
                "delays": list(self.shape.delays), "targets": dict(c.targets), "frame_rate": FRAME_RATE,
                "degenerate_tol": DEGENERATE_TOL, "degenerate_max_n": DEGENERATE_MAX_N,
                "degenerate_spread": DEGENERATE_SPREAD, "degenerate_fraction": DEGENERATE_FRACTION,
                "card_tol": CARD_TOL}

    def config_key(self, metric: str) -> str | None:
        return next((v for k, v in self._config_keys.items() if _matches(k, metric)), None)

    def summarize(self, records: Sequence[DocRecord]) -> list[DocSummary]:
        return summarize_all(records, self.shape)

    def model_metrics(self, summary: list[DocSummary]) -> dict[str, Any]:
        return metrics_from_summaries(summary, self.config, self.shape)

    def deltas(self, summary: list[DocSummary], base: list[DocSummary]) -> dict[str, Any]:
        return deltas_from_summaries(summary, base, self.config, self.shape)

    def curve_arrays(self, key: str, summary: list[DocSummary]) -> dict[str, np.ndarray]:
        arrays: dict[str, np.ndarray] = {}
        for group, c in mean_curves_from_summaries(summary).items():
            prefix = key if group == "all" else f"{key}/{group}"
            arrays[f"{prefix}/mean"] = c["mean"].astype(np.float32)
            arrays[f"{prefix}/count"] = c["count"].astype(np.int32)
        if has_voice_activity(summary):
            voiced = mean_voiced_curve(summary)
            arrays[f"{key}/voiced/mean"] = voiced["mean"].astype(np.float32)
            arrays[f"{key}/voiced/count"] = voiced["count"].astype(np.int32)
        arrays[f"{key}/doc_ids"] = np.array([d.doc_id for d in summary], dtype=str)
        for i, d in enumerate(summary):
            arrays[f"{key}/doc/{i}"] = d.curves["all"].astype(np.float32)
        return arrays

    def sample_lines(self, summary: list[DocSummary]) -> Iterable[dict[str, Any]]:
        for d in summary:
            yield {"doc_id": d.doc_id, "source": d.meta.get("source"),
                   "duration_s": d.meta.get("duration_s"), "n_frames": d.n_frames,
                   "seconds": d.seconds, "metrics": per_document_metrics(d, self.config),
                   "meta": d.meta}
