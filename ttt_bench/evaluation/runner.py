"""The evaluation loop: given built scorers, codec and tasks (``simple_evaluate`` builds them),
load each task's documents, verify every model on them, shard them across processes
(Accelerate), score in length-grouped batches, persist every finished document at once, gather
on the main process and write the outputs.

Run data-parallel with ``accelerate launch -m ttt_bench ...`` (any number of processes, GPUs
and nodes); a plain ``ttt-bench ...`` is one process. Every process holds the scorers and the
codec; the main process of each node encodes the audio first (warming the code cache), then
every process loads the same document list, takes its share of the pending documents (longest
first onto the least-loaded process), scores it and persists each document as soon as it is
done (``ttt_bench.evaluation.records``). The main process alone writes the outputs, always from the
persisted records, so a resumed run and an uninterrupted one produce the same results.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import shlex
import shutil
import signal
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ttt_bench.evaluation.batching import BatchScorer, auto_batch_size, iter_batches
from ttt_bench.evaluation.distributed import Dist, shard_by_length
from ttt_bench.evaluation.interrupt import Interrupted, SignalGuard, exit_code
from ttt_bench.metrics import DocRecord, TaskMetrics, raise_on_flags
from ttt_bench.models.base import StreamLayout
from ttt_bench.evaluation import series as series_resume
from ttt_bench.evaluation.records import DocFailure, LogEntry, RecordStore, config_hash
from ttt_bench.options import RunOptions
from ttt_bench.reporting.run_record import ModelRecord, RunRecord
from ttt_bench.tasks.base import Document, shape_of, voice_sources
from ttt_bench.version import __version__
from ttt_bench.evaluation.verify import CausalityError, VerificationError, verify_causality, verify_scorer

logger = logging.getLogger(__name__)

OUTPUT_FILES = ("results.json", "curves.npz", "leaderboard.md", "loss_vs_position.png")


class OutputExistsError(FileExistsError):
    pass


class RunStopped(RuntimeError):
    """The run stopped before every document was scored (signal, or ``--on_error fail``); the
    outputs written so far say ``complete: false``. ``exit_code`` is what the CLI exits with."""

    def __init__(self, message: str, exit_code: int, resume_command: str, is_main: bool):
        super().__init__(message)
        self.exit_code = exit_code
        self.resume_command = resume_command
        self.is_main = is_main


def holds_run(out: Path) -> bool:
    return (out / "results.json").exists() or (out / "records").exists()


def check_output_dir(spec: RunOptions) -> Path:
    """Raise if ``--output_path`` holds a run and neither --overwrite nor --resume was given
    (read-only, so every process can run it before any of them writes)."""
    out = spec.output_dir()
    if holds_run(out) and not (spec.overwrite or spec.resume):
        raise OutputExistsError(
            f"{out} already holds a run; pass --overwrite to replace it, --resume to continue it, "
            "or --output_path to write elsewhere")
    return out


def prepare_output_dir(spec: RunOptions) -> Path:
    """Check, then clear (``--overwrite``) and create the output directory (main process)."""
    out = check_output_dir(spec)
    if holds_run(out) and spec.overwrite:
        for name in OUTPUT_FILES + ("records", "samples.jsonl", "loss_vs_position.svg"):
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    return out


def layout_for(config, codec) -> StreamLayout:
    silence = codec.silence_frame() if config.user_stream == "silence" else None
    return StreamLayout(config.text_stream, config.user_stream, silence)


def environment() -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version(), "platform": platform.platform()}
    for package in ("ttt-bench", "torch", "moshi", "accelerate", "datasets", "numpy"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    versions["cuda"] = torch.version.cuda if torch.cuda.is_available() else None
    return versions


def git_hash() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def wrap_legacy(scorers: dict[str, Any], window: int | None) -> dict[str, Any]:
    """``use_fixed_method: false``: score every model with the old separate-forward-pass method."""
    from ttt_bench.models.legacy import legacy_name, make_legacy

    return {legacy_name(name) if not s.is_legacy else name: (s if s.is_legacy else make_legacy(s, window))
            for name, s in scorers.items()}




# ----------------------------------------------------------------------------- run config


def hashed_config(spec: RunOptions, tasks: dict[str, Any]) -> dict[str, Any]:
    """What the persisted records depend on; ``--resume`` refuses a run where any of it differs.
    Batch size, device and the number of processes are left out: they never change a document's
    NLL (docs/design.md invariant 4), so a run can be resumed with a smaller batch or more GPUs."""
    config = spec.hashed()
    config["task_configs"] = {name: {k: v for k, v in task.config.to_dict().items() if k != "config_path"}
                              for name, task in tasks.items()}
    return config


# ----------------------------------------------------------------------------- tasks


@dataclass
class TaskPlan:
    """One task's documents and everything needed to score and report them."""

    name: str
    config: Any
    docs: list[Document]
    layout: StreamLayout
    scorers: dict[str, Any]
    metrics: TaskMetrics
    info: dict[str, Any]
    skipped: list[dict[str, Any]]

    def keys(self) -> list[tuple[str, str, str, int]]:
        return [(self.name, model, d.doc_id, d.n_frames) for model in self.scorers for d in self.docs]


