"""Sources and decoding: Hub-style WebDataset tars (through `datasets` streaming), LibriLight
folders, parquet and audiofolder datasets; all offline, with generated audio."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import soundfile as sf
import torch

from data_fixtures import LAYOUT, flac_bytes, make_librilight_dir, make_webdataset_tar, speechlike, task_config
from ttt_bench.audio.decode import iter_audio_24k, load_audio_24k, probe
from ttt_bench.audio.sources import WebDatasetSource, make_source
from ttt_bench.models.loading.moshi import FRAME_SIZE
from ttt_bench.tasks.librilight_stream import LibriLightStreamTask

IDS = [f"{s}/{b}/{f}" for s, b, f, _ in LAYOUT]
FRAMES = [math.ceil(sec * 12.5) for *_, sec in LAYOUT]


def check_documents(docs, ids=IDS, frames=FRAMES):
    assert [d.doc_id for d in docs] == ids
    assert [d.n_frames for d in docs] == frames
    assert [d.meta["n_frames"] for d in docs] == frames
    for doc, (*_, seconds) in zip(docs, LAYOUT[: len(docs)]):
        assert doc.meta["duration_s"] == pytest.approx(seconds, abs=1e-3)
        assert doc.codes.dtype == torch.long and doc.codes.shape[0] == 8
        assert not doc.meta["truncated"]


def test_webdataset_tar_streams_through_datasets(tmp_path, codec):
    make_webdataset_tar(tmp_path / "librilight-small-flac-000000.tar")
    source = {"type": "webdataset", "data_files": str(tmp_path / "librilight-small-flac-*.tar")}
    items = list(make_source(source))
    assert [it.item_id for it in items] == IDS
    first = items[0].meta
    assert first["key"] == f"small/{IDS[0]}"
    assert (first["speaker"], first["book"], first["snr"]) == ("100", LAYOUT[0][1], 12.5)
    assert first["authors"] == ["L. Frank Baum"] and first["voice_s"] == pytest.approx(2.8)
    assert isinstance(items[0].data, bytes) and probe(items[0].data).sample_rate == 16000

    task = LibriLightStreamTask(task_config(source))
    check_documents(task.documents(codec))
    assert task.skipped == []


def test_webdataset_hub_repo_maps_to_hf_paths():
    source = WebDatasetSource.from_spec({"type": "webdataset", "repo": "collabora/librilight-webdataset",
                                         "data_files": "librilight-small-flac-*.tar"})
    assert source.data_files == ["hf://datasets/collabora/librilight-webdataset/librilight-small-flac-*.tar"]


def test_librilight_folder(tmp_path, codec):
    root = make_librilight_dir(tmp_path / "ll")
    (root / "README.txt").write_text("not audio")  # ignored: not an audio extension
    task = LibriLightStreamTask(task_config({"type": "librilight_dir", "path": str(root)}))
    docs = task.documents(codec)
    check_documents(docs)
    assert docs[0].meta["files"] == [IDS[0]] and docs[0].meta["snr"] == 12.5


def _write_parquet(path, rows):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    features = datasets.Features({"audio": datasets.Audio(decode=False), "id": datasets.Value("string"),
                                  "reader": datasets.Value("string")})
    pq.write_table(pa.Table.from_pylist(rows, schema=features.arrow_schema), path)


def test_parquet_audio_dataset(tmp_path, codec):
    rows = [{"audio": {"bytes": flac_bytes(sec, seed=i), "path": f"{f}.flac"}, "id": f"{s}/{b}/{f}", "reader": s}
            for i, (s, b, f, sec) in enumerate(LAYOUT)]
    _write_parquet(tmp_path / "train.parquet", rows)
    source = {"type": "hf_audio", "path": "parquet", "data_files": str(tmp_path / "train.parquet"),
              "id_column": "id", "speaker_column": "reader"}
    docs = LibriLightStreamTask(task_config(source)).documents(codec)
    check_documents(docs)
    assert [d.meta["speaker"] for d in docs] == [s for s, *_ in LAYOUT]


def test_audiofolder_dataset_with_custom_column(tmp_path, codec):
    root = make_librilight_dir(tmp_path / "af")
    for sidecar in root.rglob("*.json"):
        sidecar.unlink()  # audiofolder would read them as metadata
    source = {"type": "hf_audio", "path": "audiofolder", "data_dir": str(root)}
    docs = LibriLightStreamTask(task_config(source)).documents(codec)
    plain = make_source({"type": "hf_audio", "path": str(root)})  # a folder path alone: the same
    assert (plain.path, plain.data_dir) == ("audiofolder", str(root))
    assert sorted(d.doc_id for d in docs) == sorted(IDS)
    by_id = {d.doc_id: d for d in docs}
    assert [by_id[i].n_frames for i in IDS] == FRAMES
    assert by_id[IDS[2]].meta["speaker"] == "200"


def test_missing_audio_column_is_named(tmp_path, codec):
    _write_parquet(tmp_path / "t.parquet", [{"audio": {"bytes": flac_bytes(1.0), "path": "a.flac"},
                                             "id": "a", "reader": "1"}])
    source = {"type": "hf_audio", "path": "parquet", "data_files": str(tmp_path / "t.parquet"),
              "audio_column": "speech"}
    with pytest.raises(KeyError, match="speech"):
        LibriLightStreamTask(task_config(source)).documents(codec)


@pytest.mark.parametrize("fmt,sr,channels", [("WAV", 44100, 2), ("OGG", 22050, 1), ("FLAC", 16000, 1)])
def test_decode_resample_downmix_pad(fmt, sr, channels):
    seconds = 1.3
    mono = speechlike(seconds, sr)
    audio = np.stack([mono] * channels, axis=1) if channels > 1 else mono
    buf = io.BytesIO()
    sf.write(buf, audio, sr, format=fmt)
    out = load_audio_24k(buf.getvalue())
    assert out.ndim == 1 and out.dtype == np.float32
    assert len(out) == math.ceil(seconds * 12.5) * FRAME_SIZE  # padded to a whole frame
    real = int(round(seconds * 24000))
    assert np.all(out[real + 2:] == 0) and np.abs(out[:real]).max() > 0.05
    # the streaming resampler gives what a one-shot soxr resample of the decoded file gives
    import soxr

    decoded, _ = sf.read(io.BytesIO(buf.getvalue()), dtype="float32", always_2d=True)
    reference = soxr.resample(decoded.mean(axis=1), sr, 24000)
    assert np.allclose(out[: len(reference)], reference, atol=1e-5)


def test_decode_stops_early_at_max_samples():
    blocks = list(iter_audio_24k(flac_bytes(30.0), max_samples=10 * FRAME_SIZE, block_seconds=1.0))
    assert sum(len(b) for b in blocks) == 10 * FRAME_SIZE
    assert max(len(b) for b in blocks) <= 24000
