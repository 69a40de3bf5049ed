"""Frame-by-frame reference scoring written directly against moshi's streaming API.

This is what ``LMGen`` does inside, teacher-forced: the main transformer one frame at a time
(``forward_text``), then the depformer codebook by codebook (``forward_depformer``) fed the true
previous codes instead of samples. It shares no code with ttt_bench's scorer on purpose.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from moshi.models.lm import LMModel


def build_streams(lm: LMModel, audio: torch.Tensor, text_pad: bool = True) -> torch.Tensor:
    B, _, T = audio.shape
    text = torch.full((B, 1, T), lm.text_padding_token_id if text_pad else -1, dtype=torch.long)
    user = torch.full((B, lm.n_q - lm.dep_q, T), -1, dtype=torch.long)
    return torch.cat([text, audio, user], dim=1)


@torch.no_grad()
def stepwise_nll(lm: LMModel, audio: torch.Tensor, text_pad: bool = True) -> torch.Tensor:
    """NLL [B, 8, T] by stepping one frame at a time; NaN where no prediction exists."""
    codes = build_streams(lm, audio, text_pad).to(lm.device)
    B, K, T = codes.shape
    delays = lm.delays
    initial = lm._get_initial_token().view(K)

    def model_input(step: int, k: int) -> int | torch.Tensor:
        t = step - 1 - delays[k]  # the frame of stream k that is fed at transformer step `step`
        return codes[:, k, t] if t >= 0 else initial[k].expand(B)

    nll = torch.full((B, lm.dep_q, T), float("nan"))
    with lm.streaming(B):
        for step in range(T):
            x = torch.stack([model_input(step, k) for k in range(K)], dim=1).view(B, K, 1)
            transformer_out, _ = lm.forward_text(x)
            with lm.depformer.streaming(B):
                prev = torch.stack([model_input(step + 1, 0)]).view(B, 1, 1)  # text token of the next step
                for cb in range(lm.dep_q):
                    logits = lm.forward_depformer(cb, prev, transformer_out)  # [B, 1, 1, card]
                    target = model_input(step + 1, 1 + cb)
                    frame = step - delays[1 + cb]  # the frame this prediction is about
                    if 0 <= frame < T:
                        logp = F.log_softmax(logits[:, 0, 0].float(), dim=-1)
                        nll[:, cb, frame] = -logp.gather(1, target.view(B, 1)).squeeze(1).cpu()
                    prev = target.view(B, 1, 1)
    return nll