def plan_task(name: str, task, codec, scorers: dict[str, Any], spec: RunOptions, dist: Dist) -> TaskPlan:
    config = task.config
    task.use_models(scorers)  # tasks whose documents depend on the models (recall: the gap)
    with dist.local_main_first():
        docs = task.documents(codec, limit=spec.limit, on_bad_input=spec.on_bad_input)
    dist.all_agree(hashlib.sha256(json.dumps([(d.doc_id, d.n_frames) for d in docs]).encode()).hexdigest())
    if task.skipped:
        logger.warning("%s: skipped %d input(s): %s", name, len(task.skipped),
                       "; ".join(f"{s.doc_id}: {s.reason}" for s in task.skipped))
    if not docs:
        raise NoDocumentsError(no_documents_message(name, task))
    layout = layout_for(config, codec)
    task_scorers = scorers if config.use_fixed_method else wrap_legacy(scorers, config.legacy_window)
    info = {"config": config.to_dict(),
            "layout": {"text_stream": layout.text_stream, "user_stream": layout.user_stream},
            "data": {"source": task.source_spec, "doc_ids": [d.doc_id for d in docs],
                     "n_frames": [d.n_frames for d in docs]},
            "codec": codec.hash}
    if voice_sources(docs) is not None:  # long-stream tasks: where the voiced segments came from
        info["voice_activity"] = voice_sources(docs)
    return TaskPlan(name, config, docs, layout, task_scorers, task.metrics(next(iter(scorers.values())).lm),
                    info, [asdict(s) for s in task.skipped])


class NoDocumentsError(ValueError):
    """A task ended up with no document to evaluate (a user error: exit 2, one line)."""


def no_documents_message(name: str, task) -> str:
    """Why a task has no documents: its skipped inputs counted by reason."""
    reasons: dict[str, int] = {}
    for skipped in task.skipped:
        reason = skipped.reason.split(":")[0].split(" (")[0]
        reasons[reason] = reasons.get(reason, 0) + 1
    counted = "; ".join(f"{n} x {reason}" for reason, n in sorted(reasons.items(), key=lambda kv: -kv[1]))
    return (f"task {name}: no documents to evaluate" + (f" ({len(task.skipped)} input(s) skipped: {counted})"
            if task.skipped else " (its source yielded none)") + "; check the task's source and its length "
            "limits (min_duration_s, max_frames, select), or --limit")


def verify_all(plans: list[TaskPlan], spec: RunOptions, skip: set[tuple[str, str]] = frozenset()
               ) -> dict[str, dict[str, list[dict]]]:
    """Built-in checks of every model on each task's first document: the streaming loss against a
    plain forward pass (``verify_loss_computation``) and causality (``verify_causality``).
    skip: (task, model) not checked again (a resumed series' finished checkpoints)."""
    out: dict[str, dict[str, list[dict]]] = {"verification": {}, "causality": {}}
    for plan in plans:
        doc = plan.docs[0]
        out["verification"][plan.name] = [
            verify_scorer(name, scorer, doc.doc_id, doc.codes, spec.chunk_size, plan.layout).to_dict()
            for name, scorer in plan.scorers.items()
            if (plan.name, name) not in skip] if plan.config.verify_loss_computation else []
        out["causality"][plan.name] = [
            verify_causality(name, scorer, doc.doc_id, doc.codes, spec.chunk_size, plan.layout,
                             spec.allow_lookahead or scorer.lookahead).to_dict()
            for name, scorer in plan.scorers.items()
            if (plan.name, name) not in skip] if plan.config.verify_causality else []
    return out


def verify_on_main(plans: list[TaskPlan], spec: RunOptions, dist: Dist,
                   skip: set[tuple[str, str]] = frozenset()) -> dict[str, dict[str, list[dict]]]:
    """``verify_all`` on the main process; a failure there stops every process with its message
    (instead of leaving the others waiting at the next collective)."""
    verifications, error = {}, None
    if dist.is_main:
        try:
            verifications = verify_all(plans, spec, skip)
        except VerificationError as exc:
            error = (type(exc).__name__, str(exc))
    error = dist.broadcast(error)
    if error is not None:
        kind = CausalityError if error[0] == CausalityError.__name__ else VerificationError
        raise kind(error[1])
    return verifications


