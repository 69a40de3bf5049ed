"""The persisted per-document store that makes a run resumable.

Layout inside the run directory::

    records/run.json                       the run's config and its hash (written once)
    records/<task>/<model>/<doc>.npz       one finished document: nll float32 [8, T] and a JSON
                                           header (doc_id, meta, seconds, n_frames, config_hash)
    records/log.rank<R>.jsonl              append-only: one line per finished or failed document
                                           (status ok|error, file, sha256 of the npz, error)
    records/STOP                           present while a process asks every process to stop

A document counts as done only when its log line parses, carries the run's config hash and,
for ``ok``, the npz exists with the sha256 the line names and its n_frames matches. Every file
is written atomically (temporary file, fsync, rename) and the npz before its log line, so a
process killed at any point (SIGKILL) leaves either a complete record or one that is detected
and redone: a truncated log line or npz is never taken for a result.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ttt_bench.metrics import DocRecord

logger = logging.getLogger(__name__)

RECORDS_DIR = "records"
RUN_FILE = "run.json"
STOP_FILE = "STOP"


class ConfigMismatchError(ValueError):
    """``--resume`` with a configuration that differs from the interrupted run's."""


class UnsafePathError(ValueError):
    """A record would be written outside the run directory."""


@dataclass
class DocFailure:
    """A document that could not be scored, and why (reported in results.json)."""

    doc_id: str
    n_frames: int
    kind: str  # nonfinite | oom | error
    error: str


@dataclass
class LogEntry:
    task: str
    model: str
    doc_id: str
    status: str  # ok | error
    n_frames: int
    config_hash: str
    file: str | None = None
    sha256: str | None = None
    kind: str | None = None
    error: str | None = None


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def config_hash(config: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_json(config).encode()).hexdigest()[:16]


def differences(recorded: dict[str, Any], current: dict[str, Any], prefix: str = ""
                ) -> list[tuple[str, Any, Any]]:
    """(dotted key, recorded value, current value) for every differing key, looking into nested
    dicts (``task_configs.librilight_stream.max_frames``)."""
    found = []
    for key in sorted(set(recorded) | set(current)):
        a, b = recorded.get(key), current.get(key)
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            found += differences(a, b, f"{name}.")
        elif canonical_json(a) != canonical_json(b):
            found.append((name, a, b))
    return found


def safe_name(text: str) -> str:
    """A file name for an id (``speaker/book/file``, ``legacy(frozen)``): readable, no path
    separators, and unique thanks to a short hash of the original."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._")[:80] or "x"
    return f"{readable}-{hashlib.sha256(text.encode()).hexdigest()[:10]}"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """``path`` holds either its old content or ``data``, never a part of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def encode_record(record: DocRecord, task: str, model: str, chash: str) -> bytes:
    header = {"doc_id": record.doc_id, "task": task, "model": model, "meta": record.meta,
              "seconds": record.seconds, "n_frames": int(record.nll.shape[-1]), "config_hash": chash}
    buffer = io.BytesIO()
    np.savez(buffer, nll=np.asarray(record.nll, dtype=np.float32), header=np.array(canonical_json(header)))
    return buffer.getvalue()


def decode_record(data: bytes) -> tuple[DocRecord, dict[str, Any]]:
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        header = json.loads(str(npz["header"]))
        nll = np.array(npz["nll"], dtype=np.float32)
    return DocRecord(header["doc_id"], header["meta"], nll, float(header["seconds"])), header


