"""The prepared GPU check: prove ttt-bench correct on CUDA and measure it, in one command.

A GPU is lent to a session by chance, with minutes of device time. This script is what to run
then (``bash benchmarks/gpu/run.sh``, which installs the carried wheels first; the exact device
call is in benchmarks/RESULTS.md). It builds Moshi 7B's shape (moshi's default config) with
random weights in bf16, its output heads scaled so that its NLL varies by a trained model's
2.5 nats from position to position (``common.scale_output_heads``), and runs, in this order:

  setup          the measured bf16 matmul rate; the model; a probe: the time of one chunk
  verification   streamed NLL vs one LMModel.forward over the 3000-frame window at chunk 64 and
                 256: the distribution of the differences, the criterion's decision, and the
                 decision on injected errors (offset 0.05, one frame misaligned, the legacy pass)
  causality      the causality check at the default cut
  adapters       TTT-Linear, TTT-MLP, the fork's layer (causal true and false) in the last 2
                 layers: gate 0 == frozen, chunk-size invariant; dyneval lr=0 == frozen
  rng            simple_evaluate on the packaged sample leaves the CUDA and CPU RNG states as found
  speed          frames/s at batch 1 per chunk size, TFLOP/s against the matmul rate, a
                 33-minute recording's time
  batch          the largest batch that fits (--batch_size auto's probe), frames/s, TFLOP/s
  adapter_speed  TTT-Linear, TTT-MLP, dyneval relative to frozen
  mimi           Mimi encoding (full-size architecture, random weights), x real time
  long_document  25,000-frame documents at --batch_size auto: peak memory, frames/s

A time budget (``--budget``, seconds from the start of Python) bounds it: before each section
its time is estimated from the probe, and a section that would overrun is skipped; a section
still running when the budget ends is stopped. Every skip is recorded with its reason. The
report (``gpu_check.json``, and ``gpu_check.md``: a block for benchmarks/RESULTS.md) is
rewritten after every section, so whatever ran comes back even if the command is killed.
Exit code 0: every check that ran passed; 1: a check failed; 2: no CUDA device.

    python benchmarks/gpu_check.py                          # CUDA, bf16, Moshi 7B shape
    python benchmarks/gpu_check.py --device cpu --quick     # tiny shapes on a CPU (the test suite runs it)
"""

from __future__ import annotations

import time

START = time.monotonic()  # the budget counts from here: Python has just started

import argparse  # noqa: E402
import contextlib  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import traceback  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402
from typing import Any, Callable  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # this checkout's ttt_bench, not an installed one

from bench_gpu import (FRAMES_33_MIN, build_lm, codes_of, device_clock, device_name, flops_per_frame, free,  # noqa: E402
                       lm_config, matmul_rate, mimi_encoding, peak_memory_gib, synchronize)
from common import Case, machine_line, median_speed, paired_ratio, round_robin, scale_output_heads  # noqa: E402
from moshi.utils.compile import no_compile  # noqa: E402

from ttt_bench.evaluation.batching import AUTO_MAX_BATCH, auto_batch_size, is_oom  # noqa: E402
from ttt_bench.evaluation.verify import compare_nll, differences, verification_pair, verify_causality  # noqa: E402
from ttt_bench.models.base import StreamLayout  # noqa: E402
from ttt_bench.models.dyneval import DynEvalScorer  # noqa: E402
from ttt_bench.models.frozen import FrozenScorer, cpu_no_compile  # noqa: E402
from ttt_bench.models.legacy import LegacyScorer  # noqa: E402
from ttt_bench.models.loading.moshi import resolve_dtype  # noqa: E402
from ttt_bench.models.ttt import TTTScorer  # noqa: E402
from ttt_bench.tasks.base import Document  # noqa: E402

SCHEMA = "ttt-bench/gpu_check/v1"
NOT_MEASURED = "not measured (needs a CUDA device)"
LAYOUT = StreamLayout()
GATE_OPEN = 0.5  # the TTT gates for the chunk-invariance check (0 would make it vacuous)
QUICK_CONTEXT = 144  # quick: 144 frames x 8 codebooks, over the 1000 values the bf16 quantile needs


# -- what runs, by setting ---------------------------------------------------------------------

@dataclass
class Plan:
    """The shapes of every section: Moshi 7B's, or with ``quick`` tiny ones."""

    quick: bool
    verify_chunks: tuple[int, ...] = (64, 256)
    causality_chunk: int = 64
    adapter_frames: int = 512
    adapter_chunks: tuple[int, ...] = (64, 256)  # whole mini-batches (causal=false needs them)
    split_chunk: int = 40  # splits a 16-frame mini-batch (causal variants only)
    mini_batch: int = 16
    ttt_layers: str = "last 2"
    rng_frames: int = 400
    speed_chunks: tuple[int, ...] = (64, 256, 1024)
    batch_chunk: int = 256
    long_frames: int = 25000
    repeats: int = 3
    mimi_seconds: float = 30.0
    mimi_batches: tuple[int, ...] = (1, 8, 32)

    @classmethod
    def make(cls, quick: bool, repeats: int | None) -> "Plan":
        plan = cls(quick) if not quick else cls(
            quick, verify_chunks=(24, 72), causality_chunk=64, adapter_frames=48, adapter_chunks=(48, 16),
            split_chunk=24, ttt_layers="last 1", rng_frames=100, speed_chunks=(24, 72), batch_chunk=64,
            long_frames=300, repeats=1, mimi_seconds=1.0, mimi_batches=(1,))
        plan.repeats = repeats or plan.repeats
        return plan


