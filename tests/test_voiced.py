"""Voiced and silent frames: the frame rule, segments carried from LibriLight's ``.json`` (shifted in
a joined book) or found by the energy detector, and the voiced-frame metrics computed from them."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from data_fixtures import SR, librilight_json, speechlike, task_config
from ttt_bench.audio.decode import iter_audio_24k, probe
from ttt_bench.audio.voice import SOURCE_ENERGY, SOURCE_JSON, energy_segments
from ttt_bench.constants import FRAME_RATE
from ttt_bench.metrics import DocRecord, StreamMetrics, voiced_frames
from ttt_bench.tasks.librilight_stream import LibriLightStreamBookTask, LibriLightStreamTask

SAMPLE = Path(__file__).resolve().parent.parent / "ttt_bench" / "data" / "librilight_sample"
SPEECH_S, SILENCE_S = 3.0, 10.0
BOOK = "book_with_pauses"


def direct_mask(segments: list[list[float]], n_frames: int) -> np.ndarray:
    """The frame rule written out frame by frame: voiced when >= half of [t/12.5, (t+1)/12.5) lies
    inside the (non-overlapping) segments."""
    out = np.zeros(n_frames, dtype=bool)
    for t in range(n_frames):
        lo, hi = t / FRAME_RATE, (t + 1) / FRAME_RATE
        inside = sum(max(0.0, min(hi, e) - max(lo, s)) for s, e in segments)
        out[t] = inside >= 0.5 / FRAME_RATE - 1e-9
    return out


def test_the_frame_rule():
    # frame 0 = [0, 0.08) s: 0.04 s inside is exactly half (voiced), 0.03 s is not
    assert voiced_frames([[0.04, 0.12]], 3).tolist() == [True, True, False]
    assert voiced_frames([[0.05, 0.12]], 3).tolist() == [False, True, False]
    # overlapping and touching segments are one; a frame split between two segments adds both parts
    assert voiced_frames([[0.0, 0.1], [0.05, 0.2], [0.2, 0.25]], 4).tolist() == [True, True, True, False]
    assert voiced_frames([[0.0, 0.02], [0.06, 0.08]], 1).tolist() == [True]
    assert voiced_frames([], 2).tolist() == [False, False]
    rng = np.random.default_rng(0)
    edges = np.sort(rng.uniform(0, 40, 60)).round(3).reshape(-1, 2).tolist()
    assert (voiced_frames(edges, 520) == direct_mask(edges, 520)).all()


# ----------------------------------------------------------------------------- a chapter with a pause


def chapter(seed: int) -> np.ndarray:
    """3 s of speech-like noise, 10 s of digital silence, 3 s of speech-like noise (16 kHz)."""
    speech = speechlike(SPEECH_S, seed=seed)
    return np.concatenate([speech, np.zeros(int(SILENCE_S * SR), np.float32), speechlike(SPEECH_S, seed=seed + 1)])


SEGMENTS = [[0.1, SPEECH_S], [SPEECH_S + SILENCE_S, 2 * SPEECH_S + SILENCE_S - 0.1]]


def write_chapter(folder: Path, name: str, seed: int, with_json: bool = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    sf.write(folder / f"{name}.flac", chapter(seed), SR, format="FLAC")
    if with_json:
        meta = {**librilight_json("100", BOOK, 16.0), "voice_activity": SEGMENTS}
        (folder / f"{name}.json").write_text(json.dumps(meta))


@pytest.fixture
def paused(tmp_path):
    folder = tmp_path / "ll" / "100" / BOOK
    write_chapter(folder, "01_ch", seed=1)
    write_chapter(folder, "02_ch", seed=3)
    return tmp_path / "ll"


def config(root: Path, **kw):
    return task_config({"type": "librilight_dir", "path": str(root)}, positions=[20, 100, 180], window=20,
                       early_late_frames=50, segments=[[0, 100]], bootstrap_iters=50, **kw)


def test_voiced_metrics_equal_a_direct_computation(paused, codec):
    docs = LibriLightStreamTask(config(paused)).documents(codec)
    assert [d.meta["voice_source"] for d in docs] == [SOURCE_JSON, SOURCE_JSON]
    assert docs[0].meta["voice_activity"] == SEGMENTS
    rng = np.random.default_rng(0)
    records = []
    for d in docs:
        nll = rng.gamma(4.0, 0.5, (8, d.n_frames))
        nll[1:, -1] = np.nan
        records.append(DocRecord(d.doc_id, d.meta, nll))
    cfg = config(paused)
    m = StreamMetrics(cfg).model_metrics(StreamMetrics(cfg).summarize(records))
    masks = [direct_mask(SEGMENTS, r.nll.shape[1]) for r in records]
    voiced = np.concatenate([r.nll[:, k][np.isfinite(r.nll[:, k])] for r, k in zip(records, masks)])
    silent = np.concatenate([r.nll[:, ~k][np.isfinite(r.nll[:, ~k])] for r, k in zip(records, masks)])
    assert m["voiced_mean_nll"] == pytest.approx(voiced.mean(), rel=1e-12)
    assert m["silence_mean_nll"] == pytest.approx(silent.mean(), rel=1e-12)
    total = sum(r.nll.shape[1] for r in records)
    assert m["voiced_fraction"] == sum(k.sum() for k in masks) / total  # exact: a count over a count
    assert 0.3 < m["voiced_fraction"] < 0.45  # 5.8 s of 16 s
    # the voiced per-position curve and late window: the "all" curve over voiced frames only
    late = [np.nanmean(r.nll, axis=0)[-50:][k[-50:]].mean() for r, k in zip(records, masks)]
    assert m["voiced_late_nll"] == pytest.approx(np.mean(late), rel=1e-12)
    # frames 90-110 lie in the pause (3-13 s = frames 37.5-162.5): no voiced frame, no value
    assert [m["n"][f"voiced_nll@{p}"] for p in (20, 100, 180)] == [2, 0, 2]
    arrays = StreamMetrics(cfg).curve_arrays("t/m", StreamMetrics(cfg).summarize(records))
    assert np.isnan(arrays["t/m/voiced/mean"][40:160]).all() and arrays["t/m/voiced/count"][10] == 2


def test_a_joined_book_shifts_each_chapters_segments_by_its_start(paused, codec):
    [doc] = LibriLightStreamBookTask(config(paused, concat_book=True)).documents(codec)
    first = probe(paused / "100" / BOOK / "01_ch.flac").n_frames
    shift = first / FRAME_RATE
    assert doc.meta["voice_activity"] == SEGMENTS + [[round(s + shift, 3), round(e + shift, 3)] for s, e in SEGMENTS]
    mask = voiced_frames(doc.meta["voice_activity"], doc.n_frames)
    assert mask.tolist() == direct_mask(SEGMENTS, first).tolist() * 2
    # cut at max_frames (1.6 s into the second chapter): its segments end with the stream
    [short] = LibriLightStreamBookTask(config(paused, concat_book=True, max_frames=first + 20)).documents(codec)
    assert short.meta["voice_activity"] == SEGMENTS + [[round(SEGMENTS[0][0] + shift, 3), (first + 20) / FRAME_RATE]]


def test_a_recording_without_json_gets_energy_segments(tmp_path, codec):
    root = tmp_path / "ll"
    write_chapter(root / "100" / BOOK, "01_ch", seed=1, with_json=False)
    [doc] = LibriLightStreamTask(config(root)).documents(codec)
    assert doc.meta["voice_source"] == SOURCE_ENERGY
    found = voiced_frames(doc.meta["voice_activity"], doc.n_frames)
    expected = direct_mask(SEGMENTS, doc.n_frames)
    assert (found == expected).mean() >= 0.95
    pause = slice(int((SPEECH_S + 0.5) * FRAME_RATE), int((SPEECH_S + SILENCE_S - 0.5) * FRAME_RATE))
    assert not found[pause].any()  # the 10 s of silence is silent


def test_energy_detector_agrees_with_the_sample_voice_activity():
    """The bundled sample's own voice_activity (an energy threshold at 16 kHz when it was made,
    tools/make_librilight_sample.py) against the detector on the decoded 24 kHz audio: frame
    agreement overall and on the frames the .json calls silent (all-voiced would fail that)."""
    agree = silent_agree = frames = silent = 0
    for flac in sorted(SAMPLE.rglob("*.flac")):
        recorded = json.loads(flac.with_suffix(".json").read_text())["voice_activity"]
        n = probe(flac).n_frames
        a, b = voiced_frames(recorded, n), voiced_frames(energy_segments(iter_audio_24k(flac)), n)
        agree += int((a == b).sum())
        silent_agree += int((~a & ~b).sum())
        frames, silent = frames + n, silent + int((~a).sum())
    assert agree / frames >= 0.9 and silent > 50
    assert silent_agree / silent >= 0.9


def test_energy_detector_thresholds():
    sr = 24000
    quiet = np.zeros(sr, np.float32)
    tone = 0.3 * np.sin(2 * np.pi * 200 * np.arange(sr) / sr).astype(np.float32)
    assert energy_segments([quiet]) == []
    # a pause shorter than 0.3 s stays inside the segment; a longer one splits it
    short = np.concatenate([tone, quiet[: int(0.2 * sr)], tone])
    assert energy_segments([short[:5000], short[5000:]]) == [[0.0, 2.2]]
    long = np.concatenate([tone, quiet, tone])
    assert energy_segments([long]) == [[0.0, 1.0], [2.0, 3.0]]
    # hiss 40 dB under the speech is silence
    hiss = 0.003 * np.random.default_rng(0).standard_normal(sr).astype(np.float32)
    assert energy_segments([np.concatenate([tone, hiss, tone])]) == [[0.0, 1.0], [2.0, 3.0]]
    assert math.isclose(sum(e - s for s, e in energy_segments([tone])), 1.0)


def test_voice_activity_survives_the_record_store(paused, codec, tmp_path):
    """--resume reads documents back from records/: their voice activity comes with them."""
    from ttt_bench.evaluation.records import decode_record, encode_record

    [doc, _] = LibriLightStreamTask(config(paused)).documents(codec)
    nll = np.random.default_rng(1).gamma(4.0, 0.5, (8, doc.n_frames))
    record = DocRecord(doc.doc_id, json.loads(json.dumps(doc.meta)), nll.astype(np.float32))
    back, _ = decode_record(encode_record(record, "t", "m", "hash"))
    metrics = StreamMetrics(config(paused))
    assert metrics.model_metrics(metrics.summarize([back])) == metrics.model_metrics(metrics.summarize([record]))
    assert metrics.model_metrics(metrics.summarize([back]))["n"]["voiced_mean_nll"] == 1
