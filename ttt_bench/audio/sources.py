"""Where recordings come from: one interface over the Hub, local folders and HF datasets.

Every source yields ``AudioItem``s in a deterministic order: an id (LibriLight style
``<speaker>/<book>/<file>``), the encoded audio (bytes or a path; decoding happens later and
lazily) and metadata. Sources never download a whole split: Hub data are streamed.

Source spec (``config.source``, a dict), by ``type``:

- ``webdataset``: WebDataset tar shards, e.g. ``collabora/librilight-webdataset``. Keys:
  ``repo`` (HF dataset repo id; relative ``data_files`` are taken inside it),
  ``data_files`` (pattern or list; local paths, URLs or ``hf://`` paths),
  ``audio_field`` (default ``flac``), ``meta_field`` (default ``json``).
- ``librilight_dir``: ``<path>/<speaker>/<book>/<file>.flac`` with ``<file>.json`` beside it.
  Keys: ``path``, ``extensions`` (default ``[flac, wav, ogg]``).
- ``hf_audio``: any ``datasets`` dataset with an audio column (parquet, audiofolder, a Hub
  repo). Keys: ``path`` (repo id, local dir, or builder name such as ``parquet``), ``name``,
  ``data_files``, ``data_dir``, ``split`` (default ``train``), ``audio_column`` (default
  ``audio``), ``id_column``, ``speaker_column``, ``book_column`` (optional).

Relative local paths are looked up in the working directory, then in the ttt_bench package
(so ``data/librilight_sample`` finds the packaged sample).

A task's ``select:`` (:class:`Selection`) keeps some recordings of any source: ``speakers``,
``books``, ``files`` (globs over ``<speaker>/<book>/<file>`` or the file name) and
``max_chapters`` (the first N recordings of each speaker and book, in source order).
"""

from __future__ import annotations

import fnmatch
import logging
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

logger = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent.parent
AUDIO_EXTENSIONS = ("flac", "wav", "ogg")
SOURCE_TYPES = ("webdataset", "librilight_dir", "hf_audio")


@dataclass
class AudioItem:
    """One recording before decoding."""

    item_id: str
    meta: dict[str, Any] = field(default_factory=dict)
    data: bytes | None = None
    path: Path | None = None

    def read_bytes(self) -> bytes:
        if self.data is not None:
            return self.data
        if self.path is None:
            raise ValueError(f"{self.item_id}: the source gave neither audio bytes nor a path")
        return self.path.read_bytes()

    @property
    def group(self) -> tuple[str, str]:
        """(speaker, book): the recordings a book task may join."""
        return str(self.meta.get("speaker", "")), str(self.meta.get("book", ""))


def resolve_path(path: str | Path, what: str = "path") -> Path:
    """Absolute paths as given; relative ones against the working directory, then the package."""
    p = Path(path).expanduser()
    if p.is_absolute():
        return p
    for base in (Path.cwd(), PACKAGE_DIR):
        if (base / p).exists():
            return (base / p).resolve()
    raise FileNotFoundError(f"{what} {str(path)!r} not found in the working directory ({Path.cwd()}) "
                            f"nor in the ttt_bench package ({PACKAGE_DIR}); give an absolute path")


def librilight_meta(raw: dict[str, Any] | None) -> dict[str, Any]:
    """The useful part of a LibriLight ``.json``: speaker, title, authors, snr, and the voiced
    segments (``voice_activity``, seconds rounded to the millisecond) with their total ``voice_s``."""
    raw = raw or {}
    out: dict[str, Any] = {}
    if "speaker" in raw:
        out["speaker"] = str(raw["speaker"])
    book = raw.get("book_meta") or {}
    if book.get("title"):
        out["title"] = book["title"]
    authors = book.get("authors") or []
    names = [a.get("name", "") if isinstance(a, dict) else str(a) for a in authors]
    if any(names):
        out["authors"] = [n for n in names if n]
    if raw.get("snr") is not None:
        out["snr"] = float(raw["snr"])
    if raw.get("voice_activity"):
        out["voice_s"] = round(sum(float(e) - float(s) for s, e in raw["voice_activity"]), 2)
    if raw.get("voice_activity") is not None:  # [] = LibriLight found no speech: silent, not unknown
        out["voice_activity"] = [[round(float(s), 3), round(float(e), 3)] for s, e in raw["voice_activity"]]
    return out


def _split_id(parts: list[str]) -> dict[str, str]:
    """speaker/book/file from the last three parts of a LibriLight-style key or path."""
    parts = [p for p in parts if p]
    names = ("speaker", "book", "file")[-len(parts[-3:]):]
    return dict(zip(names, parts[-3:]))


