"""Document selection: bad input reported (or fatal), book joining, limits, the packaged sample."""

from __future__ import annotations

import json
import math

import pytest
import torch

from data_fixtures import flac_bytes, make_librilight_dir, task_config
from ttt_bench.tasks.librilight_stream import LibriLightStreamBookTask, LibriLightStreamTask

LAYOUT = [("100", "book_a", "01_a", 1.2), ("100", "book_a", "02_a", 0.9), ("100", "book_a", "03_a", 0.8),
          ("200", "book_b", "01_b", 0.6)]


@pytest.fixture
def root(tmp_path):
    return make_librilight_dir(tmp_path / "ll", LAYOUT)


def source(root) -> dict:
    return {"type": "librilight_dir", "path": str(root)}


def add_bad_files(root):
    bad = root / "300" / "book_c"
    bad.mkdir(parents=True)
    (bad / "01_corrupt.flac").write_bytes(b"fLaC" + bytes(range(256)) * 4)
    (bad / "02_empty.flac").write_bytes(b"")
    good = flac_bytes(2.0, seed=9)
    (bad / "03_cut.flac").write_bytes(good[: len(good) // 2])  # header promises more than is there
    (bad / "04_short.flac").write_bytes(flac_bytes(0.2))
    return {"300/book_c/01_corrupt": "does not decode", "300/book_c/02_empty": "empty",
            "300/book_c/03_cut": "", "300/book_c/04_short": "too short"}


def test_bad_inputs_are_skipped_with_reasons(root, codec):
    expected = add_bad_files(root)
    task = LibriLightStreamTask(task_config(source(root), min_duration_s=0.5))
    docs = task.documents(codec)
    assert [d.doc_id for d in docs] == [f"{s}/{b}/{f}" for s, b, f, _ in LAYOUT]
    assert [s.doc_id for s in task.skipped] == list(expected)
    for skipped in task.skipped:
        assert expected[skipped.doc_id] in skipped.reason and skipped.reason
    assert "0.2 s < min_duration_s 0.5" in task.skipped[-1].reason


@pytest.mark.parametrize("bad", ["01_corrupt", "02_empty", "04_short"])
def test_on_bad_input_fail_names_the_file(root, codec, bad):
    add_bad_files(root)
    for other in (root / "300" / "book_c").glob("*.flac"):
        if other.stem != bad:
            other.unlink()
    task = LibriLightStreamTask(task_config(source(root), min_duration_s=0.5))
    with pytest.raises(ValueError, match=f"300/book_c/{bad}.*--on_bad_input skip"):
        task.documents(codec, on_bad_input="fail")


def test_truncation_limit_and_order(root, codec):
    task = LibriLightStreamTask(task_config(source(root), min_duration_s=0.5, max_frames=12))
    docs = task.documents(codec, limit=3)
    assert [d.doc_id for d in docs] == ["100/book_a/01_a", "100/book_a/02_a", "100/book_a/03_a"]
    assert [d.n_frames for d in docs] == [12, 12, 10]  # 1.2 s (15 frames) cut; 0.9 s, 0.8 s kept whole
    assert [d.meta["truncated"] for d in docs] == [True, False, False]
    assert docs[0].meta["duration_s"] == pytest.approx(1.2)
    again = LibriLightStreamTask(task_config(source(root), min_duration_s=0.5, max_frames=12)).documents(codec, limit=3)
    assert all(torch.equal(a.codes, b.codes) for a, b in zip(docs, again))


def test_book_task_joins_chapters_in_order(root, codec):
    single = {d.doc_id: d for d in LibriLightStreamTask(task_config(source(root), min_duration_s=0.1)).documents(codec)}
    task = LibriLightStreamBookTask(task_config(source(root), min_duration_s=0.7, max_frames=30,
                                                **{"class": "librilight_stream_book"}))
    docs = task.documents(codec)
    assert [d.doc_id for d in docs] == ["100/book_a"]
    book = docs[0]
    # 15 + 12 frames whole, then 3 of the third chapter's 10
    assert book.meta["files"] == ["100/book_a/01_a", "100/book_a/02_a", "100/book_a/03_a"]
    assert book.n_frames == 30 and book.meta["truncated"]
    expected = torch.cat([single[f].codes for f in book.meta["files"]], dim=-1)[:, :30]
    assert torch.equal(book.codes, expected)
    assert book.meta["duration_s"] == pytest.approx(1.2 + 0.9 + 0.8)
    # book_b has one 0.6 s chapter: under min_duration_s, reported
    assert [(s.doc_id, "too short" in s.reason) for s in task.skipped] == [("200/book_b", True)]


def test_book_task_skips_a_bad_chapter_and_goes_on(root, codec):
    (root / "100" / "book_a" / "02_a.flac").write_bytes(b"not audio at all")
    task = LibriLightStreamBookTask(task_config(source(root), min_duration_s=0.1, max_frames=1000))
    docs = task.documents(codec)
    assert docs[0].meta["files"] == ["100/book_a/01_a", "100/book_a/03_a"]
    assert docs[0].n_frames == 15 + 10
    assert [s.doc_id for s in task.skipped] == ["100/book_a/02_a"]


def test_packaged_sample(codec):
    from ttt_bench.registry import get_task

    task = get_task("librilight_sample_book", max_frames=40)
    docs = task.documents(codec, limit=1)
    assert docs[0].doc_id == "1001/alice_in_wonderland_librivox_64kb_mp3"
    assert docs[0].n_frames == 40 and docs[0].meta["files"] == [
        "1001/alice_in_wonderland_librivox_64kb_mp3/01_carroll_alice_64kb"]
    assert docs[0].meta["title"] == "Alice's Adventures in Wonderland" and task.skipped == []

    sample = get_task("librilight_sample").source_spec
    from ttt_bench.audio.decode import probe
    from ttt_bench.audio.sources import make_source

    items = list(make_source(sample))
    assert len(items) == 3 and len({it.group for it in items}) == 2
    total = 0
    for item in items:
        info = probe(item.path)
        meta = json.loads(item.path.with_suffix(".json").read_text())
        assert (info.sample_rate, info.channels, info.format) == (16000, 1, "FLAC")
        assert 60 <= info.duration_s <= 120 and math.isfinite(meta["snr"])
        assert meta["voice_activity"][0][0] < meta["voice_activity"][-1][1] <= info.duration_s
        total += item.path.stat().st_size + item.path.with_suffix(".json").stat().st_size
    assert total <= 5_000_000


def test_limit_reads_no_further_than_needed(root, codec, monkeypatch):
    from ttt_bench.tasks import librilight_stream as task_module

    config = task_config(source(root), min_duration_s=0.5)
    LibriLightStreamTask(config).documents(codec)  # fill the cache
    pulled = []

    def counting_source(spec):
        for item in task_module.__dict__["_real_make_source"](spec):
            pulled.append(item.item_id)
            yield item

    monkeypatch.setitem(task_module.__dict__, "_real_make_source", task_module.make_source)
    monkeypatch.setattr(task_module, "make_source", counting_source)
    for batch_size in (1, 8):
        pulled.clear()
        docs = LibriLightStreamTask(config).documents(codec, limit=2, batch_size=batch_size)
        assert [d.doc_id for d in docs] == ["100/book_a/01_a", "100/book_a/02_a"]
        assert pulled == ["100/book_a/01_a", "100/book_a/02_a"]