# ----------------------------------------------------------------------------- scoring


@dataclass
class ShareOutcome:
    """What one process did: the log entries it wrote and why it stopped early, if it did."""

    written: list[LogEntry] = field(default_factory=list)
    signum: int | None = None
    failed: str | None = None  # --on_error fail: the failure that stopped the run
    peer_stop: bool = False  # another process asked every process to stop

    @property
    def stopped(self) -> bool:
        return self.signum is not None or self.failed is not None or self.peer_stop


def my_share(docs: list[Document], dist: Dist) -> list[Document]:
    return [docs[i] for i in shard_by_length([d.n_frames for d in docs], dist.world_size)[dist.rank]]


def batch_size_for(scorer, docs: list[Document], spec: RunOptions, layout: StreamLayout) -> int:
    return auto_batch_size(scorer, docs, spec.chunk_size, layout) if spec.batch_size == "auto" else int(spec.batch_size)


def score_model(plan: TaskPlan, model: str, docs: list[Document], spec: RunOptions, store: RecordStore,
                guard: SignalGuard, dist: Dist, outcome: ShareOutcome) -> None:
    """Score ``docs`` (this process's share) with one model, persisting each document at once."""
    scorer = plan.scorers[model]
    batcher = BatchScorer(scorer, spec.chunk_size, plan.layout, spec.strict)
    size = batch_size_for(scorer, docs, spec, plan.layout)
    total = sum(d.n_frames for d in docs)
    with tqdm(total=total, unit="frame", desc=f"{plan.name}/{model}", disable=not dist.is_main or not docs,
              leave=False) as bar:
        for batch in iter_batches(docs, lambda: size):
            if store.stop_requested():
                outcome.peer_stop = True
                return
            results, fit = batcher.score(batch)
            size = min(size, fit)
            with guard.writing():
                for result in results:
                    outcome.written.append(persist(store, plan.name, model, result))
            bar.update(sum(d.n_frames for d in batch))
            failures = [r for r in results if isinstance(r, DocFailure)]
            if failures and spec.on_error == "fail":
                outcome.failed = f"{plan.name}/{model}/{failures[0].doc_id}: {failures[0].error}"
                store.request_stop(f"--on_error fail: {outcome.failed}")
                return


def persist(store: RecordStore, task: str, model: str, result: DocRecord | DocFailure) -> LogEntry:
    if isinstance(result, DocFailure):
        return store.save_failure(task, model, result)
    return store.save(task, model, result)


def score_share(plans: list[TaskPlan], done: set[tuple[str, str, str]], spec: RunOptions, store: RecordStore,
                guard: SignalGuard, dist: Dist) -> ShareOutcome:
    """This process's share of every pending (task, model, document), until done or stopped."""
    outcome = ShareOutcome()
    try:
        with guard.arming():
            for plan in plans:
                for model in plan.scorers:
                    pending = [d for d in plan.docs if (plan.name, model, d.doc_id) not in done]
                    if len(pending) < len(plan.docs) and dist.is_main:
                        logger.info("%s/%s: %d of %d documents already done (resumed)", plan.name, model,
                                    len(plan.docs) - len(pending), len(plan.docs))
                    score_model(plan, model, my_share(pending, dist), spec, store, guard, dist, outcome)
                    if outcome.stopped:
                        return outcome
    except Interrupted as stop:
        outcome.signum = stop.signum
        store.request_stop(f"{signal.Signals(stop.signum).name} on process {dist.rank}")
    return outcome


# ----------------------------------------------------------------------------- gathering


def sync_to_main(dist: Dist, store: RecordStore, written: list[LogEntry]) -> None:
    """Make sure the main process's store holds what every process wrote. On a shared file
    system it already does; otherwise the missing records are sent to it."""
    if not dist.distributed:
        return
    gathered = dist.gather(written)
    missing = None
    if dist.is_main:
        index = store.index()
        missing = [[e for e in entries if not store.has(index, e)] for entries in gathered]
    missing = dist.broadcast(missing)
    payload = [store.read_bytes(e) if e.status == "ok" else None for e in missing[dist.rank]]
    sent = dist.gather(payload)
    if dist.is_main:
        for entries, datas in zip(missing, sent):
            for entry, data in zip(entries, datas):
                store.import_entry(entry, data)


