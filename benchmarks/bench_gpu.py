"""Throughput where users run ttt-bench: a Moshi-7B-shaped LM on a GPU.

moshi's default 7B config (``loaders._lm_kwargs``) with random weights, in bf16, on one CUDA
device; nothing is downloaded. Sections (``--sections``, all by default):

  matmul     the device's measured bf16 matmul rate (the ceiling for the TFLOP/s below)
  precision  NLL of the same weights in bf16 vs float32 on a short stream (flag over 5e-2)
  sweep      the chunked scorer: frames/s, achieved TFLOP/s and peak device memory for every
             chunk size and batch size 1..the largest that fits (``--batch_sizes auto``: the
             runner's own ``--batch_size auto`` probe), over a stream past the 3000-frame
             context; host-device synchronisations per score() call; the text head skipped vs
             computed (same NLL required)
  stepping   frame-by-frame stepping as the old method did it, over a short stream, and one
             plain LMModel.forward (the floor), against the chunked scorer at batch 1
  adapters   ttt (TTT-Linear and TTT-MLP in the last 2 and 8 layers) and dyneval (all
             parameters, norms only) relative to frozen
  mimi       Mimi encoding (full-size architecture, random weights) of batched audio, x real time

FLOPs per frame are counted from the model's configuration (``flops_per_frame``). Timings are
medians over rounds taken in turn (benchmarks/common.py), synchronised with the device.

    python benchmarks/bench_gpu.py                            # CUDA, bf16, Moshi 7B shape
    python benchmarks/bench_gpu.py --sections sweep,stepping  # some sections only
    python benchmarks/bench_gpu.py --device cpu --quick       # the tiny preset's shape on a CPU (smoke run;
                                                              # add --dtype float32: bf16 is slow on CPUs)
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from moshi.models import loaders
from moshi.models.lm import LMModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import QUICK_CONTEXT, Case, format_ratio, machine_line, median_speed, paired_ratio, round_robin  # noqa: E402
from moshi_reference import stepwise_nll  # noqa: E402

from ttt_bench.evaluation.batching import AUTO_MAX_BATCH, auto_batch_size, is_oom  # noqa: E402
from ttt_bench.models.base import StreamLayout  # noqa: E402
from ttt_bench.models.dyneval import DynEvalScorer  # noqa: E402
from ttt_bench.models.frozen import FrozenScorer, cpu_no_compile  # noqa: E402
from ttt_bench.models.loading.moshi import TINY_LM_CONFIG, ModelSource, load_mimi, resolve_dtype  # noqa: E402
from ttt_bench.models.streaming import forward_nll  # noqa: E402
from ttt_bench.models.ttt import TTTScorer  # noqa: E402
from ttt_bench.tasks.base import Document  # noqa: E402

SECTIONS = ("matmul", "precision", "sweep", "stepping", "adapters", "mimi")
FRAMES_33_MIN = int(33 * 60 * 12.5)  # 24750 frames
PRECISION_FLAG = 5e-2  # nats: mean |NLL bf16 - NLL float32| above this is flagged


# -- the model and its FLOPs ----------------------------------------------------------------

def lm_config(quick: bool) -> dict:
    if quick:
        return {**copy.deepcopy(TINY_LM_CONFIG), "context": QUICK_CONTEXT}
    return copy.deepcopy(loaders._lm_kwargs)  # moshi's Moshi 7B


def build_lm(config: dict, device: torch.device, dtype: torch.dtype, seed: int = 0) -> LMModel:
    torch.manual_seed(seed)
    return loaders.get_moshi_lm(None, lm_kwargs=copy.deepcopy(config), device=device, dtype=dtype).eval()


def linear_macs(module: torch.nn.Module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))


def flops_per_frame(lm: LMModel, text_head: bool = False) -> dict[str, float]:
    """Multiply-adds x 2 of scoring one frame, by part, from the model's shapes.

    Every linear layer of the main transformer runs once per frame; its attention reads
    ``context`` keys per query (the steady state past the context; the ring holds
    context + chunk - 1 keys, the mask uses ``context`` of them). The depformer runs its
    ``dep_q`` positions per frame, each with one of its per-step weight sets, attending causally
    to the positions before it. Embedding lookups cost no multiply-adds.
    """
    dep_q, dep_layers = lm.dep_q, lm.depformer.layers
    weight_sets = max(len(layer.self_attn.in_projs) for layer in dep_layers)
    depformer_dim = lm.depformer_in[0].weight.shape[0]
    parts = {
        "transformer": linear_macs(lm.transformer),
        "attention": 2 * lm.context * lm.dim * len(lm.transformer.layers),
        "text head": linear_macs(lm.text_linear) if text_head else 0,
        "depformer": (dep_q * linear_macs(lm.depformer_in) / len(lm.depformer_in)
                      + dep_q * linear_macs(lm.depformer) / weight_sets
                      + 2 * (dep_q * (dep_q + 1) // 2) * depformer_dim * len(dep_layers)),
        "heads": linear_macs(lm.linears),
    }
    parts = {name: 2.0 * macs for name, macs in parts.items()}
    parts["total"] = sum(parts.values())
    return parts


# -- timing on a device ---------------------------------------------------------------------

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_clock(device: torch.device) -> Callable[[Callable[[], object]], float]:
    def clock(run: Callable[[], object]) -> float:
        synchronize(device)
        start = time.perf_counter()
        run()
        synchronize(device)
        return time.perf_counter() - start
    return clock


def peak_memory_gib(device: torch.device, run: Callable[[], object]) -> float | None:
    """Peak device memory allocated during ``run`` (None off CUDA)."""
    if device.type != "cuda":
        run()
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    run()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**30


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def count_syncs(device: torch.device, run: Callable[[], object]) -> int | None:
    """Host-device synchronisations during ``run`` (CUDA's sync debug mode; None off CUDA)."""
    if device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message).lower() for w in caught)


