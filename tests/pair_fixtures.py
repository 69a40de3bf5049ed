"""Pair datasets as the Hub holds them and as a first online ``load_dataset`` leaves them on disk,
so the pair tasks' real loading code reads them with HF_HUB_OFFLINE=1.

A first online load of ``speed/sBLIMP`` (or ``slprl/SALMon``, config ``bg_alignment``) leaves:

* the repository's files in the hub cache (``datasets--speed--sBLIMP/snapshots/<commit>/``:
  ``README.md`` with the card's ``dataset_info``/``configs``, ``data/train-00000-of-00001.parquet``;
  SALMon: ``bg_alignment/train-00000-of-00001.parquet``), and ``refs/main``;
* the dataset prepared by the Parquet builder in datasets' own cache
  (``<HF_DATASETS_CACHE>/speed___s_blimp/default/0.0.0/<commit>/``: ``dataset_info.json`` and
  ``s_blimp-train.arrow``). Offline, datasets 5 reads only this (its Cache builder), never the
  snapshot.

Both are written here with datasets' own code: the parquet by ``Dataset.to_parquet`` (the
``Audio`` feature in the file's schema metadata, as ``push_to_hub`` writes it) and the prepared
cache by the Parquet builder configured as the Hub module factory configures it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa

from data_fixtures import flac_bytes

COMMIT = "fedcba9876543210fedcba9876543210fedcba98"
SR = 16000


def speed_features():
    from datasets import Audio, Features, Value

    return Features({"id": Value("int64"), "negative": Audio(sampling_rate=SR), "positive": Audio(sampling_rate=SR),
                     "voice": Value("string"), "negative_transcription": Value("string"),
                     "positive_transcription": Value("string"), "type": Value("string"),
                     "subtype": Value("string")})


def salmon_features():
    from datasets import Audio, Features, Value

    return Features({"task": Value("string"), "ind": Value("int64"), "positive_audio": Audio(sampling_rate=SR),
                     "negative_audio": Audio(sampling_rate=SR)})


def audio_cell(seconds: float, seed: int) -> dict[str, Any]:
    return {"bytes": flac_bytes(seconds, sr=SR, seed=seed), "path": f"{seed}.flac"}


def speed_rows(n: int, lengths=(0.6, 1.1, 0.9, 1.4, 0.7)) -> dict[str, list]:
    """``n`` pairs of clips of varied lengths (a positive and a different negative)."""
    return {"id": list(range(n)),
            "negative": [audio_cell(lengths[(i + 1) % len(lengths)], 100 + i) for i in range(n)],
            "positive": [audio_cell(lengths[i % len(lengths)], i) for i in range(n)],
            "voice": ["Alex"] * n, "negative_transcription": [f"neg {i}" for i in range(n)],
            "positive_transcription": [f"pos {i}" for i in range(n)], "type": ["t"] * n, "subtype": ["s"] * n}


def salmon_rows(n: int, task: str) -> dict[str, list]:
    rows = speed_rows(n)
    return {"task": [task] * n, "ind": [10 + i for i in range(n)], "positive_audio": rows["positive"],
            "negative_audio": rows["negative"]}


def _card(features, config_name: str, data_path: str, n_rows: int) -> str:
    import yaml

    feature_yaml = features._to_yaml_list()
    meta = {"dataset_info": {"config_name": config_name, "features": feature_yaml,
                             "splits": [{"name": "train", "num_examples": n_rows}]},
            "configs": [{"config_name": config_name, "data_files": [{"split": "train", "path": data_path}]}]}
    return f"---\n{yaml.safe_dump(meta, sort_keys=False)}---\n"


def write_hub_pair_dataset(repo_id: str, rows: dict[str, list], features, config_name: str = "default",
                           data_dir: str = "data") -> Path:
    """The repository in the hub cache and the prepared dataset in datasets' cache, as a first
    online ``load_dataset(repo_id, config_name, split="train")`` leaves them; returns the snapshot."""
    import datasets
    from datasets.data_files import DataFilesDict, DataFilesList
    from datasets.load import configure_builder_class
    from datasets.naming import camelcase_to_snakecase
    from datasets.packaged_modules.parquet.parquet import Parquet, ParquetConfig
    from huggingface_hub import constants

    repo_dir = Path(constants.HF_HUB_CACHE) / f"datasets--{repo_id.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / COMMIT
    parquet = snapshot / data_dir / "train-00000-of-00001.parquet"
    parquet.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pydict(rows, schema=features.arrow_schema)
    datasets.Dataset(table, info=datasets.DatasetInfo(features=features)).to_parquet(str(parquet))
    n_rows = len(next(iter(rows.values())))
    (snapshot / "README.md").write_text(_card(features, config_name, f"{data_dir}/train-*", n_rows))
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(COMMIT)

    name = camelcase_to_snakecase(repo_id.split("/")[-1])
    # Online, the data files are hf://datasets/<repo>@<commit>/... URLs that the download manager
    # fetches into the hub cache; resolving them needs the network, so the builder reads the
    # snapshot's copy and is given the repository id once built (it names the cache folder).
    files = DataFilesDict({"train": DataFilesList([str(parquet)], origin_metadata=[(repo_id, COMMIT)])})
    builder_cls = configure_builder_class(Parquet, [ParquetConfig(name=config_name, data_files=files)],
                                          default_config_name=config_name, dataset_name=name)
    builder = builder_cls(dataset_name=name, config_name=config_name, hash=COMMIT, base_path=str(snapshot))
    builder.repo_id = repo_id
    builder._cache_dir = builder._output_dir = builder._build_cache_dir()
    builder.download_and_prepare()
    return snapshot
