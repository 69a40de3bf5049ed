"""Per-position statistics, metrics, bootstrap intervals and sanity checks.

Input: one :class:`DocRecord` per document and model, holding that document's NLL
``[n_codebooks, T]`` (nats, NaN where a position has no prediction).

Conventions (stable; documented here and in the README):

* Prediction mask. Codebook ``k`` has no prediction at positions ``t >= T - delays[k]``
  (``MetricsConfig.delays``, default ``[0, 1, 1, 1, 1, 1, 1, 1]``). NaN there is expected and
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
* Bootstrap. Every metric above is a ratio ``sum_d num_d / sum_d den_d`` over its contributing
  documents (``den_d > 0``). Documents are resampled with replacement (``bootstrap_iters``
  draws, fixed ``seed``) among the contributing documents; percentile interval at ``ci_level``
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
     "significant": {metric: bool | null}}   # interval excludes 0
"""

from __future__ import annotations

import logging
import math
import operator
import re
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Sequence

import numpy as np

logger = logging.getLogger(__name__)

FRAME_RATE = 12.5  # Mimi frames per second
GROUPS = ("all", "semantic", "acoustic")


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


def parse_target(spec: str) -> tuple[str, float]:
    """``"< 2.25"`` -> ``("<", 2.25)``; raises ValueError naming the spec."""
    m = _TARGET_RE.match(str(spec))
    if not m:
        raise ValueError(f"target {spec!r}: expected '<', '<=', '>' or '>=' and a number, "
                         "e.g. '< 2.25'")
    return m.group(1), float(m.group(2))


@dataclass
class MetricsConfig:
    """What to compute; every field can be set from a task config's ``metrics:`` section."""

    positions: list[int] = field(default_factory=lambda: [8000, 16000, 24000])
    window: int = 500
    early_late_frames: int = 1000
    slope_range: tuple[int, int | None] | None = None
    segments: list[tuple[int, int]] = field(
        default_factory=lambda: [(4000, 8000), (8000, 16000), (16000, 24000)])
    bootstrap_iters: int = 1000
    seed: int = 0
    ci_level: float = 0.95
    card: int = 2048
    delays: list[int] = field(default_factory=lambda: [0, 1, 1, 1, 1, 1, 1, 1])
    targets: dict[str, str] = field(default_factory=dict)
    frame_rate: float = FRAME_RATE
    degenerate_tol: float = 1e-3      # |NLL - ln(n)| counted as "at ln(n)"
    degenerate_max_n: int = 64        # n = 1 .. this for the ln(n) signature
    degenerate_spread: float = 0.05   # std below this = "almost no spread"
    degenerate_fraction: float = 0.5  # this share of values at ln(n) = clustered
    card_tol: float = 0.05            # mean NLL >= ln(card) - this = near uniform

    def __post_init__(self) -> None:
        self.positions = [int(p) for p in self.positions]
        self.segments = [(int(a), int(b)) for a, b in self.segments]
        self.delays = [int(d) for d in self.delays]
        if self.slope_range is not None:
            a, b = self.slope_range
            self.slope_range = (int(a), None if b is None else int(b))
            if b is not None and int(b) - int(a) < 2:
                raise ValueError(f"metrics.slope_range {self.slope_range}: needs b - a >= 2")
        for a, b in self.segments:
            if b - a < 2:
                raise ValueError(f"metrics.segments ({a}, {b}): needs end - start >= 2")
        if self.window < 0 or self.early_late_frames < 1 or self.bootstrap_iters < 0:
            raise ValueError("metrics: window >= 0, early_late_frames >= 1 and "
                             "bootstrap_iters >= 0 are required")
        if not 0 < self.ci_level < 1:
            raise ValueError(f"metrics.ci_level {self.ci_level}: must be in (0, 1)")
        if not self.delays or min(self.delays) < 0:
            raise ValueError(f"metrics.delays {self.delays}: one delay >= 0 per codebook")
        names = set(metric_names(self))
        for name, spec in self.targets.items():
            if name not in names:
                raise ValueError(f"metrics.targets: unknown metric {name!r}; "
                                 f"known: {', '.join(sorted(names))}")
            parse_target(spec)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "MetricsConfig":
        """Build from a task config's ``metrics:`` mapping; unknown keys are an error."""
        d = dict(d or {})
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"metrics: unknown key(s) {unknown}; known: {sorted(known)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["segments"] = [list(s) for s in self.segments]
        d["slope_range"] = None if self.slope_range is None else list(self.slope_range)
        return d

    @property
    def n_codebooks(self) -> int:
        return len(self.delays)

    def group_codebooks(self, group: str) -> list[int]:
        k = self.n_codebooks
        return {"all": list(range(k)), "semantic": [0], "acoustic": list(range(1, k))}[group]


