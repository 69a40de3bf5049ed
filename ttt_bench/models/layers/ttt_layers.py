"""TTT-Linear and TTT-MLP layers (Sun et al. 2024) as moshi streaming modules.

Each head has a small inner model ``f(x) = x + LN(f_inner(x))`` whose weights (the *fast
weights*) are trained while the stream is read, on the reconstruction loss
``0.5 * ||LN(f_inner(k)) - (v - k)||^2``, by mini-batch gradient descent with mini-batch size
``b``: every token of a mini-batch takes its gradient at the weights the mini-batch started from.
Token ``i`` of a mini-batch is predicted with the weights

    W_i = W_0 - token_eta[i] * sum_{j <= i} lr_j * grad_W l_j(W_0)

(the causal *dual form* computes this without materialising W_i), and the weights move on to
``W_{b-1}`` when the mini-batch completes. ``lr_j = base_lr * sigmoid(w_h . x_j + c_h) / head_dim``
is learnable per token and head; ``token_eta[i] = max(0, 1 / (i + 1) + learnable[i])``.

Streaming: the state holds the fast weights at the start of the current mini-batch (float32)
and the projected inputs of the tokens already seen in it. A chunk that ends mid mini-batch
leaves those tokens pending; the next chunk's tokens are predicted with the dual form over the
whole mini-batch so far, so a token's output does not depend on how the stream was chunked.
Without streaming, ``forward`` reads the whole sequence from the initial weights.
"""

from __future__ import annotations

import logging
import math
from contextlib import ExitStack
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from moshi.modules.streaming import State, StreamingModule
from moshi.modules.transformer import StreamingTransformerLayer, create_norm_fn
from moshi.utils.compile import no_compile

logger = logging.getLogger(__name__)

LN_EPS = 1e-6
INNER_KINDS = ("linear", "mlp")
FastWeights = dict[str, torch.Tensor]


# -- inner-loop maths (float32) ------------------------------------------------------------

def head_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                    eps: float = LN_EPS) -> torch.Tensor:
    """LayerNorm over the last dim with per-head affine ``weight``/``bias`` [nh, 1, f]."""
    mu = x.mean(dim=-1, keepdim=True)
    var = x.var(dim=-1, keepdim=True, unbiased=False)
    return weight * (x - mu) / torch.sqrt(var + eps) + bias


def head_layer_norm_l2_grad(x: torch.Tensor, target: torch.Tensor, weight: torch.Tensor,
                            bias: torch.Tensor, eps: float = LN_EPS) -> torch.Tensor:
    """Gradient w.r.t. ``x`` of ``0.5 * ||head_layer_norm(x) - target||^2`` (per token)."""
    dim = x.shape[-1]
    mu = x.mean(dim=-1, keepdim=True)
    std = torch.sqrt(x.var(dim=-1, keepdim=True, unbiased=False) + eps)
    x_hat = (x - mu) / std
    grad_x_hat = (weight * x_hat + bias - target) * weight
    return (dim * grad_x_hat - grad_x_hat.sum(dim=-1, keepdim=True)
            - x_hat * (grad_x_hat * x_hat).sum(dim=-1, keepdim=True)) / (dim * std)


def gelu_tanh_grad(x: torch.Tensor) -> torch.Tensor:
    """Derivative of ``F.gelu(x, approximate="tanh")``."""
    c = math.sqrt(2.0 / math.pi)
    inner = c * (x + 0.044715 * x ** 3)
    t = torch.tanh(inner)
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * c * (1.0 + 3 * 0.044715 * x * x)