def collect(plans: list[TaskPlan], store: RecordStore
            ) -> tuple[dict[str, dict[str, list[DocRecord]]], dict[str, dict[str, list[dict]]], int]:
    """Records in document order and failures per task and model, from the store; and how many
    (task, model, document) are neither."""
    wanted = [key for plan in plans for key in plan.keys()]
    done, failed = store.load_done(wanted)
    records: dict[str, dict[str, list[DocRecord]]] = {}
    failures: dict[str, dict[str, list[dict]]] = {}
    for plan in plans:
        records[plan.name], failures[plan.name] = {}, {}
        for model in plan.scorers:
            keys = [(plan.name, model, d.doc_id) for d in plan.docs]
            records[plan.name][model] = [done[k] for k in keys if k in done]
            failures[plan.name][model] = [asdict(failed[k]) for k in keys if k in failed and k not in done]
    return records, failures, sum(1 for t, m, d, _ in wanted if (t, m, d) not in done and (t, m, d) not in failed)


# ----------------------------------------------------------------------------- outputs


def resume_command(spec: RunOptions, dist: Dist) -> str:
    """The command that continues this run."""
    words = shlex.split(spec.command) if spec.command else ["ttt-bench", "--model", ",".join(spec.model),
                                                            "--tasks", ",".join(spec.tasks)]
    args = [w for w in words[1:] if w != "--overwrite"]
    if "--output_path" not in args and not any(a.startswith("--output_path=") for a in args):
        args += ["--output_path", str(spec.output_dir())]
    if "--resume" not in args:
        args.append("--resume")
    if dist.distributed:  # same process count (any count gives the same results; multi-node: your config)
        launch = ["accelerate", "launch", "--multi_gpu", "--num_processes", str(dist.world_size)]
        return shlex.join(launch + ["-m", "ttt_bench", *args])
    return shlex.join([words[0], *args])


