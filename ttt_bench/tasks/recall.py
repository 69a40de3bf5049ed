"""Memory past the attention window: does hearing a passage once make it easier to predict later?

Documents come in pairs built from the source's recordings (each encoded and cached on its own,
so the two copies of A are identical codes):

    seen   = A  + F + A      A  = the first ``recall_frames`` frames of recording i
    unseen = A' + F + A      A' = the same number of frames of another recording (i + 1)
                             F  = ``gap_frames`` frames of the recordings after those (i + 2, ...)

Only the final A is scored. ``recall_gain = NLL(final A | unseen) - NLL(final A | seen)`` per
pair (nats; > 0: the model remembers A), with a bootstrap interval over pairs, per codebook
group, and as a curve over the final A. ``recall_gain_voiced``: the same over A's voiced frames
only (``meta["recall_voice_activity"]``: recording i's voiced segments within A, from its LibriLight
``.json`` or the energy detector; the frame rule of ``ttt_bench.metrics.voiced_frames``), so that a
gain that lives in A's pauses shows as such.

Attention reaches further than one window: each layer looks ``context`` frames back at the
previous layer's outputs, so information travels up to the sum of the layers' contexts (the
attention *reach*, ``num_layers * context`` for Moshi: 32 * 3000 frames for Moshi 7B).
``gap_frames: context`` sets the gap to the largest reach among the models evaluated: then a
model whose only memory is attention scores the final A identically in both documents and its
``recall_gain`` is 0 exactly (a row that is not gets the ``attention_recall`` flag). A shorter
gap is the positive control: frozen Moshi copies what its attention still reaches.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch

from ttt_bench.audio.codec import MimiCodec
from ttt_bench.audio.sources import AudioItem, make_source
from ttt_bench.config import TaskConfig, check_positive_int, check_select_and_split, _failer
from ttt_bench.constants import FRAME_RATE, N_CODEBOOKS
from ttt_bench.metrics import (BOOTSTRAP_SEED, CI_LEVEL, DocRecord, ModelShape, TaskMetrics, bootstrap_delta,
                               bootstrap_ratio, evaluate_targets, power, prediction_mask, voiced_frames)
from ttt_bench.registry import register_task
from ttt_bench.tasks.base import Document, shape_of
from ttt_bench.tasks.librilight_stream import LibriLightStreamTask, unit_segments

logger = logging.getLogger(__name__)

ROLES = ("seen", "unseen")
GAIN_GROUPS = {"recall_gain": None, "recall_gain_semantic": [0], "recall_gain_acoustic": list(range(1, N_CODEBOOKS))}
VOICED_GAIN = "recall_gain_voiced"  # recall_gain over A's voiced frames only
RECALL_METRICS = (*GAIN_GROUPS, *(f"nll_{role}" for role in ROLES), VOICED_GAIN)
ZERO_TOLERANCE = 1e-6  # nats: an attention-only model past its reach gains exactly 0


@dataclass
class RecallTaskConfig(TaskConfig):
    """Keys of the recall task (plus those of every task)."""

    select: dict[str, Any] = field(default_factory=dict)  # speakers, books, files, max_chapters
    split: str | None = None  # Hub LibriLight: small | large
    recall_frames: int = 250  # length of A (20 s)
    gap_frames: int | str = "context"  # frames of F, or "context": the models' attention reach
    pairs: int | None = None  # how many pairs (null: one per recording); --limit caps it further

    def validate(self, source: str) -> None:
        super().validate(source)
        fail = _failer(source)
        check_select_and_split(source, self)
        check_positive_int(fail, self, "recall_frames")
        if self.gap_frames != "context" and (not isinstance(self.gap_frames, int)
                                             or isinstance(self.gap_frames, bool) or self.gap_frames < 1):
            fail("gap_frames", "a positive number of frames or 'context' (the models' attention reach)",
                 self.gap_frames)
        if self.pairs is not None:
            check_positive_int(fail, self, "pairs")

    def metric_names(self) -> list[str]:
        return list(RECALL_METRICS)


def attention_reach(lm: Any) -> int | None:
    """How far back information can travel through the main transformer's attention: the sum of
    its layers' contexts (None: some layer attends without limit)."""
    from moshi.modules.transformer import StreamingMultiheadAttention

    contexts = [m.context for m in lm.transformer.modules() if isinstance(m, StreamingMultiheadAttention)]
    if not contexts or any(c is None for c in contexts):
        return None
    return int(sum(contexts))


