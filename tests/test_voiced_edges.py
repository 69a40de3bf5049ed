"""Voiced metrics at the edges: a chapter cut mid-book, deltas where one side lacks voice
activity, an empty voice_activity list."""

from __future__ import annotations

import json

import numpy as np

from data_fixtures import SR, librilight_json
from test_voiced import BOOK, SEGMENTS, chapter, config, write_chapter
from ttt_bench.audio.decode import probe
from ttt_bench.constants import FRAME_RATE
from ttt_bench.tasks.librilight_stream import LibriLightStreamBookTask


def test_a_chapter_cut_mid_book_keeps_its_segments_inside_it(tmp_path, codec):
    """A chapter whose encoding fails inside a batch leaves the next chapter cut short (planned
    against the failed one's frames) in the middle of the book: that chapter's voiced segments
    must end with its own frames, not spill into the next chapter's."""
    import soundfile as sf

    folder = tmp_path / "ll" / "100" / BOOK
    write_chapter(folder, "01_ch", seed=1)
    write_chapter(folder, "02_ch", seed=3)  # cut below: fails at encoding (header promises more)
    good = (folder / "02_ch.flac").read_bytes()
    (folder / "02_ch.flac").write_bytes(good[: len(good) // 2])
    # chapter 3 is voiced throughout; chapter 4 only in its last second
    folder.mkdir(parents=True, exist_ok=True)
    sf.write(folder / "03_ch.flac", chapter(5), SR, format="FLAC")
    (folder / "03_ch.json").write_text(json.dumps({**librilight_json("100", BOOK, 16.0),
                                                   "voice_activity": [[0.0, 16.0]]}))
    sf.write(folder / "04_ch.flac", chapter(7), SR, format="FLAC")
    (folder / "04_ch.json").write_text(json.dumps({**librilight_json("100", BOOK, 16.0), "voice_activity": [[15.0, 16.0]]}))
    first = probe(folder / "01_ch.flac").n_frames  # 200 frames a chapter
    budget = 3 * first - 100  # ch1 + ch2 (planned) + half of ch3 fill it; ch2 fails -> ch4 follows
    [doc] = LibriLightStreamBookTask(config(tmp_path / "ll", concat_book=True, max_frames=budget)
                                     ).documents(codec, batch_size=4)
    files = doc.meta["files"]
    assert [f.rsplit("/", 1)[-1] for f in files] == ["01_ch", "03_ch", "04_ch"]
    ch3_frames = budget - 2 * first  # cut against the failed chapter's planned frames
    start4 = (first + ch3_frames) / FRAME_RATE
    assert doc.meta["voice_activity"] == SEGMENTS + [[first / FRAME_RATE, start4], [start4 + 15.0, start4 + 16.0]]


def test_deltas_where_only_one_model_carries_voice_activity(caplog):
    """The baseline's records without voice activity (persisted by a version before it: --resume does
    not hash the version) and the model's with it: the deltas leave the voiced metrics out, with a
    warning naming them, instead of raising KeyError, in either direction."""
    from ttt_bench.config import StreamTaskConfig
    from ttt_bench.metrics import DocRecord, compare_to_baseline

    cfg = StreamTaskConfig(task="t", source={"type": "x"}, positions=[10], window=4, early_late_frames=5,
                           segments=[[0, 10]], bootstrap_iters=50)
    rng = np.random.default_rng(0)

    def records(voiced: bool) -> list[DocRecord]:
        out = []
        for i in range(4):
            nll = rng.uniform(1, 3, (8, 40))
            nll[1:, -1] = np.nan
            out.append(DocRecord(f"d{i}", {"voice_activity": [[0.0, 1.0]]} if voiced else {}, nll))
        return out

    with_va, without = records(True), records(False)
    for model, base in ((with_va, without), (without, with_va)):
        caplog.clear()
        d = compare_to_baseline(model, base, cfg)
        assert "no delta for silence_mean_nll, voiced_early_nll" in caplog.text  # said, not silent
        assert d["n"]["mean_nll"] == 4 and d["mde"]["mean_nll"] is not None
        assert not any(k.startswith(("voiced", "silence")) for k in (*d["delta"], *d["mde"]))


def test_an_empty_voice_activity_is_silence_not_unknown(tmp_path, codec):
    """A LibriLight .json whose voice_activity is [] (no speech found) is taken as it is: every
    frame silent, source librilight_json; the energy detector is for recordings without one."""
    from test_voiced import write_chapter as _write
    from ttt_bench.audio.voice import SOURCE_JSON
    from ttt_bench.tasks.librilight_stream import LibriLightStreamTask

    folder = tmp_path / "ll" / "100" / BOOK
    _write(folder, "01_ch", seed=1)
    (folder / "01_ch.json").write_text(json.dumps({**librilight_json("100", BOOK, 16.0), "voice_activity": []}))
    [doc] = LibriLightStreamTask(config(tmp_path / "ll")).documents(codec)
    assert doc.meta["voice_source"] == SOURCE_JSON and doc.meta["voice_activity"] == []