def metric_names(cfg: MetricsConfig) -> list[str]:
    """Every metric name, in the stable order used in results.json and the leaderboard."""
    names = ["mean_nll"] + [f"nll@{p}" for p in cfg.positions]
    names += ["early_nll", "late_nll", "improvement", "slope"]
    names += [f"slope_{a}_{b}" for a, b in cfg.segments]
    names += ["nll_semantic", "nll_acoustic"] + [f"nll_cb{k}" for k in range(cfg.n_codebooks)]
    return names


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


def prediction_mask(n_frames: int, delays: Sequence[int]) -> np.ndarray:
    """Bool [K, T]: True where codebook k has a prediction (t < T - delays[k])."""
    t = np.arange(n_frames)
    return t[None, :] < (n_frames - np.asarray(delays))[:, None]


def _near_ln_counts(values: np.ndarray, cfg: MetricsConfig) -> np.ndarray:
    """How many values lie within ``degenerate_tol`` of ln(n), for n = 0 .. max_n."""
    counts = np.zeros(cfg.degenerate_max_n + 1, dtype=np.int64)
    v = values.astype(np.float32)
    v = v[(v > -cfg.degenerate_tol) & (v < math.log(cfg.degenerate_max_n) + cfg.degenerate_tol)]
    if v.size:
        n = np.clip(np.rint(np.exp(v)), 1, cfg.degenerate_max_n).astype(np.int64)
        table = np.log(np.arange(1, cfg.degenerate_max_n + 1, dtype=np.float32))
        hit = np.abs(v - table[n - 1]) <= cfg.degenerate_tol
        counts += np.bincount(n[hit], minlength=cfg.degenerate_max_n + 1)
    return counts


def summarize(record: DocRecord, cfg: MetricsConfig) -> DocSummary:
    """Per-document curves and counts (the only pass over the raw NLL)."""
    nll = np.asarray(record.nll, dtype=np.float64)
    if nll.ndim != 2 or nll.shape[0] != cfg.n_codebooks:
        raise ValueError(f"document {record.doc_id!r}: nll has shape {nll.shape}, expected "
                         f"[{cfg.n_codebooks}, T] (one row per codebook, see metrics.delays)")
    k, t = nll.shape
    pred = prediction_mask(t, cfg.delays)
    finite = np.isfinite(nll)
    good = pred & finite
    curves = {}
    for group in GROUPS:
        cbs = cfg.group_codebooks(group)
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
        near_ln=_near_ln_counts(flat, cfg))


def summarize_all(records: Iterable[DocRecord], cfg: MetricsConfig) -> list[DocSummary]:
    return [summarize(r, cfg) for r in records]


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


def doc_terms(s: DocSummary, cfg: MetricsConfig) -> dict[str, tuple[float, float]]:
    """Per-document (numerator, denominator) of every metric; den 0 = does not contribute."""
    c = s.curves["all"]
    terms: dict[str, tuple[float, float]] = {}
    terms["mean_nll"] = (float(s.cb_sum.sum()), float(s.cb_count.sum()))
    half = cfg.window // 2
    for p in cfg.positions:
        reach = s.n_frames > p + half
        terms[f"nll@{p}"] = _ratio_term(_window_mean(c, p - half, p + half + 1) if reach
                                        else math.nan)
    n = cfg.early_late_frames
    if s.n_frames >= 2 * n:
        early, late = _window_mean(c, 0, n), _window_mean(c, s.n_frames - n, s.n_frames)
    else:
        early = late = math.nan
    terms["early_nll"], terms["late_nll"] = _ratio_term(early), _ratio_term(late)
    terms["improvement"] = _ratio_term(early - late)
    bounds = _slope_bounds(s, cfg.slope_range)
    terms["slope"] = _sxy_sxx(c, *bounds) if bounds else (0.0, 0.0)
    for a, b in cfg.segments:
        terms[f"slope_{a}_{b}"] = _sxy_sxx(c, a, b) if s.n_frames >= b else (0.0, 0.0)
    for group in ("semantic", "acoustic"):
        g = s.curves[group]
        gok = np.isfinite(g)
        terms[f"nll_{group}"] = (float(g[gok].sum()), float(gok.sum()))
    for k in range(cfg.n_codebooks):
        terms[f"nll_cb{k}"] = (float(s.cb_sum[k]), float(s.cb_count[k]))
    return terms


