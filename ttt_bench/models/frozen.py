"""The frozen adapter: Moshi as it is, scored by chunked streaming."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch
from moshi.models.lm import LMModel
from moshi.utils.compile import no_compile

from ttt_bench.registry import register_model
from ttt_bench.models.base import ScorerInfo, StreamLayout, StreamingScorer, check_score_args
from ttt_bench.models.loading.checkpoints import LoadArgs
from ttt_bench.models.loading.moshi import ModelSource, load_lm
from ttt_bench.models.streaming import chunk_nll, delayed_inputs, stream_codes, text_head_skipped, undelay, widen_kv_caches

logger = logging.getLogger(__name__)


def cpu_no_compile(device: torch.device) -> contextlib.AbstractContextManager:
    """On CPU, run moshi's lazily compiled helpers eagerly, as moshi's own layers do there:
    compiling costs ~17 s per process and buys nothing on a CPU."""
    return no_compile() if device.type != "cuda" else contextlib.nullcontext()


@register_model("frozen")
class FrozenScorer(StreamingScorer):
    """Moshi with fixed weights. Give ``lm`` (an LMModel you built), ``preset``, or moshi's loading
    arguments (``hf_repo`` or its older name ``pretrained``, ``moshi_weight``, ``mimi_weight``,
    ``lora_weight``, ``config_path``, ``fuse_lora``) or a moshi-finetune ``checkpoint`` folder."""

    name = "frozen"
    skip_text_head = True  # the audio NLL never reads the text logits (benchmarks/bench_scoring.py)
    attention_only = True

    def __init__(self, lm: LMModel | None = None, preset: str | None = None, pretrained: str | None = None,
                 device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
                 seed: int = 0, **load_args: Any):
        if lm is not None:
            given = [k for k, v in {"preset": preset, "pretrained": pretrained, **load_args}.items() if v is not None]
            if given:
                raise ValueError(f"give lm= or a checkpoint ({', '.join(given)}), not both")
            self.source: ModelSource | None = None
            self.lm = lm.to(device) if device is not None else lm
            if dtype is not None:
                from ttt_bench.models.loading.moshi import resolve_dtype
                self.lm = self.lm.to(dtype=resolve_dtype(dtype))
        else:
            self.source = ModelSource.make(preset=preset, pretrained=pretrained, seed=seed, **load_args)
            self.lm = load_lm(self.source, device=device or "cpu", dtype=dtype)
            self.record_source()  # the files and their sha256, as loaded
        self.lm.eval()

    @classmethod
    def accepted_args(cls) -> set[str]:
        return super().accepted_args() | set(LoadArgs.names()) | {"mimi"}  # mimi: an LMModel's codec

    def record_source(self) -> dict[str, Any] | None:
        """What results.json says about ``self.source`` (its files with their sha256), taken once
        per source: right after loading, so it describes the files that were loaded."""
        if self.source is None:
            return None
        if getattr(self, "_recorded_source", None) is not self.source:
            self._source_record, self._recorded_source = self.source.describe(), self.source
        return self._source_record

    @property
    def info(self) -> ScorerInfo:
        return ScorerInfo(name=self.name, label=self.label(), options=self.options())

    def label(self) -> str:
        """The leaderboard row: the adapter, and the checkpoint's short name unless it is the default."""
        short = self.source.short_name if self.source else None
        return f"{self.name} ({short})" if short else self.name

    def options(self) -> dict[str, Any]:
        options = {"source": self.source.label if self.source else "lm=<user model>",
                   "dtype": str(self.lm.dtype).removeprefix("torch."),
                   "context": self.lm.context}
        if self.source is not None:
            options["checkpoint"] = self.record_source()
        return options

    # -- scoring ---------------------------------------------------------------------------
    def score(self, codes: torch.Tensor, chunk_size: int = 64,
              layout: StreamLayout | None = None) -> torch.Tensor:
        """Teacher-forced NLL [B, 8, T] (float32, nats, on the CPU) of ``codes`` [B, 8, T]."""
        check_score_args(codes, chunk_size)
        layout = layout or StreamLayout()
        lm = self.lm
        codes = codes.to(lm.device, torch.long)
        delayed = delayed_inputs(lm, stream_codes(lm, codes, layout))
        B, _, T = codes.shape
        pattern = torch.empty(B, lm.dep_q, T, dtype=torch.float32, device=lm.device)
        with lm.streaming(B), cpu_no_compile(lm.device), text_head_skipped(lm, self.skip_text_head):
            widen_kv_caches(lm.transformer, min(chunk_size, T) - 1)
            self.begin_document(B)
            for start in range(0, T, chunk_size):
                end = min(start + chunk_size, T)
                pattern[:, :, start:end] = self.score_chunk(delayed, start, end)
        return undelay(lm, pattern).cpu()

    def score_chunk(self, delayed: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """Pattern-space NLL [B, 8, end - start] for steps start..end-1 of the stream."""
        with torch.no_grad():
            return chunk_nll(self.lm, delayed, start, end)
