"""Speed and exactness of the chunked streaming scorer against frame-by-frame stepping.

Runs, in one process, float32 on the CPU, on the ~100M-parameter benchmark model:
  (a) frame-by-frame stepping (the old method: one frame per call, depformer codebook by codebook)
  (b) the chunked scorer at its best chunk size over a stream past the context
  (c) one non-streaming LMModel.forward within the context (the floor)
and prints b/a, b/c, the max NLL difference chunked vs frame-by-frame past the context (same
model with a short context), and the peak memory of scoring T=1000 vs T=4000 frames.

    python benchmarks/bench_scoring.py            # full run (about 15-25 minutes on 2 cores)
    python benchmarks/bench_scoring.py --quick    # shorter streams, same measurements
"""

from __future__ import annotations

import argparse
import sys
import subprocess
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import bench_lm, n_params, peak_rss_mb, timed  # noqa: E402
from moshi_reference import stepwise_nll  # noqa: E402

from ttt_bench.models.base import StreamLayout  # noqa: E402
from ttt_bench.models.frozen import FrozenScorer  # noqa: E402
from ttt_bench.models.streaming import forward_nll  # noqa: E402


def codes_of(T: int, card: int, B: int = 1, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, card, (B, 8, T), generator=g)


def memory_probe(T: int, chunk: int) -> None:
    """In a fresh process: growth of peak RSS during one score() of T frames, less its output."""
    torch.set_grad_enabled(False)
    scorer = FrozenScorer(lm=bench_lm())
    scorer.score(codes_of(chunk, scorer.lm.card), chunk_size=chunk)  # allocate the steady state once
    codes = codes_of(T, scorer.lm.card)
    before = peak_rss_mb()
    nll = scorer.score(codes, chunk_size=chunk)
    print(peak_rss_mb() - before - nll.numel() * 4 / 2**20)


def peak_scoring_memory_mb(T: int, chunk: int) -> float:
    out = subprocess.run([sys.executable, __file__, "--memory-probe", str(T), str(chunk)],
                         capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="shorter streams (for a smoke run)")
    parser.add_argument("--chunks", default="64,128,256,512", help="chunk sizes to try for (b)")
    parser.add_argument("--memory-probe", nargs=2, type=int, metavar=("T", "CHUNK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_probe:
        return memory_probe(*args.memory_probe)
    step_frames, long_frames, fwd_frames = (60, 3200, 500) if args.quick else (300, 4000, 1000)
    torch.set_grad_enabled(False)

    lm = bench_lm()
    scorer = FrozenScorer(lm=lm)
    print(f"benchmark model: {n_params(lm) / 1e6:.1f}M parameters, context {lm.context}, "
          f"threads {torch.get_num_threads()}")

    scorer.score(codes_of(64, lm.card), chunk_size=64)  # warm-up
    _, t_step = timed(stepwise_nll, lm, codes_of(step_frames, lm.card))
    fps_step = step_frames / t_step
    print(f"(a) frame-by-frame stepping: {step_frames} frames in {t_step:.1f}s = {fps_step:.1f} frames/s")

    long_codes = codes_of(long_frames, lm.card)
    best_chunk, fps_chunk = 0, 0.0
    for chunk in (int(c) for c in args.chunks.split(",")):
        _, t = timed(scorer.score, long_codes, chunk_size=chunk)
        print(f"(b) chunked scorer, chunk {chunk:4d}: {long_frames} frames in {t:.1f}s = {long_frames / t:.1f} frames/s")
        if long_frames / t > fps_chunk:
            best_chunk, fps_chunk = chunk, long_frames / t

    fwd_codes = codes_of(fwd_frames, lm.card)
    forward_nll(lm, fwd_codes, StreamLayout())  # warm-up
    _, t_fwd = timed(forward_nll, lm, fwd_codes, StreamLayout())
    fps_fwd = fwd_frames / t_fwd
    print(f"(c) one LMModel.forward: {fwd_frames} frames in {t_fwd:.1f}s = {fps_fwd:.1f} frames/s")

    short = FrozenScorer(lm=bench_lm(context=200))
    check_codes = codes_of(260 if args.quick else 500, lm.card, seed=1)
    reference = stepwise_nll(short.lm, check_codes)
    diff = max(float((short.score(check_codes, chunk_size=c) - reference).nan_to_num().abs().max())
               for c in (1, 64, best_chunk))
    mem_1k = peak_scoring_memory_mb(1000, best_chunk)
    mem_4k = peak_scoring_memory_mb(long_frames, best_chunk)

    print("\n== summary ==")
    print(f"best chunk size: {best_chunk}")
    print(f"b/a (chunked vs frame-by-frame): {fps_chunk / fps_step:.1f}x   (target >= 100)")
    print(f"b/c (chunked vs one forward pass): {fps_chunk / fps_fwd:.2f}   (target >= 0.7)")
    print(f"max |NLL diff| chunked vs frame-by-frame, context 200, {check_codes.shape[-1]} frames, "
          f"chunks 1/64/{best_chunk}: {diff:.2e}   (target <= 1e-4)")
    print(f"peak RSS growth while scoring (less the output): T=1000 {mem_1k:.1f} MiB, "
          f"T={long_frames} {mem_4k:.1f} MiB   (target: does not grow with T)")


if __name__ == "__main__":
    main()
