"""LibriLight long-stream tasks: one recording per document, or a book's chapters joined.

``librilight_stream``: each recording of at least ``min_duration_s`` seconds is a document,
truncated to ``max_frames`` (shorter ones are kept with their own length).
``librilight_stream_book``: consecutive chapters of the same speaker and book, in file order,
are joined into one stream of up to ``max_frames``; ``meta["files"]`` lists what went in.
Each chapter is encoded (and cached) on its own, so the Mimi state starts fresh at each
chapter, as it does when the chapters are evaluated one by one.

Bad input (does not decode, empty, too short) is skipped with its id and reason in
``task.skipped``, or raises ValueError with ``on_bad_input="fail"``.

Voice activity: every document carries its voiced segments in document time,
``meta["voice_activity"]`` (``[[start_s, end_s], ...]``), and where they came from,
``meta["voice_source"]``: ``librilight_json`` (the recording's LibriLight ``.json``) or ``energy``
(``ttt_bench.audio.voice.energy_segments`` on the decoded audio, for recordings without one). In a
joined book each chapter's segments are shifted by the chapter's start in the stream (its first
frame / 12.5 s) and cut at the stream's end. The metadata is persisted with each scored document,
so ``--resume`` keeps it.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch
from tqdm.auto import tqdm

from ttt_bench.audio.cache import CacheEntry, hash_bytes
from ttt_bench.audio.codec import MimiCodec
from ttt_bench.audio.decode import DecodeError, frames_for_seconds, iter_audio_24k, probe
from ttt_bench.audio.sources import AudioItem, Selection, librilight_split_source, make_source
from ttt_bench.audio.voice import SOURCE_ENERGY, SOURCE_JSON, energy_segments
from ttt_bench.constants import FRAME_RATE, FRAME_SIZE
from ttt_bench.registry import register_task
from ttt_bench.tasks.base import Document, Skipped, Task

logger = logging.getLogger(__name__)

META_KEYS = ("speaker", "book", "title", "authors", "snr")


@dataclass
class _Unit:
    """One recording on its way to codes."""

    item: AudioItem
    data: bytes
    audio_hash: str
    duration_s: float
    max_frames: int | None
    entry: CacheEntry | None = None
    error: str | None = None

    @property
    def planned_frames(self) -> int:
        full = frames_for_seconds(self.duration_s)
        return full if self.max_frames is None else min(full, self.max_frames)


@register_task("librilight_stream")
class LibriLightStreamTask(Task):
    """Long LibriLight recordings as documents of Mimi codes (see module docstring)."""

    concat_book = False

    def __init__(self, config: Any):
        super().__init__(config)
        self.source_spec: dict[str, Any] = dict(getattr(config, "source", None) or {})
        if not self.source_spec:
            raise ValueError(f"task {self.name}: config has no source (see ttt_bench/audio/sources.py)")
        if getattr(config, "split", None) is not None:
            self.source_spec = librilight_split_source(self.source_spec, config.split)
        self.selection = Selection.from_spec(getattr(config, "select", None))
        min_duration = getattr(config, "min_duration_s", None)
        self.min_duration_s = float(min_duration) if min_duration is not None else 0.0
        max_frames = getattr(config, "max_frames", None)
        self.max_frames: int | None = int(max_frames) if max_frames else None
        self.concat_book = bool(getattr(config, "concat_book", False)) or type(self).concat_book

    # -- public ---------------------------------------------------------------------------

    def documents(self, codec: MimiCodec, limit: int | None = None, on_bad_input: str = "skip",
                  batch_size: int | None = None) -> list[Document]:
        """Documents in the source's order (at most ``limit``), encoded through the code cache."""
        self.start_documents(limit, on_bad_input)
        batch_size = batch_size or (8 if codec.device.type == "cuda" else 1)
        items = self.selection.apply(iter(make_source(self.source_spec)))
        make = self._book_documents if self.concat_book else self._file_documents
        docs: list[Document] = []
        with tqdm(total=limit, desc=f"{self.name}: audio -> codes", unit="doc", disable=None, leave=False) as bar:
            for doc in make(items, codec, batch_size, limit):
                docs.append(doc)
                bar.update(1)
                if limit is not None and len(docs) >= limit:
                    break
        if self.skipped:
            logger.warning("%s: %d input(s) skipped: %s", self.name, len(self.skipped),
                           "; ".join(f"{s.doc_id} ({s.reason})" for s in self.skipped[:5]))
        logger.info("%s: %d document(s), %d frames", self.name, len(docs), sum(d.n_frames for d in docs))
        return docs

    # -- one recording per document -------------------------------------------------------

    def _file_documents(self, items: Iterator[AudioItem], codec: MimiCodec, batch_size: int,
                        limit: int | None) -> Iterator[Document]:
        """Units wait in a window until a batch of uncached ones is full (or nothing waits for
        encoding, or the window would complete ``limit``), so the source is read no further
        than needed and documents come out in source order."""
        window: list[_Unit] = []
        done = 0
        for item in items:
            unit = self._prepare(item, codec, self.max_frames)
            if unit is None:
                continue
            if unit.duration_s < self.min_duration_s:
                self._skip(item, f"too short: {unit.duration_s:.1f} s < min_duration_s {self.min_duration_s:g} s")
                continue
            window.append(unit)
            pending = sum(u.entry is None for u in window)
            if pending == 0 or pending >= batch_size or (limit is not None and done + len(window) >= limit):
                for doc in self._finish(window, codec):
                    done += 1
                    yield doc
                window = []
        yield from self._finish(window, codec)

    def _finish(self, units: list[_Unit], codec: MimiCodec) -> Iterator[Document]:
        self._encode(units, codec)
        for unit in units:
            if unit.error is not None:
                self._skip(unit.item, unit.error)
            else:
                yield self._document(unit.item.item_id, [unit], unit.item.meta)

    # -- a book's chapters joined ---------------------------------------------------------

    def _book_documents(self, items: Iterator[AudioItem], codec: MimiCodec, batch_size: int,
                        limit: int | None) -> Iterator[Document]:
        for (speaker, book), chapters in itertools.groupby(items, key=lambda it: it.group):
            units = self._book_units(chapters, codec, batch_size)
            if not units:
                continue
            first = units[0].item
            doc_id = f"{speaker}/{book}" if speaker or book else first.item_id
            duration = sum(u.duration_s for u in units)
            if duration < self.min_duration_s:
                self._skip_id(doc_id, f"too short: {len(units)} chapter(s), {duration:.1f} s "
                                      f"< min_duration_s {self.min_duration_s:g} s", first.meta)
                continue
            yield self._document(doc_id, units, first.meta)

    def _book_units(self, chapters: Iterable[AudioItem], codec: MimiCodec, batch_size: int) -> list[_Unit]:
        """Chapters in order until ``max_frames`` is filled; bad chapters skipped (and reported)."""
        budget = self.max_frames
        used: list[_Unit] = []
        total = 0
        chapters = iter(chapters)
        while budget is None or total < budget:
            planned: list[_Unit] = []
            plan = total
            for item in chapters:
                unit = self._prepare(item, codec, None if budget is None else budget - plan)
                if unit is None:
                    continue
                planned.append(unit)
                plan += unit.planned_frames
                if (budget is not None and plan >= budget) or len(planned) >= batch_size:
                    break
            if not planned:
                break
            self._encode(planned, codec)
            for unit in planned:
                if unit.error is not None:
                    self._skip(unit.item, unit.error)
                else:
                    used.append(unit)
                    total += unit.entry.codes.shape[-1]
        return used

    # -- shared steps ---------------------------------------------------------------------

    def _prepare(self, item: AudioItem, codec: MimiCodec, max_frames: int | None) -> _Unit | None:
        """Read and hash the bytes; take the codes from the cache or read the header."""
        try:
            data = item.read_bytes()
        except OSError as exc:
            self._skip(item, f"cannot read ({exc})")
            return None
        audio_hash = hash_bytes(data)
        entry = codec.lookup(audio_hash, max_frames)
        if entry is not None:
            return _Unit(item, data, audio_hash, entry.duration_s, max_frames, entry=entry)
        try:
            info = probe(data)
        except DecodeError as exc:
            self._skip(item, str(exc))
            return None
        return _Unit(item, data, audio_hash, info.duration_s, max_frames)

    def _encode(self, units: list[_Unit], codec: MimiCodec) -> None:
        """Encode the units without cached codes in one batch; store the results in the cache."""
        todo = [u for u in units if u.entry is None]
        if not todo:
            return
        streams = [iter_audio_24k(u.data, max_samples=self._max_samples(u)) for u in todo]
        for unit, result in zip(todo, codec.encode_streams(streams)):
            if isinstance(result, Exception):
                unit.error = str(result)
                continue
            if result.shape[-1] == 0:
                unit.error = "empty recording (no frames after decoding)"
                continue
            complete = unit.max_frames is None or frames_for_seconds(unit.duration_s) <= unit.max_frames
            unit.entry = CacheEntry(result, complete=complete, duration_s=unit.duration_s)
            codec.store(unit.audio_hash, unit.entry)

    @staticmethod
    def _max_samples(unit: _Unit) -> int | None:
        if unit.max_frames is None or frames_for_seconds(unit.duration_s) <= unit.max_frames:
            return None
        return unit.max_frames * FRAME_SIZE

    def _document(self, doc_id: str, units: list[_Unit], meta: dict[str, Any]) -> Document:
        codes = torch.cat([u.entry.codes for u in units], dim=-1)
        full_frames = sum(frames_for_seconds(u.duration_s) for u in units)
        out = {"source": meta.get("source", self.source_spec.get("type", "")),
               **{k: meta[k] for k in META_KEYS if k in meta},
               "duration_s": round(sum(u.duration_s for u in units), 3),
               "n_frames": int(codes.shape[-1]),
               "stream_s": round(codes.shape[-1] / FRAME_RATE, 3),
               "truncated": bool(codes.shape[-1] < full_frames),
               "files": [u.item.item_id for u in units]}
        out.update(self._voice_activity(units, int(codes.shape[-1])))
        return Document(doc_id, codes, out)

    def _voice_activity(self, units: list[_Unit], n_frames: int) -> dict[str, Any]:
        """The voiced segments of the joined units in document time (each unit's shifted by its
        start, cut at its own end in the stream) and their source (``+``-joined when the units differ)."""
        segments: list[list[float]] = []
        sources: list[str] = []
        start = 0
        for unit in units:
            offset = start / FRAME_RATE
            start += int(unit.entry.codes.shape[-1])
            # cut at the unit's own end: a unit cut short (max_frames; mid-book too, when a chapter
            # planned before it failed to encode) keeps its segments out of the next unit's frames
            end = min(start, n_frames) / FRAME_RATE
            own, source = unit_segments(unit, self._max_samples(unit))
            sources.append(source)
            segments += [[round(s + offset, 3), round(min(e + offset, end), 3)] for s, e in own
                         if s + offset < end]
        return {"voice_activity": segments, "voice_source": "+".join(dict.fromkeys(sources))}

    def _skip(self, item: AudioItem, reason: str) -> None:
        where = item.meta.get("path") or item.meta.get("key") or item.meta.get("source", "")
        self._skip_id(item.item_id, reason, {"where": where})

    def _skip_id(self, doc_id: str, reason: str, meta: dict[str, Any]) -> None:
        where = meta.get("where") or meta.get("path") or meta.get("source", "")
        if self._on_bad_input == "fail":
            raise ValueError(f"{doc_id} ({where}): {reason}. Fix or remove the file, or run with "
                             "--on_bad_input skip to skip it and report it in results.json")
        logger.warning("skipping %s (%s): %s", doc_id, where, reason)
        self.skipped.append(Skipped(doc_id, reason))


def unit_segments(unit: _Unit, max_samples: int | None = None) -> tuple[list[list[float]], str]:
    """One recording's voiced segments (seconds from its start) and their source: its LibriLight
    ``.json``, else the energy detector on its decoded audio (up to ``max_samples`` at 24 kHz)."""
    recorded = unit.item.meta.get("voice_activity")
    if recorded is not None:
        return [list(seg) for seg in recorded], SOURCE_JSON
    return energy_segments(iter_audio_24k(unit.data, max_samples=max_samples)), SOURCE_ENERGY


@register_task("librilight_stream_book")
class LibriLightStreamBookTask(LibriLightStreamTask):
    """Consecutive chapters of one speaker and book joined into one stream (``concat_book``)."""

    concat_book = True
