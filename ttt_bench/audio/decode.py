"""Decode audio (soundfile), downmix to mono, resample to 24 kHz (soxr) in bounded memory.

Everything here streams: a recording is read in blocks, resampled with soxr's streaming
resampler and handed on in blocks, so memory does not grow with the recording's length.
The end is padded with zeros to a whole Mimi frame (1920 samples at 24 kHz).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Union

import numpy as np
import soundfile as sf
import soxr

from ttt_bench.constants import FRAME_RATE, FRAME_SIZE, SAMPLE_RATE

AudioInput = Union[bytes, str, Path]
BLOCK_SECONDS = 10.0  # size of the blocks read from the file (at its own sample rate)
EXACT_LENGTH_FORMATS = ("FLAC", "WAV", "WAVEX", "W64", "RF64", "AIFF")  # headers give the exact length


class DecodeError(ValueError):
    """Audio that cannot be used: does not decode, is empty, or has no samples."""


@dataclass(frozen=True)
class AudioInfo:
    """What the file header says (no decoding of the samples)."""

    sample_rate: int
    n_samples: int  # at the file's own sample rate
    channels: int
    format: str

    @property
    def duration_s(self) -> float:
        return self.n_samples / self.sample_rate

    @property
    def n_frames(self) -> int:
        """Mimi frames after resampling and padding to a whole frame: ceil(seconds x 12.5)."""
        return frames_for_seconds(self.duration_s)


def frames_for_seconds(seconds: float) -> int:
    return math.ceil(round(seconds * FRAME_RATE, 6))


def _open(audio: AudioInput) -> sf.SoundFile:
    if isinstance(audio, (bytes, bytearray, memoryview)):
        if len(audio) == 0:
            raise DecodeError("empty file (0 bytes)")
        return sf.SoundFile(io.BytesIO(bytes(audio)))
    path = Path(audio)
    if path.stat().st_size == 0:
        raise DecodeError(f"empty file (0 bytes): {path}")
    return sf.SoundFile(str(path))


def probe(audio: AudioInput) -> AudioInfo:
    """Read the header of ``audio`` (bytes or a path). Raises DecodeError if it is not audio."""
    try:
        with _open(audio) as f:
            info = AudioInfo(sample_rate=f.samplerate, n_samples=f.frames, channels=f.channels, format=f.format)
    except sf.LibsndfileError as exc:
        raise DecodeError(f"does not decode as audio ({_reason(exc)})") from exc
    if info.n_samples <= 0:
        raise DecodeError("empty recording (0 samples)")
    return info


def iter_audio_24k(audio: AudioInput, max_samples: int | None = None,
                   block_seconds: float = BLOCK_SECONDS) -> Iterator[np.ndarray]:
    """Yield float32 mono blocks at 24 kHz, ending with zero padding to a whole frame.

    ``max_samples`` (at 24 kHz) stops reading early: only as much of the file as needed is
    decoded. Raises DecodeError if the file cannot be decoded (also mid-stream).
    """
    produced = 0
    try:
        with _open(audio) as f:
            resampler = soxr.ResampleStream(f.samplerate, SAMPLE_RATE, 1, dtype="float32")
            block = max(1, int(block_seconds * f.samplerate))
            n_read = 0
            while max_samples is None or produced < max_samples:
                data = f.read(block, dtype="float32", always_2d=True)
                n_read += len(data)
                last = len(data) < block
                if last and n_read < f.frames and f.format in EXACT_LENGTH_FORMATS:
                    raise DecodeError(f"truncated: the header promises {f.frames} samples, "
                                      f"the file holds {n_read}")
                out = resampler.resample_chunk(data.mean(axis=1), last=last)
                out = out if max_samples is None else out[: max_samples - produced]
                produced += len(out)
                if len(out):
                    yield out
                if last:
                    break
    except sf.LibsndfileError as exc:
        raise DecodeError(f"does not decode as audio ({_reason(exc)})") from exc
    if produced == 0:
        raise DecodeError("empty recording (0 samples)")
    pad = (-produced) % FRAME_SIZE
    if pad:
        yield np.zeros(pad, dtype=np.float32)


def _reason(exc: sf.LibsndfileError) -> str:
    text = str(getattr(exc, "error_string", "") or exc)
    return text.split(">: ", 1)[-1].strip()  # drop "Error opening <_io.BytesIO object at ...>: "


def load_audio_24k(audio: AudioInput, max_samples: int | None = None) -> np.ndarray:
    """The whole recording at 24 kHz mono, padded to a whole frame (for short files and tests)."""
    return np.concatenate(list(iter_audio_24k(audio, max_samples=max_samples)))
