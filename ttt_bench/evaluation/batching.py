"""Scoring several documents of one process together: length-grouped batches, padding that never
reaches a document's NLL, out-of-memory retries with half the batch, per-document failures, and
``--batch_size auto``.

Padding is appended after each document's end, so the causal model's predictions inside the
document are untouched; the padded positions are cut off, and the last frames of delayed
codebooks (whose prediction would need the frame after the end) are set back to NaN, exactly as
if the document had been scored alone. Every batch row is an independent stream (its own KV
cache and TTT fast weights), so padding never reaches another document's state either.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from ttt_bench.metrics import DocRecord
from ttt_bench.models.base import StreamLayout
from ttt_bench.evaluation.records import DocFailure
from ttt_bench.models.streaming import audio_delays
from ttt_bench.tasks.base import Document

logger = logging.getLogger(__name__)

Outcome = DocRecord | DocFailure
AUTO_MAX_BATCH = 256


def by_length(docs: Sequence[Document]) -> list[Document]:
    """Longest first (ties by id), so consecutive documents have similar lengths."""
    return sorted(docs, key=lambda d: (-d.n_frames, d.doc_id))


def batches_by_length(docs: list[Document], batch_size: int) -> list[list[Document]]:
    ordered = by_length(docs)
    return [ordered[i:i + batch_size] for i in range(0, len(ordered), batch_size)]


def pad_batch(batch: Sequence[Document]) -> torch.Tensor:
    """Codes [B, 8, T_max], each document followed by zero codes."""
    length = max(d.n_frames for d in batch)
    codes = torch.zeros(len(batch), batch[0].codes.shape[0], length, dtype=torch.long)
    for i, doc in enumerate(batch):
        codes[i, :, :doc.n_frames] = doc.codes
    return codes


def mask_past_end(nll: torch.Tensor, delays: Sequence[int]) -> torch.Tensor:
    """NaN where a stream of this length has no prediction, as if it had been scored alone
    (in a padded batch, the padding supplies a prediction for the last delayed frames)."""
    T = nll.shape[-1]
    for k, delay in enumerate(delays):
        if delay:
            nll[k, max(T - delay, 0):] = float("nan")
    return nll


def n_nonfinite(nll: np.ndarray, delays: Sequence[int]) -> int:
    """Non-finite values where a prediction exists (NaN past the delayed end is expected)."""
    T = nll.shape[-1]
    expected = np.zeros(nll.shape, dtype=bool)
    for k, delay in enumerate(delays):
        if delay:
            expected[k, max(T - delay, 0):] = True
    return int((~np.isfinite(nll) & ~expected).sum() + np.isinf(nll[expected]).sum())


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def free_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass
class BatchScorer:
    """Scores batches for one model; ``strict`` turns non-finite losses into document failures."""

    scorer: object
    chunk_size: int
    layout: StreamLayout
    strict: bool = False

    @property
    def delays(self) -> list[int]:
        return audio_delays(self.scorer.lm)

    def score(self, batch: Sequence[Document]) -> tuple[list[Outcome], int]:
        """Outcomes in ``batch`` order, and the largest batch size that fit in memory (the batch
        size to continue with). Out of memory: retried with half the batch; a single document
        still out of memory fails. Any other error in a batch of several: each document is
        retried alone so only the faulty one fails."""
        try:
            return self._score_once(batch), len(batch)
        except Exception as exc:  # noqa: BLE001 - recorded per document, never swallowed silently
            if is_oom(exc):
                free_memory()
                if len(batch) == 1:
                    return [self._failure(batch[0], "oom", exc)], 1
                half = len(batch) // 2
                logger.warning("out of memory with a batch of %d; retrying with %d", len(batch), half)
                first, fit1 = self.score(batch[:half])
                second, fit2 = self.score(batch[half:])
                return first + second, min(fit1, fit2, half)
            if len(batch) == 1:
                return [self._failure(batch[0], "error", exc)], 1
            logger.warning("batch of %d failed (%s: %s); scoring its documents one by one", len(batch),
                           type(exc).__name__, exc)
            outcomes: list[Outcome] = []
            for doc in batch:
                outcomes += self.score([doc])[0]
            return outcomes, len(batch)

    def _score_once(self, batch: Sequence[Document]) -> list[Outcome]:
        start = time.perf_counter()
        nll = self.scorer.score(pad_batch(batch), chunk_size=self.chunk_size, layout=self.layout)
        elapsed = time.perf_counter() - start
        frames = sum(d.n_frames for d in batch)
        outcomes: list[Outcome] = []
        for i, doc in enumerate(batch):
            doc_nll = mask_past_end(nll[i, :, :doc.n_frames].float().clone(), self.delays)
            array = doc_nll.numpy().astype(np.float32)
            bad = n_nonfinite(array, self.delays)
            if bad and self.strict:
                outcomes.append(DocFailure(doc.doc_id, doc.n_frames, "nonfinite",
                                           f"{bad} non-finite loss value(s) at predicted positions (--strict)"))
                continue
            outcomes.append(DocRecord(doc.doc_id, doc.meta, array, elapsed * doc.n_frames / frames))
        return outcomes

    @staticmethod
    def _failure(doc: Document, kind: str, exc: BaseException) -> DocFailure:
        logger.error("document %s failed: %s: %s", doc.doc_id, type(exc).__name__, exc)
        return DocFailure(doc.doc_id, doc.n_frames, kind, f"{type(exc).__name__}: {exc}")


def iter_batches(docs: Sequence[Document], batch_size: Callable[[], int]) -> Iterator[list[Document]]:
    """Length-ordered batches whose size is asked for anew each time (it shrinks after an
    out-of-memory error)."""
    ordered = by_length(docs)
    i = 0
    while i < len(ordered):
        size = max(1, batch_size())
        yield ordered[i:i + size]
        i += size


def largest_fitting(fits: Callable[[int], bool], cap: int) -> int:
    """The largest power of two up to ``cap`` (and ``cap`` itself) for which ``fits`` holds,
    doubling from 1; at least 1."""
    best, size = 1, 1
    while size <= cap:
        if not fits(size):
            break
        best = size
        if size == cap:
            break
        size = min(size * 2, cap)
    return best


def auto_batch_size(scorer, docs: Sequence[Document], chunk_size: int, layout: StreamLayout) -> int:
    """``--batch_size auto``: the largest batch of this process's longest document that fits on
    its CUDA device (1 elsewhere). Memory does not grow past the attention context, so the probe
    scores only the first context + 2 chunks frames."""
    device = scorer.lm.device
    if not docs:
        return 1
    if device.type != "cuda":
        logger.info("--batch_size auto: %s is not a CUDA device; using batch size 1", device)
        return 1
    longest = by_length(docs)[0]
    frames = min(longest.n_frames, (scorer.lm.context or longest.n_frames) + 2 * chunk_size)
    probe = longest.codes[:, :frames]

    def fits(size: int) -> bool:
        try:
            scorer.score(probe.expand(size, -1, -1).contiguous(), chunk_size=chunk_size, layout=layout)
            return True
        except Exception as exc:  # noqa: BLE001
            if not is_oom(exc):
                raise
            return False
        finally:
            free_memory()

    size = largest_fitting(fits, min(len(docs), AUTO_MAX_BATCH))
    logger.info("--batch_size auto: %d on %s", size, device)
    return size