class _Pool:
    """The source's recordings with at least ``min_frames`` frames, encoded on demand, in source
    order; indices wrap around once the source is exhausted."""

    def __init__(self, task: "LibriLightRecallTask", items: Iterator[AudioItem], codec: MimiCodec,
                 min_frames: int, max_frames: int):
        self.task, self.items, self.codec = task, items, codec
        self.min_frames, self.max_frames = min_frames, max_frames
        self.recordings: list[tuple[str, torch.Tensor]] = []
        self.segments: dict[str, list[list[float]]] = {}  # recording -> its voiced segments
        self.exhausted = False

    def _pull(self) -> bool:
        for item in self.items:
            unit = self.task._prepare(item, self.codec, self.max_frames)
            if unit is None:
                continue
            self.task._encode([unit], self.codec)
            if unit.error is not None:
                self.task._skip(item, unit.error)
                continue
            codes = unit.entry.codes[..., :self.max_frames]
            if codes.shape[-1] < self.min_frames:
                self.task._skip(item, f"too short: {codes.shape[-1]} frames < recall_frames {self.min_frames}")
                continue
            self.recordings.append((item.item_id, codes))
            self.segments[item.item_id] = unit_segments(unit, self.task._max_samples(unit))[0]
            return True
        self.exhausted = True
        return False

    def has(self, index: int) -> bool:
        while len(self.recordings) <= index and not self.exhausted:
            self._pull()
        return index < len(self.recordings)

    def __getitem__(self, index: int) -> tuple[str, torch.Tensor]:
        if not self.has(index):
            if not self.recordings:
                raise IndexError("no recordings")
            index %= len(self.recordings)
        return self.recordings[index]

    def filler(self, start: int, exclude: int, frames: int) -> tuple[torch.Tensor, list[str]]:
        """``frames`` frames of the recordings from index ``start`` on (wrapping around), never
        recording ``exclude`` (needs at least 2 recordings)."""
        exclude_id = self[exclude][0]
        parts, ids, total, j = [], [], 0, start
        while total < frames:
            rec_id, codes = self[j]
            j += 1
            if rec_id == exclude_id:
                continue
            parts.append(codes[..., :frames - total])
            ids.append(rec_id)
            total += parts[-1].shape[-1]
        return torch.cat(parts, dim=-1), ids


@register_task("librilight_recall")
class LibriLightRecallTask(LibriLightStreamTask):
    """Pairs of documents, seen (A F A) and unseen (A' F A); see the module docstring."""

    config_class = RecallTaskConfig

    def __init__(self, config: RecallTaskConfig):
        super().__init__(config)
        self.recall_frames = int(config.recall_frames)
        self.reach: int | None = None  # the largest attention reach among the models (use_models)

    def use_models(self, scorers: dict[str, Any]) -> None:
        """Called by the runner before ``documents``: the models' attention reach sets
        ``gap_frames: context``."""
        reaches = [attention_reach(s.lm) for s in scorers.values()]
        if any(r is None for r in reaches):
            self.reach = None
            if self.config.gap_frames == "context":
                raise ValueError(f"task {self.name}: gap_frames: context needs models whose attention has a "
                                 "finite context; give gap_frames as a number of frames")
            return
        self.reach = max(reaches)

    @property
    def gap_frames(self) -> int:
        if self.config.gap_frames != "context":
            return int(self.config.gap_frames)
        if self.reach is None:
            raise ValueError(f"task {self.name}: gap_frames: context is the models' attention reach; build "
                             "the documents through the runner (it calls use_models) or give a number")
        return self.reach

    def documents(self, codec: MimiCodec, limit: int | None = None, on_bad_input: str = "skip",
                  batch_size: int | None = None) -> list[Document]:
        """Two documents per pair (seen, unseen), at most ``limit`` pairs."""
        self.start_documents(limit, on_bad_input, unit="pairs")
        gap, frames = self.gap_frames, self.recall_frames
        pool = _Pool(self, self.selection.apply(iter(make_source(self.source_spec))), codec, frames, max(frames, gap))
        wanted = min(n for n in (limit, self.config.pairs, math.inf) if n is not None)
        docs: list[Document] = []
        i = 0
        while i < wanted and pool.has(i):
            if not pool.has(1):
                raise ValueError(f"task {self.name}: the recall task needs at least 2 recordings of at least "
                                 f"recall_frames={frames} frames; the source has {len(pool.recordings)}")
            docs += self._pair(pool, i, gap)
            i += 1
        logger.info("%s: %d pair(s): A %d frames, gap %d frames", self.name, i, frames, gap)
        return docs

    def _pair(self, pool: _Pool, i: int, gap: int) -> list[Document]:
        frames = self.recall_frames
        a_id, a = pool[i]
        other_id, other = pool[i + 1]
        filler, filler_ids = pool.filler(i + 2, i, gap)
        a = a[..., :frames]
        end = frames / FRAME_RATE
        voiced = [[s, min(e, end)] for s, e in pool.segments[a_id] if s < end]
        meta = {"source": self.source_spec.get("type", ""), "pair": a_id, "recall_start": frames + gap,
                "recall_frames": frames, "gap_frames": gap, "filler": filler_ids, "recall_voice_activity": voiced}
        out = []
        for role, first, first_id in (("seen", a, a_id), ("unseen", other[..., :frames], other_id)):
            codes = torch.cat([first, filler, a], dim=-1)
            out.append(Document(f"{a_id}/{role}", codes, {**meta, "role": role, "first": first_id,
                                                          "n_frames": int(codes.shape[-1])}))
        return out

    def metrics(self, lm: Any) -> "RecallMetrics":
        return RecallMetrics(self.config, shape_of(lm), self.gap_frames, self.reach)


