"""Speed of the ttt and dyneval adapters relative to frozen, side by side in one run.

Float32 on the CPU, on the ~100M-parameter benchmark model (random weights, context 3000):
frozen, ttt with TTT-Linear and with TTT-MLP (mini-batch 16, TTT in the last 2 of 8 layers,
gate 0.1) and dyneval (one SGD step per chunk on all parameters, and on the norms only), at
chunk sizes 64 and 256. Prints frames/s and the ratio to frozen at the same chunk size.

    python benchmarks/bench_ttt.py            # 384-frame streams, best of 3 (about 15 minutes on 2 cores)
    python benchmarks/bench_ttt.py --quick    # 192-frame streams, best of 2
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import bench_lm, n_params, timed  # noqa: E402

from ttt_bench.models.dyneval import DynEvalScorer  # noqa: E402
from ttt_bench.models.frozen import FrozenScorer  # noqa: E402
from ttt_bench.models.ttt import TTTScorer  # noqa: E402

SCORERS: dict[str, Callable[[], object]] = {
    "frozen": lambda: FrozenScorer(lm=bench_lm()),
    "ttt-linear": lambda: TTTScorer(lm=bench_lm(), layers="last 2", inner="linear", mini_batch_size=16),
    "ttt-mlp": lambda: TTTScorer(lm=bench_lm(), layers="last 2", inner="mlp", mini_batch_size=16),
    "dyneval-all": lambda: DynEvalScorer(lm=bench_lm(), lr=1e-5, optimizer="sgd", params="all"),
    "dyneval-norms": lambda: DynEvalScorer(lm=bench_lm(), lr=1e-3, optimizer="sgd", params="norms"),
}


def frames_per_second(scorers: dict, codes: torch.Tensor, chunks: list[int],
                      repeats: int) -> dict[tuple[str, int], float]:
    """Best of ``repeats`` timed runs per (model, chunk), taken round-robin so that a burst of
    load on the shared machine hits every model alike; the best run is the least disturbed."""
    best: dict[tuple[str, int], float] = {}
    for _ in range(repeats):
        for chunk in chunks:
            for name, scorer in scorers.items():
                seconds = timed(scorer.score, codes, chunk_size=chunk)[1]
                best[name, chunk] = min(best.get((name, chunk), float("inf")), seconds)
    return {key: codes.shape[-1] / seconds for key, seconds in best.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="192-frame streams, 2 repeats")
    parser.add_argument("--chunks", default="64,256")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    T = 192 if args.quick else 384
    repeats = 2 if args.quick else args.repeats
    chunks = [int(c) for c in args.chunks.split(",")]
    codes = torch.randint(0, 2048, (1, 8, T), generator=torch.Generator().manual_seed(0))

    scorers = {name: make() for name, make in SCORERS.items()}
    print(f"benchmark model: {n_params(scorers['frozen'].lm) / 1e6:.1f}M parameters, context "
          f"{scorers['frozen'].lm.context}, float32 CPU, threads {torch.get_num_threads()}, T={T} frames")
    for scorer in scorers.values():  # warm-up
        scorer.score(codes[..., :32], chunk_size=16)

    fps = frames_per_second(scorers, codes, chunks, repeats)
    print(f"{'model':<15}" + "".join(f"{f'chunk {c} frames/s':>20}{'x frozen':>10}" for c in chunks))
    for name in scorers:
        row = "".join(f"{fps[name, c]:>20.1f}{fps[name, c] / fps['frozen', c]:>10.3f}" for c in chunks)
        print(f"{name:<15}{row}")


if __name__ == "__main__":
    main()
