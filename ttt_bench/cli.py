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

from ttt_bench.options import (BY_NAME, CLI_OPTIONS, Option, default_output_dir, parse_kv, parse_value,  # noqa: F401
                      read_config_file, split_top_level)

logger = logging.getLogger("ttt_bench")

SUBCOMMANDS = ("run", "ls", "validate", "leaderboard", "cache")


def run_parser(defaults: dict[str, Any] | None = None) -> argparse.ArgumentParser:
    """The flags of a run, made from ``options.OPTIONS`` (``defaults``: a --config file's values)."""
    p = argparse.ArgumentParser(
        prog="ttt-bench", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Evaluate streaming speech LMs (Moshi, frozen or with TTT layers) on long recordings. "
                    "Other commands: 'ttt-bench ls tasks|models', 'ttt-bench validate TASK|FILE...', "
                    "'ttt-bench leaderboard DIR...', 'ttt-bench cache info|clear'.")
    p.add_argument("--config", default=None, help="a YAML file of these options (flags given here override it)")
    p.add_argument("--model", default=None,
                   help="model adapter(s), comma-separated, evaluated on the same documents (see 'ttt-bench ls models')")
    p.add_argument("--tasks", default=None, help="task(s), comma-separated (see 'ttt-bench ls tasks')")
    p.add_argument("--model_args", default="",
                   help="k=v,... for every model (preset=tiny, hf_repo=REPO_OR_DIR, checkpoint=DIR, lora_weight=FILE, ...); "
                        "name.k=v for one model only (ttt.layers=[1,2])")
    for option in CLI_OPTIONS:
        if option.switch:
            p.add_argument(option.flag, action="store_true", help=option.help)
        elif option.repeat:
            p.add_argument(option.flag, action="append", default=None, help=option.help)
        else:
            p.add_argument(option.flag, default=option.default, type=_flag_type(option), choices=option.choices,
                           help=option.help)
    p.add_argument("--verbosity", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="log level")
    if defaults:
        p.set_defaults(**defaults)
    return p


def _flag_type(option: Option):
    if option.parse is None or option.name in ("task_args", "wandb_args"):  # parsed with the other k=v text
        return None

    def parse(text: str) -> Any:
        try:
            return option.check(parse_value(text) if option.name != "batch_size" or text != "auto" else text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc).removeprefix(f"{option.name}: ")) from None

    parse.__name__ = option.name
    return parse


