"""Speed of the ttt and dyneval adapters relative to frozen, side by side in one run.

Float32 on the CPU, on the ~100M-parameter benchmark model (random weights, context 3000):
frozen, ttt with TTT-Linear and with TTT-MLP (mini-batch 16, TTT in the last 2 of 8 layers,
gate 0.1) and dyneval (one SGD step per chunk on all parameters, and on the norms only), at
chunk sizes 64 and 256. All run in turn, round after round; the ratio to frozen at the same
chunk size is the median over rounds of the ratio within a round (benchmarks/common.py).

    python benchmarks/bench_ttt.py            # 384-frame streams, 5 rounds (about 15 minutes on 2 cores)
    python benchmarks/bench_ttt.py --quick    # the tiny preset's shape, 96-frame streams, 2 rounds
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Case, bench_lm, format_ratio, machine_line, median_speed, n_params, paired_ratio, round_robin  # noqa: E402

from ttt_bench.models.dyneval import DynEvalScorer  # noqa: E402
from ttt_bench.models.frozen import FrozenScorer  # noqa: E402
from ttt_bench.models.ttt import TTTScorer  # noqa: E402


def scorers(quick: bool) -> dict[str, Callable[[], object]]:
    def lm():
        return bench_lm(quick=quick)
    return {
        "frozen": lambda: FrozenScorer(lm=lm()),
        "ttt-linear": lambda: TTTScorer(lm=lm(), layers="last 2", inner="linear", mini_batch_size=16),
        "ttt-mlp": lambda: TTTScorer(lm=lm(), layers="last 2", inner="mlp", mini_batch_size=16),
        "dyneval-all": lambda: DynEvalScorer(lm=lm(), lr=1e-5, optimizer="sgd", params="all"),
        "dyneval-norms": lambda: DynEvalScorer(lm=lm(), lr=1e-3, optimizer="sgd", params="norms"),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model, 96-frame streams, 2 rounds")
    parser.add_argument("--chunks", default=None, help="chunk sizes (default 64,256; quick 16,32)")
    parser.add_argument("--repeats", type=int, default=None, help="rounds (default 5; quick 2)")
    args = parser.parse_args(argv)
    args.chunks = [int(c) for c in (args.chunks or ("16,32" if args.quick else "64,256")).split(",")]
    args.repeats = args.repeats or (2 if args.quick else 5)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    T = 96 if args.quick else 384
    made = {name: make() for name, make in scorers(args.quick).items()}
    codes = torch.randint(0, made["frozen"].lm.card, (1, 8, T), generator=torch.Generator().manual_seed(0))
    print(f"benchmark model: {n_params(made['frozen'].lm) / 1e6:.1f}M parameters, context "
          f"{made['frozen'].lm.context}, float32 CPU, T={T} frames, {args.repeats} rounds\n{machine_line()}")
    cases = {(name, chunk): Case(lambda s=scorer, c=chunk: s.score(codes, chunk_size=c), T)
             for chunk in args.chunks for name, scorer in made.items()}
    for scorer in made.values():  # warm-up
        scorer.score(codes[..., :32], chunk_size=16)

    speeds = round_robin({f"{name} {chunk}": case for (name, chunk), case in cases.items()}, args.repeats)
    print(f"{'model':<15}" + "".join(f"{f'chunk {c} frames/s':>20}{'x frozen (rounds min-max)':>36}" for c in args.chunks))
    for name in made:
        row = "".join(f"{median_speed(speeds, f'{name} {c}'):>20.1f}"
                      f"{format_ratio(paired_ratio(speeds, f'{name} {c}', f'frozen {c}'), 3):>36}"
                      for c in args.chunks)
        print(f"{name:<15}{row}")


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.ERROR)
    main()
