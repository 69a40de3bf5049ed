"""Short-context pair likelihood (sWUGGY, sBLIMP, sStoryCloze, tStoryCloze, SALMon).

A pair is two short recordings, a real one (positive) and a matched fake (negative). Each clip
is decoded with the project's decoder, resampled to 24 kHz, Mimi-encoded through the code cache
and becomes a document of its own (``<pair>/positive``, ``<pair>/negative``), so the runner
scores it like any stream: on Moshi's own audio stream, a fresh state per clip, clips batched by
length (padding never changes a score). A clip's score is its NLL summed over the task's
``codebooks`` (semantic = 0, acoustic = 1-7, all = 0-7) and its predicted frames.

Metrics (lm-eval's names), per model: ``acc`` = share of pairs whose positive clip has the lower
summed NLL (a tie counts 0.5); ``acc_norm`` = the same on the NLL per frame (summed NLL / clip
frames); each with a bootstrap interval over pairs; ``n_pairs``; and the paired difference to
the baseline model on the same pairs.

Data: any ``datasets`` dataset with the two audio columns (``source``: ``path`` = Hub id or a
local folder, ``name``, ``split``, ``data_files``, ``data_dir``, ``streaming``). A pair whose clip
does not decode, is empty or is shorter than one frame is skipped with its id and reason (or
stops the run with ``on_bad_input="fail"``); a dataset without the expected columns is refused.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ttt_bench.audio.cache import CacheEntry, hash_bytes
from ttt_bench.audio.codec import MimiCodec
from ttt_bench.audio.decode import DecodeError, frames_for_seconds, iter_audio_24k, probe
from ttt_bench.audio.sources import _local_or_as_is, reading
from ttt_bench.config import ConfigError, TaskConfig, _failer
from ttt_bench.metrics import (CI_LEVEL, BOOTSTRAP_SEED, DocRecord, ModelShape, TaskMetrics, bootstrap_delta,
                               bootstrap_ratio, evaluate_targets, flags_from_summaries, power, summarize_all)
from ttt_bench.constants import FRAME_RATE
from ttt_bench.registry import register_task
from ttt_bench.tasks.base import Document, Skipped, Task, shape_of

logger = logging.getLogger(__name__)

ROLES = ("positive", "negative")
CODEBOOKS = {"semantic": [0], "acoustic": [1, 2, 3, 4, 5, 6, 7], "all": [0, 1, 2, 3, 4, 5, 6, 7]}
PAIR_METRICS = ("acc", "acc_norm")
SOURCE_KEYS = ("path", "name", "split", "data_files", "data_dir", "streaming")
MIN_SECONDS = 1 / FRAME_RATE  # one Mimi frame
CLIP_KEYS = ("role", "duration_s", "n_frames")  # a clip's own metadata (the rest is the pair's)


class ColumnsError(ValueError):
    """A dataset without the columns the task reads."""


@dataclass
class PairTaskConfig(TaskConfig):
    """Keys of ``class: pair_likelihood`` (besides those of every task)."""

    task_class: str = "pair_likelihood"
    positive_column: str = "positive"
    negative_column: str = "negative"
    id_column: str | None = None  # a column kept as the pair's "id" (pairs are named by row number)
    meta_columns: list[str] = field(default_factory=list)  # required, kept with each pair
    codebooks: str = "semantic"
    encode_batch_size: int = 16  # clips Mimi-encodes side by side

    def validate(self, source: str) -> None:
        super().validate(source)
        fail = _failer(source)
        if self.codebooks not in CODEBOOKS:
            fail("codebooks", f"one of {', '.join(CODEBOOKS)}", self.codebooks)
        for key in ("positive_column", "negative_column"):
            if not isinstance(getattr(self, key), str) or not getattr(self, key):
                fail(key, "a column name", getattr(self, key))
        if self.id_column is not None and not isinstance(self.id_column, str):
            fail("id_column", "null or a column name", self.id_column)
        if not isinstance(self.meta_columns, list) or not all(isinstance(c, str) for c in self.meta_columns):
            fail("meta_columns", "a list of column names", self.meta_columns)
        if not isinstance(self.encode_batch_size, int) or self.encode_batch_size < 1:
            fail("encode_batch_size", "a positive integer", self.encode_batch_size)
        if not self.source.get("path"):
            fail("source", "a mapping with path (a Hub dataset id or a local folder)", self.source)
        unknown = sorted(set(self.source) - set(SOURCE_KEYS) - {"type"})
        if unknown:
            raise ConfigError(f"{source}: unknown source key(s) {', '.join(unknown)}; valid: {', '.join(SOURCE_KEYS)}")

    def metric_names(self) -> list[str]:
        return list(PAIR_METRICS)

    @property
    def columns(self) -> list[str]:
        """Every column the task reads (the dataset must have them all)."""
        extra = [self.id_column] if self.id_column else []
        return [self.positive_column, self.negative_column, *extra, *self.meta_columns]


# ----------------------------------------------------------------------------- data


def dataset_label(source: dict[str, Any]) -> str:
    name = f" ({source['name']})" if source.get("name") else ""
    return f"{source.get('path')}{name}[{source.get('split', 'train')}]"


def load_rows(source: dict[str, Any], columns: Sequence[str], audio_columns: Sequence[str]
              ) -> Iterator[dict[str, Any]]:
    """Rows of the dataset with the audio left encoded ({"bytes", "path"}); refuses a dataset
    without ``columns`` (naming the dataset, the columns found and those expected)."""
    import datasets

    label = dataset_label(source)
    kwargs = {k: source[k] for k in ("data_files", "split") if source.get(k) is not None}
    if source.get("data_dir"):
        kwargs["data_dir"] = _local_or_as_is(source["data_dir"])
    with reading(label):
        try:
            ds = datasets.load_dataset(_local_or_as_is(source["path"]), source.get("name"),
                                       streaming=bool(source.get("streaming", False)),
                                       **{"split": "train", **kwargs})
        except (ConnectionError, FileNotFoundError) as exc:
            raise type(exc)(f"dataset {label}: {exc}. Run once with network to download it (it is prepared in "
                            "the datasets cache, which later runs read offline, HF_HUB_OFFLINE=1), or point "
                            "the task's source.path at a local copy") from exc
        if ds.features is None:  # a stream whose schema is known only once a row is read
            ds = ds._resolve_features()
        found = list(ds.features)
        missing = [c for c in columns if c not in found]
        if missing:
            raise ColumnsError(f"dataset {label}: columns found: {', '.join(found) or 'none'}; expected: "
                               f"{', '.join(columns)} (missing {', '.join(missing)}); set the task's "
                               "positive_column / negative_column / meta_columns to match")
        for column in audio_columns:
            if isinstance(ds.features[column], datasets.Audio):
                ds = ds.cast_column(column, datasets.Audio(decode=False))
        yield from ds


def audio_bytes(value: Any) -> bytes:
    """The encoded audio of a cell: bytes, or a {"bytes", "path"} dict, or a local path."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"])
        value = value.get("path")
    if isinstance(value, str) and value:
        try:
            with open(value, "rb") as fh:
                return fh.read()
        except OSError:
            return b""
    return b""