class RecordStore:
    """Finished and failed documents of one run directory (see the module docstring)."""

    def __init__(self, run_dir: Path, chash: str, rank: int = 0):
        self.run_dir = Path(run_dir)
        self.root = self.run_dir / RECORDS_DIR
        self.config_hash = chash
        self.rank = rank

    # -- paths ------------------------------------------------------------------------------
    def _inside(self, path: Path) -> Path:
        resolved = path.resolve()
        if not resolved.is_relative_to(self.run_dir.resolve()):
            raise UnsafePathError(f"refusing to write {resolved}: outside the output directory {self.run_dir}")
        return path

    def record_path(self, task: str, model: str, doc_id: str) -> Path:
        return self._inside(self.root / safe_name(task) / safe_name(model) / f"{safe_name(doc_id)}.npz")

    @property
    def log_path(self) -> Path:
        return self.root / f"log.rank{self.rank}.jsonl"

    @property
    def stop_path(self) -> Path:
        return self.root / STOP_FILE

    # -- run config ---------------------------------------------------------------------------
    def check_config(self, config: dict[str, Any]) -> None:
        """Refuse to continue a run recorded with another config, naming the differing keys."""
        path = self.root / RUN_FILE
        if not path.exists():
            return
        recorded = json.loads(path.read_text())
        if recorded.get("config_hash") == self.config_hash:
            return
        found = differences(recorded.get("config", {}), json.loads(canonical_json(config)))
        details = "; ".join(f"{key}: {old!r} (interrupted run) != {new!r} (now)" for key, old, new in found)
        raise ConfigMismatchError(
            f"--resume: {self.run_dir} was run with a different configuration ({details or 'config hash differs'}). "
            "Resume with the same flags, or start a new run with --output_path (or --overwrite).")

    def check_model_files(self, model_files: dict[str, dict[str, str]]) -> None:
        """Refuse to continue a run whose models were loaded from files with other contents (a
        checkpoint saved again at the same path, a Hub repo at a new revision): the documents
        already scored would come from another model."""
        path = self.root / RUN_FILE
        if not path.exists():
            return
        recorded = json.loads(path.read_text()).get("model_files") or {}
        changed = [f"{model}.{role}" for model, files in sorted(model_files.items())
                   for role, sha in sorted(files.items())
                   if model in recorded and recorded[model].get(role) not in (None, sha)]
        if changed:
            raise ConfigMismatchError(
                f"--resume: {self.run_dir} was scored with other model files ({', '.join(changed)}: the sha256 "
                "differs). Resume with the files of the interrupted run, or start a new run with --output_path "
                "(or --overwrite).")

    def write_config(self, config: dict[str, Any], model_files: dict[str, dict[str, str]] | None = None) -> None:
        """model_files: model -> file role -> sha256, checked by ``check_model_files`` on resume."""
        path = self.root / RUN_FILE
        if path.exists():
            return
        payload = {"config_hash": self.config_hash, "config": json.loads(canonical_json(config)),
                   "model_files": model_files or {}}
        atomic_write_bytes(path, (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode())

    # -- writing ------------------------------------------------------------------------------
    def save(self, task: str, model: str, record: DocRecord) -> LogEntry:
        """Persist one finished document: its npz (atomically), then its log line."""
        data = encode_record(record, task, model, self.config_hash)
        path = self.record_path(task, model, record.doc_id)
        atomic_write_bytes(path, data)
        entry = LogEntry(task, model, record.doc_id, "ok", int(record.nll.shape[-1]), self.config_hash,
                         file=str(path.relative_to(self.root)), sha256=hashlib.sha256(data).hexdigest())
        self._append(entry)
        return entry

    def save_failure(self, task: str, model: str, failure: DocFailure) -> LogEntry:
        entry = LogEntry(task, model, failure.doc_id, "error", failure.n_frames, self.config_hash,
                         kind=failure.kind, error=failure.error)
        self._append(entry)
        return entry

    def _append(self, entry: LogEntry) -> None:
        """One line per entry, fsynced; a line cut short by a kill is closed off first so the
        new line stays whole (the cut one is then unparseable and ignored)."""
        self.root.mkdir(parents=True, exist_ok=True)
        line = canonical_json(entry.__dict__) + "\n"
        with open(self.log_path, "a+b") as fh:
            fh.seek(0, os.SEEK_END)
            if fh.tell() > 0:
                fh.seek(-1, os.SEEK_END)
                if fh.read(1) != b"\n":
                    fh.write(b"\n")
            fh.write(line.encode())
            fh.flush()
            os.fsync(fh.fileno())

    # -- reading ------------------------------------------------------------------------------
    def log_entries(self) -> list[LogEntry]:
        """Every parseable log line of this run's config, from every rank's log, in file order."""
        entries = []
        for path in sorted(self.root.glob("log.rank*.jsonl")):
            for number, raw in enumerate(path.read_bytes().split(b"\n"), 1):
                if not raw.strip():
                    continue
                try:
                    entry = LogEntry(**json.loads(raw))
                except (ValueError, TypeError):
                    logger.warning("%s line %d: truncated or corrupt record (a process was killed while "
                                   "writing it); that document will be scored again", path, number)
                    continue
                if entry.config_hash == self.config_hash:
                    entries.append(entry)
        return entries

    def index(self) -> dict[tuple[str, str, str], LogEntry]:
        """The latest entry per (task, model, doc_id); a success wins over a later failure."""
        latest: dict[tuple[str, str, str], LogEntry] = {}
        for entry in self.log_entries():
            key = (entry.task, entry.model, entry.doc_id)
            if key in latest and latest[key].status == "ok" and entry.status != "ok":
                continue
            latest[key] = entry
        return latest

    def read_verified(self, entry: LogEntry) -> DocRecord | None:
        """The record an ``ok`` entry points to, or None when its file is missing, truncated or
        not the one the entry names."""
        path = self.root / (entry.file or "")
        try:
            data = path.read_bytes()
        except OSError:
            logger.warning("%s: record file missing; %s will be scored again", path, entry.doc_id)
            return None
        if hashlib.sha256(data).hexdigest() != entry.sha256:
            logger.warning("%s: record file does not match its log line (truncated?); %s will be scored "
                           "again", path, entry.doc_id)
            return None
        try:
            record, header = decode_record(data)
        except (ValueError, KeyError, OSError) as exc:
            logger.warning("%s: unreadable record (%s); %s will be scored again", path, exc, entry.doc_id)
            return None
        if header.get("config_hash") != self.config_hash or record.nll.shape[-1] != entry.n_frames:
            return None
        return record

    def load_done(self, wanted: Iterable[tuple[str, str, str, int]]
                  ) -> tuple[dict[tuple[str, str, str], DocRecord], dict[tuple[str, str, str], DocFailure]]:
        """Verified records and recorded failures for the wanted (task, model, doc_id, n_frames)."""
        index = self.index()
        done: dict[tuple[str, str, str], DocRecord] = {}
        failed: dict[tuple[str, str, str], DocFailure] = {}
        for task, model, doc_id, n_frames in wanted:
            entry = index.get((task, model, doc_id))
            if entry is None or entry.n_frames != n_frames:
                continue
            if entry.status == "error":
                failed[(task, model, doc_id)] = DocFailure(doc_id, n_frames, entry.kind or "error",
                                                           entry.error or "")
                continue
            record = self.read_verified(entry)
            if record is not None:
                done[(task, model, doc_id)] = record
        return done, failed

    # -- moving records between processes that do not share a file system -----------------------
    def has(self, index: dict[tuple[str, str, str], LogEntry], entry: LogEntry) -> bool:
        mine = index.get((entry.task, entry.model, entry.doc_id))
        return mine is not None and mine.status == entry.status and mine.sha256 == entry.sha256

    def read_bytes(self, entry: LogEntry) -> bytes:
        return (self.root / (entry.file or "")).read_bytes()

    def import_entry(self, entry: LogEntry, data: bytes | None) -> None:
        """Store a record another process wrote (its npz bytes, then its log line)."""
        if entry.status == "ok":
            if data is None or hashlib.sha256(data).hexdigest() != entry.sha256:
                raise ValueError(f"record of {entry.doc_id} arrived damaged from another process")
            path = self.record_path(entry.task, entry.model, entry.doc_id)
            atomic_write_bytes(path, data)
            entry = LogEntry(**{**entry.__dict__, "file": str(path.relative_to(self.root))})
        self._append(entry)

    # -- stop flag ------------------------------------------------------------------------------
    def request_stop(self, reason: str) -> None:
        try:
            atomic_write_bytes(self.stop_path, reason.encode())
        except OSError as exc:
            logger.warning("could not write %s: %s", self.stop_path, exc)

    def stop_requested(self) -> bool:
        return self.stop_path.exists()

    def clear_stop(self) -> None:
        self.stop_path.unlink(missing_ok=True)

