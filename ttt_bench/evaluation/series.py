"""``--resume`` for a training run's checkpoints (docs/design.md, data flow).

A checkpoint is identified by its files' sha256: when a resumed run meets a checkpoint whose files
differ from those it scored (saved again at the same path), that checkpoint's records are
dropped and it is scored again; checkpoints saved since are new models and are scored; every
checkpoint already finished is neither scored nor verified again (its checks are carried over
from the previous results.json). Other models keep the usual rule: changed files are refused.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from ttt_bench.evaluation.records import RUN_FILE, RecordStore, atomic_write_bytes, safe_name

logger = logging.getLogger(__name__)


def is_checkpoint(scorer: Any) -> bool:
    return scorer.step is not None and scorer.series is not None


def _run_file(store: RecordStore) -> Path:
    return store.root / RUN_FILE


def forget_changed_checkpoints(store: RecordStore, scorers: dict[str, Any], files: dict[str, dict[str, str]]
                               ) -> list[str]:
    """Drop the records of every checkpoint whose files changed since they were scored, and record
    the files of every checkpoint (new ones included) in the run file. Returns the changed ones."""
    path = _run_file(store)
    if not path.exists():
        return []
    run = json.loads(path.read_text())
    recorded = run.get("model_files") or {}
    changed = []
    for name, scorer in scorers.items():
        if not is_checkpoint(scorer):
            continue
        if name in recorded and recorded[name] != files.get(name):
            changed.append(name)
            for task_dir in store.root.iterdir() if store.root.is_dir() else []:
                shutil.rmtree(task_dir / safe_name(name), ignore_errors=True)
        recorded[name] = files.get(name, {})
    if changed:
        logger.warning("--resume: checkpoint(s) %s were saved again since they were scored (their sha256 "
                       "differs): scoring them again", ", ".join(changed))
    run["model_files"] = recorded
    atomic_write_bytes(path, (json.dumps(run, indent=2, sort_keys=True) + "\n").encode())
    return changed


def finished_checkpoints(plans: list[Any], store: RecordStore) -> set[tuple[str, str]]:
    """(task, model) of every checkpoint of a series whose documents of that task are all done."""
    keys = [(plan.name, model, d.doc_id, d.n_frames) for plan in plans
            for model, scorer in plan.scorers.items() if is_checkpoint(scorer) for d in plan.docs]
    if not keys:
        return set()
    done, _ = store.load_done(keys)
    return {(plan.name, model) for plan in plans for model, scorer in plan.scorers.items()
            if is_checkpoint(scorer) and all((plan.name, model, d.doc_id) in done for d in plan.docs)}


def carried_checks(out: Path, finished: set[tuple[str, str]]) -> dict[str, dict[str, list[dict]]]:
    """The verification and causality entries of the finished checkpoints, from the previous
    results.json (nothing when there is none)."""
    carried: dict[str, dict[str, list[dict]]] = {"verification": {}, "causality": {}}
    try:
        previous = json.loads((Path(out) / "results.json").read_text())
    except (OSError, ValueError):
        return carried
    for kind in carried:
        for task, entries in (previous.get(kind) or {}).items():
            carried[kind][task] = [e for e in entries if (task, e.get("model")) in finished]
    return carried