@dataclass
class _Clip:
    doc_id: str
    data: bytes
    audio_hash: str = ""
    duration_s: float = 0.0
    codes: torch.Tensor | None = None
    error: str | None = None


@register_task("pair_likelihood")
class PairLikelihoodTask(Task):
    """Pairs of short recordings; see the module docstring."""

    config_class = PairTaskConfig

    def documents(self, codec: MimiCodec, limit: int | None = None, on_bad_input: str = "skip",
                  batch_size: int | None = None) -> list[Document]:
        """Two documents per pair (positive first), at most ``limit`` pairs."""
        self.start_documents(limit, on_bad_input, unit="pairs")
        batch_size = batch_size or self.config.encode_batch_size
        docs: list[Document] = []
        pending: list[tuple[str, dict[str, Any], list[_Clip]]] = []
        n_pairs = 0
        with tqdm(total=limit, desc=f"{self.name}: audio -> codes", unit="pair", disable=None, leave=False) as bar:
            for pair_id, meta, clips in self._pairs():
                pending.append((pair_id, meta, clips))
                if len(pending) * 2 >= batch_size or (limit is not None and n_pairs + len(pending) >= limit):
                    made = self._finish(pending, codec)
                    docs += made
                    n_pairs += len(made) // 2
                    bar.update(len(made) // 2)
                    pending = []
                if limit is not None and n_pairs >= limit:
                    break
            docs += self._finish(pending, codec)
        if self.skipped:
            logger.warning("%s: %d pair(s) skipped: %s", self.name, len(self.skipped),
                           "; ".join(f"{s.doc_id} ({s.reason})" for s in self.skipped[:5]))
        logger.info("%s: %d pair(s), %d frames", self.name, len(docs) // 2, sum(d.n_frames for d in docs))
        return docs[:2 * limit] if limit is not None else docs

    def _pairs(self) -> Iterator[tuple[str, dict[str, Any], list[_Clip]]]:
        c = self.config
        for index, row in enumerate(load_rows(c.source, c.columns, [c.positive_column, c.negative_column])):
            pair_id = f"{index:06d}"  # unique, whatever the dataset's own ids are
            meta = {"pair": pair_id, **({"id": _plain(row[c.id_column])} if c.id_column else {}),
                    **{k: _plain(row[k]) for k in c.meta_columns}}
            clips = [_Clip(f"{pair_id}/{role}", audio_bytes(row[column]))
                     for role, column in zip(ROLES, (c.positive_column, c.negative_column))]
            yield pair_id, meta, clips

    def _finish(self, pairs: list[tuple[str, dict[str, Any], list[_Clip]]], codec: MimiCodec) -> list[Document]:
        encode_clips([clip for _, _, clips in pairs for clip in clips], codec)
        docs = []
        for pair_id, meta, clips in pairs:
            bad = [(role, clip.error) for role, clip in zip(ROLES, clips) if clip.error is not None]
            if bad:
                self._skip(pair_id, "; ".join(f"{role} clip: {error}" for role, error in bad))
                continue
            source = dataset_label(self.config.source)
            for role, clip in zip(ROLES, clips):
                docs.append(Document(clip.doc_id, clip.codes, {
                    **meta, "role": role, "source": source, "duration_s": round(clip.duration_s, 3),
                    "n_frames": int(clip.codes.shape[-1])}))
        return docs

    def _skip(self, pair_id: str, reason: str) -> None:
        where = dataset_label(self.config.source)
        if self._on_bad_input == "fail":
            raise ValueError(f"pair {pair_id} of {where}: {reason}. Run with --on_bad_input skip to skip it "
                             "and report it in results.json")
        logger.warning("skipping pair %s of %s: %s", pair_id, where, reason)
        self.skipped.append(Skipped(pair_id, reason))

    def metrics(self, lm: Any) -> "PairMetrics":
        return PairMetrics(self.config, shape_of(lm))


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def encode_clips(clips: list[_Clip], codec: MimiCodec) -> None:
    """Codes of each clip from the code cache, else decoded and encoded side by side (and
    cached); a clip that cannot be used gets its ``error``."""
    todo = []
    for clip in clips:
        if not clip.data:
            clip.error = "empty file (0 bytes)"
            continue
        clip.audio_hash = hash_bytes(clip.data)
        entry = codec.lookup(clip.audio_hash)
        if entry is not None:
            clip.codes, clip.duration_s = entry.codes, entry.duration_s
        else:
            try:
                clip.duration_s = probe(clip.data).duration_s
            except DecodeError as exc:
                clip.error = str(exc)
                continue
        if clip.duration_s < MIN_SECONDS:
            clip.error = f"shorter than one frame ({1000 * clip.duration_s:.0f} ms < {1000 * MIN_SECONDS:.0f} ms)"
        elif clip.codes is None:
            todo.append(clip)
    if not todo:
        return
    longest = max(frames_for_seconds(c.duration_s) for c in todo)
    results = codec.encode_streams([iter_audio_24k(c.data) for c in todo],
                                   chunk_frames=min(codec.chunk_frames, longest))
    for clip, result in zip(todo, results):
        if isinstance(result, Exception):
            clip.error = str(result)
        elif result.shape[-1] == 0:
            clip.error = "empty recording (no frames after decoding)"
        else:
            clip.codes = result
            codec.store(clip.audio_hash, CacheEntry(result, complete=True, duration_s=clip.duration_s))


# ----------------------------------------------------------------------------- metrics


@dataclass
class PairScore:
    """One pair scored by one model: summed NLL and frames of each clip."""

    pair_id: str
    meta: dict[str, Any]
    nll: tuple[float, float]      # positive, negative: NLL summed over the codebooks and frames
    frames: tuple[int, int]
    seconds: float

    @property
    def acc(self) -> float:
        return _compare(*self.nll)

    @property
    def acc_norm(self) -> float:
        return _compare(self.nll[0] / self.frames[0], self.nll[1] / self.frames[1])


def _compare(positive: float, negative: float) -> float:
    """1 if the positive clip is more likely (lower NLL), 0 if less, 0.5 for a tie."""
    return 1.0 if positive < negative else 0.0 if positive > negative else 0.5


@dataclass
class PairScores:
    """What one model scored on a pair task (``PairMetrics.summarize``)."""

    pairs: list[PairScore]
    incomplete: list[str]      # pairs with a clip missing (its scoring failed)
    nonfinite: list[str]       # pairs with a non-finite NLL where the model predicts
    clip_summaries: list[Any]  # the long-stream summaries of the clips, for the sanity flags
    n_frames: int
    seconds: float


def clip_nll(nll: np.ndarray, codebooks: Sequence[int], delays: Sequence[int]) -> tuple[float, bool]:
    """Summed NLL of the chosen codebooks over the frames where they have a prediction, and
    whether every one of those values is finite."""
    t = nll.shape[-1]
    values = np.concatenate([nll[k, :max(t - delays[k], 0)] for k in codebooks]).astype(np.float64)
    return float(values.sum()), bool(np.isfinite(values).all())


class PairMetrics(TaskMetrics):
    """``acc`` / ``acc_norm`` over pairs, bootstrap intervals over pairs, paired deltas."""

    unit = "pairs"
    count_key = "n_pairs"
    count_header = "pairs"
    columns = PAIR_METRICS
    delta_columns = PAIR_METRICS

    higher_is_better = {"acc": True, "acc_norm": True}

    def __init__(self, config: PairTaskConfig, shape: ModelShape = ModelShape()):
        self.config = config
        self.shape = shape
        self.codebooks = config.codebooks
        self.note = f"NLL summed over the {self.codebooks} codebook(s); ties count 0.5"

    def to_dict(self) -> dict[str, Any]:
        return {"codebooks": self.codebooks, "codebook_indices": CODEBOOKS[self.codebooks],
                "bootstrap_iters": self.config.bootstrap_iters, "seed": BOOTSTRAP_SEED,
                "ci_level": CI_LEVEL, "delays": list(self.shape.delays)}

    def summarize(self, records: Sequence[DocRecord]) -> PairScores:
        by_pair: dict[str, dict[str, DocRecord]] = {}
        for r in records:
            by_pair.setdefault(str(r.meta.get("pair", r.doc_id.rsplit("/", 1)[0])), {})[r.meta.get("role", "")] = r
        pairs, incomplete, nonfinite = [], [], []
        for pair_id, clips in by_pair.items():
            if set(clips) != set(ROLES):
                incomplete.append(pair_id)
                continue
            sums = [clip_nll(np.asarray(clips[role].nll), CODEBOOKS[self.codebooks], self.shape.delays)
                    for role in ROLES]
            if not all(ok for _, ok in sums):
                nonfinite.append(pair_id)
                continue
            pos, neg = clips["positive"], clips["negative"]
            pairs.append(PairScore(pair_id, {k: v for k, v in pos.meta.items() if k not in CLIP_KEYS},
                                   (sums[0][0], sums[1][0]), (pos.nll.shape[-1], neg.nll.shape[-1]),
                                   pos.seconds + neg.seconds))
        return PairScores(pairs, incomplete, nonfinite, summarize_all(records, self.shape),
                           int(sum(r.nll.shape[-1] for r in records)), float(sum(r.seconds for r in records)))

    def _arrays(self, pairs: Sequence[PairScore]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        ones = np.ones(len(pairs))
        return {"acc": (np.array([p.acc for p in pairs]), ones),
                "acc_norm": (np.array([p.acc_norm for p in pairs]), ones)}

    def model_metrics(self, summary: PairScores) -> dict[str, Any]:
        out: dict[str, Any] = {}
        ci, se, n = {}, {}, {}
        for name, (num, den) in self._arrays(summary.pairs).items():
            b = bootstrap_ratio(num, den, self.config.bootstrap_iters)
            out[name], ci[name], se[name], n[name] = b["value"], b["ci"], b["stderr"], b["n"]
        out.update({
            "ci": ci, "stderr": se, "n": n, "n_pairs": len(summary.pairs),
            "n_incomplete": len(summary.incomplete), "n_nonfinite_pairs": len(summary.nonfinite),
            "nll_positive": _mean([p.nll[0] for p in summary.pairs]),
            "nll_negative": _mean([p.nll[1] for p in summary.pairs]),
            "n_frames": summary.n_frames, "seconds": summary.seconds,
            "frames_per_second": summary.n_frames / summary.seconds if summary.seconds > 0 else None,
            "codebooks": self.codebooks, "ci_level": CI_LEVEL,
            "bootstrap_iters": self.config.bootstrap_iters, "flags": self._flags(summary),
        })
        out["targets"] = evaluate_targets(out, self.config.targets)
        return out

    def _flags(self, summary: PairScores) -> list[dict[str, str]]:
        flags = [f for f in flags_from_summaries(summary.clip_summaries, self.shape)
                 if f["code"] != "no_documents"]
        if summary.nonfinite:
            flags.append({"code": "nonfinite_pairs", "message": (
                f"{len(summary.nonfinite)} pair(s) with a non-finite NLL where the model predicts, left out "
                f"of acc: {', '.join(summary.nonfinite[:5])}")})
        if not summary.pairs:
            flags.append({"code": "no_pairs", "message": "no pair was scored"})
        return flags

    def deltas(self, summary: PairScores, base: PairScores) -> dict[str, Any]:
        mine = {p.pair_id: p for p in summary.pairs}
        theirs = {p.pair_id: p for p in base.pairs}
        common = [k for k in mine if k in theirs]
        a, b = self._arrays([mine[k] for k in common]), self._arrays([theirs[k] for k in common])
        res = {name: bootstrap_delta(*a[name], *b[name], self.config.bootstrap_iters, paired=True) for name in a}
        significant = {k: None if r["ci"] is None else not r["ci"][0] <= 0 <= r["ci"][1] for k, r in res.items()}
        return {"n_pairs": len(common), "n_unpaired": len(mine) + len(theirs) - 2 * len(common),
                "delta": {k: r["value"] for k, r in res.items()}, "ci": {k: r["ci"] for k, r in res.items()},
                "stderr": {k: r["stderr"] for k, r in res.items()}, "n": {k: r["n"] for k, r in res.items()},
                "significant": significant, **power(a, b, significant, self.config.targets)}

    def sample_lines(self, summary: PairScores) -> Iterable[dict[str, Any]]:
        for p in summary.pairs:
            yield {"doc_id": p.pair_id, "nll_positive": p.nll[0], "nll_negative": p.nll[1],
                   "frames_positive": p.frames[0], "frames_negative": p.frames[1], "acc": p.acc,
                   "acc_norm": p.acc_norm, "seconds": p.seconds, "meta": p.meta}


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None