@dataclass
class Context:
    args: argparse.Namespace
    plan: Plan
    device: torch.device
    dtype: torch.dtype
    lm: Any = None
    config: dict = field(default_factory=dict)
    per_call_s: float = 0.0  # the probe's model of a chunk's time at batch 1: per_call_s + per_frame_s * C
    per_frame_s: float = 0.0
    per_stream_frame_s: float = 0.0  # the same at batch 4, per frame of each stream
    matmul_tflops: float | None = None
    flops: float = 0.0
    largest_batch: int | None = None
    batch_fps: float | None = None

    def cost(self, frames: int, chunk: int, batch: int = 1) -> float:
        """Estimated seconds to score ``batch`` streams of ``frames`` at ``chunk`` (from the probe)."""
        calls = -(-frames // chunk)
        per_frame = self.per_frame_s if batch == 1 else self.per_stream_frame_s * batch
        return calls * (self.per_call_s + per_frame * min(chunk, frames))

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def context(self) -> int:
        return int(self.lm.context)


class OverBudget(Exception):
    """The budget ended while a section was running."""


# -- small tools -------------------------------------------------------------------------------

def elapsed() -> float:
    return time.monotonic() - START


def abs_stats(d: torch.Tensor) -> dict[str, float]:
    """The distribution of differences d: max, mean, std and percentiles of |d|."""
    a = d.double().abs()
    if a.numel() == 0:
        return {"n": 0}
    q = torch.quantile(a, torch.tensor([0.5, 0.9, 0.99, 0.999], dtype=torch.float64)).tolist()
    return {"n": int(a.numel()), "max_abs": float(a.max()), "mean_abs": float(a.mean()), "mean": float(d.double().mean()),
            "std": float(d.double().std()) if a.numel() > 1 else 0.0,
            "p50_abs": q[0], "p90_abs": q[1], "p99_abs": q[2], "p99.9_abs": q[3]}


def exactly_equal(a: torch.Tensor, b: torch.Tensor) -> dict[str, Any]:
    """Bit-for-bit equality (NaN where the other is NaN) and the largest difference."""
    same_mask = torch.equal(a.isnan(), b.isnan())
    d = differences(a, b)
    max_abs = float(d.abs().max()) if d.numel() else 0.0
    return {"exact": bool(same_mask and max_abs == 0.0), "max_abs_diff": max_abs, "same_nan_mask": same_mask}


def rolled_by_one_frame(nll: torch.Tensor) -> torch.Tensor:
    """Each frame given its next frame's loss, the NaN mask kept."""
    out = nll.clone()
    for b in range(nll.shape[0]):
        for k in range(nll.shape[1]):
            n = int((~nll[b, k].isnan()).sum())
            out[b, k, :n] = nll[b, k, :n].roll(-1)
    return out


def set_gates(lm: torch.nn.Module, value: float) -> int:
    """Set every TTT gate (``alpha`` of ttt_bench's branch, ``gating_alpha`` of the fork's layer)."""
    count = 0
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if name.endswith((".alpha", ".gating_alpha")):
                p.fill_(value)
                count += 1
    if not count:
        raise RuntimeError("no TTT gate found in the model")
    return count


def timed_call(ctx: Context, run: Callable[[], Any]) -> tuple[Any, float]:
    synchronize(ctx.device)
    start = time.perf_counter()
    out = run()
    synchronize(ctx.device)
    return out, time.perf_counter() - start


def fps_and_tflops(ctx: Context, fps: float) -> dict[str, Any]:
    tflops = fps * ctx.flops / 1e12
    share = 100 * tflops / ctx.matmul_tflops if ctx.matmul_tflops else None
    return {"frames_per_s": fps, "tflops": tflops, "pct_of_matmul": share}


def memory(ctx: Context, run: Callable[[], Any]) -> float | str:
    value = peak_memory_gib(ctx.device, run)
    return NOT_MEASURED if value is None else value


# -- sections ----------------------------------------------------------------------------------

def setup(ctx: Context) -> dict:
    """The matmul rate, the model with scaled heads, and the probe every estimate rests on."""
    args, plan = ctx.args, ctx.plan
    ctx.matmul_tflops = matmul_rate(SimpleNamespace(quick=plan.quick, repeats=plan.repeats), ctx.device, ctx.dtype)
    ctx.config = lm_config(plan.quick)
    if plan.quick:
        ctx.config["context"] = QUICK_CONTEXT
    ctx.lm, build_s = timed_call(ctx, lambda: build_lm(ctx.config, ctx.device, ctx.dtype))
    heads = scale_output_heads(ctx.lm, codes_of(64, ctx.lm.card, seed=11).to(ctx.device))
    parts = flops_per_frame(ctx.lm)
    ctx.flops = parts["total"]
    frozen = FrozenScorer(lm=ctx.lm)
    small, large = plan.verify_chunks[0], plan.batch_chunk
    codes = codes_of(4 * small + 2 * large, ctx.lm.card, seed=12)
    _, first_s = timed_call(ctx, lambda: frozen.score(codes[..., :2 * small], chunk_size=small))  # compiles
    frozen.score(codes[..., :large], chunk_size=large)  # warm-up at the large chunk
    per_small = timed_call(ctx, lambda: frozen.score(codes[..., :4 * small], chunk_size=small))[1] / 4
    per_large = timed_call(ctx, lambda: frozen.score(codes[..., :2 * large], chunk_size=large))[1] / 2
    ctx.per_frame_s = max((per_large - per_small) / (large - small), per_large / large / 4)
    ctx.per_call_s = max(per_small - ctx.per_frame_s * small, 0.0)
    batch = codes_of(large, ctx.lm.card, B=4, seed=13)
    frozen.score(batch[..., :large // 2], chunk_size=large)  # warm-up at this shape
    per_batch = timed_call(ctx, lambda: frozen.score(batch, chunk_size=large))[1]
    ctx.per_stream_frame_s = max(per_batch - ctx.per_call_s, 0.0) / (4 * large)
    return {"device": device_name(ctx.device), "dtype": str(ctx.dtype).removeprefix("torch."),
            "model": "tiny preset shape" if plan.quick else "Moshi 7B shape (moshi's default config)",
            "params_billion": sum(p.numel() for p in ctx.lm.parameters()) / 1e9, "context": ctx.context,
            "gflop_per_frame": {k: v / 1e9 for k, v in parts.items()}, "matmul_tflops": ctx.matmul_tflops,
            "build_s": build_s, "heads": heads, "compile": ctx.args.compile_status,
            "probe": {"first_call_s": first_s, "chunk_s": {str(small): per_small, str(large): per_large},
                      "batch_4_chunk_s": per_batch, "per_call_s": ctx.per_call_s, "per_frame_s": ctx.per_frame_s,
                      "per_stream_frame_s_at_batch_4": ctx.per_stream_frame_s}}


def verification(ctx: Context) -> dict:
    """The built-in verification over the whole first window, at each chunk size, with the
    distribution of its differences; and what the criterion says of injected errors there."""
    frozen = FrozenScorer(lm=ctx.lm)
    codes = codes_of(ctx.context, ctx.lm.card, seed=1)[0]
    out: dict[str, Any] = {"frames": ctx.context, "chunks": {}}
    passed = True
    for chunk in ctx.plan.verify_chunks:
        streamed, reference = verification_pair(frozen, codes, chunk, LAYOUT)
        record = compare_nll("frozen", "random codes", streamed, reference, ctx.dtype)
        entry = {"decision": record.to_dict(), "differences": abs_stats(differences(streamed, reference))}
        injected = {"offset 0.05": streamed + 0.05, "misaligned by one frame": rolled_by_one_frame(streamed)}
        if chunk == ctx.plan.verify_chunks[0]:  # the legacy method: a fresh forward over 2 chunks per chunk
            legacy = LegacyScorer(frozen, window=2 * chunk + max(ctx.lm.delays))
            injected["legacy pass, window 2 chunks"] = verification_pair(legacy, codes, chunk, LAYOUT)[0]
        entry["injected"] = {}
        for name, wrong in injected.items():
            judged = compare_nll("injected", name, wrong, reference, ctx.dtype)
            entry["injected"][name] = {"caught": not judged.passed, "failed": judged.failed,
                                       "mean_diff": judged.mean_diff, "mean_abs_diff": judged.mean_abs_diff,
                                       "quantile_abs_diff": judged.quantile_abs_diff}
            passed &= not judged.passed
        passed &= record.passed
        out["chunks"][str(chunk)] = entry
    out["nll"] = abs_stats(reference[~reference.isnan()])  # the scale the differences are judged against
    out["passed"] = passed
    return out


def causality(ctx: Context) -> dict:
    codes = codes_of(max(2 * ctx.plan.causality_chunk, 128), ctx.lm.card, seed=2)[0]
    record = verify_causality("frozen", FrozenScorer(lm=ctx.lm), "random codes", codes, ctx.plan.causality_chunk,
                              LAYOUT, allow_lookahead=True)
    result = record.to_dict()
    result["passed"] = bool(record.passed and record.max_abs_change_after > 0)
    return result


def adapter_variants(plan: Plan) -> dict[str, dict]:
    common = {"layers": plan.ttt_layers, "mini_batch_size": plan.mini_batch, "gate_init": 0.0}
    return {"ttt-linear": {**common, "inner": "linear"},
            "ttt-mlp": {**common, "inner": "mlp"},
            "fork causal=true": {**common, "arch": "moshi_finetune_ttt", "causal": True},
            "fork causal=false": {**common, "arch": "moshi_finetune_ttt", "causal": False}}


def adapters(ctx: Context) -> dict:
    """Each TTT variant on its own copy of the model: gate 0 gives frozen's NLL exactly; gates
    open, the NLL is the same at every chunk size (by the verification's criterion in bf16).
    Dynamic evaluation at lr 0 gives frozen's NLL exactly."""
    plan = ctx.plan
    codes = codes_of(plan.adapter_frames, ctx.lm.card, seed=3)
    base_chunk = plan.adapter_chunks[0]
    frozen_nll = FrozenScorer(lm=ctx.lm).score(codes, chunk_size=base_chunk)
    out: dict[str, Any] = {"frames": plan.adapter_frames, "layers": plan.ttt_layers, "base_chunk": base_chunk,
                           "variants": {}}
    passed = True
    for name, options in adapter_variants(plan).items():
        scorer = TTTScorer(lm=copy.deepcopy(ctx.lm), **options)
        try:
            gate_zero = exactly_equal(scorer.score(codes, chunk_size=base_chunk), frozen_nll)
            set_gates(scorer.lm, GATE_OPEN)
            reference = scorer.score(codes, chunk_size=base_chunk)
            chunks = list(plan.adapter_chunks[1:]) + ([plan.split_chunk] if options.get("causal", True) else [])
            invariance = {}
            for chunk in chunks:
                record = compare_nll(name, f"chunk {chunk} vs {base_chunk}", scorer.score(codes, chunk_size=chunk),
                                     reference, ctx.dtype)
                invariance[str(chunk)] = {"passed": record.passed, "failed": record.failed,
                                          "max_abs_diff": record.max_abs_diff, "mean_abs_diff": record.mean_abs_diff,
                                          "quantile_abs_diff": record.quantile_abs_diff}
            moved = float(differences(reference, frozen_nll).abs().max())
            ok = gate_zero["exact"] and moved > 0 and all(v["passed"] for v in invariance.values())
            out["variants"][name] = {"gate_zero_is_frozen": gate_zero, "open_gate_moves_nll_by": moved,
                                     "chunk_invariance": invariance, "passed": ok}
            passed &= ok
        finally:
            scorer = None
            free(ctx.device)
    dyneval = DynEvalScorer(lm=ctx.lm, lr=0.0)
    lr_zero = exactly_equal(dyneval.score(codes, chunk_size=base_chunk), frozen_nll)
    dyneval = None
    free(ctx.device)
    out["dyneval lr=0 is frozen"] = lr_zero
    out["passed"] = bool(passed and lr_zero["exact"])
    return out


def rng(ctx: Context) -> dict:
    """simple_evaluate on the model in memory (the packaged sample, the tiny preset's Mimi)
    leaves the random number generators and the weights as found; its own verification and
    causality records come along."""
    from ttt_bench import simple_evaluate

    def weights_sum() -> float:
        with torch.no_grad():
            return float(sum(p.double().sum() for p in ctx.lm.parameters()))

    cpu_before = torch.get_rng_state()
    cuda_before = torch.cuda.get_rng_state(ctx.device) if ctx.cuda else None
    before = weights_sum()
    with tempfile.TemporaryDirectory(prefix="gpu_check_cache_") as cache:
        saved = os.environ.get("TTT_BENCH_CACHE")
        os.environ["TTT_BENCH_CACHE"] = cache
        try:
            results = simple_evaluate(model=ctx.lm, model_args={"preset": "tiny"}, tasks=["librilight_sample"],
                                      limit=1, task_args={"max_frames": ctx.plan.rng_frames}, distributed=False,
                                      chunk_size=ctx.plan.causality_chunk)
        finally:
            if saved is None:
                os.environ.pop("TTT_BENCH_CACHE", None)
            else:
                os.environ["TTT_BENCH_CACHE"] = saved
    cpu_same = torch.equal(cpu_before, torch.get_rng_state())
    cuda_same = torch.equal(cuda_before, torch.cuda.get_rng_state(ctx.device)) if ctx.cuda else NOT_MEASURED
    weights_same = weights_sum() == before
    row = results["results"]["librilight_sample"]["model"]
    out = {"cuda_rng_unchanged": cuda_same, "cpu_rng_unchanged": cpu_same, "weights_unchanged": weights_same,
           "mean_nll": row["mean_nll"], "n_frames": row["n_frames"],
           "verification": results["verification"]["librilight_sample"],
           "causality": results["causality"]["librilight_sample"]}
    out["passed"] = bool(cpu_same and weights_same and cuda_same is not False)
    return out


def speed(ctx: Context) -> dict:
    """Frames/s of one recording (batch 1) per chunk size, over a stream past the context."""
    frozen = FrozenScorer(lm=ctx.lm)
    T = ctx.context + max(ctx.plan.speed_chunks)
    codes = codes_of(T, ctx.lm.card, seed=4)
    cases = {str(c): Case(lambda c=c: frozen.score(codes, chunk_size=c), T) for c in ctx.plan.speed_chunks}
    for case in cases.values():
        case.run()  # warm-up (and compilation at this shape)
    speeds = round_robin(cases, ctx.plan.repeats, device_clock(ctx.device))
    per_chunk = {c: fps_and_tflops(ctx, median_speed(speeds, c)) for c in cases}
    best = max(per_chunk, key=lambda c: per_chunk[c]["frames_per_s"])
    fps = per_chunk[best]["frames_per_s"]
    return {"frames": T, "chunks": per_chunk, "best_chunk": int(best), "frames_per_s": fps,
            "seconds_33_min_recording": FRAMES_33_MIN / fps, "vs_old_method_5.4_fps": fps / 5.4,
            "peak_gib": memory(ctx, lambda: frozen.score(codes, chunk_size=int(best)))}


def batch(ctx: Context) -> dict:
    """The largest batch ``--batch_size auto`` finds, and its throughput."""
    frozen = FrozenScorer(lm=ctx.lm)
    chunk = ctx.plan.batch_chunk
    T = ctx.context + chunk
    codes = codes_of(T, ctx.lm.card, seed=5)
    docs = [Document(f"probe{i}", codes[0]) for i in range(AUTO_MAX_BATCH)]
    (size, probe_s) = timed_call(ctx, lambda: auto_batch_size(frozen, docs, chunk, LAYOUT))
    if not ctx.cuda:
        size = 2  # a smoke run of the batched path; the largest batch is a CUDA figure
    ctx.largest_batch = size if ctx.cuda else None
    stack = codes.expand(size, -1, -1).contiguous()
    case = {"batch": Case(lambda: frozen.score(stack, chunk_size=chunk), size * T)}
    case["batch"].run()
    fps = median_speed(round_robin(case, ctx.plan.repeats, device_clock(ctx.device)), "batch")
    ctx.batch_fps = fps
    return {"chunk": chunk, "frames": T, "largest_batch": size if ctx.cuda else NOT_MEASURED,
            "batch_timed": size, "auto_probe_s": probe_s, **fps_and_tflops(ctx, fps),
            "seconds_per_33_min_recording": FRAMES_33_MIN / fps,
            "peak_gib": memory(ctx, lambda: frozen.score(stack, chunk_size=chunk))}


def adapter_speed(ctx: Context) -> dict:
    """TTT (last 2 layers) and dynamic evaluation relative to frozen, batch 1, chunk 256,
    each round-robin with frozen on the same stream."""
    chunk = ctx.plan.batch_chunk
    T = adapter_speed_frames(ctx)
    codes = codes_of(T, ctx.lm.card, seed=6)
    frozen = FrozenScorer(lm=ctx.lm)
    variants: dict[str, Callable[[], Any]] = {
        "ttt-linear": lambda: TTTScorer(lm=copy.deepcopy(ctx.lm), layers=ctx.plan.ttt_layers, inner="linear",
                                        mini_batch_size=ctx.plan.mini_batch),
        "ttt-mlp": lambda: TTTScorer(lm=copy.deepcopy(ctx.lm), layers=ctx.plan.ttt_layers, inner="mlp",
                                     mini_batch_size=ctx.plan.mini_batch),
        "dyneval all": lambda: DynEvalScorer(lm=ctx.lm, lr=1e-5, optimizer="sgd", params="all"),
    }
    out: dict[str, Any] = {"chunk": chunk, "frames": T}
    for name, make in variants.items():
        scorer = None
        try:
            scorer = make()
            cases = {"frozen": Case(lambda: frozen.score(codes, chunk_size=chunk), T),
                     name: Case(lambda: scorer.score(codes, chunk_size=chunk), T)}
            cases[name].run()  # warm-up
            speeds = round_robin(cases, ctx.plan.repeats, device_clock(ctx.device))
            ratio = paired_ratio(speeds, name, "frozen")
            out[name] = {"frames_per_s": median_speed(speeds, name), "x_frozen": ratio[0],
                         "x_frozen_rounds": [ratio[1], ratio[2]]}
        except Exception as exc:  # noqa: BLE001 - a variant that does not fit is reported, the rest still run
            if not is_oom(exc):
                raise
            out[name] = "out of memory"
        finally:
            scorer = None
            free(ctx.device)
    return out


def mimi(ctx: Context) -> dict:
    plan = ctx.plan
    realtime = mimi_encoding(SimpleNamespace(quick=plan.quick, mimi_seconds=plan.mimi_seconds,
                                             mimi_batches=list(plan.mimi_batches), repeats=plan.repeats), ctx.device)
    return {"seconds_per_stream": plan.mimi_seconds, "architecture": "tiny preset" if plan.quick else "full size",
            "x_real_time": {str(b): x for b, x in realtime.items()}}


def long_document(ctx: Context) -> dict:
    """Documents of 25,000 frames (a 33-minute recording) at ``--batch_size auto``: the batch
    the probe picks, the peak memory of scoring one such batch, and its frames/s."""
    frozen = FrozenScorer(lm=ctx.lm)
    chunk = ctx.plan.batch_chunk
    T = ctx.plan.long_frames
    codes = codes_of(T, ctx.lm.card, seed=7)
    size = ctx.largest_batch if ctx.largest_batch is not None else auto_batch_size(
        frozen, [Document(f"long{i}", codes[0]) for i in range(AUTO_MAX_BATCH)], chunk, LAYOUT)
    stack = codes.expand(size, -1, -1).contiguous()
    box: dict[str, float] = {}

    def run() -> None:
        box["s"] = timed_call(ctx, lambda: frozen.score(stack, chunk_size=chunk))[1]

    peak = memory(ctx, run)
    fps = size * T / box["s"]
    return {"frames": T, "chunk": chunk, "batch": size, "peak_gib": peak, "frames_per_s": fps,
            "seconds": box["s"], "seconds_per_recording": T / fps}


@dataclass
class Section:
    name: str
    run: Callable[[Context], dict]
    estimate: Callable[[Context], float]  # seconds, from the probe
    check: bool = False  # a correctness section (its "passed" counts)


SAFETY = 1.5  # estimates are the probe's model of the work times this, plus a section's start-up


def sections(quick: bool) -> list[Section]:
    """In order of value: correctness first, then the headline speed figures."""
    fixed = 1.0 if quick else 10.0  # a section's own start-up: copies, compiling at new shapes

    def est(work: Callable[[Context, Plan, int], float], startups: int = 1) -> Callable[[Context], float]:
        return lambda c: startups * fixed + SAFETY * work(c, c.plan, c.context)

    def verification_work(c: Context, p: Plan, n: int) -> float:
        legacy = -(-n // p.verify_chunks[0]) * c.cost(2 * p.verify_chunks[0], 2 * p.verify_chunks[0])
        return sum(c.cost(n, chunk) + c.cost(n, n) for chunk in p.verify_chunks) + legacy

    def adapters_work(c: Context, p: Plan, n: int) -> float:
        F = p.adapter_frames
        per_variant = 2 * c.cost(F, p.adapter_chunks[0]) + sum(c.cost(F, k) for k in p.adapter_chunks[1:])
        return 4 * (per_variant + c.cost(F, p.split_chunk)) + 4 * c.cost(F, p.adapter_chunks[0])

    def speed_work(c: Context, p: Plan, n: int) -> float:
        return (p.repeats + 2) * sum(c.cost(n + max(p.speed_chunks), k) for k in p.speed_chunks)

    def batch_work(c: Context, p: Plan, n: int) -> float:
        B, T = batch_guess(c), n + p.batch_chunk
        probes = sum(c.cost(n + 2 * p.batch_chunk, p.batch_chunk, b) for b in doublings(B)) if c.cuda else 0.0
        return probes + (p.repeats + 2) * c.cost(T, p.batch_chunk, B)

    def adapter_speed_work(c: Context, p: Plan, n: int) -> float:
        one = c.cost(adapter_speed_frames(c), p.batch_chunk)
        return (p.repeats + 1) * (2 * 2 * 1.5 * one + 5 * one) + p.repeats * 3 * one

    def long_work(c: Context, p: Plan, n: int) -> float:
        return c.cost(p.long_frames, p.batch_chunk, c.largest_batch or batch_guess(c))

    return [
        Section("verification", verification, est(verification_work), check=True),
        Section("causality", causality, est(lambda c, p, n: 2 * c.cost(max(128, 2 * p.causality_chunk),
                                                                         p.causality_chunk)), check=True),
        Section("adapters", adapters, est(adapters_work, startups=5), check=True),
        Section("rng", rng, est(lambda c, p, n: 6 * c.cost(p.rng_frames, p.causality_chunk), startups=2), check=True),
        Section("speed", speed, est(speed_work)),
        Section("batch", batch, est(batch_work)),
        Section("adapter_speed", adapter_speed, est(adapter_speed_work, startups=3)),
        Section("mimi", mimi, lambda c: fixed + (0 if quick else 10.0)),
        Section("long_document", long_document, est(long_work)),
    ]


def doublings(cap: int) -> list[int]:
    """The batch sizes --batch_size auto's probe tries up to ``cap`` (and the one past it)."""
    sizes = [1]
    while sizes[-1] < min(cap * 2, AUTO_MAX_BATCH):
        sizes.append(min(sizes[-1] * 2, AUTO_MAX_BATCH))
    return sizes


def adapter_speed_frames(ctx: Context) -> int:
    return ctx.plan.adapter_frames if ctx.plan.quick else ctx.context + ctx.plan.batch_chunk


def batch_guess(ctx: Context) -> int:
    """The batch ``--batch_size auto`` will likely pick, from free memory and the KV cache's size
    (2, the smoke run's, off CUDA); only for estimates."""
    if ctx.largest_batch is not None:
        return ctx.largest_batch
    if not ctx.cuda:
        return 2
    free_bytes, _ = torch.cuda.mem_get_info(ctx.device)
    layers = len(ctx.lm.transformer.layers)
    per_stream = 2 * layers * (ctx.context + ctx.plan.batch_chunk) * ctx.lm.dim * ctx.lm.dtype.itemsize * 1.5
    return max(1, min(AUTO_MAX_BATCH, int(free_bytes // per_stream)))


# -- the report --------------------------------------------------------------------------------

def fmt(value: Any, spec: str = ".3g") -> str:
    if value is None:
        return "-"
    if isinstance(value, bool) or isinstance(value, str):
        return str(value)
    return format(value, spec)


def gib(value: Any) -> str:
    return f"{value:.1f} GiB" if isinstance(value, (int, float)) else str(value)


def markdown(report: dict) -> str:
    """The block for benchmarks/RESULTS.md."""
    meta, s = report["meta"], report["sections"]
    get = lambda name: s.get(name, {}) if s.get(name, {}).get("status") == "done" else {}  # noqa: E731
    lines = [f"### gpu_check: {meta['device']}, {meta['date']}, commit {meta['commit']}", "",
             f"`{meta['command']}`: torch {meta['torch']}, {meta['dtype']}, {meta['model']}, random weights "
             f"(output heads scaled to an NLL spread of 2.5 nats), budget {report['budget_s']:g} s, "
             f"{report['elapsed_s']:.0f} s used. Checks: **{'all passed' if report['checks_passed'] else 'FAILED: ' + ', '.join(report['failed_checks'])}**.",
             "", "| figure | value |", "|---|---|"]
    setup_ = get("setup")
    if setup_:
        lines.append(f"| bf16 matmul rate (measured) | {fmt(setup_['matmul_tflops'], '.4g')} TFLOP/s |")
        lines.append(f"| model | {setup_['params_billion']:.3g} B parameters, context {setup_['context']}, "
                     f"{setup_['gflop_per_frame']['total']:.4g} GFLOP per frame; moshi compile: {setup_['compile']} |")
        lines.append(f"| NLL of the scaled heads | mean {setup_['heads']['nll_mean']:.2f}, std {setup_['heads']['nll_std']:.2f} nats |")
    for chunk, entry in get("verification").get("chunks", {}).items():
        d, dec = entry["differences"], entry["decision"]
        caught = ", ".join(f"{k}: {'caught' if v['caught'] else 'MISSED'}" for k, v in entry["injected"].items())
        lines.append(f"| verification, {d['n']} NLL values, chunk {chunk} | max {fmt(d['max_abs'])}, mean |d| "
                     f"{fmt(d['mean_abs'])}, mean d {fmt(d['mean'], '+.2g')}, p99 {fmt(d['p99_abs'])}, p99.9 "
                     f"{fmt(d['p99.9_abs'])} nats: {'passed' if dec['passed'] else 'FAILED ' + str(dec['failed'])}; {caught} |")
    c = get("causality")
    if c:
        lines.append(f"| causality, cut at {c['perturbed_from']} | earlier NLL moved by {fmt(c['max_abs_change_before'])} "
                     f"(limit {c['tolerance']:g}), later by {fmt(c['max_abs_change_after'])}: {'passed' if c['passed'] else 'FAILED'} |")
    a = get("adapters")
    for name, v in a.get("variants", {}).items():
        inv = ", ".join(f"chunk {k}: max {fmt(x['max_abs_diff'])}, q99 {fmt(x['quantile_abs_diff'])}"
                        for k, x in v["chunk_invariance"].items())
        lines.append(f"| {name}, {a['layers']} | gate 0 == frozen: {v['gate_zero_is_frozen']['exact']}; open gates "
                     f"move the NLL by up to {fmt(v['open_gate_moves_nll_by'])}; vs chunk {a['base_chunk']}: {inv}: "
                     f"{'passed' if v['passed'] else 'FAILED'} |")
    if a:
        lines.append(f"| dyneval lr=0 == frozen | {a['dyneval lr=0 is frozen']['exact']} "
                     f"(max diff {fmt(a['dyneval lr=0 is frozen']['max_abs_diff'])}) |")
    r = get("rng")
    if r:
        lines.append(f"| simple_evaluate leaves the RNG and weights as found | CUDA RNG {r['cuda_rng_unchanged']}, "
                     f"CPU RNG {r['cpu_rng_unchanged']}, weights {r['weights_unchanged']} |")
    sp = get("speed")
    if sp:
        per = ", ".join(f"chunk {k}: {v['frames_per_s']:.0f}" for k, v in sp["chunks"].items())
        best = sp["chunks"][str(sp["best_chunk"])]
        lines.append(f"| **frames/s, one recording (batch 1)** | **{sp['frames_per_s']:.0f}** ({per}); "
                     f"{fmt(best['tflops'], '.3g')} TFLOP/s ({fmt(best['pct_of_matmul'], '.1f')}% of matmul); "
                     f"peak {gib(sp['peak_gib'])} |")
        lines.append(f"| **a 33-minute recording ({FRAMES_33_MIN} frames), batch 1** | **{sp['seconds_33_min_recording']:.1f} s** "
                     f"({sp['vs_old_method_5.4_fps']:.0f}x the old method's 5.4 frames/s) |")
    b = get("batch")
    if b:
        lines.append(f"| largest batch (--batch_size auto), chunk {b['chunk']} | {b['largest_batch']}: "
                     f"{b['frames_per_s']:.0f} frames/s, {fmt(b['tflops'], '.3g')} TFLOP/s "
                     f"({fmt(b['pct_of_matmul'], '.1f')}% of matmul), peak {gib(b['peak_gib'])}; "
                     f"{b['seconds_per_33_min_recording']:.2f} s per 33-minute recording |")
    ad = get("adapter_speed")
    if ad:
        parts = [f"{k}: {v['x_frozen']:.3f}x" if isinstance(v, dict) else f"{k}: {v}"
                 for k, v in ad.items() if isinstance(v, (dict, str)) and k not in ("status",)]
        lines.append(f"| relative to frozen, batch 1, chunk {ad['chunk']} | {'; '.join(parts)} |")
    m = get("mimi")
    if m:
        lines.append(f"| Mimi encoding ({m['architecture']}), x real time | " + ", ".join(
            f"batch {k}: {v:.0f}x" for k, v in m["x_real_time"].items()) + " |")
    ld = get("long_document")
    if ld:
        lines.append(f"| {ld['frames']}-frame documents, --batch_size auto | batch {ld['batch']}, peak "
                     f"{gib(ld['peak_gib'])}, {ld['frames_per_s']:.0f} frames/s |")
    for item in report["skipped"]:
        lines.append(f"| {item['section']} | not run: {item['reason']} |")
    return "\n".join(lines) + "\n"


def write(report: dict, out: Path) -> None:
    report["elapsed_s"] = elapsed()
    checks = {n: v.get("passed") for n, v in report["sections"].items() if v.get("check") and v.get("status") == "done"}
    report["failed_checks"] = sorted(n for n, ok in checks.items() if not ok)
    report["failed_checks"] += sorted(n for n, v in report["sections"].items() if v.get("status") == "error")
    report["checks_passed"] = not report["failed_checks"]
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "gpu_check.json.tmp"
    tmp.write_text(json.dumps(report, indent=1, default=str) + "\n")
    tmp.replace(out / "gpu_check.json")
    (out / "gpu_check.md").write_text(markdown(report))


# -- main --------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (a smoke run on a CPU)")
    parser.add_argument("--budget", type=float, default=330.0,
                        help="seconds from the start of Python; sections that would overrun are skipped")
    parser.add_argument("--repeats", type=int, default=None, help="timing rounds (default 3; quick 1)")
    parser.add_argument("--compile", choices=("moshi", "off"), default="moshi",
                        help="moshi: moshi's lazy torch.compile of its helpers on CUDA, as users run it "
                             "(falls back to eager if compiling fails); off: eager")
    parser.add_argument("--sections", default=None, help="a comma-separated subset (default: all, in order)")
    parser.add_argument("--out", default=None, help="output folder (default $OUT, else benchmarks/gpu/out)")
    args = parser.parse_args(argv)
    default_out = os.environ.get("OUT") or str(Path(__file__).resolve().parent / "gpu" / "out")
    args.out = Path(args.out or default_out)
    return args


def package_versions() -> dict[str, str]:
    """The versions this run imported (on the device: the carried wheels and its own packages)."""
    from importlib import metadata

    versions = {"python": sys.version.split()[0]}
    for name in ("torch", "moshi", "numpy", "safetensors", "huggingface_hub", "soundfile", "soxr", "accelerate"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


@contextlib.contextmanager
def budget_alarm(seconds_left: float):
    """Raise OverBudget in this (main) thread when the budget ends."""
    def ring(signum, frame):
        raise OverBudget()

    usable = hasattr(signal, "setitimer") and sys.platform != "win32"
    try:
        import threading
        usable = usable and threading.current_thread() is threading.main_thread()
    except ImportError:
        pass
    if not usable:
        yield
        return
    previous = signal.signal(signal.SIGALRM, ring)
    signal.setitimer(signal.ITIMER_REAL, max(0.001, seconds_left))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_section(ctx: Context, report: dict, name: str, run: Callable[[Context], dict], estimate: float | None,
                check: bool) -> bool:
    """Run one section under the budget; record it. False: the budget is spent, stop."""
    budget = ctx.args.budget
    left = budget - elapsed()
    entry: dict[str, Any] = {"check": check, "estimate_s": estimate}
    if estimate is not None and estimate > left:
        entry.update(status="skipped", reason=f"estimated {estimate:.0f} s, {max(left, 0):.0f} s of the budget left")
        report["sections"][name] = entry
        report["skipped"].append({"section": name, "reason": entry["reason"]})
        print(f"[{name}] skipped: {entry['reason']}", flush=True)
        return True
    start = time.monotonic()
    print(f"[{name}] running (estimate {fmt(estimate, '.0f')} s, {left:.0f} s left)", flush=True)
    try:
        with budget_alarm(left):
            fields = run(ctx)
        entry.update(status="done", **fields)
    except OverBudget:
        entry.update(status="stopped", reason=f"the budget of {budget:g} s ended after {time.monotonic() - start:.0f} s")
        report["skipped"].append({"section": name, "reason": entry["reason"]})
    except Exception as exc:  # noqa: BLE001 - recorded; the other sections still run
        entry.update(status="error", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc(limit=8))
        print(entry["traceback"], file=sys.stderr, flush=True)
    finally:
        free(ctx.device)
    entry["seconds"] = time.monotonic() - start
    report["sections"][name] = entry
    status = entry["status"] + (f" ({entry.get('reason') or entry.get('error')})" if entry["status"] != "done" else "")
    passed = f", passed: {entry.get('passed')}" if check and entry["status"] == "done" else ""
    print(f"[{name}] {status} in {entry['seconds']:.1f} s{passed}", flush=True)
    return entry["status"] != "stopped"


def compile_mode(args, device: torch.device) -> contextlib.AbstractContextManager:
    """Off CUDA, or with --compile off, moshi's helpers run eagerly."""
    if device.type != "cuda" or args.compile == "off":
        args.compile_status = "off (eager)" if device.type == "cuda" else "off (not CUDA)"
        return no_compile()
    args.compile_status = "moshi's lazy torch.compile"
    return contextlib.nullcontext()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device, dtype = torch.device(args.device), resolve_dtype(args.dtype)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run with --device cpu --quick for a smoke run", file=sys.stderr)
        return 2
    plan = Plan.make(args.quick, args.repeats)
    ctx = Context(args, plan, device, dtype)
    chosen = None if args.sections is None else set(args.sections.split(","))
    header = machine_line()
    report: dict[str, Any] = {
        "schema": SCHEMA, "budget_s": args.budget, "not_measured": NOT_MEASURED,
        "meta": {"device": device_name(device), "torch": torch.__version__, "dtype": str(dtype).removeprefix("torch."),
                 "quick": plan.quick, "model": "tiny preset shape" if plan.quick else "Moshi 7B shape",
                 "command": "python benchmarks/gpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                 "machine": header, "commit": header.split(",")[0].removeprefix("commit "),
                 "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "plan": plan.__dict__,
                 "versions": package_versions(), "python_start_to_main_s": elapsed()},
        "sections": {}, "skipped": []}
    print(f"gpu_check on {report['meta']['device']}, {report['meta']['dtype']}, {report['meta']['model']}, "
          f"budget {args.budget:g} s\n{header}", flush=True)
    grad = torch.is_grad_enabled()
    try:
        with compile_mode(args, device), cpu_no_compile(device):
            go_on = run_section(ctx, report, "setup", setup, None, False)
            write(report, args.out)
            stop_reason = "the budget ended" if not go_on else "setup failed"
            go_on = go_on and report["sections"]["setup"]["status"] == "done"
            for section in sections(plan.quick):
                if chosen is not None and section.name not in chosen:
                    continue
                if not go_on:
                    report["sections"][section.name] = {"check": section.check, "status": "skipped",
                                                        "reason": stop_reason}
                    report["skipped"].append({"section": section.name, "reason": stop_reason})
                    continue
                go_on = run_section(ctx, report, section.name, section.run, section.estimate(ctx), section.check)
                stop_reason = "the budget ended"
                write(report, args.out)
    finally:
        torch.set_grad_enabled(grad)
        write(report, args.out)
    print(markdown(report), flush=True)
    print(f"gpu_check: {report['elapsed_s']:.0f} s, report in {args.out}/gpu_check.json and gpu_check.md", flush=True)
    return 0 if report["checks_passed"] else 1


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.WARNING)
    sys.exit(main())