# ----------------------------------------------------------------------------- metrics


@dataclass
class RecallPair:
    """The final A of one pair, as one model scored it after A (seen) and after A' (unseen)."""

    pair: str
    seen: np.ndarray  # float64 [K, R]: NLL of the final A after A
    unseen: np.ndarray  # after A'
    mask: np.ndarray  # bool [K, R]: predicted and finite in both
    voiced: np.ndarray | None = None  # bool [R]: A's voiced frames (None: no voice activity known)


@dataclass
class RecallSummary:
    pairs: list[RecallPair]
    unpaired: list[str]
    n_docs: int
    n_frames: int
    seconds: float
    n_nonfinite: int


class RecallMetrics(TaskMetrics):
    """recall_gain and friends, over pairs (see the module docstring)."""

    unit = "pairs"
    count_key = "n_pairs"
    count_header = "pairs"
    note = ("recall_gain = NLL(final A | unseen) − NLL(final A | seen), nats per value; > 0: the model "
            "remembers A; nll_seen/nll_unseen: NLL of the final A")
    columns = ("recall_gain", VOICED_GAIN, "recall_gain_semantic", "recall_gain_acoustic", "nll_seen", "nll_unseen")
    delta_columns = ("recall_gain", VOICED_GAIN)
    headline = "recall_gain"
    higher_is_better = {"recall_gain*": True, "nll_seen": False, "nll_unseen": False}

    def __init__(self, config: RecallTaskConfig, shape: ModelShape, gap_frames: int, reach: int | None):
        """``gap_frames``: the gap as the task resolved it (``context``: the models' reach)."""
        self.config, self.shape, self.gap_frames, self.reach = config, shape, gap_frames, reach
        self.recall_frames = int(config.recall_frames)

    def to_dict(self) -> dict[str, Any]:
        return {"recall_frames": self.recall_frames, "gap_frames": self.gap_frames, "attention_reach": self.reach,
                "bootstrap_iters": self.config.bootstrap_iters, "ci_level": CI_LEVEL, "seed": BOOTSTRAP_SEED}

    # -- one pass over the records ------------------------------------------------------------

    def summarize(self, records: Sequence[DocRecord]) -> RecallSummary:
        by_pair: dict[str, dict[str, np.ndarray]] = {}
        voiced: dict[str, np.ndarray] = {}
        n_nonfinite = 0
        for r in records:
            if r.meta.get("recall_voice_activity") is not None:
                voiced[str(r.meta["pair"])] = voiced_frames(r.meta["recall_voice_activity"], int(r.meta["recall_frames"]))
            nll = np.asarray(r.nll, dtype=np.float64)
            start, frames = int(r.meta["recall_start"]), int(r.meta["recall_frames"])
            predicted = prediction_mask(nll.shape[-1], self.shape.delays)[:, start:start + frames]
            final = nll[:, start:start + frames]
            n_nonfinite += int((predicted & ~np.isfinite(final)).sum())
            by_pair.setdefault(str(r.meta["pair"]), {})[r.meta["role"]] = np.where(predicted, final, np.nan)
        pairs, unpaired = [], []
        for pair, roles in by_pair.items():
            if set(roles) != set(ROLES):
                unpaired.append(pair)
                continue
            mask = np.isfinite(roles["seen"]) & np.isfinite(roles["unseen"])
            pairs.append(RecallPair(pair, roles["seen"], roles["unseen"], mask, voiced.get(pair)))
        return RecallSummary(pairs, unpaired, len(records), int(sum(np.asarray(r.nll).shape[-1] for r in records)),
                             float(sum(r.seconds or 0.0 for r in records)), n_nonfinite)

    def _terms(self, s: RecallSummary) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """metric -> (num, den) per pair: the pair's value is num / den."""
        out = {}
        for name, codebooks in GAIN_GROUPS.items():
            rows = slice(None) if codebooks is None else codebooks
            out[name] = (np.array([np.where(p.mask, p.unseen - p.seen, 0.0)[rows].sum() for p in s.pairs]),
                         np.array([p.mask[rows].sum() for p in s.pairs], dtype=np.float64))
        for role in ROLES:
            out[f"nll_{role}"] = (np.array([np.where(p.mask, getattr(p, role), 0.0).sum() for p in s.pairs]),
                                  np.array([p.mask.sum() for p in s.pairs], dtype=np.float64))
        if any(p.voiced is not None for p in s.pairs):
            masks = [p.mask & p.voiced[None, :] if p.voiced is not None else np.zeros_like(p.mask) for p in s.pairs]
            out[VOICED_GAIN] = (np.array([np.where(m, p.unseen - p.seen, 0.0).sum() for p, m in zip(s.pairs, masks)]),
                                np.array([m.sum() for m in masks], dtype=np.float64))
        return out

    # -- results ------------------------------------------------------------------------------

    def model_metrics(self, s: RecallSummary) -> dict[str, Any]:
        m: dict[str, Any] = {"ci": {}, "stderr": {}, "n": {}}
        terms = self._terms(s)
        for name, (num, den) in terms.items():
            b = bootstrap_ratio(num, den, self.config.bootstrap_iters)
            m[name], m["ci"][name], m["stderr"][name], m["n"][name] = b["value"], b["ci"], b["stderr"], b["n"]
        num, den = terms["recall_gain"]
        per_pair = {p.pair: (float(n / d) if d > 0 else None) for p, n, d in zip(s.pairs, num, den)}
        m.update({"per_pair": per_pair, "max_abs_pair_gain": max((abs(v) for v in per_pair.values() if v is not None),
                                                                 default=None),
                  "n_pairs": len(s.pairs), "n_docs": s.n_docs, "n_frames": s.n_frames,
                  "n_nonfinite": s.n_nonfinite, "seconds": s.seconds,
                  "frames_per_second": s.n_frames / s.seconds if s.seconds > 0 else None,
                  "recall_frames": self.recall_frames, "gap_frames": self.gap_frames, "attention_reach": self.reach,
                  "ci_level": CI_LEVEL, "bootstrap_iters": self.config.bootstrap_iters,
                  "flags": self._flags(s)})
        m["targets"] = evaluate_targets(m, self.config.targets)
        return m

    def _flags(self, s: RecallSummary) -> list[dict[str, str]]:
        flags = []
        if not s.pairs:
            flags.append({"code": "no_pairs", "message": "no complete pair (seen and unseen) was scored"})
        if s.unpaired:
            flags.append({"code": "unpaired", "message": f"{len(s.unpaired)} pair(s) with only one document "
                                                          f"scored (first: {s.unpaired[0]}); left out"})
        if s.n_nonfinite:
            flags.append({"code": "nonfinite", "message": f"{s.n_nonfinite} non-finite NLL values in the final A; "
                                                          "left out of both documents of their pair"})
        return flags

    def model_flags(self, m: dict[str, Any], info: Any) -> list[dict[str, str]]:
        """An attention-only model that gains from a repeat its attention cannot reach: the
        measurement is wrong (state carried between documents, or a reach larger than computed)."""
        gain = m.get("max_abs_pair_gain")
        if (info.attention_only and self.reach is not None and self.gap_frames >= self.reach
                and gain is not None and gain > ZERO_TOLERANCE):
            return [{"code": "attention_recall", "message": (
                f"a model whose only memory is attention gains up to {gain:.3g} nats from a repeat "
                f"{self.gap_frames} frames back, past its attention reach ({self.reach}); it must gain 0")}]
        return []

    def deltas(self, s: RecallSummary, base: RecallSummary) -> dict[str, Any]:
        mine = {p.pair: i for i, p in enumerate(s.pairs)}
        shared = [p.pair for p in base.pairs if p.pair in mine]
        order_a = [mine[k] for k in shared]
        theirs = {p.pair: i for i, p in enumerate(base.pairs)}
        order_b = [theirs[k] for k in shared]
        ta, tb = self._terms(s), self._terms(base)
        out: dict[str, Any] = {"n_pairs": len(shared), "n_unpaired": len(s.pairs) + len(base.pairs) - 2 * len(shared),
                               "delta": {}, "ci": {}, "stderr": {}, "n": {}, "significant": {}}
        for name in [n for n in ta if n in tb]:  # recall_gain_voiced: where both carry voice activity
            (na, da), (nb, db) = ta[name], tb[name]
            b = bootstrap_delta(na[order_a], da[order_a], nb[order_b], db[order_b], self.config.bootstrap_iters)
            out["delta"][name], out["ci"][name], out["stderr"][name], out["n"][name] = (
                b["value"], b["ci"], b["stderr"], b["n"])
            out["significant"][name] = None if b["ci"] is None else bool(b["ci"][0] > 0 or b["ci"][1] < 0)
        out.update(power({k: (na[order_a], da[order_a]) for k, (na, da) in ta.items()},
                         {k: (nb[order_b], db[order_b]) for k, (nb, db) in tb.items()},
                         out["significant"], self.config.targets))
        return out

    # -- curves, lines, plot ------------------------------------------------------------------

    def gain_curve(self, s: RecallSummary) -> dict[str, np.ndarray]:
        """Mean gain per position of the final A over pairs, with a bootstrap band over pairs."""
        frames = self.recall_frames
        per_pair = np.full((len(s.pairs), frames), np.nan)
        for i, p in enumerate(s.pairs):
            count = p.mask.sum(axis=0)
            total = np.where(p.mask, p.unseen - p.seen, 0.0).sum(axis=0)
            per_pair[i] = np.where(count > 0, total / np.maximum(count, 1), np.nan)
        ok = np.isfinite(per_pair)
        count = ok.sum(axis=0)
        mean = np.where(count > 0, np.where(ok, per_pair, 0.0).sum(axis=0) / np.maximum(count, 1), np.nan)
        low = high = np.full(frames, np.nan)
        if len(s.pairs) >= 2 and self.config.bootstrap_iters >= 2:
            rng = np.random.default_rng(BOOTSTRAP_SEED)
            idx = rng.integers(0, len(s.pairs), (self.config.bootstrap_iters, len(s.pairs)))
            sums = np.where(ok, per_pair, 0.0)[idx].sum(axis=1)
            counts = ok[idx].sum(axis=1)
            reps = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
            alpha = (1 - CI_LEVEL) / 2
            with np.errstate(all="ignore"):
                low, high = np.nanquantile(reps, [alpha, 1 - alpha], axis=0)
        return {"mean": mean, "low": low, "high": high, "count": count}

    def curve_arrays(self, key: str, summary: RecallSummary) -> dict[str, np.ndarray]:
        curve = self.gain_curve(summary)
        out = {f"{key}/recall_gain/{k}": v.astype(np.float32 if k != "count" else np.int32) for k, v in curve.items()}
        out[f"{key}/pairs"] = np.array([p.pair for p in summary.pairs], dtype=str)
        return out

    def sample_lines(self, s: RecallSummary) -> Iterable[dict[str, Any]]:
        terms = self._terms(s)
        for i, p in enumerate(s.pairs):
            values = {name: (float(num[i] / den[i]) if den[i] > 0 else None) for name, (num, den) in terms.items()}
            yield {"doc_id": p.pair, "pair": p.pair, "recall_frames": self.recall_frames,
                   "gap_frames": self.gap_frames, "metrics": values}

    def plot(self, path, task: str, summaries: dict[str, RecallSummary], labels: dict[str, str]) -> bool:
        """The gain curve over the final A per model, with its bootstrap band."""
        from ttt_bench.reporting import plots  # noqa: F401  (selects the Agg backend)
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 4.5))
        for model, s in summaries.items():
            c = self.gain_curve(s)
            x = np.arange(self.recall_frames)
            line, = ax.plot(x, c["mean"], label=labels.get(model, model))
            if np.isfinite(c["low"]).any():
                ax.fill_between(x, c["low"], c["high"], color=line.get_color(), alpha=0.2, linewidth=0)
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_xlabel(f"frame of the final A ({FRAME_RATE:g} frames/s)")
        ax.set_ylabel("recall gain, nats (unseen − seen)")
        ax.set_title(f"{task}: A {self.recall_frames} frames, gap {self.gap_frames} frames"
                     + (f" (attention reach {self.reach})" if self.reach is not None else ""))
        ax.legend(loc="best", fontsize="small")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return True
