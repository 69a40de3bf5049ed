"""select: (speakers, books, file globs, max_chapters) on a local LibriLight folder and a local
WebDataset shard; the seed-system book; the split of the Hub LibriLight tasks."""

from __future__ import annotations

import pytest

from data_fixtures import make_librilight_dir, make_webdataset_tar
from ttt_bench.audio.sources import WebDatasetSource
from ttt_bench.cli import main
from ttt_bench.config import ConfigError
from ttt_bench.registry import get_task

EMERALD = "emerald_city_librivox_64kb_mp3"
LAYOUT = [("100", EMERALD, f"emeraldcity_{i:02d}_baum_64kb", 0.4) for i in range(1, 5)] + [
    ("100", "sea_fairies_0812_librivox_64kb_mp3", "01_baum_sea_fairies_64kb", 0.3),
    ("1001", EMERALD, "emeraldcity_01_baum_64kb", 0.3),
    ("200", "wizard_oz_librivox_64kb_mp3", "01_baum_wizard_oz_64kb", 0.3),
    ("200", "wizard_oz_librivox_64kb_mp3", "02_baum_wizard_oz_64kb", 0.3),
]
ALL = [f"{s}/{b}/{f}" for s, b, f, _ in LAYOUT]


@pytest.fixture(scope="module")
def codec(mimi, tmp_path_factory):
    """One code cache for the module: every selection reads the same recordings."""
    from ttt_bench.audio.cache import CodeCache
    from ttt_bench.audio.codec import MimiCodec

    return MimiCodec(mimi, cache=CodeCache(tmp_path_factory.mktemp("codes")), chunk_frames=25)


@pytest.fixture(scope="module", params=["folder", "shard"])
def source(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    if request.param == "folder":
        return {"type": "librilight_dir", "path": str(make_librilight_dir(tmp / "ll", LAYOUT))}
    make_webdataset_tar(tmp / "librilight-small-flac-000000.tar", LAYOUT)
    return {"type": "webdataset", "data_files": str(tmp / "librilight-small-flac-*.tar")}


def doc_ids(task_name, source, codec, **overrides):
    task = get_task(task_name, source=source, split=None, min_duration_s=0, **overrides)
    return [d.doc_id for d in task.documents(codec)], task


@pytest.mark.parametrize("select,expected", [
    ({}, ALL),
    ({"speakers": [100]}, ALL[:5]),
    ({"speakers": ["200", "1001"]}, ALL[5:]),
    ({"books": [EMERALD]}, ALL[:4] + ALL[5:6]),
    ({"speakers": "100", "books": EMERALD, "max_chapters": 2}, ALL[:2]),
    ({"max_chapters": 1}, [ALL[0], ALL[4], ALL[5], ALL[6]]),
    ({"files": ["*/wizard_oz_librivox_64kb_mp3/02_*", "emeraldcity_03_*"]}, [ALL[2], ALL[7]]),
])
def test_select_picks_exactly_the_named_recordings(source, codec, select, expected):
    ids, _ = doc_ids("librilight_stream", source, codec, select=select)
    assert ids == expected


def test_seed_book_is_the_first_three_chapters_of_speaker_100_joined(source, codec):
    single = {d.doc_id: d for d in get_task("librilight_stream", source=source, split=None,
                                            min_duration_s=0).documents(codec)}
    task = get_task("librilight_seed_book", source=source, split=None)
    [doc] = task.documents(codec)
    assert doc.doc_id == f"100/{EMERALD}"
    assert doc.meta["files"] == ALL[:3]
    assert doc.n_frames == sum(single[f].n_frames for f in ALL[:3])


def test_seed_book_config_points_at_the_seed_systems_document():
    task = get_task("librilight_seed_book")
    config = task.config
    assert config.task_class == "librilight_stream_book" and config.concat_book and config.max_frames == 25000
    assert (task.selection.speakers, task.selection.books, task.selection.max_chapters) == (("100",), (EMERALD,), 3)
    source = WebDatasetSource.from_spec(task.source_spec)
    assert source.data_files == ["hf://datasets/collabora/librilight-webdataset/librilight-small-flac-*.tar"]


@pytest.mark.parametrize("task_name", ["librilight_stream", "librilight_stream_book"])
@pytest.mark.parametrize("split,shards", [(None, "librilight-small-flac-*.tar"),
                                          ("small", "librilight-small-flac-*.tar"),
                                          ("large", "librilight-large-wo6454-flac-*.tar")])
def test_split_picks_the_shards_at_the_repository_root(task_name, split, shards):
    task = get_task(task_name, **({"split": split} if split else {}))
    source = WebDatasetSource.from_spec(task.source_spec)
    assert source.data_files == [f"hf://datasets/collabora/librilight-webdataset/{shards}"]


def test_unknown_split_is_refused_with_the_choices(capsys):
    with pytest.raises(ConfigError, match=r"key 'split' must be one of small, large, got 'medium'"):
        get_task("librilight_stream", split="medium")
    assert main(["--model", "frozen", "--model_args", "preset=tiny", "--tasks", "librilight_stream",
                 "--task_args", "split=medium"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "small, large" in err


@pytest.mark.parametrize("overrides,message", [
    ({"select": {"speaker": ["100"]}}, "select: unknown key.*speaker.*valid keys: speakers"),
    ({"select": {"max_chapters": 0}}, "select.max_chapters must be a positive integer"),
    ({"select": {"books": []}}, "select.books must be a name or a non-empty list"),
    ({"split": "small", "source": {"type": "librilight_dir", "path": "x"}}, "split applies to the Hub"),
    ({"split": "large", "source": {"type": "webdataset", "data_files": "a.tar"}}, "either split or source.data_files"),
])
def test_bad_select_or_split_names_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        get_task("librilight_stream", **overrides)
