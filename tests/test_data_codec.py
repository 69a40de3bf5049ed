"""Mimi streaming encode is exact, and the code cache is trusted only when intact."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data_fixtures import make_librilight_dir, speechlike, task_config
from ttt_bench.audio import codec as codec_module
from ttt_bench.audio import decode as decode_module
from ttt_bench.audio.cache import CacheEntry, CodeCache, cache_clear, cache_info, hash_bytes
from ttt_bench.audio.codec import MimiCodec
from ttt_bench.models.loading.moshi import FRAME_SIZE, ModelSource, load_mimi
from ttt_bench.tasks import librilight_stream as task_module
from ttt_bench.tasks.librilight_stream import LibriLightStreamTask


CONTEXT = 16  # encoder-transformer steps (2 per frame): short audio goes well past it


@pytest.fixture(scope="module")
def mimi():
    """Tiny Mimi whose encoder transformer matters and has a short context. With moshi's layer
    scale of 0.01 and random weights, a lost key would be too small to change anything."""
    from moshi.modules.transformer import set_attention_context

    model = load_mimi(ModelSource.make(preset="tiny"))
    set_attention_context(model.encoder_transformer, CONTEXT)
    with torch.no_grad():
        for name, param in model.encoder_transformer.named_parameters():
            if "layer_scale" in name:
                param.fill_(1.0)
    return model


AUDIO = speechlike(3.0, sr=24000, seed=3)  # 38 frames = 76 encoder steps, well past CONTEXT


def whole_file(mimi, audio: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.from_numpy(audio)[None, None]
    with torch.no_grad():
        return mimi.encode(x)[0], mimi._encode_to_unquantized_latent(x)[0]


@pytest.mark.parametrize("chunk_frames", [3, 10])
def test_streaming_encode_equals_whole_file(mimi, chunk_frames):
    codes, _ = whole_file(mimi, AUDIO)
    streamed = MimiCodec(mimi, chunk_frames=chunk_frames).encode_stream(np.array_split(AUDIO, 7))
    assert streamed.shape == codes.shape == (8, int(np.ceil(len(AUDIO) / FRAME_SIZE)))
    assert torch.equal(streamed, codes)
    assert len(set(map(tuple, codes.T.tolist()))) > 3  # the test audio gives varied codes


def test_unwidened_ring_cache_would_drift(mimi, monkeypatch):
    """The test above is sensitive: moshi's ring cache as-is loses keys past the context."""
    _, latent = whole_file(mimi, AUDIO)
    seen: list[torch.Tensor] = []
    chunk = 10 * FRAME_SIZE
    errors = {}
    for widen in (True, False):
        if not widen:
            monkeypatch.setattr(codec_module, "widen_kv_caches", lambda module, extra: None)
        seen.clear()
        with torch.no_grad(), mimi.streaming(1):
            codec_module.widen_kv_caches(mimi.encoder_transformer, 19)
            for i in range(0, len(AUDIO) // chunk * chunk, chunk):
                seen.append(mimi._encode_to_unquantized_latent(torch.from_numpy(AUDIO[i:i + chunk])[None, None]))
        streamed = torch.cat(seen, dim=-1)[0]
        errors[widen] = (streamed - latent[:, : streamed.shape[-1]]).abs().max().item()
    assert errors[True] < 1e-5 and errors[False] > 100 * max(errors[True], 1e-7), errors


def test_batched_encode_equals_one_by_one(mimi):
    short, long_ = AUDIO[: 5 * FRAME_SIZE + 100], AUDIO[: 20 * FRAME_SIZE]
    codec = MimiCodec(mimi, chunk_frames=10)
    batched = codec.encode_streams([[short], [long_]])
    assert torch.equal(batched[0], codec.encode(short)) and torch.equal(batched[1], codec.encode(long_))
    assert batched[0].shape[-1] == 6


def test_silence_frame(mimi):
    codec = MimiCodec(mimi, chunk_frames=25)
    frame = codec.silence_frame(seconds=2.0)
    assert len(frame) == 8 and all(isinstance(c, int) for c in frame)
    steady = codec.encode(np.zeros(3 * 24000, dtype=np.float32))
    assert tuple(steady[:, -1].tolist()) == frame


def test_codec_hash_depends_on_weights(mimi):
    other = load_mimi(ModelSource.make(preset="tiny", seed=5))
    assert MimiCodec(mimi).hash != MimiCodec(other).hash
    assert MimiCodec(mimi).hash == MimiCodec(mimi).hash


# -- cache --------------------------------------------------------------------------------


SHORT = [("100", "book_a", "01_a", 1.0), ("100", "book_a", "02_a", 0.7), ("200", "book_b", "01_b", 0.5)]


def _run(codec, root, **overrides):
    task = LibriLightStreamTask(task_config({"type": "librilight_dir", "path": str(root)},
                                            min_duration_s=0.1, **overrides))
    return task.documents(codec)


def test_second_run_neither_decodes_nor_encodes(codec, tmp_path, monkeypatch):
    root = make_librilight_dir(tmp_path / "ll", SHORT)
    first = _run(codec, root)
    assert codec.n_encoded == 3

    calls = {"encode": 0}
    real = codec.mimi.encode
    monkeypatch.setattr(codec.mimi, "encode", lambda x: (calls.__setitem__("encode", calls["encode"] + 1), real(x))[1])

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded although the codes are cached")

    monkeypatch.setattr(task_module, "iter_audio_24k", no_decoding)
    monkeypatch.setattr(task_module, "probe", no_decoding)
    second = _run(codec, root)
    assert calls["encode"] == 0 and codec.n_encoded == 3
    assert [d.doc_id for d in second] == [d.doc_id for d in first]
    assert all(torch.equal(a.codes, b.codes) and a.meta == b.meta for a, b in zip(first, second))


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage"])
def test_damaged_cache_entry_is_reencoded(codec, tmp_path, damage):
    root = make_librilight_dir(tmp_path / "ll", SHORT)
    first = _run(codec, root)
    entries = codec.cache.entries()
    assert len(entries) == 3 and not list(codec.cache.root.rglob("*.tmp"))
    victim = entries[0]
    data = bytearray(victim.read_bytes())
    if damage == "truncate":
        data = data[: len(data) - 7]
    elif damage == "flip":
        data[-3] ^= 0xFF  # inside the codes, the header still parses
    else:
        data = bytearray(b"\x00" * len(data))
    victim.write_bytes(bytes(data))
    second = _run(codec, root)
    assert codec.n_encoded == 4  # exactly the damaged entry encoded again
    assert all(torch.equal(a.codes, b.codes) for a, b in zip(first, second))
    assert codec.cache.get(victim.stem, codec.hash) is not None  # and rewritten intact


def test_truncated_codes_are_reused_only_when_long_enough(codec):
    audio = AUDIO[: 40 * FRAME_SIZE]
    key = hash_bytes(audio.tobytes())

    def load(max_samples):
        return [audio[:max_samples]]

    short = codec.encode_cached(key, load, duration_s=len(audio) / 24000, max_frames=20)
    assert short.codes.shape[-1] == 20 and not short.complete and codec.n_encoded == 1
    assert torch.equal(codec.encode_cached(key, load, len(audio) / 24000, max_frames=10).codes, short.codes[:, :10])
    assert codec.n_encoded == 1  # a prefix of cached codes is served
    longer = codec.encode_cached(key, load, len(audio) / 24000, max_frames=30)
    assert codec.n_encoded == 2 and longer.codes.shape[-1] == 30
    assert torch.equal(longer.codes[:, :20], short.codes)


def test_cache_info_and_clear(tmp_path, codec):
    codec.cache.put("ab" * 16, codec.hash, CacheEntry(torch.zeros(8, 5, dtype=torch.long), True, 0.4))
    info = cache_info(codec.cache.root)
    assert "entries: 1" in info and codec.hash in info
    assert cache_clear(codec.cache.root) == 1 and codec.cache.entries() == []
    assert "entries: 0" in cache_info(tmp_path / "nowhere")


def test_default_cache_dir_follows_env(tmp_path, monkeypatch):
    monkeypatch.setenv("TTT_BENCH_CACHE", str(tmp_path / "elsewhere"))
    assert CodeCache().root == tmp_path / "elsewhere"
    monkeypatch.delenv("TTT_BENCH_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert CodeCache().root == tmp_path / "xdg" / "ttt_bench" / "codes"
    assert decode_module.frames_for_seconds(2.0) == 25 and decode_module.frames_for_seconds(2.01) == 26
