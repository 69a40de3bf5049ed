"""Voiced segments of a recording: LibriLight's own ``voice_activity``, or an energy detector.

LibriLight ships each recording's voiced segments in its ``.json`` (``voice_activity: [[start_s,
end_s], ...]``, from its voice activity detection); the long-stream tasks carry them into each
document's metadata (source ``librilight_json``). A recording without them (an HF audio dataset,
a folder without ``.json``) gets its segments from :func:`energy_segments` on the decoded 24 kHz
audio (source ``energy``). ``ttt_bench.metrics.voiced_frames`` turns segments into voiced frames.

The energy detector, with its thresholds (module constants, recorded nowhere else):

* the level of each ``ENERGY_WINDOW_S`` window is its mean power in dB (full scale = 0 dB);
* the reference is the ``ENERGY_REFERENCE_PERCENTILE``-th percentile of the window levels (the
  loud speech, robust to a few clicks);
* a window is voiced when its level is above ``reference + ENERGY_RELATIVE_DB`` and above the
  absolute floor ``ENERGY_FLOOR_DB`` (digital silence and faint hiss are never speech);
* voiced windows closer than ``ENERGY_MIN_GAP_S`` are joined (a pause inside a phrase stays
  voiced, as in LibriLight's segments), and segments shorter than ``ENERGY_MIN_SEGMENT_S`` dropped.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from ttt_bench.constants import SAMPLE_RATE

SOURCE_JSON = "librilight_json"   # segments from the recording's LibriLight .json
SOURCE_ENERGY = "energy"          # segments from energy_segments

ENERGY_WINDOW_S = 0.02             # 20 ms windows
ENERGY_REFERENCE_PERCENTILE = 99.0
ENERGY_RELATIVE_DB = -35.0         # voiced: within 35 dB of the reference level
ENERGY_FLOOR_DB = -60.0            # and above -60 dB full scale
ENERGY_MIN_GAP_S = 0.3             # pauses shorter than this stay inside a segment
ENERGY_MIN_SEGMENT_S = 0.06        # shorter segments are dropped (clicks)


def window_levels(blocks: Iterable[np.ndarray], sample_rate: int = SAMPLE_RATE,
                  window_s: float = ENERGY_WINDOW_S) -> np.ndarray:
    """Mean power in dB of each whole window of the mono ``blocks`` (streamed: memory is one
    float per window); a last partial window is dropped."""
    size = int(round(window_s * sample_rate))
    levels: list[np.ndarray] = []
    rest = np.zeros(0, dtype=np.float64)
    for block in blocks:
        data = np.concatenate([rest, np.asarray(block, dtype=np.float64).reshape(-1)])
        n = data.size // size
        if n:
            power = np.mean(data[: n * size].reshape(n, size) ** 2, axis=1)
            levels.append(10.0 * np.log10(power + 1e-12))
        rest = data[n * size:]
    return np.concatenate(levels) if levels else np.zeros(0)


def energy_segments(blocks: Iterable[np.ndarray], sample_rate: int = SAMPLE_RATE) -> list[list[float]]:
    """Voiced segments ``[[start_s, end_s], ...]`` of a recording from its energy (thresholds in
    the module docstring); ``blocks``: its mono samples at ``sample_rate``, e.g.
    ``ttt_bench.audio.decode.iter_audio_24k``."""
    levels = window_levels(blocks, sample_rate)
    if not levels.size:
        return []
    reference = float(np.percentile(levels, ENERGY_REFERENCE_PERCENTILE))
    active = levels > max(reference + ENERGY_RELATIVE_DB, ENERGY_FLOOR_DB)
    return _join(np.flatnonzero(active), ENERGY_WINDOW_S)


def _join(windows: np.ndarray, window_s: float) -> list[list[float]]:
    """Runs of voiced windows as segments: gaps under ``ENERGY_MIN_GAP_S`` joined, segments under
    ``ENERGY_MIN_SEGMENT_S`` dropped; seconds rounded to the millisecond."""
    segments: list[list[float]] = []
    for i in windows:
        start, end = i * window_s, (i + 1) * window_s
        if segments and start - segments[-1][1] < ENERGY_MIN_GAP_S:
            segments[-1][1] = end
        else:
            segments.append([start, end])
    return [[round(s, 3), round(e, 3)] for s, e in segments if e - s >= ENERGY_MIN_SEGMENT_S - 1e-9]