def parse_run_args(argv: Sequence[str]) -> argparse.Namespace:
    """The run's flags over a ``--config`` file's values (a flag given on the command line wins)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    defaults = config_defaults(read_config_file(known.config)) if known.config else None
    parser = run_parser(defaults)
    args = parser.parse_args(argv)
    for required in ("model", "tasks"):
        if not getattr(args, required):
            parser.error(f"--{required} is required (on the command line or in --config)")
    return args


def config_defaults(data: dict[str, Any]) -> dict[str, Any]:
    """A --config file's values as the flags' values: lists and mappings as the flags write them."""
    out = {}
    for key, value in data.items():
        if key in ("model", "tasks") and isinstance(value, list):
            value = ",".join(str(v) for v in value)
        elif key in ("model_args", "task_args", "wandb_args") and isinstance(value, dict):
            value = ",".join(f"{k}={_kv_text(v)}" for k, v in value.items())
        elif key == "include_path":
            value = value if isinstance(value, list) else [value]
        elif key in BY_NAME and value is not None:
            value = BY_NAME[key].check(value)
        out[key] = value
    return out


def _kv_text(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ",".join(_kv_text(v) for v in value) + "]"
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def cmd_run(argv: Sequence[str]) -> int:
    from ttt_bench.api import simple_evaluate
    from ttt_bench.evaluation.distributed import Dist
    from ttt_bench.evaluation.runner import RunStopped

    args = parse_run_args(argv)
    logging.basicConfig(level=args.verbosity, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options = {o.name: getattr(args, o.name) for o in CLI_OPTIONS}
    options["task_args"] = parse_kv(args.task_args, "--task_args")
    options["wandb_args"] = parse_kv(args.wandb_args, "--wandb_args") if args.wandb_args is not None else None
    models, tasks = split_top_level(args.model), split_top_level(args.tasks)
    options["output_path"] = args.output_path or str(default_output_dir(models, tasks))
    dist = Dist.create(args.device)  # joins the process group of `accelerate launch`, if any
    try:
        results = simple_evaluate(models, parse_kv(args.model_args, "--model_args"), tasks,
                                  **{**options, "device": str(dist.device)},
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
    from ttt_bench.reporting.report import render_terminal

    print(render_terminal(results))
    written = [name for name in ("results.json", "curves.npz", "leaderboard.md", "loss_vs_position.png")
               if (out / name).exists()] + sorted(p.name for p in out.glob("*.png") if p.name != "loss_vs_position.png")
    print(f"\nwrote {out}/{', '.join(written)}")
    return 0


def cmd_ls(argv: Sequence[str]) -> int:
    from ttt_bench.registry import add_task_config_dir, list_models, list_tasks

    p = argparse.ArgumentParser(prog="ttt-bench ls", description="List the runnable tasks or the models, each "
                                "with a one-line description and whether it needs the Hugging Face Hub.")
    p.add_argument("what", choices=["tasks", "models"])
    p.add_argument("--include_path", action="append", default=[], help="directory of extra YAML task configs")
    args = p.parse_args(argv)
    for path in args.include_path:
        add_task_config_dir(path)
    names = list_models() if args.what == "models" else list_tasks()
    rows = [(name, *(model_summary(name) if args.what == "models" else task_summary(name))) for name in names]
    width = max(len(name) for name, _, _ in rows)
    for name, hub, line in rows:
        print(f"{name:<{width}}  {hub:<7}  {line}")
    return 0


def first_sentence(text: str, limit: int = 90) -> str:
    line = " ".join((text or "").split())
    line = line.split(". ")[0].rstrip(".")
    return line if len(line) <= limit else line[:limit - 3].rstrip() + "..."


def task_summary(name: str) -> tuple[str, str]:
    """("Hub" or "offline", one line) of a task, from its config alone (nothing is loaded)."""
    from ttt_bench.audio.sources import resolve_path
    from ttt_bench.config import is_group_file, read_yaml
    from ttt_bench.registry import get_task_class, task_config_files

    path = task_config_files().get(name)
    if path is None:  # a standalone task class
        cls = get_task_class(name)
        return "offline", first_sentence(cls.__doc__ or "")
    data = read_yaml(path)
    if is_group_file(path):
        members = [task_summary(member)[0] for member in data.get("task", [])]
        return ("Hub" if "Hub" in members else "offline"), first_sentence(data.get("description") or
                                                                          f"group of {', '.join(data['task'])}")
    source = data.get("source") or {}
    try:
        local = source.get("type") != "webdataset" and not source.get("repo") and \
            bool(source.get("path")) and resolve_path(source["path"]).exists()
    except FileNotFoundError:
        local = False
    return ("offline" if local else "Hub"), first_sentence(data.get("description", ""))


def model_summary(name: str) -> tuple[str, str]:
    """("Hub" or "offline", one line) of a model adapter: built-in ones load moshiko from the
    Hub unless given preset=tiny or a local hf_repo/checkpoint."""
    from ttt_bench.registry import model_factory

    factory = model_factory(name)
    doc = first_sentence((factory.__doc__ or "").strip())
    return "Hub", f"{doc} (offline: preset=tiny or a local hf_repo=/checkpoint=)"


def cmd_validate(argv: Sequence[str]) -> int:
    """Check task configs without loading a model or audio: one line per problem, exit 2."""
    from ttt_bench.config import ConfigError
    from ttt_bench.registry import add_task_config_dir, expand_tasks, get_task, list_tasks, task_config_files

    p = argparse.ArgumentParser(prog="ttt-bench validate", description="Check task configs (names, YAML files, "
                                "--include_path folders) without loading a model or audio.")
    p.add_argument("targets", nargs="*", help="task names or YAML files (default: every task found)")
    p.add_argument("--include_path", action="append", default=[], help="directory of extra YAML task configs")
    args = p.parse_args(argv)
    problems: list[str] = []
    for path in args.include_path:
        try:
            add_task_config_dir(path)
        except OSError as exc:
            problems.append(str(exc))
    targets = args.targets or (list_tasks() if not args.include_path else
                               [n for n, f in task_config_files().items()
                                if any(Path(d).resolve() in f.resolve().parents for d in args.include_path)])
    checked = 0
    for target in targets:
        try:
            if target.endswith((".yaml", ".yml")) or Path(target).is_file():
                validate_file(Path(target))
            else:
                for name in expand_tasks([target])[0]:
                    get_task(name)
            checked += 1
        except (ConfigError, ValueError, KeyError, OSError) as exc:
            problems.append(str(exc).strip("'\""))
    for problem in problems:
        print(f"ttt-bench validate: {problem}", file=sys.stderr)
    if not problems:
        print(f"{checked} task config(s) valid")
    return 2 if problems else 0


def validate_file(path: Path) -> None:
    from ttt_bench.config import ConfigError, TaskConfig, is_group_file, load_group_config, read_yaml

    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    if is_group_file(path):
        load_group_config(path)
        return
    data = read_yaml(path)
    data.setdefault("task", path.stem)
    TaskConfig.from_dict(data, source=str(path))


def cmd_leaderboard(argv: Sequence[str]) -> int:
    from ttt_bench.reporting.report import merge_runs

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
    from ttt_bench.audio.cache import cache_clear, cache_info

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
    from ttt_bench.evaluation.verify import VerificationError

    handlers = {"run": cmd_run, "ls": cmd_ls, "validate": cmd_validate, "leaderboard": cmd_leaderboard,
                "cache": cmd_cache}
    try:
        return handlers[command](rest)
    except VerificationError as exc:
        print(f"ttt-bench: verification failed: {exc}", file=sys.stderr)
        return 3
    except (ValueError, KeyError, OSError, ImportError) as exc:  # bad input, missing files or extras, no network
        from ttt_bench.registry import UnknownNameError
        from ttt_bench.reporting.trackers import MissingExtraError

        if isinstance(exc, KeyError) and not isinstance(exc, UnknownNameError) or \
                isinstance(exc, ImportError) and not isinstance(exc, MissingExtraError):
            raise
        print(f"ttt-bench: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
