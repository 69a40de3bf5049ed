"""Synthetic task and test models for the runner tests, and an entry point so they can be used
in a subprocess (``python tests/runner_fixtures.py ARGS`` or ``accelerate launch`` of it).

* task ``synthetic_docs``: documents of random codes with different lengths (``max_frames``
  caps them); document ``poison`` starts with the frame ``POISON`` in every codebook.
* model ``frozen_poisonable``: the frozen scorer, raising inside the model on a ``poison`` row.
* model ``frozen_slow``: the frozen scorer, sleeping ``TTT_BENCH_TEST_SLEEP`` seconds per call
  (so a test can interrupt a run part-way).
* model ``separate_pass``: scores each chunk in a pass of its own (the old bug), so the built-in
  verification fails.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ttt_bench.models.frozen import FrozenScorer  # noqa: E402
from ttt_bench.registry import register_model, register_task  # noqa: E402
from ttt_bench.tasks.base import Document, Task  # noqa: E402

LENGTHS = {"a/long": 48, "b/mid": 35, "c/short": 12, "d/mid2": 27, "e/long2": 41, "f/tiny": 7, "poison": 20,
           "g/mid3": 30}
POISON = 201


def synthetic_documents(max_frames: int | None = None, names: list[str] | None = None) -> list[Document]:
    docs = []
    for i, name in enumerate(names or LENGTHS):
        length = LENGTHS[name] if not max_frames else min(LENGTHS[name], max_frames)
        generator = torch.Generator().manual_seed(1000 + i)
        codes = torch.randint(0, 200, (8, length), generator=generator)
        if name == "poison":
            codes[:, 0] = POISON
        docs.append(Document(name, codes, {"n_frames": length, "duration_s": length / 12.5, "source": "synthetic"}))
    return docs


@register_task("synthetic_docs")
class SyntheticTask(Task):
    standalone = True  # its documents are made here, not read from a source

    def documents(self, codec, limit=None, on_bad_input="skip"):
        docs = synthetic_documents(self.config.max_frames)
        return docs[:limit] if limit else docs


@register_model("frozen_poisonable")
class PoisonableScorer(FrozenScorer):
    name = "frozen_poisonable"

    def score(self, codes, chunk_size=64, layout=None):
        if bool((codes[:, :, 0] == POISON).all(dim=1).any()):
            raise RuntimeError("poisoned document")
        return super().score(codes, chunk_size=chunk_size, layout=layout)


@register_model("frozen_slow")
class SlowScorer(FrozenScorer):
    name = "frozen_slow"

    def score(self, codes, chunk_size=64, layout=None):
        time.sleep(float(os.environ.get("TTT_BENCH_TEST_SLEEP", "0")))
        return super().score(codes, chunk_size=chunk_size, layout=layout)


@register_model("separate_pass")
class SeparatePassScorer(FrozenScorer):
    name = "separate_pass"

    def score(self, codes, chunk_size=64, layout=None):
        parts = [super(SeparatePassScorer, self).score(codes[..., s:s + chunk_size], chunk_size, layout)
                 for s in range(0, codes.shape[-1], chunk_size)]
        return torch.cat(parts, dim=-1)


if __name__ == "__main__":
    from ttt_bench.cli import main

    sys.exit(main())


# ----------------------------------------------------------------------------- test helpers

SCRIPT = Path(__file__).resolve()
REPO = SCRIPT.parents[1]
TIMING = ("seconds", "frames_per_second")  # wall-clock: differs between any two runs


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for a ttt-bench subprocess: the repo importable, no network, moshi's lazy
    torch.compile off (eager, as the in-process tests run with ``no_compile``), same code cache."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "NO_TORCH_COMPILE": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.update(extra)
    return env


def log_lines(run_dir: Path) -> list[dict]:
    """Every parseable line of every process's record log, in file order."""
    import json

    lines = []
    for path in sorted((Path(run_dir) / "records").glob("log.rank*.jsonl")):
        for raw in path.read_text().splitlines():
            try:
                lines.append(json.loads(raw))
            except ValueError:
                pass
    return lines


def _assert_close(got, want, atol: float, where: str) -> None:
    if isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), f"{where}: keys {set(got) ^ set(want)}"
        for key in want:
            if key not in TIMING:
                _assert_close(got[key], want[key], atol, f"{where}.{key}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            _assert_close(g, w, atol, f"{where}[{i}]")
    elif isinstance(want, float) and isinstance(got, float):
        assert abs(got - want) <= atol, f"{where}: {got} != {want}"
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


def assert_same_results(got_dir: Path, want_dir: Path, atol: float = 1e-6) -> None:
    """results.json metrics (all but wall-clock), failures and skips, and every array of
    curves.npz (per-document curves included, same NaN positions) agree within ``atol``."""
    import json

    import numpy as np

    got, want = (json.loads((Path(d) / "results.json").read_text()) for d in (got_dir, want_dir))
    assert got["complete"] is True and want["complete"] is True
    for key in ("results", "failed", "skipped", "baselines"):
        _assert_close(got[key], want[key], atol, key)
    with np.load(Path(got_dir) / "curves.npz") as g, np.load(Path(want_dir) / "curves.npz") as w:
        assert sorted(g.files) == sorted(w.files)
        for key in w.files:
            if w[key].dtype.kind == "f":
                np.testing.assert_allclose(g[key], w[key], rtol=0, atol=atol, equal_nan=True, err_msg=key)
            else:
                assert np.array_equal(g[key], w[key]), key
