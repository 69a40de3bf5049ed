"""Helpers for the data-pipeline tests: generated audio in LibriLight layouts (no network)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import soundfile as sf

SR = 16000


def speechlike(seconds: float, sr: int = SR, seed: int = 0) -> np.ndarray:
    """Noise with a syllable-rate envelope: enough structure for varied Mimi codes."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(round(seconds * sr))) / sr
    envelope = (0.2 + np.sin(2 * np.pi * 3.0 * t) ** 2) * (1 + 0.5 * np.sin(2 * np.pi * 0.4 * t))
    return (0.1 * envelope * rng.standard_normal(len(t))).astype(np.float32)


def flac_bytes(seconds: float, sr: int = SR, seed: int = 0, fmt: str = "FLAC") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, speechlike(seconds, sr, seed), sr, format=fmt)
    return buf.getvalue()


def librilight_json(speaker: str, title: str, seconds: float) -> dict:
    return {"speaker": speaker, "book_meta": {"title": title, "authors": [{"name": "L. Frank Baum"}]},
            "snr": 12.5, "voice_activity": [[0.1, round(seconds - 0.1, 2)]]}


# (speaker, book, file, seconds); two chapters of one book so the book task has something to join
LAYOUT = [
    ("100", "sea_fairies_0812_librivox_64kb_mp3", "01_baum_sea_fairies_64kb", 3.0),
    ("100", "sea_fairies_0812_librivox_64kb_mp3", "02_baum_sea_fairies_64kb", 2.2),
    ("200", "wizard_oz_librivox_64kb_mp3", "01_baum_wizard_oz_64kb", 1.5),
]


def make_librilight_dir(root: Path, layout=LAYOUT) -> Path:
    for i, (speaker, book, name, seconds) in enumerate(layout):
        folder = root / speaker / book
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{name}.flac").write_bytes(flac_bytes(seconds, seed=i))
        (folder / f"{name}.json").write_text(json.dumps(librilight_json(speaker, book, seconds)))
    return root


def add_tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_webdataset_tar(path: Path, layout=LAYOUT, split: str = "small") -> Path:
    """A WebDataset shard as collabora/librilight-webdataset lays it out: ``<key>.flac``, ``<key>.json``."""
    with tarfile.open(path, "w") as tar:
        for i, (speaker, book, name, seconds) in enumerate(layout):
            key = f"{split}/{speaker}/{book}/{name}"
            add_tar_member(tar, f"{key}.flac", flac_bytes(seconds, seed=i))
            add_tar_member(tar, f"{key}.json", json.dumps(librilight_json(speaker, book, seconds)).encode())
    return path


def task_config(source: dict, **overrides):
    from ttt_bench.config import TaskConfig

    data = {"task": "test_stream", "class": "librilight_stream", "source": source, "min_duration_s": 1.0,
            "max_frames": 1000, **overrides}
    return TaskConfig.from_dict(data, source="<test>")
