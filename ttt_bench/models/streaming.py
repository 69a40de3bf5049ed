"""Chunked teacher-forced scoring of Moshi in streaming mode (docs/design.md, "Fast and exact").

The recording goes on the model's own audio stream. The main transformer runs in moshi
streaming mode, fed C frames per call through ``lm.forward_text``; the depformer scores the C
frames at once with ``lm.forward_depformer_training`` on the teacher-forced codes. This equals
frame-by-frame stepping to float tolerance, provided the KV ring has room for context + C - 1
keys (``widen_kv_caches``).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from moshi.models.lm import LMModel
from moshi.modules.transformer import RingKVCache, StreamingMultiheadAttention

from ttt_bench.models.base import StreamLayout


def stream_codes(lm: LMModel, audio: torch.Tensor, layout: StreamLayout) -> torch.Tensor:
    """All of Moshi's streams [B, 1 + n_q, T]: text, the recording on the model's own audio
    codebooks, then the user codebooks."""
    B, K, T = audio.shape
    if K != lm.dep_q:
        raise ValueError(f"expected codes with {lm.dep_q} codebooks, got shape {tuple(audio.shape)}")
    text_token = lm.text_padding_token_id if layout.text_stream == "pad" else lm.zero_token_id
    text = torch.full((B, 1, T), text_token, dtype=torch.long, device=audio.device)
    n_user = lm.n_q - lm.dep_q
    if layout.user_stream == "silence":
        frame = torch.tensor(layout.silence_frame, dtype=torch.long, device=audio.device)
        if frame.numel() < n_user:
            raise ValueError(f"silence_frame has {frame.numel()} codes, the model has {n_user} user codebooks")
        user = frame[:n_user].view(1, n_user, 1).expand(B, n_user, T)
    else:
        user = torch.full((B, n_user, T), lm.zero_token_id, dtype=torch.long, device=audio.device)
    return torch.cat([text, audio, user], dim=1)


def delayed_inputs(lm: LMModel, codes: torch.Tensor) -> torch.Tensor:
    """The sequence ``LMModel.forward`` builds: initial token, then the codes shifted by each
    stream's delay. Shape [B, K, T + 1]; step s of the transformer reads column s and the
    depformer predicts column s + 1."""
    B, K, T = codes.shape
    initial = lm._get_initial_token().to(codes.device).expand(B, -1, 1)
    delays = torch.tensor(lm.delays, device=codes.device)
    time = torch.arange(T + 1, device=codes.device).view(1, -1) - 1 - delays.view(-1, 1)  # [K, T+1]
    gathered = codes.gather(2, time.clamp(min=0).unsqueeze(0).expand(B, -1, -1))
    return torch.where(time.unsqueeze(0) >= 0, gathered, initial)


def widen_kv_caches(module: torch.nn.Module, extra: int) -> None:
    """Give every streaming attention in ``module`` a ring of context + ``extra`` keys.

    moshi's ring holds exactly ``context`` keys, so a call with C > 1 frames overwrites keys
    that the chunk's first queries still need once the ring wraps. The attention mask still
    limits each query to ``context`` keys back, so a wider ring changes nothing else.
    Must be called right after entering streaming, before the first forward.
    """
    if extra <= 0:
        return
    for attn in module.modules():
        if not isinstance(attn, StreamingMultiheadAttention):
            continue
        state = attn._streaming_state
        if state is None or state.kv_cache is None or attn.context is None:
            continue
        old = state.kv_cache
        if int(old.end_offset.max()) != 0:
            raise RuntimeError("widen_kv_caches must run before the first streaming step")
        _, batch, heads, _, dim = old.cache.shape
        state.kv_cache = RingKVCache(batch, heads, dim, attn.context + extra,
                                     respect_exec_mask=old.respect_exec_mask,
                                     device=old.cache.device, dtype=old.cache.dtype)


class _NoTextLogits(torch.nn.Module):
    """Stands in for ``lm.text_linear`` while audio is scored: ``forward_text`` still returns
    text logits, but with 0 entries, since the audio NLL never reads them."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., :0]


@contextlib.contextmanager
def text_head_skipped(lm: LMModel, skip: bool = True) -> Iterator[None]:
    """Inside this block ``lm.forward_text`` does not compute the text logits (dim x text_card
    multiply-adds per frame: ~2% of Moshi 7B, ~15% of the CPU benchmark model). The audio
    predictions are untouched; the text head is put back on exit, whatever happens."""
    if not skip:
        yield
        return
    head = lm.text_linear
    lm.text_linear = _NoTextLogits()
    try:
        yield
    finally:
        lm.text_linear = head


def nll_of_logits(logits: torch.Tensor, targets: torch.Tensor, card: int) -> torch.Tensor:
    """Per-position NLL in nats (float32) of ``targets`` [B, K, S] under ``logits`` [B, K, S, card];
    NaN where the target is not an audio code (initial or zero token)."""
    valid = (targets >= 0) & (targets < card)
    log_probs = F.log_softmax(logits.float(), dim=-1)
    nll = -log_probs.gather(-1, targets.clamp(0, card - 1).unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, nll, torch.full_like(nll, float("nan")))


def audio_streams(lm: LMModel) -> slice:
    """Where Moshi's own audio codebooks (the ones scored) sit among the model's streams."""
    return slice(lm.audio_offset, lm.audio_offset + lm.dep_q)


def audio_delays(lm: LMModel) -> list[int]:
    """The delays of Moshi's own audio codebooks, in frames."""
    return list(lm.delays[audio_streams(lm)])


def chunk_nll(lm: LMModel, delayed: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Pattern-space NLL [B, dep_q, end - start] of transformer steps start..end-1, with the
    streaming state built from steps before ``start`` (and advanced through ``end``)."""
    transformer_out, _ = lm.forward_text(delayed[:, :, start:end])
    targets = delayed[:, :, start + 1:end + 1]
    logits = lm.forward_depformer_training(targets, transformer_out)
    audio_targets = targets[:, audio_streams(lm)]
    return nll_of_logits(logits, audio_targets, lm.card)


def undelay(lm: LMModel, pattern_nll: torch.Tensor) -> torch.Tensor:
    """Map pattern-space NLL [B, dep_q, T] back to frames: frame t of codebook k was predicted
    at step t + delay[k]; frames whose prediction would fall past the end are NaN."""
    B, K, T = pattern_nll.shape
    delays = audio_delays(lm)[:K]
    out = torch.full_like(pattern_nll, float("nan"))
    for k, delay in enumerate(delays):
        out[:, k, :T - delay] = pattern_nll[:, k, delay:]
    return out


def forward_nll(lm: LMModel, audio: torch.Tensor, layout: StreamLayout) -> torch.Tensor:
    """NLL [B, 8, T] from one plain, non-streaming ``LMModel.forward`` (the reference)."""
    codes = stream_codes(lm, audio, layout)
    out = lm.forward(codes)
    targets = codes[:, audio_streams(lm)]
    nll = nll_of_logits(out.logits, targets, lm.card)
    return torch.where(out.mask, nll, torch.full_like(nll, float("nan")))
