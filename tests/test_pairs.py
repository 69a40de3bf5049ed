"""Pair-likelihood tasks (sWUGGY, sBLIMP, s/tStoryCloze, SALMon) on fixture datasets in the exact
Hub layouts, read by the real loading code with HF_HUB_OFFLINE=1 (tests/pair_fixtures.py).

Datasets used here (written once per module into the session's private HF cache):
speed/sBLIMP (6 pairs of clips of different lengths), slprl/SALMon (each of the 8 configs, 2
pairs), speed/tStoryCloze (positive == negative), speed/sStoryCloze (a clip that does not decode
and one shorter than a frame among good pairs) and speed/sWUGGY (wrong column names).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from moshi.utils.compile import no_compile

from data_fixtures import flac_bytes
from pair_fixtures import (SR, salmon_features, salmon_rows, speed_features, speed_rows,
                           write_hub_pair_dataset)
from ttt_bench.evaluation.batching import BatchScorer, mask_past_end
from ttt_bench.cli import main
from ttt_bench.metrics import DocRecord, ModelShape
from ttt_bench.models.base import StreamLayout
from ttt_bench.registry import get_model, get_task
from evaluate_helper import evaluate_run
from ttt_bench.tasks.pairs import CODEBOOKS, PairMetrics, PairTaskConfig, clip_nll, load_rows

SALMON = ("bg_alignment", "bg_all_consistency", "bg_domain_consistency", "gender_consistency",
          "rir_consistency", "sentiment_alignment", "sentiment_consistency", "speaker_consistency")
N_BLIMP = 6


@pytest.fixture(autouse=True)
def _eager():
    with no_compile():
        yield


@pytest.fixture(scope="module", autouse=True)
def hub_datasets():
    write_hub_pair_dataset("speed/sBLIMP", speed_rows(N_BLIMP), speed_features())
    for i, config in enumerate(SALMON):
        write_hub_pair_dataset("slprl/SALMon", salmon_rows(2, config), salmon_features(), config, config)
    same = speed_rows(3)
    write_hub_pair_dataset("speed/tStoryCloze", {**same, "negative": same["positive"]}, speed_features())
    bad = speed_rows(4)
    bad["negative"][1] = {"bytes": b"this is not audio", "path": "broken.flac"}
    bad["positive"][2] = {"bytes": flac_bytes(0.03, sr=SR, seed=7), "path": "short.flac"}
    write_hub_pair_dataset("speed/sStoryCloze", bad, speed_features())
    wrong = speed_rows(2)
    wrong["good"], wrong["bad"] = wrong.pop("positive"), wrong.pop("negative")
    from datasets import Features

    features = Features({k: (speed_features()["positive"] if k in ("good", "bad") else v)
                         for k, v in speed_features().items() if k not in ("positive", "negative")}
                        | {"good": speed_features()["positive"], "bad": speed_features()["negative"]})
    write_hub_pair_dataset("speed/sWUGGY", wrong, features)


def run(tmp_path: Path, tasks: list[str], models=("frozen",), model_args=None, **kwargs) -> dict:
    return evaluate_run(models, tasks, model_args={"preset": "tiny", **(model_args or {})},
                        chunk_size=16, device="cpu", output_path=str(tmp_path / "run"), **kwargs)


def samples(tmp_path: Path, task: str, model: str = "frozen") -> dict[str, dict]:
    lines = map(json.loads, (tmp_path / "run" / "samples.jsonl").read_text().splitlines())
    return {s["doc_id"]: s for s in lines if s["task"] == task and s["model"] == model}


# ----------------------------------------------------------------------------- data


def test_hub_layouts_load_offline_as_pairs_of_documents(codec):
    docs = get_task("sblimp").documents(codec)
    assert [d.doc_id for d in docs[:4]] == ["000000/positive", "000000/negative", "000001/positive",
                                           "000001/negative"]
    assert len(docs) == 2 * N_BLIMP and len({d.n_frames for d in docs}) > 2  # clips of several lengths
    assert docs[0].meta["role"] == "positive" and docs[0].meta["source"] == "speed/sBLIMP[train]"
    salmon = get_task("salmon_rir_consistency").documents(codec, limit=1)
    assert [d.doc_id for d in salmon] == ["000000/positive", "000000/negative"]
    assert salmon[0].meta["task"] == "rir_consistency" and salmon[0].meta["id"] == 10  # the `ind` column
    again = get_task("sblimp").documents(codec)  # second time: every clip from the code cache
    assert all(torch.equal(a.codes, b.codes) for a, b in zip(docs, again))


def test_a_dataset_without_the_expected_columns_is_refused_in_one_line(tmp_path, capsys):
    code = main(["--model", "frozen", "--model_args", "preset=tiny", "--tasks", "swuggy",
                 "--output_path", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert "dataset speed/sWUGGY[train]: columns found: id, voice" in err
    assert "expected: positive, negative (missing positive, negative)" in err and "good, bad" in err
    assert not (tmp_path / "run").exists()


def test_bad_clips_skip_their_pair_and_are_reported_or_stop_the_run(tmp_path, capsys):
    results = run(tmp_path, ["sstorycloze"])
    skipped = {s["doc_id"]: s["reason"] for s in results["skipped"]["sstorycloze"]}
    assert set(skipped) == {"000001", "000002"}
    assert "negative clip: does not decode as audio" in skipped["000001"]
    assert "positive clip: shorter than one frame (30 ms < 80 ms)" in skipped["000002"]
    assert results["results"]["sstorycloze"]["frozen"]["n_pairs"] == 2
    assert "sstorycloze: 2 input(s) skipped (first: 000001" in (tmp_path / "run" / "leaderboard.md").read_text()
    capsys.readouterr()
    code = main(["--model", "frozen", "--model_args", "preset=tiny", "--tasks", "sstorycloze",
                 "--on_bad_input", "fail", "--output_path", str(tmp_path / "failed")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "pair 000001 of speed/sStoryCloze[train]: negative clip: does not decode" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "failed").exists()


# ----------------------------------------------------------------------------- metrics


@pytest.fixture(scope="module")
def frozen():
    return get_model("frozen", preset="tiny", seed=0)


def own_pair_scores(scorer, codec, task_name: str, codebooks: str, limit=None, **overrides
                    ) -> list[tuple[float, float, int, int]]:
    """(positive, negative) summed NLL and frames, each clip scored alone by the scorer itself."""
    docs = get_task(task_name, **overrides).documents(codec, limit=limit)
    sums = []
    for doc in docs:
        nll = scorer.score(doc.codes[None], chunk_size=16, layout=StreamLayout())[0].numpy()
        rows = nll[CODEBOOKS[codebooks]]
        sums.append((float(np.nansum(rows.astype(np.float64))), doc.n_frames))
    return [(p[0], n[0], p[1], n[1]) for p, n in zip(sums[::2], sums[1::2])]


def expected_acc(pairs) -> tuple[float, float]:
    def cmp(a, b):
        return 1.0 if a < b else 0.0 if a > b else 0.5

    return (float(np.mean([cmp(p, n) for p, n, _, _ in pairs])),
            float(np.mean([cmp(p / fp, n / fn) for p, n, fp, fn in pairs])))


@pytest.mark.parametrize("codebooks", ["semantic", "all"])
def test_acc_and_acc_norm_equal_the_scorers_own_per_clip_nll(tmp_path, frozen, codec, codebooks):
    results = run(tmp_path, ["sblimp"], task_overrides={"codebooks": codebooks})
    m = results["results"]["sblimp"]["frozen"]
    pairs = own_pair_scores(frozen, codec, "sblimp", codebooks)
    acc, acc_norm = expected_acc(pairs)
    assert m["n_pairs"] == N_BLIMP and m["acc"] == pytest.approx(acc, abs=1e-12)
    assert m["acc_norm"] == pytest.approx(acc_norm, abs=1e-12) and m["codebooks"] == codebooks
    lines = samples(tmp_path, "sblimp")
    for i, (pos, neg, _, _) in enumerate(pairs):
        assert lines[f"{i:06d}"]["nll_positive"] == pytest.approx(pos, rel=1e-5)
        assert lines[f"{i:06d}"]["nll_negative"] == pytest.approx(neg, rel=1e-5)
    assert m["ci"]["acc"] is not None and m["ci"]["acc"][0] <= m["acc"] <= m["ci"]["acc"][1]
    board = (tmp_path / "run" / "leaderboard.md").read_text()
    assert "| acc " in board and "acc_norm" in board and "mean_nll" not in board and "| pairs" in board


def test_codebook_selection_changes_which_nll_is_summed(frozen, codec):
    semantic = own_pair_scores(frozen, codec, "sblimp", "semantic", limit=2)
    acoustic = own_pair_scores(frozen, codec, "sblimp", "acoustic", limit=2)
    every = own_pair_scores(frozen, codec, "sblimp", "all", limit=2)
    for s, a, e in zip(semantic, acoustic, every):
        assert s[0] != a[0] and e[0] == pytest.approx(s[0] + a[0], rel=1e-9)


def test_ties_count_half_and_swapping_gives_one_minus_acc():
    config = PairTaskConfig.from_dict({"task": "pairs", "source": {"path": "unused"}, "bootstrap_iters": 100})
    metrics = PairMetrics(config, ModelShape(card=256, delays=[0, 1, 1, 1, 1, 1, 1, 1]))
    rng = np.random.default_rng(0)

    def records(swap: bool, tie_at: int) -> list[DocRecord]:
        out = []
        for i in range(8):
            pos, neg = rng.random((8, 5 + i)).astype(np.float32), rng.random((8, 7)).astype(np.float32)
            if i == tie_at:
                neg = pos.copy()
            for role, nll in zip(("negative", "positive") if swap else ("positive", "negative"), (pos, neg)):
                out.append(DocRecord(f"{i}/{role}", {"pair": str(i), "role": role}, nll))
        return out

    summary = metrics.summarize(records(False, tie_at=3))
    m = metrics.model_metrics(summary)
    by_pair = {p.pair_id: p for p in summary.pairs}
    assert by_pair["3"].acc == 0.5 and by_pair["3"].acc_norm == 0.5
    expected = np.mean([1.0 if p.nll[0] < p.nll[1] else 0.0 if p.nll[0] > p.nll[1] else 0.5 for p in summary.pairs])
    assert m["acc"] == expected
    rng = np.random.default_rng(0)
    swapped = metrics.model_metrics(metrics.summarize(records(True, tie_at=3)))
    assert swapped["acc"] == pytest.approx(1 - m["acc"]) and swapped["acc_norm"] == pytest.approx(1 - m["acc_norm"])


def test_identical_clips_give_one_half_and_swapped_columns_give_one_minus_acc(tmp_path):
    same = run(tmp_path / "same", ["tstorycloze"])["results"]["tstorycloze"]["frozen"]
    assert same["acc"] == 0.5 and same["acc_norm"] == 0.5 and same["n_pairs"] == 3
    straight = run(tmp_path / "a", ["sblimp"])["results"]["sblimp"]["frozen"]
    swapped = run(tmp_path / "b", ["sblimp"], task_overrides={"positive_column": "negative",
                                                               "negative_column": "positive"})
    swapped = swapped["results"]["sblimp"]["frozen"]
    assert swapped["acc"] == pytest.approx(1 - straight["acc"], abs=1e-12)
    assert swapped["acc_norm"] == pytest.approx(1 - straight["acc_norm"], abs=1e-12)


def test_clips_of_mixed_length_batched_score_as_alone(frozen, codec):
    scorer = frozen
    docs = get_task("sblimp").documents(codec)
    layout = StreamLayout()
    batched, _ = BatchScorer(scorer, 16, layout).score(docs)
    delays = list(scorer.lm.delays[scorer.lm.audio_offset:scorer.lm.audio_offset + scorer.lm.dep_q])
    assert len({d.n_frames for d in docs}) > 2
    for doc, record in zip(docs, batched):
        alone = mask_past_end(scorer.score(doc.codes[None], chunk_size=16, layout=layout)[0].float(), delays)
        np.testing.assert_allclose(record.nll, alone.numpy(), atol=1e-5, rtol=0, equal_nan=True)
        for books in CODEBOOKS.values():
            assert clip_nll(record.nll, books, delays)[0] == pytest.approx(
                clip_nll(alone.numpy(), books, delays)[0], abs=1e-5 * len(books) * doc.n_frames)


# ----------------------------------------------------------------------------- runs


def test_salmon_group_runs_its_members_and_reports_their_mean(tmp_path, capsys):
    code = main(["--model", "frozen,dyneval", "--model_args", "preset=tiny,dyneval.lr=1e-2", "--tasks", "salmon",
                 "--limit", "1", "--chunk_size", "16", "--output_path", str(tmp_path / "run")])
    assert code == 0, capsys.readouterr().err
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    members = [f"salmon_{c}" for c in SALMON]
    assert list(results["results"]) == members and results["group_subtasks"]["salmon"] == members
    for model in ("frozen", "dyneval"):
        assert all(results["results"][t][model]["n_pairs"] == 1 for t in members)  # --limit counts pairs
        group = results["groups"]["salmon"][model]
        for metric in ("acc", "acc_norm"):
            assert group[metric] == pytest.approx(np.mean([results["results"][t][model][metric] for t in members]))
    delta = results["groups"]["salmon"]["dyneval"]["delta_vs_baseline"]
    assert delta["baseline"] == "frozen" and delta["delta"]["acc"] == pytest.approx(
        results["groups"]["salmon"]["dyneval"]["acc"] - results["groups"]["salmon"]["frozen"]["acc"])
    board = (tmp_path / "run" / "leaderboard.md").read_text()
    assert "### salmon (group)" in board and "### salmon_bg_alignment" in board
    assert not (tmp_path / "run" / "loss_vs_position.png").exists()


# dyneval scores one clip at a time (its weights are shared by the rows of a batch), so frozen
# is run alike: batching changes a score by float rounding only (tested above), not exactly.
@pytest.mark.parametrize("model,args,batch", [("ttt", {"gate_init": 0.0}, 3), ("dyneval", {"lr": 0.0}, 1)])
def test_gate_zero_and_lr_zero_equal_frozen_exactly_on_pairs(tmp_path, model, args, batch):
    results = run(tmp_path, ["sblimp", "salmon_speaker_consistency"], models=("frozen", model),
                  model_args={f"{model}.{k}": v for k, v in args.items()}, batch_size=batch)
    for task in ("sblimp", "salmon_speaker_consistency"):
        frozen, other = results["results"][task]["frozen"], results["results"][task][model]
        assert other["acc"] == frozen["acc"] and other["acc_norm"] == frozen["acc_norm"]
        assert other["delta_vs_baseline"]["delta"] == {"acc": 0.0, "acc_norm": 0.0}
        mine, theirs = samples(tmp_path, task, model), samples(tmp_path, task, "frozen")
        assert {k: (v["nll_positive"], v["nll_negative"]) for k, v in mine.items()} == \
            {k: (v["nll_positive"], v["nll_negative"]) for k, v in theirs.items()}


def test_every_adapter_runs_the_pair_tasks(tmp_path):
    results = run(tmp_path, ["sblimp"], models=("frozen", "ttt", "legacy", "dyneval"),
                  model_args={"ttt.gate_init": 0.5, "dyneval.lr": 1e-2}, limit=2)
    for model in ("frozen", "ttt", "legacy", "dyneval"):
        m = results["results"]["sblimp"][model]
        assert m["n_pairs"] == 2 and 0.0 <= m["acc"] <= 1.0 and 0.0 <= m["acc_norm"] <= 1.0
    nll = {model: samples(tmp_path, "sblimp", model)["000000"]["nll_positive"] for model in ("frozen", "ttt")}
    assert nll["ttt"] != nll["frozen"]  # the TTT layers with a non-zero gate change the score


def test_the_bundled_zeroshot_sample_is_read_by_the_same_code(codec):
    task = get_task("zeroshot_sample")
    rows = list(load_rows(task.config.source, task.config.columns, ["positive", "negative"]))
    assert len(rows) == 30 and sorted({r["type"] for r in rows}) == ["lexical", "story", "syntax"]
    assert all(r["positive"]["bytes"] != r["negative"]["bytes"] for r in rows)
    docs = task.documents(codec, limit=2)
    assert [d.doc_id for d in docs] == ["000000/positive", "000000/negative", "000001/positive", "000001/negative"]
    assert docs[0].meta["type"] == "lexical" and docs[2].meta["id"] == 1 and all(d.n_frames > 5 for d in docs)