# -- WebDataset (Hub or local tars) ----------------------------------------------------------


@dataclass
class WebDatasetSource:
    data_files: list[str]
    repo: str | None = None
    audio_field: str = "flac"
    meta_field: str = "json"

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> "WebDatasetSource":
        files = spec.get("data_files")
        if not files:
            raise ValueError("source type webdataset needs data_files (a tar pattern or list of tars)")
        files = [files] if isinstance(files, str) else list(files)
        repo = spec.get("repo")
        return cls([_data_file(f, repo) for f in files], repo, spec.get("audio_field", "flac"),
                   spec.get("meta_field", "json"))

    @property
    def label(self) -> str:
        return f"webdataset:{self.repo or ','.join(self.data_files)}"

    def __iter__(self) -> Iterator[AudioItem]:
        import datasets

        with reading(self.label):
            for sample in self._stream(datasets):
                key = sample["__key__"]
                parts = _split_id(key.split("/"))
                meta = {"source": self.label, "key": key, **parts, **librilight_meta(sample.get(self.meta_field))}
                meta["speaker"] = parts.get("speaker", meta.get("speaker", ""))
                audio = sample.get(self.audio_field)
                if isinstance(audio, dict):  # Audio(decode=False) on older datasets: {"bytes", "path"}
                    audio = audio.get("bytes")
                yield AudioItem("/".join(parts.values()), meta, data=audio or b"")

    def _stream(self, datasets):
        """The shards, streamed, with the audio as raw bytes (the Audio feature would need
        torchcodec and FFmpeg to decode)."""
        kwargs = {"data_files": {"train": self.data_files}, "split": "train", "streaming": True}
        if hasattr(datasets, "Json"):
            features = datasets.Features({"__key__": datasets.Value("string"), "__url__": datasets.Value("string"),
                                          self.audio_field: datasets.Value("binary"),
                                          self.meta_field: datasets.Json()})
            return datasets.load_dataset("webdataset", features=features, **kwargs)
        # datasets without the Json feature: let it infer the schema, then keep the audio undecoded
        ds = datasets.load_dataset("webdataset", **kwargs)
        return ds.cast_column(self.audio_field, datasets.Audio(decode=False))


@contextmanager
def reading(label: str) -> Iterator[None]:
    """Turn a network failure while streaming a dataset into an error that says what to do
    (requests' and huggingface_hub's connection errors are OSErrors)."""
    try:
        yield
    except OSError as exc:
        if isinstance(exc, (FileNotFoundError, ConnectionError)):
            raise
        raise ConnectionError(
            f"{label}: could not read the dataset ({type(exc).__name__}: {exc}). Without network, point "
            "the task's source at a local copy (type librilight_dir, or webdataset with local data_files) "
            "through --include_path, or use a populated HF cache with HF_DATASETS_OFFLINE=1") from exc


def _data_file(pattern: str, repo: str | None) -> str:
    if "://" in pattern:
        return pattern
    if repo:
        return f"hf://datasets/{repo}/{pattern.lstrip('/')}"
    if Path(pattern).expanduser().is_absolute():
        return str(Path(pattern).expanduser())
    return str(Path.cwd() / pattern)


# -- local LibriLight folder -----------------------------------------------------------------


@dataclass
class LibriLightDirSource:
    root: Path
    extensions: tuple[str, ...] = AUDIO_EXTENSIONS

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> "LibriLightDirSource":
        if not spec.get("path"):
            raise ValueError("source type librilight_dir needs path (the folder holding <speaker>/<book>/<file>.flac)")
        root = resolve_path(spec["path"], "librilight_dir path")
        if not root.is_dir():
            raise NotADirectoryError(f"librilight_dir path {root} is not a directory")
        exts = tuple(e.lower().lstrip(".") for e in spec.get("extensions", AUDIO_EXTENSIONS))
        return cls(root, exts)

    @property
    def label(self) -> str:
        return f"librilight_dir:{self.root}"

    def files(self) -> list[Path]:
        found = [p for p in self.root.rglob("*") if p.is_file() and p.suffix.lower().lstrip(".") in self.extensions]
        if not found:
            logger.warning("no audio files (%s) under %s", ", ".join(self.extensions), self.root)
        return sorted(found, key=lambda p: p.relative_to(self.root).as_posix())

    def __iter__(self) -> Iterator[AudioItem]:
        import json

        for path in self.files():
            rel = PurePosixPath(path.relative_to(self.root).as_posix()).with_suffix("")
            parts = _split_id(list(rel.parts))
            meta: dict[str, Any] = {"source": self.label, "path": str(path), **parts}
            sidecar = path.with_suffix(".json")
            if sidecar.is_file():
                try:
                    meta.update(librilight_meta(json.loads(sidecar.read_text())))
                except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                    logger.warning("%s: unreadable metadata (%s); using the path only", sidecar, exc)
            meta["speaker"] = parts.get("speaker", meta.get("speaker", ""))
            yield AudioItem("/".join(parts.values()), meta, path=path)