@dataclass
class TTTInputs:
    """Projected inputs of a run of tokens: q, k, v [B, nh, n, f] and lr [B, nh, n] (float32)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    lr: torch.Tensor

    def __len__(self) -> int:
        return self.q.shape[2]

    def slice(self, start: int, end: int) -> "TTTInputs":
        return TTTInputs(self.q[:, :, start:end], self.k[:, :, start:end],
                         self.v[:, :, start:end], self.lr[:, :, start:end])

    def cat(self, other: "TTTInputs | None") -> "TTTInputs":
        """``self`` followed by ``other``."""
        if other is None or len(other) == 0:
            return self
        if len(self) == 0:
            return other
        return TTTInputs(*(torch.cat([a, b], dim=2) for a, b in
                           zip((self.q, self.k, self.v, self.lr), (other.q, other.k, other.v, other.lr))))

    def detach(self) -> "TTTInputs":
        return TTTInputs(self.q.detach(), self.k.detach(), self.v.detach(), self.lr.detach())


@dataclass
class _TTTState(State):
    """Fast weights at the start of the current mini-batch (None: the initial weights) and the
    inputs of the tokens already seen in that mini-batch (None: at a mini-batch boundary)."""

    weights: FastWeights | None = None
    pending: TTTInputs | None = None

    def reset(self, reset_mask: torch.Tensor) -> None:
        super().reset(reset_mask)
        if not bool(reset_mask.all()):
            raise NotImplementedError("TTT layers reset all streams of a batch together")
        self.weights = None
        self.pending = None

    def detach(self) -> None:
        """Cut the autograd history (dynamic evaluation steps between chunks)."""
        if self.weights is not None:
            self.weights = {name: w.detach() for name, w in self.weights.items()}
        if self.pending is not None:
            self.pending = self.pending.detach()


class TTTBase(StreamingModule[_TTTState]):
    """Multi-head TTT layer: Q/K/V projections, inner model trained on ``v - k``, post-norm and
    output projection. Subclasses define the inner model (``initial_weights``, ``inner_dual``)."""

    kind = "base"

    def __init__(self, width: int, num_heads: int, mini_batch_size: int = 16, base_lr: float = 1.0,
                 device=None, dtype=None):
        super().__init__()
        if width % num_heads:
            raise ValueError(f"TTT width {width} is not divisible by num_heads={num_heads}")
        if mini_batch_size < 1:
            raise ValueError(f"mini_batch_size must be >= 1, got {mini_batch_size}")
        factory = {"device": device, "dtype": dtype}
        self.width, self.num_heads = width, num_heads
        self.head_dim = width // num_heads
        self.mini_batch_size, self.base_lr = mini_batch_size, base_lr
        self.q_proj = nn.Linear(width, width, bias=False, **factory)
        self.k_proj = nn.Linear(width, width, bias=False, **factory)
        self.v_proj = nn.Linear(width, width, bias=False, **factory)
        self.o_proj = nn.Linear(width, width, bias=False, **factory)
        self.lr_weight = nn.Parameter(torch.randn(num_heads, width, **factory) * 0.02)
        self.lr_bias = nn.Parameter(torch.zeros(num_heads, **factory))
        self.register_buffer("token_idx", 1.0 / torch.arange(1, mini_batch_size + 1, device=device),
                             persistent=False)
        self.learnable_token_idx = nn.Parameter(torch.zeros(mini_batch_size, **factory))
        self.ttt_norm_weight = nn.Parameter(torch.ones(num_heads, self.head_dim, **factory))
        self.ttt_norm_bias = nn.Parameter(torch.zeros(num_heads, self.head_dim, **factory))
        self.post_norm = nn.LayerNorm(width, eps=LN_EPS, **factory)

    # -- pieces shared with the tests' primal-form reference ----------------------------
    def project(self, x: torch.Tensor) -> TTTInputs:
        """q, k, v per head and the per-token inner learning rate, in float32."""
        B, T, _ = x.shape

        def heads(proj: nn.Linear) -> torch.Tensor:
            return proj(x).float().view(B, T, self.num_heads, self.head_dim).transpose(1, 2)

        gate = torch.einsum("btc,hc->bht", x.float(), self.lr_weight.float()) + self.lr_bias.float().view(1, -1, 1)
        lr = self.base_lr * torch.sigmoid(gate) / self.head_dim
        return TTTInputs(heads(self.q_proj), heads(self.k_proj), heads(self.v_proj), lr)

    def token_eta(self) -> torch.Tensor:
        """Weight [b] of position i within a mini-batch: ``max(0, 1/(i+1) + learnable[i])``."""
        return torch.clamp_min(self.token_idx.float() + self.learnable_token_idx.float(), 0.0)

    def ln_params(self) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (self.num_heads, 1, self.head_dim)
        return self.ttt_norm_weight.float().view(shape), self.ttt_norm_bias.float().view(shape)

    def finish(self, inner_out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """[B, nh, T, f] inner outputs -> [B, T, width]: merge heads, post-norm, projection."""
        B, _, T, _ = inner_out.shape
        merged = inner_out.transpose(1, 2).reshape(B, T, self.width).to(dtype)
        return self.o_proj(self.post_norm(merged))

    # -- the inner model ----------------------------------------------------------------
    def initial_weights(self, batch_size: int) -> FastWeights:
        raise NotImplementedError

    def inner_dual(self, weights: FastWeights, mb: TTTInputs, first: int,
                   complete: bool) -> tuple[torch.Tensor, FastWeights]:
        """Outputs [B, nh, n - first, f] of tokens first..n-1 of the mini-batch ``mb`` (its first n
        tokens), each seeing only the gradients of tokens <= itself; and the weights after the
        mini-batch if ``complete`` (else ``weights`` unchanged)."""
        raise NotImplementedError

    def dual_coefficients(self, mb: TTTInputs, first: int) -> tuple[torch.Tensor, torch.Tensor]:
        """eta [B, nh, n - first, n] (token_eta[i] * lr_j for j <= i, else 0), and the
        coefficients [B, nh, n] of the weight update that ends a complete mini-batch."""
        n = len(mb)
        token_eta = self.token_eta()[:n]
        rows = torch.arange(first, n, device=mb.lr.device)
        causal = torch.arange(n, device=mb.lr.device).view(1, -1) <= rows.view(-1, 1)
        eta = token_eta[rows].view(-1, 1) * mb.lr.unsqueeze(-2) * causal
        return eta, token_eta[n - 1] * mb.lr

    # -- the TTT scan ---------------------------------------------------------------------
    def _init_streaming_state(self, batch_size: int) -> _TTTState:
        return _TTTState(batch_size, self.q_proj.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        new = self.project(x)
        state = self._streaming_state
        weights = state.weights if state is not None and state.weights is not None else None
        if weights is None:
            weights = self.initial_weights(x.shape[0])
        pending = state.pending if state is not None else None
        n_pending = len(pending) if pending is not None else 0
        tokens = pending.cat(new) if pending is not None else new
        outputs, weights, rest = self.scan(weights, tokens, n_pending)
        if state is not None:
            state.weights, state.pending = weights, rest
        return self.finish(torch.cat(outputs, dim=2), x.dtype)

    def scan(self, weights: FastWeights, tokens: TTTInputs,
             skip: int) -> tuple[list[torch.Tensor], FastWeights, TTTInputs | None]:
        """Run ``tokens`` (starting at a mini-batch boundary) through mini-batch TTT.

        Returns the outputs of tokens ``skip..`` (earlier ones were output by a previous call),
        the weights at the start of the last incomplete mini-batch, and its tokens (or None)."""
        b = self.mini_batch_size
        outputs: list[torch.Tensor] = []
        for start in range(0, len(tokens), b):
            mb = tokens.slice(start, start + b)
            complete = len(mb) == b
            first = max(skip - start, 0)
            if first >= len(mb):  # only possible for the pending tokens' own mini-batch
                raise AssertionError("pending tokens must form an incomplete mini-batch")
            out, weights = self.inner_dual(weights, mb, first, complete)
            outputs.append(out)
            if not complete:
                return outputs, weights, mb
        return outputs, weights, None


class TTTLinear(TTTBase):
    """TTT with a linear inner model: ``f_inner(x) = x W + b`` per head."""

    kind = "linear"

    def __init__(self, width: int, num_heads: int, **kwargs):
        super().__init__(width, num_heads, **kwargs)
        factory = {"device": self.q_proj.weight.device, "dtype": self.q_proj.weight.dtype}
        f = self.head_dim
        self.W1 = nn.Parameter(torch.randn(num_heads, f, f, **factory) * 0.02)
        self.b1 = nn.Parameter(torch.zeros(num_heads, 1, f, **factory))

    def initial_weights(self, batch_size: int) -> FastWeights:
        return {name: getattr(self, name).float().unsqueeze(0).expand(batch_size, -1, -1, -1)
                for name in ("W1", "b1")}

    def inner_dual(self, weights: FastWeights, mb: TTTInputs, first: int,
                   complete: bool) -> tuple[torch.Tensor, FastWeights]:
        W1, b1 = weights["W1"], weights["b1"]
        ln_w, ln_b = self.ln_params()
        z1 = mb.k @ W1 + b1
        grad_z1 = head_layer_norm_l2_grad(z1, mb.v - mb.k, ln_w, ln_b)
        eta, eta_last = self.dual_coefficients(mb, first)
        q = mb.q[:, :, first:]
        z1_bar = q @ W1 + b1 - (eta * (q @ mb.k.transpose(-1, -2) + 1.0)) @ grad_z1
        out = q + head_layer_norm(z1_bar, ln_w, ln_b)
        if not complete:
            return out, weights
        step = eta_last.unsqueeze(-1)
        return out, {"W1": W1 - (step * mb.k).transpose(-1, -2) @ grad_z1,
                     "b1": b1 - (step * grad_z1).sum(dim=-2, keepdim=True)}


class TTTMLP(TTTBase):
    """TTT with a two-layer MLP inner model (hidden 4 * head_dim, tanh-GELU) per head."""

    kind = "mlp"

    def __init__(self, width: int, num_heads: int, **kwargs):
        super().__init__(width, num_heads, **kwargs)
        factory = {"device": self.q_proj.weight.device, "dtype": self.q_proj.weight.dtype}
        f = self.head_dim
        self.W1 = nn.Parameter(torch.randn(num_heads, f, 4 * f, **factory) * 0.02)
        self.b1 = nn.Parameter(torch.zeros(num_heads, 1, 4 * f, **factory))
        self.W2 = nn.Parameter(torch.randn(num_heads, 4 * f, f, **factory) * 0.02)
        self.b2 = nn.Parameter(torch.zeros(num_heads, 1, f, **factory))

    def initial_weights(self, batch_size: int) -> FastWeights:
        return {name: getattr(self, name).float().unsqueeze(0).expand(batch_size, -1, -1, -1)
                for name in ("W1", "b1", "W2", "b2")}

    def inner_dual(self, weights: FastWeights, mb: TTTInputs, first: int,
                   complete: bool) -> tuple[torch.Tensor, FastWeights]:
        W1, b1, W2, b2 = weights["W1"], weights["b1"], weights["W2"], weights["b2"]
        ln_w, ln_b = self.ln_params()
        z1 = mb.k @ W1 + b1
        x2 = F.gelu(z1, approximate="tanh")
        z2 = x2 @ W2 + b2
        grad_z2 = head_layer_norm_l2_grad(z2, mb.v - mb.k, ln_w, ln_b)
        grad_z1 = (grad_z2 @ W2.transpose(-1, -2)) * gelu_tanh_grad(z1)
        eta, eta_last = self.dual_coefficients(mb, first)
        q = mb.q[:, :, first:]
        z1_bar = q @ W1 + b1 - (eta * (q @ mb.k.transpose(-1, -2) + 1.0)) @ grad_z1
        x2_bar = F.gelu(z1_bar, approximate="tanh")
        z2_bar = x2_bar @ W2 + b2 - (eta * (x2_bar @ x2.transpose(-1, -2) + 1.0)) @ grad_z2
        out = q + head_layer_norm(z2_bar, ln_w, ln_b)
        if not complete:
            return out, weights
        step = eta_last.unsqueeze(-1)
        return out, {"W1": W1 - (step * mb.k).transpose(-1, -2) @ grad_z1,
                     "b1": b1 - (step * grad_z1).sum(dim=-2, keepdim=True),
                     "W2": W2 - (step * x2).transpose(-1, -2) @ grad_z2,
                     "b2": b2 - (step * grad_z2).sum(dim=-2, keepdim=True)}


TTT_CLASSES: dict[str, type[TTTBase]] = {"linear": TTTLinear, "mlp": TTTMLP}


# -- the gated residual branch inside moshi's transformer ----------------------------------

class TTTBranch(nn.Module):
    """``x + tanh(alpha) * TTT(norm(x))`` with a per-channel gate ``alpha``."""

    def __init__(self, dim: int, inner: str, num_heads: int, mini_batch_size: int = 16,
                 base_lr: float = 1.0, gate_init: float = 0.0, device=None, dtype=None):
        super().__init__()
        if inner not in TTT_CLASSES:
            raise ValueError(f"unknown TTT inner model {inner!r}; choose one of {', '.join(INNER_KINDS)}")
        self.norm = create_norm_fn("rms_norm_f32", dim, device=device)
        self.ttt = TTT_CLASSES[inner](dim, num_heads, mini_batch_size=mini_batch_size, base_lr=base_lr,
                                      device=device, dtype=dtype)
        self.alpha = nn.Parameter(torch.full((dim,), float(gate_init), device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.tanh(self.alpha.float())
        update = gate * self.ttt(self.norm(x)).float()
        # A closed gate contributes an exact zero, even if the branch produced inf/NaN.
        update = torch.where(gate == 0, torch.zeros_like(update), update)
        return x + update.to(x.dtype)


class TTTTransformerLayer(StreamingTransformerLayer):
    """A moshi transformer layer followed by a TTT branch (``ttt_branch``).

    Existing layers become this class in place (``insert_ttt_branch``), so the base model's
    parameter names are unchanged and the TTT parameters live under ``<layer>.ttt_branch``.
    """

    ttt_branch: TTTBranch

    def forward(self, x: torch.Tensor, cross_attention_src: torch.Tensor | None = None):
        x = super().forward(x, cross_attention_src)
        with ExitStack() as stack:
            if x.device.type != "cuda":  # as moshi's layers: no torch.compile of the norm on CPU
                stack.enter_context(no_compile())
            return self.ttt_branch(x)


def insert_ttt_branch(layer: StreamingTransformerLayer, branch: TTTBranch) -> None:
    """Turn ``layer`` into a TTTTransformerLayer carrying ``branch``."""
    if isinstance(layer, TTTTransformerLayer):
        raise ValueError("this transformer layer already has a TTT branch")
    if type(layer) is not StreamingTransformerLayer:
        raise TypeError(f"can only add TTT to moshi's StreamingTransformerLayer, got {type(layer).__name__}")
    if layer._streaming_state is not None:
        raise RuntimeError("cannot add a TTT branch while the model is streaming")
    layer.__class__ = TTTTransformerLayer
    layer.ttt_branch = branch


def reset_streaming_children_cache(module: nn.Module) -> None:
    """moshi caches each StreamingModule's streaming descendants on first use; forget them so
    modules inserted afterwards get streaming state too."""
    for child in module.modules():
        if isinstance(child, StreamingModule):
            child._cached_children = None
