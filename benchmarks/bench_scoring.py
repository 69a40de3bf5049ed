"""Speed and exactness of the chunked streaming scorer against frame-by-frame stepping.

Runs, in one process, float32 on the CPU, on the ~100M-parameter benchmark model:
  (a) frame-by-frame stepping (the old method: one frame per call, depformer codebook by codebook)
  (b) the chunked scorer at several chunk sizes over a stream past the context
  (b') the chunked scorer computing the unused text head, as moshi's forward_text does
  (c) one non-streaming LMModel.forward within the context (the floor)
All cases run in turn, round after round; a ratio is the median over rounds of the ratio within
a round (benchmarks/common.py), so that load from other processes hits both sides alike. Prints
b/a, b/c, b/b' (with the NLL difference, which must be exactly 0), the max NLL difference
chunked vs frame-by-frame past the context (same model with a short context), and the peak
memory of scoring T=1000 vs T=4000 frames.

    python benchmarks/bench_scoring.py            # full run (about 10-20 minutes on 2 cores)
    python benchmarks/bench_scoring.py --quick    # the tiny preset's shape, short streams (seconds)
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (Case, bench_lm, format_ratio, machine_line, median_speed, n_params,  # noqa: E402
                    paired_ratio, peak_rss_mb, round_robin)
from moshi_reference import stepwise_nll  # noqa: E402

from ttt_bench.models.base import StreamLayout  # noqa: E402
from ttt_bench.models.frozen import FrozenScorer, cpu_no_compile  # noqa: E402
from ttt_bench.models.streaming import forward_nll  # noqa: E402

FULL = {"step": 300, "long": 4000, "forward": 1000, "check": 500, "check_context": 200, "memory_short": 1000}
QUICK = {"step": 12, "long": 64, "forward": 20, "check": 30, "check_context": 8, "memory_short": 32}


def codes_of(T: int, card: int, B: int = 1, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, card, (B, 8, T), generator=g)


@torch.no_grad()
def memory_probe(T: int, chunk: int, quick: bool) -> float:
    """Growth of peak RSS during one score() of T frames, less its output (run in a fresh process)."""
    torch.set_num_threads(min(2, torch.get_num_threads()))
    scorer = FrozenScorer(lm=bench_lm(quick=quick))
    scorer.score(codes_of(chunk, scorer.lm.card), chunk_size=chunk)  # allocate the steady state once
    codes = codes_of(T, scorer.lm.card)
    before = peak_rss_mb()
    nll = scorer.score(codes, chunk_size=chunk)
    return peak_rss_mb() - before - nll.numel() * 4 / 2**20


def peak_scoring_memory_mb(T: int, chunk: int, quick: bool) -> float:
    if quick:  # a smoke run: the probe in this process (its figure is then not the peak of a fresh process)
        return memory_probe(T, chunk, quick)
    cmd = [sys.executable, __file__, "--memory-probe", str(T), str(chunk)] + (["--quick"] if quick else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model, short streams (a smoke run)")
    parser.add_argument("--chunks", default=None, help="chunk sizes for (b) (default 64,128,256,512; quick 8,16,32)")
    parser.add_argument("--head_chunk", type=int, default=None, help="chunk size for (b') (default 256; quick 16)")
    parser.add_argument("--repeats", type=int, default=None, help="rounds (default 5; quick 2)")
    parser.add_argument("--step_frames", type=int, default=None, help="stream for (a) (default 300)")
    parser.add_argument("--frames", type=int, default=None, help="stream for (b) (default 4000)")
    parser.add_argument("--forward_frames", type=int, default=None, help="stream for (c) (default 1000)")
    parser.add_argument("--check_frames", type=int, default=None,
                        help="stream of the exactness check at context 200 (default 500; 0 skips it)")
    parser.add_argument("--skip_memory", action="store_true", help="skip the peak-memory probes")
    parser.add_argument("--memory-probe", nargs=2, type=int, metavar=("T", "CHUNK"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.chunks = [int(c) for c in (args.chunks or ("8,16,32" if args.quick else "64,128,256,512")).split(",")]
    args.head_chunk = args.head_chunk or (16 if args.quick else 256)
    args.repeats = args.repeats or (2 if args.quick else 5)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.memory_probe:
        print(memory_probe(*args.memory_probe, quick=args.quick))
        return
    n = dict(QUICK if args.quick else FULL)
    for key, value in (("step", args.step_frames), ("long", args.frames), ("forward", args.forward_frames),
                       ("check", args.check_frames)):
        if value is not None:
            n[key] = value
    with torch.no_grad(), cpu_no_compile(torch.device("cpu")):  # as the scorer runs on a CPU
        run(args, n)


def run(args: argparse.Namespace, n: dict[str, int]) -> None:
    lm = bench_lm(quick=args.quick)
    scorer = FrozenScorer(lm=lm)
    with_head = FrozenScorer(lm=lm)
    with_head.skip_text_head = False
    print(f"benchmark model: {n_params(lm) / 1e6:.1f}M parameters, context {lm.context}, float32 CPU; "
          f"{args.repeats} rounds\n{machine_line()}")

    step_codes, long_codes = codes_of(n["step"], lm.card), codes_of(n["long"], lm.card)
    fwd_codes = codes_of(n["forward"], lm.card)
    cases = {"step": Case(lambda: stepwise_nll(lm, step_codes), n["step"])}
    for chunk in args.chunks:
        cases[f"chunk {chunk}"] = Case(lambda chunk=chunk: scorer.score(long_codes, chunk_size=chunk), n["long"])
    cases["text head"] = Case(lambda: with_head.score(long_codes, chunk_size=args.head_chunk), n["long"])
    cases["forward"] = Case(lambda: forward_nll(lm, fwd_codes, StreamLayout()), n["forward"])
    for case in cases.values():  # warm-up
        case.run()

    speeds = round_robin(cases, args.repeats)
    print(f"(a) frame-by-frame stepping, {n['step']} frames: {median_speed(speeds, 'step'):.1f} frames/s")
    for chunk in args.chunks:
        print(f"(b) chunked scorer, chunk {chunk:4d}, {n['long']} frames: "
              f"{median_speed(speeds, f'chunk {chunk}'):.1f} frames/s")
    print(f"(b') chunked, chunk {args.head_chunk}, text head computed: {median_speed(speeds, 'text head'):.1f} frames/s")
    print(f"(c) one LMModel.forward, {n['forward']} frames: {median_speed(speeds, 'forward'):.1f} frames/s")
    best = max(args.chunks, key=lambda c: median_speed(speeds, f"chunk {c}"))

    head_diff = float((scorer.score(long_codes, chunk_size=args.head_chunk)
                       - with_head.score(long_codes, chunk_size=args.head_chunk)).nan_to_num().abs().max())
    if n["check"]:
        short = FrozenScorer(lm=bench_lm(context=n["check_context"], quick=args.quick))
        check_codes = codes_of(n["check"], lm.card, seed=1)
        reference = stepwise_nll(short.lm, check_codes)
        diff = max(float((short.score(check_codes, chunk_size=c) - reference).nan_to_num().abs().max())
                   for c in (1, args.chunks[0], best))
    if not args.skip_memory:
        mem_short = peak_scoring_memory_mb(n["memory_short"], best, args.quick)
        mem_long = peak_scoring_memory_mb(n["long"], best, args.quick)

    print("\n== summary (median over rounds of the ratio within a round; min-max over rounds) ==")
    print(f"best chunk size: {best}")
    print(f"b/a (chunked vs frame-by-frame): {format_ratio(paired_ratio(speeds, f'chunk {best}', 'step'), 1)}"
          f"   (target >= 100)")
    print(f"b/c (chunked vs one forward pass): {format_ratio(paired_ratio(speeds, f'chunk {best}', 'forward'))}"
          f"   (target >= 0.7)")
    print(f"b/b' (text head skipped vs computed, chunk {args.head_chunk}): "
          f"{format_ratio(paired_ratio(speeds, f'chunk {args.head_chunk}', 'text head'))}   "
          f"max |NLL diff| {head_diff:.1e} (must be 0)" if f"chunk {args.head_chunk}" in speeds else
          f"b/b': add {args.head_chunk} to --chunks for this ratio; max |NLL diff| {head_diff:.1e} (must be 0)")
    if n["check"]:
        print(f"max |NLL diff| chunked vs frame-by-frame, context {short.lm.context}, {n['check']} frames, "
              f"chunks 1/{args.chunks[0]}/{best}: {diff:.2e}   (target <= 1e-4)")
    if not args.skip_memory:
        print(f"peak RSS growth while scoring (less the output): T={n['memory_short']} {mem_short:.1f} MiB, "
              f"T={n['long']} {mem_long:.1f} MiB   (target: does not grow with T)")
    if head_diff != 0.0:
        raise SystemExit(f"skipping the text head changed the NLL by {head_diff:.2e}: it must not change it at all")


if __name__ == "__main__":
    main()