# -- any HF audio dataset --------------------------------------------------------------------


@dataclass
class HFAudioSource:
    path: str
    name: str | None = None
    data_files: Any = None
    data_dir: str | None = None
    split: str = "train"
    audio_column: str = "audio"
    id_column: str | None = None
    speaker_column: str | None = None
    book_column: str | None = None

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> "HFAudioSource":
        if not spec.get("path"):
            raise ValueError("source type hf_audio needs path (a Hub dataset id, a local folder, "
                             "or a builder name such as parquet / audiofolder with data_files)")
        keys = ("name", "data_files", "data_dir", "split", "audio_column", "id_column", "speaker_column",
                "book_column")
        kwargs = {k: spec[k] for k in keys if spec.get(k) is not None}
        if kwargs.get("data_dir"):
            kwargs["data_dir"] = _local_or_as_is(kwargs["data_dir"])
        path = _local_or_as_is(spec["path"])
        if Path(path).is_dir() and _is_audio_folder(Path(path)) and "data_dir" not in kwargs:
            path, kwargs["data_dir"] = "audiofolder", path  # a plain folder of audio files
        return cls(path=path, **kwargs)

    @property
    def label(self) -> str:
        return f"hf_audio:{self.path}" + (f"[{self.split}]" if self.split else "")

    def __iter__(self) -> Iterator[AudioItem]:
        import datasets

        kwargs: dict[str, Any] = {}
        if self.path == "audiofolder":
            # the folder builder encodes file paths with the Audio feature, which needs torchcodec;
            # take the paths as strings instead (speaker/book come from the folder layout)
            kwargs = {"features": datasets.Features({self.audio_column: datasets.Value("string")}),
                      "drop_labels": True, "drop_metadata": True}
        with reading(self.label):
            ds = datasets.load_dataset(self.path, self.name, data_files=self.data_files, data_dir=self.data_dir,
                                       split=self.split, streaming=True, **kwargs)
            if ds.features is not None and self.audio_column not in ds.features:
                raise KeyError(f"{self.label}: no audio column {self.audio_column!r}; columns are "
                               f"{', '.join(ds.features)} (set source.audio_column)")
            if ds.features is not None and isinstance(ds.features[self.audio_column], datasets.Audio):
                ds = ds.cast_column(self.audio_column, datasets.Audio(decode=False))
            for index, row in enumerate(ds):
                yield self._item(index, row)

    def _relative_id(self, path: str) -> str:
        """The file's path without extension, relative to data_dir when it lies inside it."""
        p = PurePosixPath(Path(path).as_posix())
        if self.data_dir:
            try:
                p = p.relative_to(Path(self.data_dir).resolve().as_posix())
            except ValueError:
                p = PurePosixPath(*p.parts[-3:])
        elif p.is_absolute():
            p = PurePosixPath(*p.parts[-3:])
        return p.with_suffix("").as_posix()

    def _item(self, index: int, row: dict[str, Any]) -> AudioItem:
        value = row[self.audio_column]
        if isinstance(value, (bytes, bytearray)):
            data, path = value, None
        elif isinstance(value, str):
            data, path = None, value
        else:
            data, path = (value or {}).get("bytes"), (value or {}).get("path")
        if self.id_column:
            item_id = str(row[self.id_column])
        elif path:
            item_id = self._relative_id(str(path))
        else:
            item_id = f"{index:06d}"
        meta: dict[str, Any] = {"source": self.label, "index": index}
        if item_id.count("/") == 2:  # <speaker>/<book>/<file>, as in a LibriLight layout
            meta.update(_split_id(item_id.split("/")))
        for key, column in (("speaker", self.speaker_column), ("book", self.book_column)):
            if column:
                meta[key] = str(row[column])
        local = Path(path) if (path and data is None and Path(path).is_file()) else None
        if data is None and local is None:
            data = b""  # reported as an empty file, not silently dropped
        return AudioItem(item_id, meta, data=bytes(data) if data is not None else None, path=local)


def _is_audio_folder(folder: Path) -> bool:
    """Audio files and no table files (parquet, arrow, csv, jsonl) at the top of ``folder``."""
    tables = {".parquet", ".arrow", ".csv", ".jsonl"}
    if any(p.suffix.lower() in tables for p in folder.iterdir()):
        return False
    return any(p.suffix.lower().lstrip(".") in AUDIO_EXTENSIONS for p in folder.rglob("*"))