def term_arrays(summaries: Sequence[DocSummary], cfg: MetricsConfig
                ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """metric -> (num [n_docs], den [n_docs])."""
    per_doc = [doc_terms(s, cfg) for s in summaries]
    out = {}
    for name in metric_names(cfg):
        num = np.array([t[name][0] for t in per_doc], dtype=np.float64)
        den = np.array([t[name][1] for t in per_doc], dtype=np.float64)
        out[name] = (num, den)
    return out


# ----------------------------------------------------------------------------- bootstrap


def _uniforms(n_docs: int, cfg: MetricsConfig) -> np.ndarray:
    """[iters, n_docs] uniforms from the fixed seed; column j drives the j-th resampled doc."""
    return np.random.default_rng(cfg.seed).random((cfg.bootstrap_iters, n_docs))


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


def bootstrap_ratio(num: np.ndarray, den: np.ndarray, cfg: MetricsConfig,
                    u: np.ndarray | None = None) -> dict[str, Any]:
    """Value, interval, stderr and n of ``sum(num)/sum(den)`` over documents with den > 0."""
    contrib = np.flatnonzero(den > 0)
    value = float(num[contrib].sum() / den[contrib].sum()) if contrib.size else None
    out = {"value": value, "ci": None, "stderr": None, "n": int(contrib.size)}
    if contrib.size < 2 or cfg.bootstrap_iters < 2:
        return out
    u = _uniforms(num.size, cfg) if u is None else u
    idx = _resample_idx(contrib, u)
    reps = num[idx].sum(axis=1) / den[idx].sum(axis=1)
    out["ci"], out["stderr"] = _interval(reps, cfg.ci_level)
    return out


def bootstrap_delta(num_a: np.ndarray, den_a: np.ndarray, num_b: np.ndarray,
                    den_b: np.ndarray, cfg: MetricsConfig, paired: bool = True,
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
    if contrib.size < 2 or cfg.bootstrap_iters < 2:
        return out
    u = _uniforms(num_a.size, cfg) if u is None else u
    ia = _resample_idx(contrib, u)
    if paired:
        ib = ia
    else:
        u2 = np.random.default_rng(cfg.seed + 1).random(u.shape)
        ib = _resample_idx(contrib, u2)
    reps = (num_a[ia].sum(axis=1) / den_a[ia].sum(axis=1)
            - num_b[ib].sum(axis=1) / den_b[ib].sum(axis=1))
    out["ci"], out["stderr"] = _interval(reps, cfg.ci_level)
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


def _degenerate_flags(summaries: Sequence[DocSummary], cfg: MetricsConfig
                      ) -> list[dict[str, str]]:
    n, mean, std = _pooled_values(summaries)
    if not n:
        return []
    flags = []
    near = np.sum([s.near_ln for s in summaries], axis=0)
    for k in range(1, cfg.degenerate_max_n + 1):
        ln_k = math.log(k)
        close_mean = abs(mean - ln_k) <= cfg.degenerate_tol and std <= cfg.degenerate_spread
        share = near[k] / n
        if close_mean or share >= cfg.degenerate_fraction:
            flags.append(_flag("degenerate", (
                f"NLL clustered at ln({k}) = {ln_k:.4f} (mean {mean:.4f}, std {std:.4f}, "
                f"{100 * share:.0f}% of values within {cfg.degenerate_tol:g}): the loss of a "
                f"uniform guess over {k} classes, not a measurement of the model")))
    ln_card = math.log(cfg.card)
    if mean >= ln_card - cfg.card_tol:
        what = "worse than" if mean > ln_card + cfg.card_tol else "close to"
        flags.append(_flag("near_uniform", (
            f"mean NLL {mean:.4f} is {what} ln(card) = ln({cfg.card}) = {ln_card:.4f}: the "
            "model predicts no better than a uniform guess over the codebook")))
    return flags


def _flat_flags(summaries: Sequence[DocSummary], cfg: MetricsConfig) -> list[dict[str, str]]:
    n, mean, std = _pooled_values(summaries)
    curve = mean_curves_from_summaries(summaries)["all"]["mean"]
    curve = curve[np.isfinite(curve)]
    if n >= 2 and (std <= 1e-9 or (curve.size >= 2 and float(curve.std()) <= 1e-12)):
        return [_flag("flat_curve", f"the NLL does not vary at all (std {std:.2e} over {n} "
                                    f"values, constant {mean:.4f}): not a model's loss")]
    return []


def flags_from_summaries(summaries: Sequence[DocSummary], cfg: MetricsConfig
                         ) -> list[dict[str, str]]:
    if not summaries:
        return [_flag("no_documents", "no documents were scored")]
    return (_nonfinite_flags(summaries) + _degenerate_flags(summaries, cfg)
            + _flat_flags(summaries, cfg))


def sanity_flags(records: Sequence[DocRecord], cfg: MetricsConfig) -> list[dict[str, str]]:
    """``verify_loss_computation``: non-finite values, ln(n) / ln(card) signatures, flat curve."""
    return flags_from_summaries(summarize_all(records, cfg), cfg)


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
    out = {}
    for group in GROUPS:
        total = np.zeros(t_max)
        count = np.zeros(t_max, dtype=np.int64)
        for s in summaries:
            c = s.curves[group]
            ok = np.isfinite(c)
            total[: c.size] += np.where(ok, c, 0.0)
            count[: c.size] += ok
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(count > 0, total / np.maximum(count, 1), np.nan)
        out[group] = {"mean": mean, "count": count}
    return out


def mean_curves(records: Sequence[DocRecord], cfg: MetricsConfig
                ) -> dict[str, dict[str, np.ndarray]]:
    """Per group ("all", "semantic", "acoustic"): ``{"mean": float [T_max], "count": int
    [T_max]}``; the mean over documents (equal weight) of each document's curve at each
    position, and how many documents have a value there (NaN mean where none does)."""
    return mean_curves_from_summaries(summarize_all(records, cfg))


def evaluate_targets(values: dict[str, float | None], targets: dict[str, str]
                     ) -> dict[str, dict[str, Any]]:
    out = {}
    for name, spec in targets.items():
        op, bound = parse_target(spec)
        v = values.get(name)
        out[name] = {"target": spec, "value": v,
                     "pass": None if v is None else bool(_TARGET_OPS[op](v, bound))}
    return out


def metrics_from_summaries(summaries: Sequence[DocSummary], cfg: MetricsConfig
                           ) -> dict[str, Any]:
    terms = term_arrays(summaries, cfg)
    u = _uniforms(len(summaries), cfg) if cfg.bootstrap_iters >= 2 else None
    out: dict[str, Any] = {}
    ci, se, n = {}, {}, {}
    for name, (num, den) in terms.items():
        b = bootstrap_ratio(num, den, cfg, u)
        out[name], ci[name], se[name], n[name] = b["value"], b["ci"], b["stderr"], b["n"]
    seconds = float(sum(s.seconds for s in summaries))
    n_frames = int(sum(s.n_frames for s in summaries))
    out.update({
        "ci": ci, "stderr": se, "n": n,
        "n_docs": len(summaries), "n_frames": n_frames,
        "n_nonfinite": int(sum(s.n_nonfinite for s in summaries)),
        "n_no_prediction": int(sum(s.n_no_prediction for s in summaries)),
        "seconds": seconds, "frames_per_second": n_frames / seconds if seconds > 0 else None,
        "ci_level": cfg.ci_level, "bootstrap_iters": cfg.bootstrap_iters,
        "flags": flags_from_summaries(summaries, cfg),
    })
    out["targets"] = evaluate_targets(out, cfg.targets)
    return out


def compute_model_metrics(records: Sequence[DocRecord], cfg: MetricsConfig) -> dict[str, Any]:
    """All metrics of one model on one task (schema in the module docstring)."""
    return metrics_from_summaries(summarize_all(records, cfg), cfg)


def deltas_from_summaries(model: Sequence[DocSummary], base: Sequence[DocSummary],
                          cfg: MetricsConfig) -> dict[str, Any]:
    by_id = {s.doc_id: s for s in base}
    common = [s.doc_id for s in model if s.doc_id in by_id]
    mine = {s.doc_id: s for s in model}
    ta = term_arrays([mine[d] for d in common], cfg)
    tb = term_arrays([by_id[d] for d in common], cfg)
    u = _uniforms(len(common), cfg) if cfg.bootstrap_iters >= 2 else None
    out: dict[str, Any] = {"n_docs": len(common),
                           "n_unpaired": len(mine) + len(by_id) - 2 * len(common)}
    res = {name: bootstrap_delta(*ta[name], *tb[name], cfg, paired=True, u=u) for name in ta}
    out["delta"] = {k: r["value"] for k, r in res.items()}
    out["ci"] = {k: r["ci"] for k, r in res.items()}
    out["stderr"] = {k: r["stderr"] for k, r in res.items()}
    out["n"] = {k: r["n"] for k, r in res.items()}
    out["significant"] = {k: None if r["ci"] is None else not r["ci"][0] <= 0 <= r["ci"][1]
                          for k, r in res.items()}
    return out


def compare_to_baseline(records_model: Sequence[DocRecord],
                        records_baseline: Sequence[DocRecord],
                        cfg: MetricsConfig) -> dict[str, Any]:
    """Paired bootstrap of ``model - baseline`` for every metric on the shared doc ids."""
    return deltas_from_summaries(summarize_all(records_model, cfg),
                                 summarize_all(records_baseline, cfg), cfg)


def per_document_metrics(s: DocSummary, cfg: MetricsConfig) -> dict[str, float | None]:
    """That document's own value of every metric (None where it does not contribute)."""
    out = {}
    for name, (num, den) in doc_terms(s, cfg).items():
        out[name] = num / den if den > 0 else None
    out["n_nonfinite"] = s.n_nonfinite
    return out


# ----------------------------------------------------------------------------- task metrics


class TaskMetrics(ABC):
    """How one task turns the documents each model scored into results. A task class builds one
    (``Task.metrics``) and so owns its metrics: what goes into ``results[task][model]``, the
    deltas to the baseline, the leaderboard columns, the curves and the per-document lines.

    ``summarize`` is the one pass over a model's records; every other method takes its output.
    """

    unit: ClassVar[str] = "documents"   # what the bootstrap resamples (leaderboard footnote)
    count_key: ClassVar[str] = "n_docs"  # the metric counting them
    count_header: ClassVar[str] = "docs"  # its leaderboard column
    note: str = ""  # what the leaderboard's footnote says about the columns
    columns: ClassVar[tuple[str, ...]] = ()        # leaderboard columns; "name*" = every "name..."
    delta_columns: ClassVar[tuple[str, ...]] = ()  # metrics shown as Δ vs the baseline
    loss_curves: ClassVar[bool] = False  # its documents go into the loss-vs-position plot

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

    def curve_arrays(self, key: str, summary: Any) -> dict[str, np.ndarray]:
        return {}

    def model_flags(self, metrics: dict[str, Any], model_info: dict[str, Any]) -> list[dict[str, str]]:
        """Sanity flags that depend on what the model is (``results.json``'s ``models[name]``)."""
        return []

    def sample_lines(self, summary: Any) -> Iterable[dict[str, Any]]:
        return ()

    def leaderboard_spec(self) -> dict[str, Any]:
        """What the leaderboard shows (stored in results.json, so merged runs render alike)."""
        return {"columns": list(self.columns), "delta_columns": list(self.delta_columns), "unit": self.unit,
                "count_key": self.count_key, "count_header": self.count_header, "note": self.note}


class StreamMetrics(TaskMetrics):
    """The long-stream metrics of this module (loss per position), for :class:`MetricsConfig`."""

    columns = ("mean_nll", "nll@*", "early_nll", "late_nll", "improvement", "slope")
    delta_columns = ("mean_nll", "late_nll", "improvement", "slope")
    note = "(n=k): only k documents reach that position; slopes in nats per frame"
    loss_curves = True

    def __init__(self, config: MetricsConfig):
        self.config = config

    def to_dict(self) -> dict[str, Any]:
        return self.config.to_dict()

    def summarize(self, records: Sequence[DocRecord]) -> list[DocSummary]:
        return summarize_all(records, self.config)

    def model_metrics(self, summary: list[DocSummary]) -> dict[str, Any]:
        return metrics_from_summaries(summary, self.config)

    def deltas(self, summary: list[DocSummary], base: list[DocSummary]) -> dict[str, Any]:
        return deltas_from_summaries(summary, base, self.config)

    def curve_arrays(self, key: str, summary: list[DocSummary]) -> dict[str, np.ndarray]:
        arrays: dict[str, np.ndarray] = {}
        for group, c in mean_curves_from_summaries(summary).items():
            prefix = key if group == "all" else f"{key}/{group}"
            arrays[f"{prefix}/mean"] = c["mean"].astype(np.float32)
            arrays[f"{prefix}/count"] = c["count"].astype(np.int32)
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


def as_task_metrics(metrics: TaskMetrics | MetricsConfig) -> TaskMetrics:
    """A :class:`MetricsConfig` stands for the long-stream metrics it configures."""
    return StreamMetrics(metrics) if isinstance(metrics, MetricsConfig) else metrics
