"""How large a difference a run can detect: the minimum detectable effect of every delta, the
documents a target's size needs, and "underpowered" null results in results.json and the table."""

from __future__ import annotations

import math

import numpy as np
import pytest

from test_metrics import linear_doc, small_cfg
from ttt_bench.metrics import (DocRecord, StreamMetrics, documents_needed, minimum_detectable_effect,
                               paired_differences)
from ttt_bench.reporting.report import build_results, render_leaderboard, to_jsonable
from ttt_bench.reporting.run_record import RunRecord

Z = 1.959963984540054 + 0.8416212335729143  # z_0.975 + z_0.8


def test_mde_is_the_normal_approximation_on_paired_differences():
    rng = np.random.default_rng(0)
    sd, n = 0.3, 400
    diffs = rng.normal(0.1, sd, n)
    mde = minimum_detectable_effect(diffs)
    assert mde == pytest.approx(Z * diffs.std(ddof=1) / math.sqrt(n), rel=1e-12)
    assert mde == pytest.approx(Z * sd / math.sqrt(n), rel=0.1)  # the known variance, within sampling error
    # a constant offset between models does not change it; only the spread of the differences does
    assert minimum_detectable_effect(diffs + 5.0) == pytest.approx(mde, rel=1e-12)
    assert minimum_detectable_effect(2 * diffs) == pytest.approx(2 * mde, rel=1e-12)
    assert minimum_detectable_effect(diffs[:1]) is None


def test_documents_needed_scale_as_one_over_the_target_squared():
    diffs = np.random.default_rng(1).normal(0.0, 0.5, 50)
    sd = diffs.std(ddof=1)
    for size in (0.05, 0.1, 0.2):
        assert documents_needed(diffs, size) == math.ceil((Z * sd / size) ** 2)
    exact = (Z * sd / 0.2) ** 2
    assert documents_needed(diffs, 0.1) == math.ceil(4 * exact)
    assert documents_needed(diffs, 0.05) == math.ceil(16 * exact)
    assert documents_needed(diffs, -0.1) == documents_needed(diffs, 0.1)  # "< -0.1" has size 0.1
    assert documents_needed(diffs, 0.0) is None
    # with the MDE's own n, a difference of the MDE's size needs that n
    assert documents_needed(diffs, minimum_detectable_effect(diffs) * (1 + 1e-9)) == diffs.size


def test_paired_differences_are_per_document_values_of_documents_both_have():
    num_a, den_a = np.array([2.0, 3.0, 1.0]), np.array([1.0, 2.0, 0.0])
    num_b, den_b = np.array([1.0, 1.0, 5.0]), np.array([1.0, 1.0, 1.0])
    assert paired_differences(num_a, den_a, num_b, den_b).tolist() == [1.0, 0.5]


def _records(noise: float, n_docs: int, shift: float, seed: int) -> tuple[list[DocRecord], list[DocRecord]]:
    rng = np.random.default_rng(seed)
    base = [linear_doc(f"d{i}", 600, offset=3.0 + rng.normal(0, 0.5)) for i in range(n_docs)]
    model = []
    for d in base:
        nll = d.nll.copy()
        nll[:, 300:] += shift + rng.normal(0, noise)  # a per-document change of the late loss
        model.append(DocRecord(d.doc_id, d.meta, nll))
    return base, model


def _results(base, model, targets) -> dict:
    cfg = small_cfg(targets=targets, bootstrap_iters=200)
    metrics = StreamMetrics(cfg)
    summaries = {"t": {"frozen": metrics.summarize(base), "ttt": metrics.summarize(model)}}
    return to_jsonable(build_results(RunRecord(config={}), summaries, {"t": metrics}))


def test_results_give_mde_docs_needed_and_underpowered():
    base, model = _records(noise=0.2, n_docs=5, shift=0.0, seed=0)
    results = _results(base, model, {"improvement": "> 0.05", "late_nll": "< 2.25"})
    d = results["results"]["t"]["ttt"]["delta_vs_baseline"]
    metrics = StreamMetrics(small_cfg())
    per_doc = [_doc_value(metrics, a, "improvement") - _doc_value(metrics, b, "improvement")
               for a, b in zip(model, base)]
    assert d["mde"]["improvement"] == pytest.approx(Z * np.std(per_doc, ddof=1) / math.sqrt(5), rel=1e-9)
    assert set(d["mde"]) == set(d["delta"]) and set(d["docs_needed"]) == {"improvement", "late_nll"}
    assert d["docs_needed"]["improvement"] == math.ceil((Z * np.std(per_doc, ddof=1) / 0.05) ** 2)
    # 5 documents with 0.2 nats of spread cannot tell 0.05: a null result here is underpowered
    assert d["significant"]["improvement"] is False and d["mde"]["improvement"] > 0.05
    assert d["underpowered"] == {"improvement": True, "late_nll": False}
    table = render_leaderboard(results)
    assert "underpowered" in table.split("| ttt")[1].split("\n")[0]
    assert "MDE of Δ improvement" in table and f"ttt {d['mde']['improvement']:.4f} (n=5)" in table
    # many documents with little spread: the same null result is informative
    base, model = _records(noise=0.01, n_docs=40, shift=0.0, seed=1)
    d = _results(base, model, {"improvement": "> 0.05"})["results"]["t"]["ttt"]["delta_vs_baseline"]
    assert d["mde"]["improvement"] < 0.05 and d["underpowered"] == {"improvement": False}
    # a detected difference is never underpowered
    base, model = _records(noise=0.2, n_docs=5, shift=-1.0, seed=0)
    d = _results(base, model, {"improvement": "> 0.05"})["results"]["t"]["ttt"]["delta_vs_baseline"]
    assert d["significant"]["improvement"] is True and d["underpowered"] == {"improvement": False}


def _doc_value(metrics: StreamMetrics, record: DocRecord, name: str) -> float:
    from ttt_bench.metrics import per_document_metrics

    return per_document_metrics(metrics.summarize([record])[0], metrics.config)[name]
