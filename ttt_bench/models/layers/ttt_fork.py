"""The TTT layer of the moshi-finetune TTT fork (GitHub AlufRon/claude-web,
``moshi_ttt_try/moshi-finetune``) as its training forward computes it, as a moshi streaming module.

Placement: inside a transformer layer, after the self-attention block and before the
feed-forward block, on the un-normalised residual stream: ``x + tanh(clamp(a, -3, 3)) * TTT(x)``
with a per-channel gate ``a``.

TTT(x) per head (width f = dim / heads, mini-batch size C):

- ``q, k``: the projections ``wq x``, ``wk x`` (with biases), L2-normalised per head, then,
  with ``use_rope``, rotated in adjacent pairs of dimensions by the position *within the
  mini-batch* (``t mod C``) with "audio-scaled" frequencies.
- the value target ``LN_t(wv x - k)``: per-head LayerNorm with the TTT norm's affine parameters,
  unbiased standard deviation, eps 1e-5 added to the deviation (not under the square root).
- the inner learning rate of token j: ``eta_j = base_lr * sigmoid(w_h . x_j + c_h) / f / C``.
- the inner model ``f_W``: an MLP f -> hidden -> ... -> f (tanh-GELU between layers); token j's
  loss is ``0.5 * ||LN(f_W(k_j)) - target_j||^2`` (LN eps 1e-8, biased variance).
- every gradient of a mini-batch is taken at ``W0``, its starting weights; with
  ``D(S) = sum_{j in S} eta_j * grad loss_j(W0)``, token i outputs
  ``q_i + LN(f_{W0 - m * D(S_i)}(q_i))`` and the next mini-batch starts from ``W0 - D(all)``.
  ``m`` is 1 for a 2-layer MLP and 2 for 3 or more layers: the fork's multi-layer step applies
  the update to the weights and then subtracts the same update again in its dual form.
- ``S_i``: the whole mini-batch with ``causal=False`` (how the fork trains: up to C - 1 frames
  of look-ahead), the tokens ``<= i`` with ``causal=True``. The last token of a mini-batch is
  the same in both modes, and so are the weights carried to the next mini-batch.
- heads are merged back to ``dim``; the fork's ``post_norm`` and ``wo`` are never applied.

The fork pads a sequence with zero frames to a multiple of C; the pad frames take part in the
last mini-batch's update (their projections are the biases). ``causal=False`` does the same;
with ``causal=True`` pad frames come after every real frame and change nothing.

Streaming: the state holds the fast weights at the start of the current mini-batch (float32)
and the projected inputs of its tokens seen so far. ``causal=True`` outputs every token when it
arrives (any chunk size); ``causal=False`` can only output a mini-batch once all of it has been
read, so it takes chunks that are multiples of C, and a shorter chunk ends the document (zero
padded as in training).
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from moshi.modules.streaming import State, StreamingModule
from moshi.modules.transformer import StreamingTransformerLayer
from moshi.utils.compile import no_compile
from torch import nn

from ttt_bench.models.layers.ttt_layers import TTTInputs, gelu_tanh_grad, head_layer_norm, head_layer_norm_l2_grad

INNER_LN_EPS = 1e-8   # the LayerNorm of the inner model's output and of its loss
TARGET_LN_EPS = 1e-5  # added to the unbiased std of the value target
GATE_CLAMP = 3.0
FastWeights = list[tuple[torch.Tensor, torch.Tensor]]  # (W [B, nh, d_in, d_out], b [B, nh, 1, d_out])


@dataclass(frozen=True)
class ForkTTTConfig:
    """Shape and behaviour of one fork TTT layer (from the fork's ``training_config.json``)."""

    dim: int
    num_heads: int
    mini_batch_size: int = 16
    base_lr: float = 1.0
    mlp_layers: int = 2
    mlp_hidden_dims: tuple[int, ...] | None = None
    mlp_expansion_factor: float = 4.0
    use_rope: bool = False
    rope_theta: float = 10000.0
    causal: bool = True

    def __post_init__(self):
        if self.dim % self.num_heads:
            raise ValueError(f"TTT dim {self.dim} is not divisible by num_heads={self.num_heads}")
        if self.mini_batch_size < 1:
            raise ValueError(f"mini_batch_size must be >= 1, got {self.mini_batch_size}")
        if self.mlp_layers < 2:
            raise ValueError(f"mlp_layers must be >= 2 (the fork's TTT-MLP), got {self.mlp_layers}")
        if self.mlp_hidden_dims is not None and len(self.mlp_hidden_dims) != self.mlp_layers - 1:
            raise ValueError(f"mlp_hidden_dims {list(self.mlp_hidden_dims)} must give {self.mlp_layers - 1} "
                             f"sizes for mlp_layers={self.mlp_layers}")
        if self.use_rope and self.head_dim % 2:
            raise ValueError(f"use_rope needs an even head dim, got {self.head_dim}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def layer_dims(self) -> list[int]:
        """Widths head_dim -> ... -> head_dim of the inner MLP. The fork's 2-layer MLP is always
        4x wide; only 3+ layers read the hidden dims or the expansion factor."""
        f = self.head_dim
        if self.mlp_layers == 2:
            return [f, 4 * f, f]
        if self.mlp_hidden_dims is not None:
            return [f, *self.mlp_hidden_dims, f]
        return [f] + [int(f * self.mlp_expansion_factor)] * (self.mlp_layers - 1) + [f]

    @property
    def update_multiplier(self) -> float:
        return 1.0 if self.mlp_layers == 2 else 2.0


def rope_angles(head_dim: int, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotation angles [n, head_dim / 2] of the fork's audio RoPE."""
    index = torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device)
    freqs = 1.0 / (theta ** (index / head_dim))
    freqs = freqs * (0.5 + 1.5 * torch.exp(-index / (2 * head_dim)))
    return positions.float().unsqueeze(-1) * freqs


def rotate_pairs(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate dims (0, 1), (2, 3), ... of ``x`` [..., n, f] by ``angles`` [n, f / 2]."""
    even, odd = x[..., 0::2], x[..., 1::2]
    cos, sin = torch.cos(angles), torch.sin(angles)
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)


@dataclass
class _ForkState(State):
    """Fast weights at the start of the current mini-batch (None: the layer's own), the inputs of
    the tokens already seen in it (None: at a boundary), and, for ``causal=False``, whether a
    partial (padded) mini-batch has ended the document."""

    weights: FastWeights | None = None
    pending: TTTInputs | None = None
    ended: bool = False

    def reset(self, reset_mask: torch.Tensor) -> None:
        super().reset(reset_mask)
        if not bool(reset_mask.all()):
            raise NotImplementedError("TTT layers reset all streams of a batch together")
        self.weights, self.pending, self.ended = None, None, False


class ForkTTT(StreamingModule[_ForkState]):
    """The fork's TTT-MLP (parameter names as in its checkpoints, under ``ttt_layer.ttt.``)."""

    def __init__(self, config: ForkTTTConfig, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.config = config
        dim, heads, f = config.dim, config.num_heads, config.head_dim
        self.wq = nn.Linear(dim, dim, bias=True, **factory)
        self.wk = nn.Linear(dim, dim, bias=True, **factory)
        self.wv = nn.Linear(dim, dim, bias=True, **factory)
        for linear in (self.wq, self.wk, self.wv):
            nn.init.normal_(linear.weight, std=0.02)
        self.learnable_ttt_lr_weight = nn.Parameter(torch.randn(heads, 1, dim, **factory) * 0.02)
        self.learnable_ttt_lr_bias = nn.Parameter(torch.zeros(heads, 1, **factory))
        self.ttt_norm_weight = nn.Parameter(torch.ones(heads, f, **factory))
        self.ttt_norm_bias = nn.Parameter(torch.zeros(heads, f, **factory))
        dims = config.layer_dims
        shapes = [((heads, d_in, d_out), (heads, 1, d_out)) for d_in, d_out in zip(dims[:-1], dims[1:])]
        if config.mlp_layers == 2:
            self.W1, self.W2 = (nn.Parameter(torch.randn(w, **factory) * 0.02) for w, _ in shapes)
            self.b1, self.b2 = (nn.Parameter(torch.zeros(b, **factory)) for _, b in shapes)
        else:
            self.weights = nn.ParameterList([nn.Parameter(torch.randn(w, **factory) * 0.02) for w, _ in shapes])
            self.biases = nn.ParameterList([nn.Parameter(torch.zeros(b, **factory)) for _, b in shapes])

    def inner_parameters(self) -> list[tuple[nn.Parameter, nn.Parameter]]:
        if self.config.mlp_layers == 2:
            return [(self.W1, self.b1), (self.W2, self.b2)]
        return list(zip(self.weights, self.biases))

    def initial_weights(self, batch_size: int) -> FastWeights:
        return [(w.float().unsqueeze(0).expand(batch_size, -1, -1, -1),
                 b.float().unsqueeze(0).expand(batch_size, -1, -1, -1)) for w, b in self.inner_parameters()]

    def ln_params(self) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (self.config.num_heads, 1, self.config.head_dim)
        return self.ttt_norm_weight.float().view(shape), self.ttt_norm_bias.float().view(shape)

    # -- inputs ------------------------------------------------------------------------
    def project(self, x: torch.Tensor) -> TTTInputs:
        """Per-token inputs of the inner loop (float32): q and k L2-normalised, not yet rotated (the
        rotation depends on the position in the mini-batch); ``lr`` the learning rate eta of each token."""
        B, T, _ = x.shape
        heads, f = self.config.num_heads, self.config.head_dim

        def split(linear: nn.Linear) -> torch.Tensor:
            return linear(x).float().view(B, T, heads, f).transpose(1, 2)

        gate = torch.einsum("btd,hd->bht", x.float(), self.learnable_ttt_lr_weight.float().view(heads, -1))
        gate = gate + self.learnable_ttt_lr_bias.float().view(1, heads, 1)
        eta = self.config.base_lr * torch.sigmoid(gate) / f / self.config.mini_batch_size
        return TTTInputs(F.normalize(split(self.wq), dim=-1), F.normalize(split(self.wk), dim=-1),
                          split(self.wv), eta)

    def value_target(self, v: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        residual = v - k
        mean = residual.mean(dim=-1, keepdim=True)
        std = residual.std(dim=-1, keepdim=True)  # unbiased, as the fork
        ln_w, ln_b = self.ln_params()
        return ln_w * (residual - mean) / (std + TARGET_LN_EPS) + ln_b

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        if not self.config.use_rope:
            return x
        positions = torch.arange(x.shape[2], device=x.device)  # a mini-batch starts at position 0
        return rotate_pairs(x, rope_angles(self.config.head_dim, positions, self.config.rope_theta))

    # -- one mini-batch ----------------------------------------------------------------
    def mini_batch(self, weights: FastWeights, mb: TTTInputs, first: int,
                   complete: bool) -> tuple[torch.Tensor, FastWeights]:
        """Outputs [B, nh, n - first, f] of tokens first..n-1 of the mini-batch ``mb`` (its first n
        tokens so far), and the weights after it if ``complete`` (else ``weights``)."""
        q, k = self.rotate(mb.q), self.rotate(mb.k)
        target = self.value_target(mb.v, k)
        ln_w, ln_b = self.ln_params()
        layer_inputs, pre_activations = [k], []
        for index, (W, b) in enumerate(weights):
            z = layer_inputs[-1] @ W + b
            pre_activations.append(z)
            if index < len(weights) - 1:
                layer_inputs.append(F.gelu(z, approximate="tanh"))
        grads = [head_layer_norm_l2_grad(pre_activations[-1], target, ln_w, ln_b, eps=INNER_LN_EPS)]
        for index in range(len(weights) - 2, -1, -1):
            upstream = grads[0] @ weights[index + 1][0].transpose(-1, -2)
            grads.insert(0, upstream * gelu_tanh_grad(pre_activations[index]))

        coeff = self.config.update_multiplier * self.step_coefficients(mb.lr, first)
        x_bar = q[:, :, first:]
        for index, (W, b) in enumerate(weights):
            similarity = x_bar @ layer_inputs[index].transpose(-1, -2) + 1.0
            z_bar = x_bar @ W + b - (coeff * similarity) @ grads[index]
            x_bar = F.gelu(z_bar, approximate="tanh") if index < len(weights) - 1 else z_bar
        out = q[:, :, first:] + head_layer_norm(x_bar, ln_w, ln_b, eps=INNER_LN_EPS)
        if not complete:
            return out, weights
        step = mb.lr.unsqueeze(-1)
        return out, [(W - (step * x).transpose(-1, -2) @ g, b - (step * g).sum(dim=-2, keepdim=True))
                     for (W, b), x, g in zip(weights, layer_inputs, grads)]

    def step_coefficients(self, eta: torch.Tensor, first: int) -> torch.Tensor:
        """[B, nh, n - first, n]: how much token j's gradient moves the weights token i reads."""
        n = eta.shape[-1]
        coeff = eta.unsqueeze(-2).expand(*eta.shape[:2], n - first, n)
        if not self.config.causal:
            return coeff
        rows = torch.arange(first, n, device=eta.device).view(-1, 1)
        return coeff * (torch.arange(n, device=eta.device).view(1, -1) <= rows)

    # -- the scan ----------------------------------------------------------------------
    def _init_streaming_state(self, batch_size: int) -> _ForkState:
        return _ForkState(batch_size, self.wq.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        C = self.config.mini_batch_size
        state = self._streaming_state
        if state is not None and state.ended:
            raise RuntimeError(
                f"causal=false: a chunk of {T} frames came after a chunk that was not a multiple of "
                f"mini_batch_size={C} (a partial mini-batch ends the document); stream in multiples of {C}")
        padded = x
        if not self.config.causal and T % C:
            padded = torch.cat([x, x.new_zeros(B, C - T % C, x.shape[-1])], dim=1)
            if state is not None:
                state.ended = True
        tokens = self.project(padded)
        weights = state.weights if state is not None and state.weights is not None else self.initial_weights(B)
        pending = state.pending if state is not None else None
        skip = len(pending) if pending is not None else 0
        if pending is not None:
            tokens = pending.cat(tokens)
        outputs = []
        rest = None
        for start in range(0, len(tokens), C):
            mb = tokens.slice(start, start + C)
            complete = len(mb) == C
            out, weights = self.mini_batch(weights, mb, max(skip - start, 0), complete)
            outputs.append(out)
            if not complete:
                rest = mb
        if state is not None:
            state.weights, state.pending = weights, rest
        out = torch.cat(outputs, dim=2)[:, :, :T]
        return out.transpose(1, 2).reshape(B, T, self.config.dim).to(x.dtype)


class ForkGate(nn.Module):
    """``tanh(clamp(gating_alpha, -3, 3)) * y`` per channel."""

    def __init__(self, dim: int, init: float, device=None, dtype=None):
        super().__init__()
        self.gating_alpha = nn.Parameter(torch.full((dim,), float(init), device=device, dtype=dtype))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        gate = torch.tanh(self.gating_alpha.float().clamp(-GATE_CLAMP, GATE_CLAMP))
        gated = gate * y.float()
        # A closed gate contributes an exact zero, even if the branch produced inf/NaN.
        return torch.where(gate == 0, torch.zeros_like(gated), gated)


class ForkTTTBlock(nn.Module):
    """The fork's ``seq_modeling_block`` without its shared copy of the wrapped layer:
    ``x + gate(TTT(x))``, parameters under ``ttt_layer.ttt.`` and ``forward_ssm_gating.``."""

    def __init__(self, config: ForkTTTConfig, gate_init: float, device=None, dtype=None):
        super().__init__()
        self.ttt_layer = nn.Module()
        self.ttt_layer.ttt = ForkTTT(config, device=device, dtype=dtype)
        self.forward_ssm_gating = ForkGate(config.dim, gate_init, device=device, dtype=dtype)

    @property
    def ttt(self) -> ForkTTT:
        return self.ttt_layer.ttt

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.forward_ssm_gating(self.ttt(x)).to(x.dtype)


class ForkTTTTransformerLayer(StreamingTransformerLayer):
    """A moshi transformer layer with the fork's TTT block between attention and feed-forward.

    Existing layers become this class in place (``insert_fork_ttt_block``), so the base model's
    parameter names are unchanged and the TTT parameters live under ``<layer>.seq_modeling_block``.
    """

    seq_modeling_block: ForkTTTBlock

    def forward(self, x: torch.Tensor, cross_attention_src: torch.Tensor | None = None):
        with ExitStack() as stack:
            if x.device.type != "cuda":
                stack.enter_context(no_compile())
            x = self._sa_block(x)
            if self.cross_attention is not None:
                x = self._cross_attention_block(x, cross_attention_src)
            x = self.seq_modeling_block(x)
            x = self._ff_block(x)
            state = self._streaming_state
            if state:
                state.offset_cpu += x.shape[1]
            return x


def insert_fork_ttt_block(layer: StreamingTransformerLayer, block: ForkTTTBlock) -> None:
    """Turn ``layer`` into a ForkTTTTransformerLayer carrying ``block``."""
    if type(layer) is not StreamingTransformerLayer:
        raise TypeError(f"can only add TTT to moshi's StreamingTransformerLayer, got {type(layer).__name__}")
    if layer._streaming_state is not None:
        raise RuntimeError("cannot add a TTT block while the model is streaming")
    layer.__class__ = ForkTTTTransformerLayer
    layer.seq_modeling_block = block
