"""The TTT modules on their own: dual form == primal form, streaming == one pass, causality."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ttt_bench.models.layers.ttt_layers import TTT_CLASSES, TTTBase, TTTInputs, TTTLinear, TTTMLP

WIDTH, HEADS, B_MINI, T = 16, 2, 4, 14  # 3 complete mini-batches and a partial one


def make_layer(inner: str, base_lr: float = 4.0, seed: int = 0) -> TTTBase:
    torch.manual_seed(seed)
    layer = TTT_CLASSES[inner](WIDTH, HEADS, mini_batch_size=B_MINI, base_lr=base_lr)
    with torch.no_grad():  # make the learnable parts non-trivial
        layer.learnable_token_idx.normal_(0.0, 0.1)
        layer.ttt_norm_weight.normal_(1.0, 0.1)
        layer.ttt_norm_bias.normal_(0.0, 0.1)
        layer.lr_bias.normal_(0.0, 0.5)
        for name, p in layer.named_parameters():
            if name in ("W1", "W2"):
                p.normal_(0.0, 0.3)
            elif name in ("b1", "b2"):
                p.normal_(0.0, 0.1)
    return layer.eval()


def stream(layer: TTTBase, x: torch.Tensor, chunk: int) -> torch.Tensor:
    with layer.streaming(x.shape[0]):
        return torch.cat([layer(x[:, s:s + chunk]) for s in range(0, x.shape[1], chunk)], dim=1)


# -- primal form: the update equations written out token by token ------------------------

def inner_model(inner: str, x: torch.Tensor, w: dict[str, torch.Tensor]) -> torch.Tensor:
    if inner == "linear":
        return x @ w["W1"] + w["b1"]
    return F.gelu(x @ w["W1"] + w["b1"], approximate="tanh") @ w["W2"] + w["b2"]


def head_ln(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], eps=1e-6) * weight + bias


def primal_inner(layer: TTTBase, inputs: TTTInputs, inner: str) -> torch.Tensor:
    """Outputs [B, nh, T, f]: token i uses W_0 - token_eta[i] * sum_{j<=i} lr_j grad l_j(W_0)
    (gradients by autograd), and W_0 moves to the last token's weights after each mini-batch."""
    names = ["W1", "b1"] + (["W2", "b2"] if inner == "mlp" else [])
    B = inputs.q.shape[0]
    w0 = {n: getattr(layer, n).detach().float().unsqueeze(0).repeat(B, 1, 1, 1) for n in names}
    ln_w, ln_b = (p.detach().view(HEADS, 1, -1) for p in (layer.ttt_norm_weight, layer.ttt_norm_bias))
    token_eta = layer.token_eta().detach()
    outs = []
    for start in range(0, len(inputs), B_MINI):
        acc = {n: torch.zeros_like(w) for n, w in w0.items()}
        for i in range(min(B_MINI, len(inputs) - start)):
            tok = inputs.slice(start + i, start + i + 1).detach()
            w = {n: t.clone().requires_grad_() for n, t in w0.items()}
            loss = 0.5 * ((head_ln(inner_model(inner, tok.k, w), ln_w, ln_b) - (tok.v - tok.k)) ** 2).sum()
            grads = torch.autograd.grad(loss, [w[n] for n in names])
            lr = tok.lr.view(B, HEADS, 1, 1)
            acc = {n: acc[n] + lr * g for n, g in zip(names, grads)}
            w_i = {n: w0[n] - token_eta[i] * acc[n] for n in names}
            outs.append(tok.q + head_ln(inner_model(inner, tok.q, w_i), ln_w, ln_b))
        if i == B_MINI - 1:
            w0 = w_i
    return torch.cat(outs, dim=2)


@pytest.mark.parametrize("inner", ["linear", "mlp"])
def test_dual_form_equals_primal_form(inner):
    layer = make_layer(inner)
    x = torch.randn(2, T, WIDTH)
    with torch.no_grad():
        dual = layer(x)
        inputs = layer.project(x)
    primal = layer.finish(primal_inner(layer, inputs, inner), x.dtype).detach()
    torch.testing.assert_close(dual, primal, rtol=0, atol=1e-5)
    # the updates matter: without them (base_lr 0) the outputs are far from these
    layer.base_lr = 0.0
    with torch.no_grad():
        assert (layer(x) - dual).abs().max() > 1e-2


@pytest.mark.parametrize("inner", ["linear", "mlp"])
@pytest.mark.parametrize("chunk", [1, 3, B_MINI, B_MINI + 1, 3 * B_MINI + 1])
def test_streaming_equals_one_pass(inner, chunk):
    layer = make_layer(inner)
    x = torch.randn(2, T, WIDTH)
    with torch.no_grad():
        torch.testing.assert_close(stream(layer, x, chunk), layer(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("inner", ["linear", "mlp"])
def test_state_is_float32_and_reset(inner):
    layer = make_layer(inner).to(torch.bfloat16)
    x = torch.randn(1, T, WIDTH, dtype=torch.bfloat16)
    with torch.no_grad(), layer.streaming(1):
        first = layer(x)
        state = layer._streaming_state
        assert all(w.dtype == torch.float32 for w in state.weights.values())
        assert state.pending is not None and len(state.pending) == T % B_MINI
        assert state.pending.q.dtype == torch.float32
        layer.reset_streaming()
        again = layer(x)
    assert first.dtype == torch.bfloat16
    assert torch.equal(first, again)


class NonCausalTTTLinear(TTTLinear):
    """The leak the causality test must catch: update on the whole mini-batch, then predict
    every token of it with the updated weights."""

    def inner_dual(self, weights, mb, first, complete):
        _, updated = TTTLinear.inner_dual(self, weights, mb, 0, True)
        ln_w, ln_b = self.ln_params()
        q = mb.q[:, :, first:]
        return q + head_ln(q @ updated["W1"] + updated["b1"], ln_w, ln_b), (updated if complete else weights)


def changed_after(x: torch.Tensor, t: int) -> torch.Tensor:
    y = x.clone()
    y[:, t + 1:] = torch.randn_like(y[:, t + 1:])
    return y


def max_change_up_to(layer: TTTBase, x: torch.Tensor, t: int) -> float:
    with torch.no_grad():
        return float((layer(x)[:, :t + 1] - layer(changed_after(x, t))[:, :t + 1]).abs().max())


@pytest.mark.parametrize("inner", ["linear", "mlp"])
def test_causal(inner):
    layer = make_layer(inner)
    x = torch.randn(2, T, WIDTH)
    for t in range(T - 1):
        assert max_change_up_to(layer, x, t) == 0.0, f"output at <= {t} depends on later tokens"


def test_causality_check_catches_a_non_causal_update():
    layer = make_layer("linear")
    leaky = NonCausalTTTLinear(WIDTH, HEADS, mini_batch_size=B_MINI, base_lr=layer.base_lr)
    leaky.load_state_dict(layer.state_dict())
    x = torch.randn(2, T, WIDTH)
    leaks = [t for t in range(T - 1) if max_change_up_to(leaky, x, t) > 1e-6]
    assert leaks, "the non-causal variant went unnoticed"
    assert all(t % B_MINI != B_MINI - 1 for t in leaks)  # only inside a mini-batch


def test_mlp_and_linear_shapes():
    for cls in (TTTLinear, TTTMLP):
        layer = cls(WIDTH, HEADS, mini_batch_size=B_MINI)
        assert layer(torch.randn(3, 5, WIDTH)).shape == (3, 5, WIDTH)