def _local_or_as_is(path: str) -> str:
    """A local folder/file (working directory, then package) as an absolute path; anything else
    (``parquet``, ``audiofolder``, ``user/dataset``) unchanged for ``datasets`` to resolve."""
    try:
        return str(resolve_path(path))
    except FileNotFoundError:
        return path


# -- LibriLight on the Hub ------------------------------------------------------------------

LIBRILIGHT_REPO = "collabora/librilight-webdataset"
LIBRILIGHT_SPLITS = {  # task key ``split`` -> the shards at the root of LIBRILIGHT_REPO
    "small": "librilight-small-flac-*.tar",  # 8 shards of about 5 GB, 577 h
    "large": "librilight-large-wo6454-flac-*.tar",
}


def librilight_split_source(spec: dict[str, Any], split: str) -> dict[str, Any]:
    """``spec`` (a webdataset source on the Hub LibriLight repo) reading the shards of ``split``."""
    if split not in LIBRILIGHT_SPLITS:
        raise ValueError(f"split {split!r} is not one of {', '.join(LIBRILIGHT_SPLITS)}")
    if spec.get("type") != "webdataset":
        raise ValueError(f"split applies to the Hub LibriLight source (type webdataset, repo {LIBRILIGHT_REPO}), "
                         f"not to source type {spec.get('type')!r}; remove split or select recordings with select:")
    if spec.get("data_files"):
        raise ValueError(f"give either split or source.data_files ({spec['data_files']!r}), not both")
    return {**spec, "repo": spec.get("repo") or LIBRILIGHT_REPO, "data_files": LIBRILIGHT_SPLITS[split]}


# -- selection -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Selection:
    """Which recordings of a source a task uses (``select:`` in a task config). Empty = all."""

    speakers: tuple[str, ...] | None = None
    books: tuple[str, ...] | None = None
    files: tuple[str, ...] | None = None  # globs over "<speaker>/<book>/<file>" or the file name
    max_chapters: int | None = None  # per speaker and book, the first N in source order

    @classmethod
    def from_spec(cls, spec: dict[str, Any] | None) -> "Selection":
        """From the ``select:`` mapping; ValueError names the key at fault."""
        spec = spec or {}
        if not isinstance(spec, dict):
            raise ValueError(f"select must be a mapping with keys {', '.join(SELECT_KEYS)}, got {spec!r}")
        unknown = sorted(set(spec) - set(SELECT_KEYS))
        if unknown:
            raise ValueError(f"select: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(SELECT_KEYS)}")
        lists = {key: _names(key, spec.get(key)) for key in ("speakers", "books", "files")}
        max_chapters = spec.get("max_chapters")
        if max_chapters is not None and (not isinstance(max_chapters, int) or isinstance(max_chapters, bool)
                                         or max_chapters < 1):
            raise ValueError(f"select.max_chapters must be a positive integer, got {max_chapters!r}")
        return cls(**lists, max_chapters=max_chapters)

    def keeps(self, item: AudioItem) -> bool:
        speaker, book = item.group
        file = str(item.meta.get("file", item.item_id.rsplit("/", 1)[-1]))
        return ((self.speakers is None or speaker in self.speakers)
                and (self.books is None or book in self.books)
                and (self.files is None or any(fnmatch.fnmatchcase(item.item_id, g) or fnmatch.fnmatchcase(file, g)
                                               for g in self.files)))

    def apply(self, items: Iterator[AudioItem]) -> Iterator[AudioItem]:
        taken: Counter = Counter()
        for item in items:
            if not self.keeps(item):
                continue
            if self.max_chapters is not None:
                if taken[item.group] >= self.max_chapters:
                    continue
                taken[item.group] += 1
            yield item


SELECT_KEYS = ("speakers", "books", "files", "max_chapters")


def _names(key: str, value: Any) -> tuple[str, ...] | None:
    """A list of names (a single name or number is a list of one); numbers become strings (speaker 100)."""
    if value is None:
        return None
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in values):
        raise ValueError(f"select.{key} must be a name or a non-empty list of names, got {value!r}")
    return tuple(str(v) for v in values)


def make_source(spec: dict[str, Any]):
    """Build the source described by ``spec`` (``config.source``)."""
    kind = spec.get("type")
    builders = {"webdataset": WebDatasetSource, "librilight_dir": LibriLightDirSource, "hf_audio": HFAudioSource}
    if kind not in builders:
        raise ValueError(f"source.type {kind!r} is not one of {', '.join(SOURCE_TYPES)}")
    return builders[kind].from_spec(spec)
