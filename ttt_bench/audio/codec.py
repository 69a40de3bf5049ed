"""Mimi encoding in streaming chunks (bounded memory, exact), batched across documents, cached.

Exactness: moshi's streaming attention keeps a ring KV cache of ``context`` keys, which is
only right when fed one step at a time. Fed C steps per call, the first queries of a chunk
would lose up to C-1 keys once the ring wraps (past 10 s of audio for Mimi's encoder
transformer), so chunked encoding would drift from a whole-file encode. We give each ring
room for ``context + C - 1`` keys; the attention mask still limits every query to
``context`` keys back, so a chunked encode equals the whole-file encode.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from moshi.models.compression import MimiModel

from ttt_bench.constants import FRAME_SIZE, N_CODEBOOKS as NUM_AUDIO_CODEBOOKS, SAMPLE_RATE
from ttt_bench.models.loading.moshi import ModelSource, load_mimi, module_hash
from ttt_bench.models.streaming import widen_kv_caches
from ttt_bench.audio.cache import CacheEntry, CodeCache, cache_clear, cache_info  # noqa: F401  (re-exported for the CLI)
from ttt_bench.audio.decode import DecodeError

logger = logging.getLogger(__name__)

DEFAULT_CHUNK_FRAMES = 125  # 10 s of audio per streaming call
CODEC_SETTINGS_VERSION = "mimi-stream-v1"  # bump when the encoding procedure changes


class _Chunker:
    """Regroups a stream of sample blocks into fixed-size chunks, zero-padding the last one.

    A decoding error in the stream is kept (``error``) and the stream then counts as ended,
    so one bad file does not stop the others in its batch.
    """

    def __init__(self, blocks: Iterable[np.ndarray], chunk: int):
        self._blocks: Iterator[np.ndarray] = iter(blocks)
        self._chunk = chunk
        self._buffer = np.zeros(0, dtype=np.float32)
        self.n_samples = 0
        self.done = False
        self.error: Exception | None = None

    def next(self) -> np.ndarray:
        while not self.done and len(self._buffer) < self._chunk:
            try:
                block = next(self._blocks)
            except StopIteration:
                self.done = True
                break
            except DecodeError as exc:
                self.error, self.done = exc, True
                break
            block = np.asarray(block, dtype=np.float32).reshape(-1)
            self.n_samples += len(block)
            self._buffer = np.concatenate([self._buffer, block])
        out, self._buffer = self._buffer[: self._chunk], self._buffer[self._chunk:]
        return np.pad(out, (0, self._chunk - len(out)))

    @property
    def n_frames(self) -> int:
        return -(-self.n_samples // FRAME_SIZE)


class MimiCodec:
    """Moshi's Mimi as an exact streaming encoder with an on-disk code cache.

    ``encode`` / ``encode_stream`` / ``encode_streams`` always run the encoder;
    ``lookup`` / ``store`` / ``encode_cached`` go through the cache (if there is one).
    ``n_encoded`` counts recordings run through the encoder (tests check the cache with it).
    """

    def __init__(self, mimi: MimiModel, device: str | torch.device = "cpu", cache: CodeCache | None = None,
                 chunk_frames: int = DEFAULT_CHUNK_FRAMES, label: str = ""):
        if mimi.frame_size != FRAME_SIZE or mimi.sample_rate != SAMPLE_RATE:
            raise ValueError(f"Mimi {label}: frame size {mimi.frame_size} at {mimi.sample_rate} Hz; "
                             f"ttt-bench needs {FRAME_SIZE} samples at {SAMPLE_RATE} Hz")
        self.mimi = mimi.eval()
        self.device = torch.device(device)
        self.cache = cache
        self.chunk_frames = int(chunk_frames)
        self.label = label
        self.n_encoded = 0
        self._hash: str | None = None
        self._silence: tuple[int, ...] | None = None

    @classmethod
    def from_source(cls, source: ModelSource, device: str | torch.device = "cpu",
                    cache_dir: str | Path | None = None, use_cache: bool = True,
                    chunk_frames: int = DEFAULT_CHUNK_FRAMES) -> "MimiCodec":
        """The Mimi belonging to ``source`` (preset or pretrained), with the code cache at
        ``cache_dir`` (default: ``$TTT_BENCH_CACHE`` or the user's cache directory)."""
        mimi = load_mimi(source, device=device)
        cache = CodeCache(cache_dir) if use_cache else None
        return cls(mimi, device=device, cache=cache, chunk_frames=chunk_frames, label=source.label)

    @property
    def hash(self) -> str:
        """Hash of the codec weights and encoding settings (part of every cache key)."""
        if self._hash is None:
            extra = f"{CODEC_SETTINGS_VERSION};n_q={NUM_AUDIO_CODEBOOKS};sr={SAMPLE_RATE};frame={FRAME_SIZE}"
            self._hash = module_hash(self.mimi, extra)
        return self._hash

    # -- encoding -------------------------------------------------------------------------

    def encode(self, audio_24k: np.ndarray) -> torch.Tensor:
        """Codes [8, T] of a 24 kHz mono recording, T = ceil(len / 1920)."""
        return self.encode_stream([np.asarray(audio_24k, dtype=np.float32)])

    def encode_stream(self, blocks: Iterable[np.ndarray]) -> torch.Tensor:
        """Codes [8, T] of a recording given as consecutive 24 kHz blocks of any size."""
        result = self.encode_streams([blocks])[0]
        if isinstance(result, Exception):
            raise result
        return result

    @torch.no_grad()
    def encode_streams(self, streams: list[Iterable[np.ndarray]],
                       chunk_frames: int | None = None) -> list[torch.Tensor | DecodeError]:
        """Encode several recordings side by side (one batch, streamed chunk by chunk).

        ``chunk_frames`` (default ``self.chunk_frames``) only sets how much is encoded per call
        (short clips need less than 10 s); the codes do not depend on it.
        Returns codes [8, T_i] per recording, or the DecodeError that stopped it.
        """
        chunk_frames = chunk_frames or self.chunk_frames
        chunk = chunk_frames * FRAME_SIZE
        chunkers = [_Chunker(s, chunk) for s in streams]
        pieces: list[torch.Tensor] = []
        with self.mimi.streaming(len(chunkers)):
            steps = chunk_frames * round(self.mimi.encoder_frame_rate / self.mimi.frame_rate)
            if self.mimi.encoder_transformer is not None:
                widen_kv_caches(self.mimi.encoder_transformer, steps - 1)
            while True:
                batch = np.stack([c.next() for c in chunkers])
                if all(c.done for c in chunkers) and all(c.n_frames <= len(pieces) * chunk_frames
                                                         for c in chunkers):
                    break
                x = torch.from_numpy(batch).to(self.device)[:, None, :]
                pieces.append(self.mimi.encode(x).to("cpu"))
        self.n_encoded += len(chunkers)
        codes = torch.cat(pieces, dim=-1) if pieces else torch.zeros(len(chunkers), NUM_AUDIO_CODEBOOKS, 0)
        return [c.error if c.error is not None else codes[i, :, : c.n_frames].long().clone()
                for i, c in enumerate(chunkers)]

    # -- cache ----------------------------------------------------------------------------

    def lookup(self, audio_hash: str, max_frames: int | None = None) -> CacheEntry | None:
        """Cached codes for this audio, cut to ``max_frames``; None if absent or too short."""
        if self.cache is None:
            return None
        entry = self.cache.get(audio_hash, self.hash)
        if entry is None:
            return None
        n = entry.codes.shape[-1]
        if not entry.complete and (max_frames is None or n < max_frames):
            return None  # cached from a shorter truncation than we need now
        if max_frames is not None and n > max_frames:
            entry = CacheEntry(entry.codes[:, :max_frames], complete=False, duration_s=entry.duration_s)
        return entry

    def store(self, audio_hash: str, entry: CacheEntry) -> None:
        if self.cache is not None:
            self.cache.put(audio_hash, self.hash, entry)

    def encode_cached(self, audio_hash: str, load: Callable[[int | None], Iterable[np.ndarray]],
                      duration_s: float, max_frames: int | None = None) -> CacheEntry:
        """Codes of one recording from the cache, else encoded (and then cached).

        ``load(max_samples)`` yields the recording's 24 kHz blocks, stopping after
        ``max_samples`` samples when that is not None.
        """
        entry = self.lookup(audio_hash, max_frames)
        if entry is not None:
            return entry
        from ttt_bench.audio.decode import frames_for_seconds

        full = frames_for_seconds(duration_s)
        truncated = max_frames is not None and full > max_frames
        codes = self.encode_stream(load(max_frames * FRAME_SIZE if truncated else None))
        entry = CacheEntry(codes, complete=not truncated, duration_s=duration_s)
        self.store(audio_hash, entry)
        return entry

    # -- helpers --------------------------------------------------------------------------

    def silence_frame(self, seconds: float = 4.0) -> tuple[int, ...]:
        """The 8 codes of Mimi's steady-state encoding of silence (last frame of ``seconds`` of zeros)."""
        if self._silence is None:
            codes = self.encode(np.zeros(int(seconds * SAMPLE_RATE), dtype=np.float32))
            self.n_encoded -= 1  # not a recording
            self._silence = tuple(int(c) for c in codes[:, -1])
        return self._silence
