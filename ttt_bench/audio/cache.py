"""On-disk cache of Mimi codes.

An entry is keyed by a hash of the audio file's bytes and a hash of the codec (weights and
settings): ``<root>/<codec_hash>/<audio_hash[:2]>/<audio_hash>.safetensors``. It holds the
codes (int16, [8, T]) and, in the safetensors metadata, how many frames were encoded, whether
that is the whole recording, the recording's duration and a checksum of the codes. Entries are
written to a temporary file and renamed into place, so a crash never leaves a half-written
entry; an entry that does not load or whose checksum does not match is deleted and treated
as a miss.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

logger = logging.getLogger(__name__)

CACHE_ENV = "TTT_BENCH_CACHE"
SUFFIX = ".safetensors"
FORMAT_VERSION = "1"


def default_cache_dir() -> Path:
    """``$TTT_BENCH_CACHE``, else ``$XDG_CACHE_HOME/ttt_bench/codes`` (``~/.cache/ttt_bench/codes``)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "ttt_bench" / "codes"


def hash_bytes(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


@dataclass
class CacheEntry:
    codes: torch.Tensor  # LongTensor [8, T]
    complete: bool  # True if T covers the whole recording (else it was truncated at T frames)
    duration_s: float  # duration of the whole recording


class CodeCache:
    """Mimi codes on disk, one file per (audio hash, codec hash)."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root).expanduser() if root is not None else default_cache_dir()

    def path(self, audio_hash: str, codec_hash: str) -> Path:
        return self.root / codec_hash / audio_hash[:2] / f"{audio_hash}{SUFFIX}"

    def get(self, audio_hash: str, codec_hash: str) -> CacheEntry | None:
        """The entry, or None if absent or damaged (a damaged entry is deleted)."""
        path = self.path(audio_hash, codec_hash)
        if not path.is_file():
            return None
        try:
            return _read_entry(path)
        except (SafetensorError, OSError, ValueError, KeyError) as exc:
            logger.warning("code cache entry %s is damaged (%s); deleting it and encoding again", path, exc)
            path.unlink(missing_ok=True)
            return None

    def put(self, audio_hash: str, codec_hash: str, entry: CacheEntry) -> Path:
        """Write atomically: a temporary file in the same directory, then rename."""
        path = self.path(audio_hash, codec_hash)
        path.parent.mkdir(parents=True, exist_ok=True)
        codes = entry.codes.to("cpu", torch.int16).contiguous().numpy()
        meta = {"version": FORMAT_VERSION, "complete": str(int(entry.complete)),
                "duration_s": repr(float(entry.duration_s)), "n_frames": str(codes.shape[-1]),
                "checksum": hash_bytes(codes.tobytes())}
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            save_file({"codes": codes}, tmp, metadata=meta)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path

    def entries(self) -> list[Path]:
        return sorted(self.root.glob(f"*/*/*{SUFFIX}")) if self.root.is_dir() else []


def _read_entry(path: Path) -> CacheEntry:
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata() or {}
    if meta.get("version") != FORMAT_VERSION:
        raise ValueError(f"format version {meta.get('version')!r}, expected {FORMAT_VERSION}")
    codes = load_file(str(path))["codes"]
    if codes.ndim != 2 or codes.shape[-1] != int(meta["n_frames"]):
        raise ValueError(f"codes of shape {codes.shape}, metadata says {meta['n_frames']} frames")
    if hash_bytes(np.ascontiguousarray(codes).tobytes()) != meta["checksum"]:
        raise ValueError("checksum mismatch")
    return CacheEntry(codes=torch.from_numpy(codes.astype(np.int64)), complete=meta["complete"] == "1",
                      duration_s=float(meta["duration_s"]))


def cache_info(cache_dir: str | Path | None = None) -> str:
    """A human-readable summary of the code cache (for ``ttt-bench cache info``)."""
    cache = CodeCache(cache_dir)
    entries = cache.entries()
    lines = [f"code cache: {cache.root}" + ("" if cache.root.is_dir() else " (does not exist yet)"),
             f"entries: {len(entries)}, size: {_human(sum(p.stat().st_size for p in entries))}"]
    by_codec: dict[str, int] = {}
    for p in entries:
        by_codec[p.parent.parent.name] = by_codec.get(p.parent.parent.name, 0) + 1
    lines += [f"  codec {codec}: {n} entries" for codec, n in sorted(by_codec.items())]
    lines.append(f"(set {CACHE_ENV} to move it)")
    return "\n".join(lines)


def cache_clear(cache_dir: str | Path | None = None) -> int:
    """Delete every cache entry; returns how many were removed (``ttt-bench cache clear``)."""
    cache = CodeCache(cache_dir)
    entries = cache.entries()
    for codec_dir in {p.parent.parent for p in entries}:
        shutil.rmtree(codec_dir, ignore_errors=True)
    for stray in (cache.root.glob("*/*/.*.tmp") if cache.root.is_dir() else []):
        stray.unlink(missing_ok=True)
    logger.info("removed %d code cache entries from %s", len(entries), cache.root)
    return len(entries)


def _human(n_bytes: int) -> str:
    size = float(n_bytes)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return f"{size:.1f} GB"
