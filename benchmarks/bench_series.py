"""A training run evaluated as a series (the base loaded once, each checkpoint swapped in) vs each
checkpoint evaluated as a separate run (the base loaded for every one).

Float32 on the CPU, on the ~100M-parameter benchmark model written as a local Moshi repo
(config.json + model.safetensors), with a run of moshi-finetune checkpoints of it: LoRA
(``lora.safetensors``, rank 64, in every linear layer) and full fine-tunes
(``consolidated.safetensors``). Each checkpoint is loaded and scores one stream of random codes.

- separate: per checkpoint, build the model from its files (moshi's loaders, as a fresh run
  does) and score.
- series: check every checkpoint's files, build the model from the first and score it; then
  for each further checkpoint swap its tensors in and score (what ``checkpoint=RUN`` does).

Printed: the time of the first checkpoint and of each further one (load + score) in both ways,
and the ratio series / separate for the whole run and for a further checkpoint; each the median
over rounds (the files stay in the page cache after the first round, as they would for a run
evaluated while training). NLLs of both ways are compared (must be equal to 1e-6).

    python benchmarks/bench_series.py            # 4 checkpoints per kind, 32-frame streams, 3 rounds
    python benchmarks/bench_series.py --quick    # the tiny preset's shape, 3 checkpoints, 16 frames, 1 round
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BENCH_LM_CONFIG, bench_lm, machine_line, n_params  # noqa: E402

from ttt_bench.models.loading import checkpoints  # noqa: E402
from ttt_bench.models.loading.moshi import TINY_LM_CONFIG, TINY_MIMI_CONFIG, ModelSource, load_mimi  # noqa: E402
from ttt_bench.models.loading.series import expand_series  # noqa: E402
from ttt_bench.models.series import build_series, check_runs, series_args  # noqa: E402
from ttt_bench.options import ModelArgs  # noqa: E402
from ttt_bench.registry import get_model  # noqa: E402

LORA_RANK = 64


def tensors(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().clone() for k, v in module.state_dict().items()}


def write_base(folder: Path, quick: bool) -> dict:
    """A local Moshi repo of the benchmark model (a tiny Mimi: the audio is not encoded here)."""
    folder.mkdir(parents=True)
    lm = bench_lm(quick=quick)
    save_file(tensors(lm), str(folder / "model.safetensors"))
    save_file(tensors(load_mimi(ModelSource.make(preset="tiny"))), str(folder / "mimi.safetensors"))
    (folder / "mimi_config.json").write_text(json.dumps(TINY_MIMI_CONFIG))
    lm_config = {**(TINY_LM_CONFIG if quick else BENCH_LM_CONFIG), "context": lm.context}
    config = {**lm_config, "moshi_name": "model.safetensors", "mimi_name": "mimi.safetensors",
              "mimi_config_name": "mimi_config.json"}
    (folder / "config.json").write_text(json.dumps(config))
    return lm_config


def write_run(run: Path, base: Path, lm_config: dict, kind: str, steps: list[int]) -> None:
    """moshi-finetune checkpoints run/checkpoints/checkpoint_NNNNNN/consolidated/ of ``kind``."""
    from moshi.models import loaders
    from moshi.modules.lora import LoRALinear, replace_lora_with_linear

    config = {**lm_config, "lora": True, "lora_rank": LORA_RANK, "lora_scaling": 2.0}
    names = {"moshi_name": "model.safetensors", "mimi_name": "mimi.safetensors", "mimi_config_name": "mimi_config.json"}
    for step in steps:
        lm = loaders.get_moshi_lm(base / "model.safetensors", lm_kwargs=config, device="cpu", dtype=torch.float32)
        generator = torch.Generator().manual_seed(step)
        with torch.no_grad():
            for module in lm.modules():
                if isinstance(module, LoRALinear):
                    for adapter in (module.lora_A, module.lora_B):
                        adapter.weight.copy_(torch.randn(adapter.weight.shape, generator=generator) * 0.02)
        folder = run / "checkpoints" / f"checkpoint_{step:06d}" / "consolidated"
        folder.mkdir(parents=True)
        if kind == "lora":
            save_file({k: v for k, v in tensors(lm).items() if ".lora_" in k}, str(folder / "lora.safetensors"))
        else:
            replace_lora_with_linear(lm)
            save_file(tensors(lm), str(folder / "consolidated.safetensors"))
        (folder / "config.json").write_text(json.dumps({**config, **names, "lora": kind == "lora"}))


def fresh_process() -> None:
    """Forget what an earlier run in this process cached (the config's key shapes), as a new
    process would."""
    checkpoints._META_SHAPES.clear()


def separate(run: Path, base: Path, steps: list[int], codes: torch.Tensor, chunk: int):
    """Each checkpoint as its own run: per checkpoint (load s, score s), and the NLLs."""
    times, nlls = [], []
    for step in steps:
        fresh_process()
        start = time.perf_counter()
        scorer = get_model("frozen", checkpoint=str(run / "checkpoints" / f"checkpoint_{step:06d}"),
                           hf_repo=str(base), fuse_lora=False)
        loaded = time.perf_counter()
        nlls.append(scorer.score(codes, chunk_size=chunk))
        times.append((loaded - start, time.perf_counter() - loaded))
        del scorer
    return times, nlls


def series(run: Path, base: Path, codes: torch.Tensor, chunk: int):
    """The run as a series: per checkpoint (load s, score s), and the NLLs. The first's load is
    checking every checkpoint's files and building the model; a further one's, swapping its
    tensors in."""
    fresh_process()
    start = time.perf_counter()
    entries, per_model, runs = expand_series({"frozen": "frozen"}, {"frozen": ModelArgs(
        {"checkpoint": str(run), "hf_repo": str(base)}, {})})
    checked, _ = check_runs(runs, per_model, seed=0, on_error="fail")

    def build(first):
        name = first.member.name
        return get_model("frozen", **series_args(per_model[name], first).kwargs())

    scorers = build_series(build, checked["frozen"])
    times, nlls = [], []
    for scorer in scorers.values():
        scorer.activate()  # what score() does first: swap this checkpoint's tensors in
        loaded = time.perf_counter()
        nlls.append(scorer.score(codes, chunk_size=chunk))
        times.append((loaded - start, time.perf_counter() - loaded))
        start = time.perf_counter()
    return times, nlls


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model, 3 checkpoints, 16 frames, 1 round")
    parser.add_argument("--checkpoints", type=int, default=None, help="checkpoints per run (default 4; quick 3)")
    parser.add_argument("--frames", type=int, default=None, help="frames scored per checkpoint (default 32)")
    parser.add_argument("--repeats", type=int, default=None, help="rounds (default 3; quick 1)")
    parser.add_argument("--kinds", default="lora,full", help="checkpoint kinds: lora, full")
    args = parser.parse_args(argv)
    n = args.checkpoints or (3 if args.quick else 4)
    frames = args.frames or (16 if args.quick else 32)
    repeats = args.repeats or (1 if args.quick else 3)
    chunk = 16
    steps = [100 * (i + 1) for i in range(n)]
    with tempfile.TemporaryDirectory(prefix="bench_series_") as tmp:
        base = Path(tmp) / "base"
        lm_config = write_base(base, args.quick)
        card = lm_config["card"]
        codes = torch.randint(0, card, (1, 8, frames), generator=torch.Generator().manual_seed(0))
        params = n_params(bench_lm(quick=args.quick))
        print(f"benchmark model: {params / 1e6:.1f}M parameters, float32 CPU, {n} checkpoints per run, "
              f"{frames} frames scored per checkpoint (chunk {chunk}), {repeats} rounds\n{machine_line()}")
        for kind in args.kinds.split(","):
            run = Path(tmp) / f"run_{kind}"
            write_run(run, base, lm_config, kind, steps)
            size = sum(p.stat().st_size for p in run.rglob("*.safetensors")) / n / 1e6
            rounds = []
            for _ in range(repeats):
                sep_t, sep_nll = separate(run, base, steps, codes, chunk)
                ser_t, ser_nll = series(run, base, codes, chunk)
                worst = max(float((a - b).nan_to_num().abs().max()) for a, b in zip(sep_nll, ser_nll))
                if worst > 1e-6:
                    raise SystemExit(f"{kind}: the series' NLL differs from separate runs by {worst:.2e}")
                rounds.append((sep_t, ser_t))
            med = statistics.median

            def at(which: int, first: bool, part: slice) -> float:
                """Median over rounds of the first / the median further checkpoint's load, score or both."""
                def one(r):
                    times = r[which][:1] if first else r[which][1:]
                    return med(sum(t[part]) for t in times)
                return med(one(r) for r in rounds)

            both, load, score = slice(0, 2), slice(0, 1), slice(1, 2)
            whole = med(sum(sum(t) for t in r[1]) / sum(sum(t) for t in r[0]) for r in rounds)
            further = med(med(sum(t) for t in r[1][1:]) / med(sum(t) for t in r[0][1:]) for r in rounds)
            further_load = med(med(t[0] for t in r[1][1:]) / med(t[0] for t in r[0][1:]) for r in rounds)
            print(f"\n{kind}: {size:.1f} MB of checkpoint files each; NLL series == separate (max diff {worst:.1e})")
            for label, which, what in (("separate runs", 0, "load"), ("series", 1, "swap")):
                print(f"  {label + ':':15s} first {at(which, True, both):.2f} s (load {at(which, True, load):.2f} + "
                      f"score {at(which, True, score):.2f}), each further {at(which, False, both):.2f} s "
                      f"({what} {at(which, False, load):.3f} + score {at(which, False, score):.2f})")
            print(f"  series / separate: whole run {whole:.2f}x the time; a further checkpoint {further:.2f}x "
                  f"(load + score), its load {further_load:.3f}x")

if __name__ == "__main__":
    main()