def write_results(out: Path, spec: RunOptions, plans: list[TaskPlan], store: RecordStore, complete: bool,
                  verifications: dict[str, dict[str, list[dict]]], dist: Dist,
                  groups: dict[str, Any] | None = None,
                  skipped_checkpoints: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """results.json and the other outputs from the persisted records (main process)."""
    from ttt_bench.reporting.report import write_outputs

    records, failures, n_missing = collect(plans, store)
    complete = complete and n_missing == 0
    n_failed = sum(len(f) for models in failures.values() for f in models.values())
    if n_failed:
        logger.warning("%d document(s) failed; see \"failed\" in results.json", n_failed)
    kept = {t: {m: recs for m, recs in models.items() if recs} for t, models in records.items()}
    kept = {t: models for t, models in kept.items() if models}
    models = {name: ModelRecord(label=s.info.label, legacy=bool(s.is_legacy), lookahead=bool(s.lookahead),
                                attention_only=bool(s.attention_only), options=s.info.options, shape=shape_of(s.lm),
                                step=s.step, series=s.series)
              for plan in plans for name, s in plan.scorers.items()}
    run = RunRecord(
        config={**spec.recorded(), "output_path": str(out)},
        command=spec.command,
        environment=environment(),
        git_hash=git_hash(),
        complete=complete,
        config_hash=store.config_hash,
        num_processes=dist.world_size,
        skipped={plan.name: plan.skipped for plan in plans},
        failed=failures,
        models=models,
        tasks={plan.name: plan.info for plan in plans},
        verification=verifications.get("verification", {}),
        causality=verifications.get("causality", {}),
        baseline=spec.baseline or ("frozen" if "frozen" in spec.model and not any(  # not a training run's name
            s.series == "frozen" for plan in plans for s in plan.scorers.values()) else None),
        group_subtasks={name: list(g.task) for name, g in (groups or {}).items()},
        group_metrics={name: g.metrics for name, g in (groups or {}).items()},
        versions={plan.name: plan.config.version for plan in plans},
        ttt_bench_version=__version__,
        resume_command=None if complete else resume_command(spec, dist),
        skipped_checkpoints=list(skipped_checkpoints or []),
    )
    write_outputs(out, run, kept, {plan.name: plan.metrics for plan in plans if plan.name in kept})
    from ttt_bench.reporting.series import add_series

    if add_series(out):  # a training run's checkpoints: results.json's series, <task>_vs_step plots
        from ttt_bench.reporting.report import render_leaderboard

        (out / "leaderboard.md").write_text(render_leaderboard(json.loads((out / "results.json").read_text())))
    return json.loads((out / "results.json").read_text())


def final_exit_code(outcomes: list[ShareOutcome]) -> tuple[int, str]:
    """The exit code and reason of the whole run from every process's outcome."""
    for o in outcomes:
        if o.signum is not None:
            return exit_code(o.signum), f"interrupted by {signal.Signals(o.signum).name}"
    for o in outcomes:
        if o.failed is not None:
            return 1, f"stopped by --on_error fail after a failed document ({o.failed})"
    if any(o.peer_stop for o in outcomes):
        return 1, "stopped at another process's request"
    return 0, ""


# ----------------------------------------------------------------------------- evaluate


def open_store(spec: RunOptions, tasks: dict[str, Any], dist: Dist) -> tuple[Path, RecordStore]:
    """Output directory and record store, read-only: refuses an existing run without
    --overwrite/--resume and a resume whose config differs, before any slow work."""
    out = check_output_dir(spec)
    config = hashed_config(spec, tasks)
    store = RecordStore(out, config_hash(config), dist.rank)
    if spec.resume:
        store.check_config(config)
    return out, store


def model_files(scorers: dict[str, Any]) -> dict[str, dict[str, str]]:
    """Model -> file role -> sha256 of the files each model was loaded from (none for presets
    and models given in memory)."""
    files = {}
    for name, scorer in scorers.items():
        record = scorer.record_source()
        files[name] = {role: f["sha256"] for role, f in ((record or {}).get("files") or {}).items()}
    return files


def init_store(spec: RunOptions, tasks: dict[str, Any], dist: Dist, store: RecordStore,
               files: dict[str, dict[str, str]] | None = None) -> None:
    """Create the output directory and write the run's config (and the sha256 of the models'
    files). Done once the documents are loaded and verified, so a run that fails before scoring
    leaves no run behind. Every process has checked (``open_store``) before the main process
    writes anything."""
    dist.barrier()
    if dist.is_main:
        prepare_output_dir(spec)
        store.write_config(hashed_config(spec, tasks), files)
        store.clear_stop()
    dist.barrier()


@dataclass
class Evaluation:
    """One run over built objects: plan (each task's documents), verify (every model on each
    task's first document), score (this process's share, persisted as it goes), gather and write.
    ``simple_evaluate`` assembles and validates everything and is the public way in."""

    options: RunOptions
    tasks: dict[str, Any]  # name -> Task, built and validated
    groups: dict[str, Any]  # task groups met while expanding the task names
    scorers: dict[str, Any]  # display name -> StreamingScorer, in the order of options.model
    codec: Any  # the one MimiCodec every model's codes come from
    dist: Dist
    store: RecordStore  # opened (and, for --resume, checked) before anything was built
    out: Path
    skipped_checkpoints: list[dict[str, Any]] = field(default_factory=list)  # of a series (--on_error skip)

    def run(self) -> dict[str, Any] | None:
        """The results.json dict on the main process, None on the others; raises
        :class:`RunStopped` (after writing partial outputs) when the run was interrupted or
        stopped by a failed document under ``--on_error fail``."""
        spec, dist, store = self.options, self.dist, self.store
        files = model_files(self.scorers)
        if spec.resume:
            if dist.is_main:  # a training run's checkpoint saved again is scored again
                series_resume.forget_changed_checkpoints(store, self.scorers, files)
            dist.barrier()
            store.check_model_files(files)
        plans = [plan_task(name, task, self.codec, self.scorers, spec, dist) for name, task in self.tasks.items()]
        finished = series_resume.finished_checkpoints(plans, store) if spec.resume else set()
        verifications = verify_on_main(plans, spec, dist, finished)
        if finished:
            for kind, by_task in series_resume.carried_checks(self.out, finished).items():
                for task, entries in by_task.items():
                    verifications.setdefault(kind, {}).setdefault(task, [])[:0] = entries
        init_store(spec, self.tasks, dist, store, files)
        done = dist.broadcast(set(store.load_done([k for p in plans for k in p.keys()])[0]) if dist.is_main else None)
        guard = SignalGuard()
        with guard.installed():
            outcome = score_share(plans, done, spec, store, guard, dist)
            sync_to_main(dist, store, outcome.written)
            outcomes = dist.gather(outcome)
            results = None
            code, reason = final_exit_code(outcomes) if dist.is_main else (0, "")
            if dist.is_main:
                results = write_results(self.out, spec, plans, store, code == 0, verifications, dist, self.groups,
                                        self.skipped_checkpoints)
                store.clear_stop()
            code, reason = dist.broadcast((code, reason))
        if code:
            raise RunStopped(f"{reason}; partial results in {self.out} (complete: false)", code,
                             resume_command(spec, dist), dist.is_main)
        if dist.is_main and spec.strict:
            raise_on_flags(results["results"])
        return results
