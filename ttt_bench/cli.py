"""``ttt-bench``: evaluate models on tasks, list what is registered, merge leaderboards.

    ttt-bench --model frozen,ttt --model_args preset=tiny --tasks librilight_sample
    ttt-bench ls tasks|models
    ttt-bench leaderboard DIR [DIR ...]
    ttt-bench cache info|clear
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path
from typing import Any, Sequence

logger = logging.getLogger("ttt_bench")

SUBCOMMANDS = ("run", "ls", "leaderboard", "cache")


def parse_value(text: str) -> Any:
    """Typed value of a ``k=v`` argument: int, float, bool, null, [list], else the string."""
    import yaml

    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    if text.startswith("[") and text.endswith("]"):
        return [parse_value(str(v)) for v in yaml.safe_load(text)]
    return text


def split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets (so ``layers=[1,2],inner=mlp`` works)."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += char == "["
        depth -= char == "]"
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return [p for p in (p.strip() for p in parts) if p]


def parse_kv(text: str | None, flag: str) -> dict[str, Any]:
    result = {}
    for item in split_top_level(text or ""):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{flag} expects key=value pairs separated by commas, got {item!r}")
        result[key.strip()] = parse_value(value.strip())
    return result


def batch_size_arg(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {text!r}") from None


def run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ttt-bench", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Evaluate streaming speech LMs (Moshi, frozen or with TTT layers) on long recordings. "
                    "Other commands: 'ttt-bench ls tasks|models', 'ttt-bench leaderboard DIR...', "
                    "'ttt-bench cache info|clear'.")
    p.add_argument("--model", required=True,
                   help="model adapter(s), comma-separated, evaluated on the same documents (see 'ttt-bench ls models')")
    p.add_argument("--tasks", required=True, help="task(s), comma-separated (see 'ttt-bench ls tasks')")
    p.add_argument("--model_args", default="",
                   help="k=v,... for every model (preset=tiny, hf_repo=REPO_OR_DIR, checkpoint=DIR, lora_weight=FILE, ...); "
                        "name.k=v for one model only (ttt.layers=[1,2])")
    p.add_argument("--task_args", default="", help="k=v,... overriding task config keys (max_frames=2000, ...)")
    p.add_argument("--limit", type=int, default=None, help="evaluate at most N documents per task (pairs for the pair tasks)")
    p.add_argument("--batch_size", type=batch_size_arg, default=1,
                   help="documents scored together (grouped by length), or 'auto': the largest that fits on the GPU")
    p.add_argument("--chunk_size", type=int, default=64, help="frames per streaming call (any value gives the same NLL)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (CUDA when available)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="model dtype")
    p.add_argument("--seed", type=int, default=0, help="seed for random presets and the bootstrap")
    p.add_argument("--output_path", default=None, help="run directory (default: results/<models>__<tasks>)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --output_path")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --output_path")
    p.add_argument("--include_path", action="append", default=[],
                   help="directory of extra YAML task configs (repeatable)")
    p.add_argument("--baseline", default=None, help="model the deltas compare to (default: frozen when present)")
    p.add_argument("--strict", action="store_true", help="fail the run when a sanity flag is raised")
    p.add_argument("--on_bad_input", default="skip", choices=["skip", "fail"],
                   help="unreadable, empty or too-short audio: skip it (reported) or fail")
    p.add_argument("--on_error", default="skip", choices=["skip", "fail"],
                   help="a document that fails (out of memory, model error, non-finite loss under --strict): "
                        "record it and go on (skip), or stop after saving everything done (fail)")
    p.add_argument("--allow_lookahead", action="store_true",
                   help="measure a model whose loss depends on later frames (it fails the causality check "
                        "otherwise, exit 3) and flag its rows 'lookahead'")
    p.add_argument("--wandb_args", default=None,
                   help="k=v,... passed to wandb.init (project=...,name=...): also log the results to "
                        "Weights & Biases (pip install \"ttt-bench[wandb]\")")
    p.add_argument("--tensorboard_dir", default=None,
                   help="also log the results to TensorBoard event files in this directory "
                        "(pip install \"ttt-bench[tensorboard]\")")
    p.add_argument("--verbosity", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="log level")
    return p


def cmd_run(argv: Sequence[str]) -> int:
    from .api import simple_evaluate
    from .distributed import Dist
    from .runner import RunStopped

    args = run_parser().parse_args(argv)
    logging.basicConfig(level=args.verbosity, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    model_args = parse_kv(args.model_args, "--model_args")
    task_args = parse_kv(args.task_args, "--task_args")
    wandb_args = parse_kv(args.wandb_args, "--wandb_args") if args.wandb_args is not None else None
    dist = Dist.create(args.device)  # joins the process group of `accelerate launch`, if any
    try:
        results = simple_evaluate(
            model=split_top_level(args.model), model_args=model_args, tasks=split_top_level(args.tasks),
            task_args=task_args, include_path=args.include_path, limit=args.limit, batch_size=args.batch_size,
            chunk_size=args.chunk_size, device=str(dist.device), dtype=args.dtype, seed=args.seed,
            output_path=args.output_path or default_output_path(args), overwrite=args.overwrite,
            resume=args.resume, baseline=args.baseline, strict=args.strict, on_bad_input=args.on_bad_input,
            on_error=args.on_error, allow_lookahead=args.allow_lookahead, wandb_args=wandb_args,
            tensorboard_dir=args.tensorboard_dir,
            command=shlex.join(["ttt-bench", *argv]))
    except RunStopped as stop:
        dist.close()
        if stop.is_main:
            print(f"ttt-bench: {stop}\nresume with:\n  {stop.resume_command}", file=sys.stderr)
        return stop.exit_code
    dist.close()
    if results is None:  # not the main process: the main process alone reports
        return 0
    out = Path(results["config"]["output_path"])
    from .report import render_terminal

    print(render_terminal(results))
    written = [name for name in ("results.json", "curves.npz", "leaderboard.md", "loss_vs_position.png")
               if (out / name).exists()] + sorted(p.name for p in out.glob("*.png") if p.name != "loss_vs_position.png")
    print(f"\nwrote {out}/{', '.join(written)}")
    return 0


def default_output_path(args: argparse.Namespace) -> str:
    """results/<models>__<tasks>, as the README says."""
    from .runner import RunSpec

    return str(RunSpec(models=split_top_level(args.model), tasks=split_top_level(args.tasks)).output_dir())


def cmd_ls(argv: Sequence[str]) -> int:
    from .registry import add_task_config_dir, list_models, list_tasks, task_config_files

    p = argparse.ArgumentParser(prog="ttt-bench ls", description="List registered tasks or models.")
    p.add_argument("what", choices=["tasks", "models"])
    p.add_argument("--include_path", action="append", default=[], help="directory of extra YAML task configs")
    args = p.parse_args(argv)
    for path in args.include_path:
        add_task_config_dir(path)
    if args.what == "models":
        print("\n".join(list_models()))
    else:
        files = task_config_files()
        for name in list_tasks():
            print(f"{name}\t{files[name] if name in files else '(task class defaults)'}")
    return 0


def cmd_leaderboard(argv: Sequence[str]) -> int:
    from .report import merge_runs

    p = argparse.ArgumentParser(prog="ttt-bench leaderboard",
                                description="Merge finished runs of the same task into one leaderboard.")
    p.add_argument("dirs", nargs="+", type=Path, help="run directories holding results.json")
    p.add_argument("--output", type=Path, default=None, help="also write the merged markdown here")
    p.add_argument("--allow_version_mismatch", action="store_true",
                   help="merge runs of different task versions anyway, marking each row with its version")
    args = p.parse_args(argv)
    table = merge_runs(args.dirs, allow_version_mismatch=args.allow_version_mismatch)
    print(table)
    if args.output:
        args.output.write_text(table)
    return 0


def cmd_cache(argv: Sequence[str]) -> int:
    from .audio.cache import cache_clear, cache_info

    p = argparse.ArgumentParser(prog="ttt-bench cache", description="Inspect or clear the Mimi code cache "
                                "(TTT_BENCH_CACHE moves it).")
    p.add_argument("action", choices=["info", "clear"])
    args = p.parse_args(argv)
    if args.action == "info":
        print(cache_info())
    else:
        print(f"removed {cache_clear()} cached entries")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in SUBCOMMANDS else "run"
    rest = argv[1:] if argv and argv[0] in SUBCOMMANDS else argv
    from .verify import VerificationError

    handlers = {"run": cmd_run, "ls": cmd_ls, "leaderboard": cmd_leaderboard, "cache": cmd_cache}
    try:
        return handlers[command](rest)
    except VerificationError as exc:
        print(f"ttt-bench: verification failed: {exc}", file=sys.stderr)
        return 3
    except (ValueError, KeyError, OSError, ImportError) as exc:  # bad input, missing files or extras, no network
        from .registry import UnknownNameError

        from .trackers import MissingExtraError

        if isinstance(exc, KeyError) and not isinstance(exc, UnknownNameError) or \
                isinstance(exc, ImportError) and not isinstance(exc, MissingExtraError):
            raise
        print(f"ttt-bench: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
