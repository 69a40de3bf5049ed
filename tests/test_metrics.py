"""Metrics on synthetic NLL curves with known offset, slope and noise."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from ttt_bench.config import StreamTaskConfig
from ttt_bench.metrics import (DocRecord, ModelShape, bootstrap_delta, bootstrap_ratio,
                               compare_to_baseline, compute_model_metrics, mean_curves,
                               per_document_metrics, raise_on_flags, SanityError, sanity_flags,
                               summarize)

DELAYS = [0, 1, 1, 1, 1, 1, 1, 1]
OFFSETS = np.array([0.5, 0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6])  # per codebook


def small_cfg(**kw) -> StreamTaskConfig:
    """A long-stream task config with short positions (validated as a task config is)."""
    base = dict(task="synthetic", positions=[200, 400], window=50, early_late_frames=100,
                segments=[[100, 200], [200, 400]], bootstrap_iters=200)
    base.update(kw)
    return StreamTaskConfig.from_dict(base)


def linear_doc(doc_id: str, n_frames: int, offset: float = 3.0, slope: float = -1e-3,
               noise: float = 0.0, rng: np.random.Generator | None = None) -> DocRecord:
    """NLL[k, t] = offset + OFFSETS[k] + slope * t (+ noise), NaN at the delay positions."""
    t = np.arange(n_frames)
    nll = offset + OFFSETS[:, None] + slope * t[None, :]
    if noise:
        nll = nll + rng.normal(0.0, noise, nll.shape)
    nll[1:, -1] = np.nan
    return DocRecord(doc_id, {"source": "synthetic", "n_frames": n_frames}, nll, seconds=0.5)


def test_noiseless_metrics_are_exact():
    a, b, T, N = 3.0, -1e-3, 600, 100
    cfg = small_cfg()
    recs = [linear_doc(f"d{i}", T, a, b) for i in range(4)]
    m = compute_model_metrics(recs, cfg)
    o = OFFSETS.mean()  # the "all" curve; last frame excluded (codebooks 1-7 not predicted)
    exact = {
        "mean_nll": a + (OFFSETS.sum() * (T - 1) + OFFSETS[0] + b * (T - 1) * (T - 2) / 2 * 8
                         + b * (T - 1)) / (8 * (T - 1) + 1),  # every predicted value
        "nll@200": a + o + b * 200, "nll@400": a + o + b * 400,
        "early_nll": a + o + b * (N - 1) / 2,
        "late_nll": a + o + b * ((T - N) + (T - 2)) / 2,
        "slope": b, "slope_100_200": b, "slope_200_400": b,
        "nll_cb0": a + OFFSETS[0] + b * (T - 1) / 2,
        "nll_semantic": a + OFFSETS[0] + b * (T - 1) / 2,
        "nll_acoustic": a + OFFSETS[1:].mean() + b * (T - 2) / 2,
        "nll_cb3": a + OFFSETS[3] + b * (T - 2) / 2,
    }
    exact["improvement"] = exact["early_nll"] - exact["late_nll"]
    for name, want in exact.items():
        assert m[name] == pytest.approx(want, rel=1e-12, abs=1e-12), name
        lo, hi = m["ci"][name]
        assert lo == pytest.approx(want, abs=1e-9) and hi == pytest.approx(want, abs=1e-9)
        assert m["n"][name] == 4
    assert m["n_docs"] == 4 and m["n_frames"] == 4 * T
    assert m["n_nonfinite"] == 0 and m["n_no_prediction"] == 4 * 7
    assert m["frames_per_second"] == pytest.approx(4 * T / 2.0)
    assert m["flags"] == []


def test_documents_of_different_lengths_count_per_position():
    cfg = small_cfg()
    lengths = [150, 300, 450, 600]
    offsets = [2.0, 3.0, 4.0, 5.0]  # longer documents are harder: must not bias the slope
    recs = [linear_doc(f"d{i}", n, off, -2e-3) for i, (n, off) in enumerate(zip(lengths, offsets))]
    curves = mean_curves(recs)
    count = curves["all"]["count"]
    assert count.shape == (600,)
    assert count[0] == 4 and count[148] == 4 and count[149] == 3  # last frame of d0: cb0 only
    assert count[299] == 2 and count[598] == 1 and count[599] == 0
    assert curves["semantic"]["count"][149] == 4 and curves["semantic"]["count"][599] == 1
    o = OFFSETS.mean()
    assert curves["all"]["mean"][100] == pytest.approx(np.mean(offsets) + o - 0.2)
    assert curves["all"]["mean"][500] == pytest.approx(5.0 + o - 1.0)
    assert np.isnan(curves["all"]["mean"][599])

    m = compute_model_metrics(recs, cfg)
    # nll@200 window 175..225 needs T > 225: the documents of 300, 450, 600 frames
    assert m["n"]["nll@200"] == 3
    assert m["nll@200"] == pytest.approx(np.mean(offsets[1:]) + o - 0.4)
    assert m["n"]["nll@400"] == 2
    assert m["n"]["early_nll"] == 3  # needs T >= 2 * 100
    assert m["slope"] == pytest.approx(-2e-3, rel=1e-9)  # within-document fit
    assert m["n"]["slope_200_400"] == 2
    assert m["n_frames"] == sum(lengths)


def test_unavailable_is_none_never_zero():
    cfg = small_cfg()
    one = compute_model_metrics([linear_doc("d0", 300)], cfg)
    assert one["mean_nll"] is not None
    assert one["ci"]["mean_nll"] is None and one["stderr"]["mean_nll"] is None
    assert one["nll@400"] is None and one["n"]["nll@400"] == 0
    assert one["ci"]["nll@400"] is None
    none = compute_model_metrics([], cfg)
    assert none["mean_nll"] is None and none["frames_per_second"] is None
    assert [f["code"] for f in none["flags"]] == ["no_documents"]
    json.dumps(one, allow_nan=False)  # valid JSON: no NaN literal anywhere
    json.dumps(none, allow_nan=False)


def test_delay_nans_are_not_failures_but_inf_and_predicted_nan_are():
    cfg = small_cfg()
    clean = linear_doc("clean", 300)
    assert summarize(clean).n_nonfinite == 0
    bad = linear_doc("bad", 300)
    bad.nll[0, 10] = np.inf
    bad.nll[2, 20] = np.nan      # predicted position
    bad.nll[3, -1] = np.inf      # no-prediction position, but Inf is never legitimate
    m = compute_model_metrics([clean, bad], cfg)
    assert m["n_nonfinite"] == 3
    assert math.isfinite(m["mean_nll"])
    assert [f["code"] for f in m["flags"]] == ["nonfinite"]
    assert "bad" in m["flags"][0]["message"]
    with pytest.raises(SanityError, match="nonfinite"):
        raise_on_flags({"task": {"model": m}})


def test_delays_are_configurable():
    shape = ModelShape(delays=[0, 2, 2, 2, 2, 2, 2, 2])
    rec = linear_doc("d", 300)
    rec.nll[1:, -2] = np.nan
    s = summarize(rec, shape)
    assert s.n_nonfinite == 0 and s.n_no_prediction == 14
    assert np.isnan(s.curves["all"][-2]) and not np.isnan(s.curves["semantic"][-2])
    with pytest.raises(ValueError, match="expected"):
        summarize(linear_doc("d", 300), ModelShape(delays=[0, 1]))


def test_ln10_signature_is_flagged():
    """The old frozen baseline: mean 2.3010, max 2.3026 = ln(10), a few lower values."""
    rng = np.random.default_rng(1)
    nll = np.full((8, 1000), math.log(10))
    low = rng.random(nll.shape) < 0.03
    nll[low] = rng.uniform(1.49, 2.29, low.sum())
    nll[1:, -1] = np.nan
    flags = sanity_flags([DocRecord("old", {}, nll)])
    codes = [f["code"] for f in flags]
    assert codes == ["degenerate"]
    assert "ln(10)" in flags[0]["message"]
    assert abs(np.nanmean(nll) - math.log(10)) > 1e-3  # caught by clustering, not by the mean


def test_uniform_over_codebook_and_flat_curve_are_flagged():
    shape = ModelShape(card=2048)
    rng = np.random.default_rng(2)
    near = linear_doc("u", 300, offset=math.log(2048), slope=0.0, noise=0.3, rng=rng)
    near.nll[:8] -= OFFSETS[:, None]
    assert [f["code"] for f in sanity_flags([near], shape)] == ["near_uniform"]
    flat = DocRecord("flat", {}, np.full((8, 300), 3.7))
    flat.nll[1:, -1] = np.nan
    assert [f["code"] for f in sanity_flags([flat], shape)] == ["flat_curve"]
    healthy = linear_doc("ok", 300, noise=0.5, rng=rng)
    assert sanity_flags([healthy], shape) == []


def test_bootstrap_interval_covers_true_value_at_nominal_rate():
    iters = 400
    rng = np.random.default_rng(3)
    hits = 0
    reps = 200
    for _ in range(reps):
        doc_means = rng.normal(2.5, 0.3, 40)
        b = bootstrap_ratio(doc_means, np.ones(40), iters)
        hits += b["ci"][0] <= 2.5 <= b["ci"][1]
    assert 0.85 <= hits / reps <= 0.99  # nominal 0.95; percentile bootstrap runs a bit low


def test_bootstrap_covers_true_slope_through_the_full_pipeline():
    cfg = small_cfg(bootstrap_iters=200)
    rng = np.random.default_rng(4)
    hits, reps = 0, 40
    for r in range(reps):
        recs = [linear_doc(f"d{i}", 250, offset=rng.normal(3, 0.5),
                           slope=-1e-3 + rng.normal(0, 3e-4), noise=0.2, rng=rng)
                for i in range(15)]
        lo, hi = compute_model_metrics(recs, cfg)["ci"]["slope"]
        hits += lo <= -1e-3 <= hi
    assert hits / reps >= 0.8


def test_paired_delta_is_tighter_than_unpaired_on_correlated_data():
    iters = 500
    rng = np.random.default_rng(5)
    base = rng.normal(3.0, 0.5, 50)            # documents differ a lot in difficulty
    model = base - 0.05 + rng.normal(0, 0.01, 50)  # same documents, a small real gain
    ones = np.ones(50)
    paired = bootstrap_delta(model, ones, base, ones, iters, paired=True)
    unpaired = bootstrap_delta(model, ones, base, ones, iters, paired=False)
    assert paired["value"] == pytest.approx(unpaired["value"])
    assert paired["stderr"] < unpaired["stderr"] / 5
    assert paired["ci"][1] < 0 < unpaired["ci"][1]  # only pairing shows the gain is real


def test_compare_to_baseline_pairs_by_doc_id():
    cfg = small_cfg()
    rng = np.random.default_rng(6)
    base = [linear_doc(f"d{i}", 500, offset=rng.normal(3, 0.5), slope=-1e-4, noise=0.1,
                       rng=rng) for i in range(6)]
    model = [DocRecord(r.doc_id, r.meta, r.nll - 0.1, 1.0) for r in reversed(base[1:])]
    d = compare_to_baseline(model, base, cfg)
    assert d["n_docs"] == 5 and d["n_unpaired"] == 1
    assert d["delta"]["mean_nll"] == pytest.approx(-0.1)
    assert d["ci"]["mean_nll"] == pytest.approx([-0.1, -0.1])
    assert d["delta"]["slope"] == pytest.approx(0.0, abs=1e-12)
    assert d["significant"]["mean_nll"] is True
    json.dumps(d, allow_nan=False)


def test_targets_pass_fail_and_validation():
    cfg = small_cfg(targets={"late_nll": "< 2.25", "improvement": "> 0.05", "slope": "< -1e-4"})
    m = compute_model_metrics([linear_doc(f"d{i}", 600, 2.0, -1e-3) for i in range(3)], cfg)
    assert m["targets"]["late_nll"]["pass"] is True   # ~1.83
    assert m["targets"]["improvement"]["pass"] is True  # 0.5
    assert m["targets"]["slope"] == {"target": "< -1e-4", "value": m["slope"], "pass": True}
    short = compute_model_metrics([linear_doc("s", 150)], cfg)
    assert short["targets"]["late_nll"]["pass"] is None  # unavailable, not failed
    with pytest.raises(ValueError, match="unknown metric 'late'"):
        small_cfg(targets={"late": "< 2"})
    with pytest.raises(ValueError, match="expected"):
        small_cfg(targets={"late_nll": "about 2"})
    with pytest.raises(ValueError, match="unknown key"):
        StreamTaskConfig.from_dict({"task": "t", "postions": [1]})


def test_per_document_metrics_and_determinism():
    cfg = small_cfg()
    rng = np.random.default_rng(7)
    recs = [linear_doc(f"d{i}", 420, noise=0.2, rng=rng) for i in range(5)]  # < 400 + 25
    per = per_document_metrics(summarize(recs[0]), cfg)
    assert per["nll@400"] is None and per["nll@200"] is not None and per["n_nonfinite"] == 0
    assert compute_model_metrics(recs, cfg) == compute_model_metrics(recs, cfg)