def codes_of(T: int, card: int, B: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, card, (B, 8, T), generator=torch.Generator().manual_seed(seed))


def fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


# -- sections -------------------------------------------------------------------------------

def matmul_rate(args, device: torch.device, dtype: torch.dtype) -> float:
    """Measured dense matmul rate in TFLOP/s (median over rounds)."""
    n = 256 if args.quick else 8192
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    per_call = 10
    case = Case(lambda: [a @ b for _ in range(per_call)], 2 * n ** 3 * per_call / 1e12)
    case.run()
    rate = median_speed(round_robin({"matmul": case}, args.repeats, device_clock(device)), "matmul")
    print(f"[matmul] {n}x{n} {str(dtype).removeprefix('torch.')}: {rate:.2f} TFLOP/s")
    return rate


def precision_check(args, device: torch.device, dtype: torch.dtype) -> None:
    """Scores a short stream in float32, converts the same weights to ``dtype``, scores again."""
    lm = build_lm(args.config, device, torch.float32)
    codes = codes_of(args.check_frames, lm.card, seed=1)
    reference = FrozenScorer(lm=lm).score(codes, chunk_size=args.adapter_chunk)
    lm = lm.to(dtype)
    nll = FrozenScorer(lm=lm).score(codes, chunk_size=args.adapter_chunk)
    diff = (nll - reference).nan_to_num()
    mean_abs = float(diff.abs().mean())
    flag = "FLAGGED" if mean_abs > PRECISION_FLAG else "ok"
    print(f"[precision] {str(dtype).removeprefix('torch.')} vs float32, {args.check_frames} frames, chunk "
          f"{args.adapter_chunk}: mean |diff| {mean_abs:.2e}, max |diff| {float(diff.abs().max()):.2e}, "
          f"diff of means {float(nll.nanmean() - reference.nanmean()):+.2e} nats ({flag}: flag over {PRECISION_FLAG:g})")
    del lm
    free(device)


def batch_sizes_for(args, scorer: FrozenScorer, chunk: int, codes: torch.Tensor) -> list[int]:
    if args.batch_sizes != "auto":
        return [int(b) for b in args.batch_sizes.split(",")]
    docs = [Document(f"probe{i}", codes[0]) for i in range(AUTO_MAX_BATCH)]
    largest = auto_batch_size(scorer, docs, chunk, StreamLayout())
    sizes = [1]
    while sizes[-1] * 2 <= largest:
        sizes.append(sizes[-1] * 2)
    return sizes + ([largest] if sizes[-1] != largest else [])


