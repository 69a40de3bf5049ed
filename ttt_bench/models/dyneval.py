"""The dyneval adapter: dynamic evaluation (Krause et al. 2018) of Moshi.

Each chunk is scored with the current weights in the frozen adapter's streaming pass, then the
optimiser takes one step on that chunk's mean NLL; the chunk size is the update segment. Weights
(and the optimiser state) are restored at every document, and documents of a batch are scored
one after the other so that none learns from another.

Gradients flow through moshi's streaming forward: the KV cache is written in place, so after
each step the streaming state is detached; otherwise every cached key would keep its chunk's
graph alive and memory would grow with the stream.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import torch
from moshi.models.lm import LMModel
from moshi.modules.transformer import LayerNormF32, RMSNorm

from ttt_bench.registry import register_model
from ttt_bench.models.base import StreamLayout
from ttt_bench.models.frozen import FrozenScorer
from ttt_bench.models.streaming import chunk_nll

logger = logging.getLogger(__name__)

OPTIMIZERS = ("sgd", "adam")
NORM_TYPES = (RMSNorm, torch.nn.LayerNorm, LayerNormF32)


def select_parameters(lm: LMModel, which: str) -> list[tuple[str, torch.nn.Parameter]]:
    """``all``, ``norms`` (parameters of normalisation layers) or a regular expression searched
    in parameter names (e.g. ``transformer\\.layers\\.7\\.``)."""
    if which == "all":
        chosen = list(lm.named_parameters())
    elif which == "norms":
        chosen = [(f"{prefix}.{name}" if prefix else name, p)
                  for prefix, module in lm.named_modules() if isinstance(module, NORM_TYPES)
                  for name, p in module.named_parameters(recurse=False)]
    else:
        try:
            pattern = re.compile(which)
        except re.error as exc:
            raise ValueError(f"dyneval params={which!r}: not 'all', 'norms' or a valid regex ({exc})") from None
        chosen = [(name, p) for name, p in lm.named_parameters() if pattern.search(name)]
    if not chosen:
        raise ValueError(f"dyneval params={which!r} selects no parameter of the model")
    return chosen


def detach_streaming_state(lm: LMModel) -> None:
    """Cut the autograd history held by streaming state (KV caches, TTT fast weights)."""
    for state in lm.get_streaming_state().values():
        kv_cache = getattr(state, "kv_cache", None)
        if kv_cache is not None:
            kv_cache.cache = kv_cache.cache.detach()
        detach = getattr(state, "detach", None)
        if callable(detach):
            detach()


@register_model("dyneval")
class DynEvalScorer(FrozenScorer):
    """Moshi updated by gradient steps while it reads. Loading arguments as ``frozen``; ``lr``,
    ``optimizer`` (sgd|adam), ``params`` (all|norms|regex)."""

    name = "dyneval"
    adapts_weights = True

    def __init__(self, lm: LMModel | None = None, device: str | torch.device | None = None,
                 dtype: str | torch.dtype | None = None, seed: int = 0, lr: float = 1e-4, optimizer: str = "sgd",
                 params: str = "all", **load_args: Any):
        super().__init__(lm=lm, device=device, dtype=dtype, seed=seed, **load_args)
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"dyneval optimizer={optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")
        self.lr, self.optimizer_name, self.params = float(lr), optimizer, params
        self.trainable = select_parameters(self.lm, params)
        self._initial = {name: p.detach().clone() for name, p in self.trainable}
        self._optimizer: torch.optim.Optimizer | None = None

    @property
    def attention_only(self) -> bool:  # type: ignore[override]
        return self.lr == 0  # the weights learn the stream

    def options(self) -> dict[str, Any]:
        return {**super().options(), "lr": self.lr, "optimizer": self.optimizer_name, "params": self.params,
                "n_params": sum(p.numel() for _, p in self.trainable)}

    def score(self, codes: torch.Tensor, chunk_size: int = 64,
              layout: StreamLayout | None = None) -> torch.Tensor:
        """One document at a time, each from the original weights; the weights are restored after."""
        if codes.dim() != 3:
            raise ValueError(f"codes must be [B, 8, T], got shape {tuple(codes.shape)}")
        chosen = {id(p) for _, p in self.trainable}
        requires = {name: p.requires_grad for name, p in self.lm.named_parameters()}
        try:
            for p in self.lm.parameters():
                p.requires_grad_(id(p) in chosen)
            return torch.cat([super(DynEvalScorer, self).score(codes[i:i + 1], chunk_size, layout)
                              for i in range(codes.shape[0])])
        finally:
            self._restore()
            self._optimizer = None
            for name, p in self.lm.named_parameters():
                p.requires_grad_(requires[name])

    def begin_document(self, batch_size: int) -> None:
        self._restore()
        params = [p for _, p in self.trainable]
        if self.optimizer_name == "adam":
            self._optimizer = torch.optim.Adam(params, lr=self.lr)
        else:
            self._optimizer = torch.optim.SGD(params, lr=self.lr)

    def score_chunk(self, delayed: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """Score the chunk with the current weights, then one optimiser step on its mean NLL."""
        assert self._optimizer is not None, "begin_document must run first"
        with torch.enable_grad():
            nll = chunk_nll(self.lm, delayed, start, end)
            valid = ~nll.isnan()
            if bool(valid.any()):
                self._optimizer.zero_grad(set_to_none=True)
                nll[valid].mean().backward()
                self._optimizer.step()
        detach_streaming_state(self.lm)
        return nll.detach()

    def weights_changed(self) -> None:
        """A new checkpoint: every document starts from its weights."""
        self._initial = {name: p.detach().clone() for name, p in self.trainable}

    def _restore(self) -> None:
        with torch.no_grad():
            for name, p in self.trainable:
                p.copy_(self._initial[name])
                p.grad = None