def sweep(args, lm: LMModel, device: torch.device, matmul: float | None) -> dict[str, float]:
    scorer, with_head = FrozenScorer(lm=lm), FrozenScorer(lm=lm)
    with_head.skip_text_head = False
    T = args.frames
    codes = codes_of(T, lm.card)
    flops = flops_per_frame(lm)["total"]
    cases, memory = {}, {}
    for chunk in args.chunks:
        for B in batch_sizes_for(args, scorer, chunk, codes):
            batch = codes.expand(B, -1, -1).contiguous()
            try:
                memory[chunk, B] = peak_memory_gib(device, lambda: scorer.score(batch, chunk_size=chunk))
            except Exception as exc:  # noqa: BLE001 - out of memory ends this chunk size's batch sizes
                if not is_oom(exc):
                    raise
                free(device)
                print(f"[sweep] chunk {chunk}, batch {B}: out of memory")
                break
            cases[f"{chunk} {B}"] = Case(lambda b=batch, c=chunk: scorer.score(b, chunk_size=c), B * T)
    cases["head"] = Case(lambda: with_head.score(codes, chunk_size=args.adapter_chunk), T)
    if f"{args.adapter_chunk} 1" not in cases:
        cases[f"{args.adapter_chunk} 1"] = Case(lambda: scorer.score(codes, chunk_size=args.adapter_chunk), T)
    speeds = round_robin(cases, args.repeats, device_clock(device))

    print(f"[sweep] chunked scorer, {T} frames per stream (context {lm.context}), "
          f"{flops / 1e9:.4g} GFLOP per frame counted from the config")
    print(f"{'chunk':>6}{'batch':>6}{'frames/s':>12}{'TFLOP/s':>10}{'% of matmul':>12}{'peak GiB':>10}")
    for key in (k for k in cases if k != "head" and tuple(map(int, k.split())) in memory):
        chunk, B = map(int, key.split())
        fps = median_speed(speeds, key)
        tflops = fps * flops / 1e12
        share = f"{100 * tflops / matmul:.1f}" if matmul else "-"
        print(f"{chunk:>6}{B:>6}{fps:>12.1f}{tflops:>10.2f}{share:>12}{fmt(memory[chunk, B], '.2f'):>10}")
    head_diff = float((scorer.score(codes, chunk_size=args.adapter_chunk)
                       - with_head.score(codes, chunk_size=args.adapter_chunk)).nan_to_num().abs().max())
    print(f"[sweep] text head skipped vs computed, chunk {args.adapter_chunk}, batch 1: "
          f"{format_ratio(paired_ratio(speeds, f'{args.adapter_chunk} 1', 'head'), 3)}, max |NLL diff| "
          f"{head_diff:.1e} (must be 0)")
    n_chunks = -(-T // args.adapter_chunk)
    syncs = count_syncs(device, lambda: scorer.score(codes, chunk_size=args.adapter_chunk))
    print(f"[sweep] host-device synchronisations in one score() of {n_chunks} chunks: "
          f"{fmt(syncs, 'd') if syncs is not None else '- (not a CUDA device)'}")
    if head_diff != 0.0:
        raise SystemExit(f"skipping the text head changed the NLL by {head_diff:.2e}: it must not change it at all")

    single = {int(k.split()[0]): median_speed(speeds, k) for k in cases if k.endswith(" 1") and k != "head"}
    best_chunk = max(single, key=single.get)
    best_key = max((k for k in cases if k != "head"), key=lambda k: median_speed(speeds, k))
    return {"best_chunk": best_chunk, "fps_1": single[best_chunk], "fps_best": median_speed(speeds, best_key),
            "best_key": best_key, "flops": flops}


def stepping(args, lm: LMModel, device: torch.device, chunk: int) -> None:
    codes = codes_of(args.frames, lm.card)
    step_codes, fwd_codes = codes[..., :args.step_frames], codes[..., :args.forward_frames]
    scorer = FrozenScorer(lm=lm)
    cases = {
        "step": Case(lambda: stepwise_nll(lm, step_codes), args.step_frames),
        "chunked": Case(lambda: scorer.score(codes, chunk_size=chunk), args.frames),
        "forward": Case(lambda: forward_nll(lm, fwd_codes.to(device), StreamLayout()), args.forward_frames),
    }
    for case in cases.values():  # warm-up (and moshi's lazy compilation on CUDA)
        case.run()
    speeds = round_robin(cases, args.repeats, device_clock(device))
    print(f"[stepping] frame by frame ({args.step_frames} frames): {median_speed(speeds, 'step'):.1f} frames/s; "
          f"one LMModel.forward ({args.forward_frames} frames): {median_speed(speeds, 'forward'):.1f} frames/s; "
          f"chunked, chunk {chunk}, batch 1 ({args.frames} frames): {median_speed(speeds, 'chunked'):.1f} frames/s")
    print(f"[stepping] chunked vs frame by frame: {format_ratio(paired_ratio(speeds, 'chunked', 'step'), 1)}; "
          f"chunked vs one forward pass: {format_ratio(paired_ratio(speeds, 'chunked', 'forward'))}")


def adapters(args, lm: LMModel, device: torch.device, dtype: torch.dtype) -> None:
    """Each adapter round-robin with frozen on the same stream, batch 1. TTT adds layers to its
    own copy of the model (built from the same seed); dyneval shares ``lm`` (restored per call)."""
    codes = codes_of(args.frames, lm.card)
    chunk = args.adapter_chunk
    frozen = FrozenScorer(lm=lm)
    variants: dict[str, Callable[[], object]] = {}
    for n in args.ttt_layers:
        for inner in ("linear", "mlp"):
            variants[f"ttt-{inner} last {n}"] = (
                lambda n=n, inner=inner: TTTScorer(lm=build_lm(args.config, device, dtype), layers=f"last {n}",
                                                   inner=inner, mini_batch_size=16))
    variants["dyneval norms"] = lambda: DynEvalScorer(lm=lm, lr=1e-3, optimizer="sgd", params="norms")
    variants["dyneval all"] = lambda: DynEvalScorer(lm=lm, lr=1e-5, optimizer="sgd", params="all")
    print(f"[adapters] frames/s relative to frozen, chunk {chunk}, batch 1, {args.frames} frames")
    for name, make in variants.items():
        try:
            scorer = make()
            cases = {"frozen": Case(lambda: frozen.score(codes, chunk_size=chunk), args.frames),
                     name: Case(lambda: scorer.score(codes, chunk_size=chunk), args.frames)}
            cases[name].run()  # warm-up
            speeds = round_robin(cases, args.repeats, device_clock(device))
            print(f"{name:>22}: {median_speed(speeds, name):10.1f} frames/s, "
                  f"{format_ratio(paired_ratio(speeds, name, 'frozen'), 3)} frozen")
        except Exception as exc:  # noqa: BLE001 - a variant that does not fit is reported, the rest still run
            if not is_oom(exc):
                raise
            print(f"{name:>22}: out of memory")
        finally:
            scorer = None
            free(device)


def mimi_encoding(args, device: torch.device) -> dict[int, float]:
    """Mimi encoding speed, x real time, per batch size (also printed)."""
    from ttt_bench.audio.codec import MimiCodec

    if args.quick:
        mimi = load_mimi(ModelSource.make(preset="tiny"), device=device)
    else:  # the full-size Mimi architecture with random weights (no download)
        torch.manual_seed(0)
        mimi = loaders.get_mimi(None, device=device, num_codebooks=8).eval()
    codec = MimiCodec(mimi, device=device)
    rng = np.random.default_rng(0)
    audio = (0.1 * rng.standard_normal(int(args.mimi_seconds * 24000))).astype(np.float32)
    codec.encode_streams([[audio[:24000]]])  # warm-up
    cases = {str(B): Case(lambda B=B: codec.encode_streams([[audio]] * B), B * args.mimi_seconds)
             for B in args.mimi_batches}
    speeds = round_robin(cases, args.repeats, device_clock(device))
    realtime = {B: median_speed(speeds, str(B)) for B in args.mimi_batches}
    print(f"[mimi] encoding {args.mimi_seconds:g} s recordings, chunk {codec.chunk_frames} frames: " + ", ".join(
        f"batch {B}: {x:.1f}x real time" for B, x in realtime.items()))
    return realtime


# -- main -----------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", help="the model's dtype in the timed sections")
    parser.add_argument("--check_dtype", default="bfloat16", help="the dtype the precision section compares to float32")
    parser.add_argument("--quick", action="store_true", help="the tiny preset's shape, short streams")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"any of {','.join(SECTIONS)}")
    parser.add_argument("--chunks", default=None, help="chunk sizes (default 64,128,256,512,1024; quick 8,16)")
    parser.add_argument("--batch_sizes", default=None, help="'auto' (default; quick 1,2) or a list, e.g. 1,4,16")
    parser.add_argument("--frames", type=int, default=None, help="stream length (default context + largest chunk)")
    parser.add_argument("--step_frames", type=int, default=None, help="frame-stepping stream (default 64; quick 4)")
    parser.add_argument("--forward_frames", type=int, default=None, help="LMModel.forward stream (default 1000; quick 20)")
    parser.add_argument("--check_frames", type=int, default=None, help="precision check stream (default 256; quick 32)")
    parser.add_argument("--adapter_chunk", type=int, default=None, help="chunk for adapters/precision (default 256; quick 8)")
    parser.add_argument("--ttt_layers", default=None, help="TTT in the last N layers (default 2,8; quick 2)")
    parser.add_argument("--mimi_batches", default=None, help="Mimi batch sizes (default 1,8,32; quick 1,2)")
    parser.add_argument("--mimi_seconds", type=float, default=None, help="seconds per Mimi stream (default 60; quick 1)")
    parser.add_argument("--repeats", type=int, default=None, help="rounds (default 3; quick 1)")
    args = parser.parse_args(argv)
    quick = args.quick
    args.config = lm_config(quick)
    args.sections = [s for s in args.sections.split(",") if s]
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    args.chunks = [int(c) for c in (args.chunks or ("8,16" if quick else "64,128,256,512,1024")).split(",")]
    args.batch_sizes = args.batch_sizes or ("1,2" if quick else "auto")
    args.frames = args.frames or args.config["context"] + max(args.chunks)
    args.step_frames = args.step_frames or (4 if quick else 64)
    args.forward_frames = args.forward_frames or (20 if quick else 1000)
    args.check_frames = args.check_frames or (32 if quick else 256)
    args.adapter_chunk = args.adapter_chunk or (8 if quick else 256)
    args.ttt_layers = [int(n) for n in (args.ttt_layers or ("2" if quick else "2,8")).split(",")]
    args.mimi_batches = [int(b) for b in (args.mimi_batches or ("1,2" if quick else "1,8,32")).split(",")]
    args.mimi_seconds = args.mimi_seconds or (1.0 if quick else 60.0)
    args.repeats = args.repeats or (1 if quick else 3)
    return args


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name}, {props.total_memory / 2**30:.0f} GiB"
    return "CPU"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device, dtype = torch.device(args.device), resolve_dtype(args.dtype)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_gpu: no CUDA device here; run with --device cpu --quick for a smoke run", file=sys.stderr)
        raise SystemExit(2)
    print(f"bench_gpu on {device_name(device)}, {str(dtype).removeprefix('torch.')}, "
          f"{'tiny preset shape' if args.quick else 'Moshi 7B shape (moshi default config)'}, random weights, "
          f"{args.repeats} rounds\n{machine_line()}")
    with cpu_no_compile(device):
        run(args, device, dtype)


def run(args, device: torch.device, dtype: torch.dtype) -> None:
    matmul = matmul_rate(args, device, dtype) if "matmul" in args.sections else None
    if "precision" in args.sections:
        precision_check(args, device, resolve_dtype(args.check_dtype))
    lm = build_lm(args.config, device, dtype)
    parts = flops_per_frame(lm)
    print(f"[model] {sum(p.numel() for p in lm.parameters()) / 1e9:.2f}B parameters, context {lm.context}; "
          "GFLOP per frame: " + ", ".join(f"{name} {value / 1e9:.4g}" for name, value in parts.items()))
    summary = None
    with torch.no_grad():
        if "sweep" in args.sections:
            summary = sweep(args, lm, device, matmul)
        if "stepping" in args.sections:
            stepping(args, lm, device, summary["best_chunk"] if summary else args.adapter_chunk)
    if "adapters" in args.sections:
        adapters(args, lm, device, dtype)
    del lm
    free(device)
    if "mimi" in args.sections:
        mimi_encoding(args, device)
    if summary:
        chunk, B = summary["best_key"].split()
        print(f"\n== headline ==\none recording (batch 1, chunk {summary['best_chunk']}): "
              f"{summary['fps_1']:.0f} frames/s, a 33-minute recording ({FRAMES_33_MIN} frames) in "
              f"{FRAMES_33_MIN / summary['fps_1']:.1f} s\nbest throughput (chunk {chunk}, batch {B}): "
              f"{summary['fps_best']:.0f} frames/s = {summary['fps_best'] * summary['flops'] / 1e12:.2f} TFLOP/s"
              + (f" ({100 * summary['fps_best'] * summary['flops'] / 1e12 / matmul:.1f}% of the measured matmul rate)"
                 if matmul else "")
              + f", {FRAMES_33_MIN / summary['fps_best']:.1f} s per 33-minute recording")


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.WARNING)
    main()
