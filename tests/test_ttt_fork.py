"""The moshi-finetune TTT fork's layer (ttt_bench/models/layers/ttt_fork.py) against an independent
reference of its training-time forward, streamed and in one pass, in both causal modes."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from ttt_bench.models.layers.ttt_fork import ForkTTT, ForkTTTBlock, ForkTTTConfig

WIDTH, HEADS, C, T = 16, 2, 4, 14  # 3 complete mini-batches and a partial one
CAUSAL_CHUNKS, LOOKAHEAD_CHUNKS = (1, 3, C, 2 * C + 1), (C, 2 * C, 4 * C)
DEPTHS = {"2 layers": {"mlp_layers": 2}, "3 layers": {"mlp_layers": 3},
          "4 layers, hidden dims": {"mlp_layers": 4, "mlp_hidden_dims": (12, 20, 6)}}


def make_layer(causal: bool = True, use_rope: bool = False, base_lr: float = 20.0, seed: int = 0,
               **config) -> ForkTTT:
    torch.manual_seed(seed)
    cfg = ForkTTTConfig(WIDTH, HEADS, mini_batch_size=C, base_lr=base_lr, use_rope=use_rope,
                        rope_theta=100.0, causal=causal, **config)
    layer = ForkTTT(cfg)
    with torch.no_grad():  # every parameter non-trivial (biases too: the pad frames see them)
        for name, p in layer.named_parameters():
            if name.startswith(("wq", "wk", "wv")):
                p.normal_(0.0, 0.3 if name.endswith("weight") else 0.5)
            elif name == "ttt_norm_weight":
                p.normal_(1.0, 0.2)
            elif name == "learnable_ttt_lr_bias":
                p.normal_(0.0, 0.5)
            elif name == "learnable_ttt_lr_weight":
                p.normal_(0.0, 0.1)
            else:
                p.normal_(0.0, 0.3)
    return layer.eval()


# -- the reference: the fork's training forward written out token by token -------------

def inner_mlp(x: torch.Tensor, weights: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    for index, (W, b) in enumerate(weights):
        x = x @ W + b
        if index < len(weights) - 1:
            x = F.gelu(x, approximate="tanh")
    return x


def reference_forward(layer: ForkTTT, x: torch.Tensor) -> torch.Tensor:
    """Primal form: every gradient by autograd at the mini-batch's starting weights W0; token i
    reads W0 - m * sum_{j in S_i} eta_j grad_j, S_i its whole mini-batch (causal=False, zero
    padding to a multiple of C) or the tokens up to i; W0 then moves by the whole mini-batch's
    step once. m = 2 for MLPs of 3+ layers (the fork applies the step and its dual form)."""
    cfg = layer.config
    B, length, D = x.shape
    f = cfg.head_dim
    if not cfg.causal and length % C:
        x = torch.cat([x, torch.zeros(B, C - length % C, D)], dim=1)
    n = x.shape[1]
    p = {name: t.detach().float() for name, t in layer.named_parameters()}

    def heads(name: str) -> torch.Tensor:  # [B, n, H, f]
        return F.linear(x, p[f"{name}.weight"], p[f"{name}.bias"]).view(B, n, HEADS, f)

    q = heads("wq") / heads("wq").norm(dim=-1, keepdim=True)
    k = heads("wk") / heads("wk").norm(dim=-1, keepdim=True)
    v = heads("wv")
    if cfg.use_rope:
        exponent = torch.arange(0, f, 2).float() / f
        freq = cfg.rope_theta ** -exponent * (0.5 + 1.5 * torch.exp(-exponent / 2))
        turn = torch.polar(torch.ones(n, f // 2), (torch.arange(n) % C).float()[:, None] * freq)
        rot = lambda t: torch.view_as_real(torch.view_as_complex(t.reshape(B, n, HEADS, f // 2, 2))
                                           * turn[None, :, None]).reshape(B, n, HEADS, f)
        q, k = rot(q), rot(k)
    norm_w, norm_b = p["ttt_norm_weight"], p["ttt_norm_bias"]  # [H, f]
    r = v - k
    target = norm_w * (r - r.mean(-1, keepdim=True)) / (r.std(-1, keepdim=True) + 1e-5) + norm_b
    gate = torch.einsum("bnd,hd->bnh", x, p["learnable_ttt_lr_weight"][:, 0]) + p["learnable_ttt_lr_bias"][:, 0]
    eta = cfg.base_lr * torch.sigmoid(gate) / f / C  # [B, n, H]

    def ln(z):
        return F.layer_norm(z, (f,), eps=1e-8) * norm_w + norm_b

    names = [(f"W{i + 1}", f"b{i + 1}") for i in range(2)] if cfg.mlp_layers == 2 else \
        [(f"weights.{i}", f"biases.{i}") for i in range(cfg.mlp_layers)]
    w0 = [(p[w].expand(B, -1, -1, -1).clone(), p[b].expand(B, -1, -1, -1).clone()) for w, b in names]
    m = 1.0 if cfg.mlp_layers == 2 else 2.0
    outs = []
    for start in range(0, n, C):
        span = range(start, min(start + C, n))
        grads = []
        for j in span:
            leaves = [(W.clone().requires_grad_(), b.clone().requires_grad_()) for W, b in w0]
            pred = ln(inner_mlp(k[:, j].unsqueeze(2), leaves).squeeze(2))  # [B, H, f]
            loss = 0.5 * ((pred - target[:, j]) ** 2).sum()
            flat = torch.autograd.grad(loss, [t for pair in leaves for t in pair])
            grads.append([(flat[2 * i], flat[2 * i + 1]) for i in range(len(leaves))])

        def moved(tokens, scale):
            e = {j: eta[:, j].view(B, HEADS, 1, 1) for j in tokens}
            return [(W - scale * sum(e[j] * grads[j - start][i][0] for j in tokens),
                     b - scale * sum(e[j] * grads[j - start][i][1] for j in tokens))
                    for i, (W, b) in enumerate(w0)]

        for i in span:
            seen = [j for j in span if j <= i] if cfg.causal else list(span)
            w_i = moved(seen, m)
            outs.append(q[:, i] + ln(inner_mlp(q[:, i].unsqueeze(2), w_i).squeeze(2)))
        w0 = moved(list(span), 1.0)
    return torch.stack(outs, dim=1)[:, :length].reshape(B, length, D)


def stream(layer: ForkTTT, x: torch.Tensor, chunk: int) -> torch.Tensor:
    with layer.streaming(x.shape[0]):
        return torch.cat([layer(x[:, s:s + chunk]) for s in range(0, x.shape[1], chunk)], dim=1)


CONFIGS = [pytest.param(depth, rope, causal, id=f"{depth}-{'rope' if rope else 'no rope'}-causal={causal}")
           for depth in DEPTHS for rope in (False, True) for causal in (True, False)]


@pytest.mark.parametrize("depth,rope,causal", CONFIGS)
def test_layer_equals_reference_in_one_pass_and_streamed(depth, rope, causal):
    layer = make_layer(causal, rope, **DEPTHS[depth])
    x = torch.randn(2, T, WIDTH)
    expected = reference_forward(layer, x)
    with torch.no_grad():
        results = {"one pass": layer(x)}
        for chunk in CAUSAL_CHUNKS if causal else LOOKAHEAD_CHUNKS:
            results[f"chunk {chunk}"] = stream(layer, x, chunk)
    diffs = {how: float((out - expected).abs().max()) for how, out in results.items()}
    print(f"max |layer - reference| {depth}, rope={rope}, causal={causal}: {diffs}")
    assert max(diffs.values()) <= 1e-5, diffs
    # the inner updates matter: without them the outputs are far from these
    static = dataclasses.replace(layer.config, base_lr=1e-9)
    frozen_layer = ForkTTT(static)
    frozen_layer.load_state_dict(layer.state_dict())
    with torch.no_grad():
        assert (frozen_layer(x) - expected).abs().max() > 1e-2


@pytest.mark.parametrize("depth", list(DEPTHS))
def test_last_token_of_each_mini_batch_is_the_same_in_both_modes(depth):
    causal, lookahead = make_layer(True, **DEPTHS[depth]), make_layer(False, **DEPTHS[depth])
    x = torch.randn(2, 3 * C, WIDTH)
    with torch.no_grad():
        a, b = causal(x), lookahead(x)
    last = torch.arange(C - 1, 3 * C, C)
    torch.testing.assert_close(a[:, last], b[:, last], rtol=0, atol=1e-5)
    others = torch.tensor([t for t in range(3 * C) if t % C != C - 1])
    assert (a[:, others] - b[:, others]).abs().max() > 1e-3  # the look-ahead is real


def changed_from(x: torch.Tensor, p: int) -> torch.Tensor:
    y = x.clone()
    y[:, p:] = torch.randn_like(y[:, p:])
    return y


@pytest.mark.parametrize("depth", list(DEPTHS))
def test_causal_layer_never_reads_ahead_and_lookahead_layer_does(depth):
    x = torch.randn(2, T, WIDTH)
    causal, lookahead = make_layer(True, True, **DEPTHS[depth]), make_layer(False, True, **DEPTHS[depth])
    leaks = []
    with torch.no_grad():
        causal_x, lookahead_x = causal(x), lookahead(x)
        for p in range(1, T):
            y = changed_from(x, p)
            assert torch.equal(causal_x[:, :p], causal(y)[:, :p]), f"causal output before {p} read frame >= {p}"
            if (lookahead_x[:, :p] - lookahead(y)[:, :p]).abs().max() > 1e-6:
                leaks.append(p)
    # causal=False leaks exactly where frame p shares a mini-batch with earlier frames
    assert leaks == [p for p in range(1, T) if p % C]


def test_lookahead_layer_refuses_a_chunk_after_a_partial_mini_batch():
    layer = make_layer(False)
    with torch.no_grad(), layer.streaming(1):
        layer(torch.randn(1, C + 1, WIDTH))
        with pytest.raises(RuntimeError, match="multiples of 4"):
            layer(torch.randn(1, C, WIDTH))
        layer.reset_streaming()
        layer(torch.randn(1, C, WIDTH))  # a new document starts afresh


def test_state_is_float32_reset_and_never_written_to_parameters():
    layer = make_layer(True, mlp_layers=3).to(torch.bfloat16)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(1, T, WIDTH, dtype=torch.bfloat16)
    with torch.no_grad(), layer.streaming(1):
        first = layer(x)
        state = layer._streaming_state
        assert all(w.dtype == torch.float32 and b.dtype == torch.float32 for w, b in state.weights)
        assert len(state.pending) == T % C
        layer.reset_streaming()
        again = layer(x)
    assert first.dtype == torch.bfloat16 and torch.equal(first, again)
    assert all(torch.equal(v, layer.state_dict()[k]) for k, v in before.items())


def test_gate_clamps_alpha_and_adds_to_the_residual():
    cfg = ForkTTTConfig(WIDTH, HEADS, mini_batch_size=C)
    block = ForkTTTBlock(cfg, gate_init=0.0)
    with torch.no_grad():
        block.forward_ssm_gating.gating_alpha.copy_(torch.linspace(-5, 5, WIDTH))
        x = torch.randn(1, T, WIDTH)
        expected = x + torch.tanh(torch.linspace(-5, 5, WIDTH).clamp(-3, 3)) * block.ttt(x)
        torch.testing.assert_close(block(x), expected)


def test_parameter_names_and_shapes_are_the_forks():
    f = WIDTH // HEADS
    two = dict(make_layer(mlp_layers=2).named_parameters())
    assert {k: tuple(v.shape) for k, v in two.items()} == {
        "wq.weight": (WIDTH, WIDTH), "wq.bias": (WIDTH,), "wk.weight": (WIDTH, WIDTH), "wk.bias": (WIDTH,),
        "wv.weight": (WIDTH, WIDTH), "wv.bias": (WIDTH,),
        "learnable_ttt_lr_weight": (HEADS, 1, WIDTH), "learnable_ttt_lr_bias": (HEADS, 1),
        "ttt_norm_weight": (HEADS, f), "ttt_norm_bias": (HEADS, f),
        "W1": (HEADS, f, 4 * f), "b1": (HEADS, 1, 4 * f), "W2": (HEADS, 4 * f, f), "b2": (HEADS, 1, f)}
    three = dict(make_layer(mlp_layers=3, mlp_expansion_factor=2.0).named_parameters())
    assert [tuple(three[f"weights.{i}"].shape) for i in range(3)] == [(HEADS, f, 2 * f), (HEADS, 2 * f, 2 * f),
                                                                       (HEADS, 2 * f, f)]
    assert tuple(three["biases.2"].shape) == (HEADS, 1, f)


# -- inside Moshi: the ttt adapter with arch=moshi_finetune_ttt ----------------------------

from conftest import tiny_lm  # noqa: E402
from ttt_bench.models.base import StreamLayout  # noqa: E402
from ttt_bench.models.frozen import FrozenScorer  # noqa: E402
from ttt_bench.models.streaming import forward_nll  # noqa: E402
from ttt_bench.models.ttt import TTTOptions, TTTScorer  # noqa: E402

LM_CONTEXT, FRAMES = 64, 18  # 4 mini-batches and a partial one


def fork_scorer(causal: bool = True, gate_init: float = 0.5, **options) -> TTTScorer:
    scorer = TTTScorer(lm=tiny_lm(context=LM_CONTEXT), arch="moshi_finetune_ttt", layers="all",
                       mini_batch_size=C, base_lr=20.0, gate_init=gate_init, causal=causal, use_rope=True,
                       **options)
    with torch.no_grad():  # biases and learning-rate gates away from their zero init
        for name, p in scorer.lm.named_parameters():
            if ".seq_modeling_block." in name and name.endswith(("bias", "lr_weight")):
                p.normal_(0.0, 0.3)
    return scorer


@pytest.fixture(scope="module")
def codes() -> torch.Tensor:
    torch.manual_seed(5)
    return torch.randint(0, 256, (1, 8, FRAMES))


def nan_max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert torch.equal(a.isnan(), b.isnan())
    return float((a - b).nan_to_num().abs().max())


@pytest.mark.parametrize("mlp_layers", [2, 3])
@pytest.mark.parametrize("causal", [True, False])
def test_scorer_streams_the_training_forward_at_every_chunk_size(causal, mlp_layers, codes):
    scorer = fork_scorer(causal, mlp_layers=mlp_layers)
    with torch.no_grad():
        one_pass = forward_nll(scorer.lm, codes, StreamLayout())  # the whole sequence at once
    chunks = CAUSAL_CHUNKS if causal else LOOKAHEAD_CHUNKS
    diffs = {chunk: nan_max_diff(scorer.score(codes, chunk_size=chunk), one_pass) for chunk in chunks}
    assert max(diffs.values()) < 1e-4, diffs
    frozen = FrozenScorer(lm=tiny_lm(context=LM_CONTEXT)).score(codes, chunk_size=8)
    assert nan_max_diff(one_pass, frozen) > 0.05  # the TTT layers matter


@pytest.mark.parametrize("causal", [True, False])
def test_gate_zero_is_frozen_exactly(causal, codes):
    frozen = FrozenScorer(lm=tiny_lm(context=LM_CONTEXT)).score(codes, chunk_size=C)
    nll = fork_scorer(causal, gate_init=0.0, mlp_layers=3).score(codes, chunk_size=C)
    torch.testing.assert_close(nll, frozen, rtol=0, atol=0, equal_nan=True)


PERTURBED_FROM = (4, 5, 6, 7, 14)


def nll_changes_before(scorer: TTTScorer, codes: torch.Tensor, chunk: int) -> dict[int, float]:
    """For each p: max |NLL change| at frames before p (less each codebook's delay: moshi predicts
    an acoustic code after the next semantic one) when every frame from p on changes."""
    delays = scorer.lm.delays[1:9]
    base = scorer.score(codes, chunk_size=chunk)
    changes = {}
    for p in PERTURBED_FROM:
        other = codes.clone()
        other[..., p:] = torch.randint(0, 256, other[..., p:].shape)
        nll = scorer.score(other, chunk_size=chunk)
        assert nan_max_diff(nll, base) > 0.01  # the perturbation itself is seen
        changes[p] = max(nan_max_diff(nll[:, k, :p - d], base[:, k, :p - d]) for k, d in enumerate(delays))
    return changes


def test_causal_scorer_never_reads_ahead(codes):
    changes = nll_changes_before(fork_scorer(True, mlp_layers=3), codes, chunk=2 * C)
    assert set(changes.values()) == {0.0}, changes


def test_lookahead_scorer_is_caught_reading_ahead(codes):
    changes = nll_changes_before(fork_scorer(False, mlp_layers=3), codes, chunk=2 * C)
    leaks = [p for p, change in changes.items() if change > 1e-5]
    # step p + 1 is the first to read frame p; steps before it in its mini-batch score frames < p
    # when it is not among the first two of its mini-batch
    assert leaks == [p for p in PERTURBED_FROM if (p + 1) % C >= 2], changes


def test_lookahead_refuses_chunks_that_split_a_mini_batch(codes):
    scorer = fork_scorer(False)
    with pytest.raises(ValueError, match="not a multiple of the TTT mini_batch_size 4"):
        scorer.score(codes, chunk_size=6)


def test_label_and_lookahead_flag_say_what_was_measured():
    assert fork_scorer(True).info.label == "ttt (moshi_finetune_ttt, causal=true)"
    lookahead = fork_scorer(False)
    assert lookahead.info.label == "ttt (moshi_finetune_ttt, causal=false)" and lookahead.lookahead
    assert not fork_scorer(True).lookahead
    assert lookahead.info.options["arch"] == "moshi_finetune_ttt" and lookahead.info.options["causal"] is False


def test_options_that_do_not_apply_are_refused_by_name():
    with pytest.raises(ValueError, match="causal"):
        TTTOptions(causal="false")  # arch=ttt_bench is causal only
    with pytest.raises(ValueError, match="use_rope"):
        TTTOptions(use_rope=True)
    with pytest.raises(ValueError, match="inner='linear'"):
        TTTOptions(arch="moshi_finetune_ttt", inner="linear")
    assert TTTOptions(arch="moshi_finetune_ttt", causal="false", mlp_hidden_dims="12;20").mlp_hidden_dims == (12, 20)


def test_cli_measures_causal_false_flagged_lookahead_and_refuses_split_mini_batches(tmp_path, capsys):
    import json

    from ttt_bench.cli import main

    run = ["--model", "ttt", "--tasks", "librilight_sample", "--task_args", "max_frames=128", "--limit", "1",
           "--model_args", "preset=tiny,arch=moshi_finetune_ttt,causal=false,mini_batch_size=4,layers=all"]
    out = tmp_path / "out"
    assert main([*run, "--chunk_size", "8", "--output_path", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    info = results["models"]["ttt"]
    assert info["lookahead"] is True and info["label"] == "ttt (moshi_finetune_ttt, causal=false)"
    assert [f["code"] for f in results["results"]["librilight_sample"]["ttt"]["flags"]].count("lookahead") == 1
    check = results["causality"]["librilight_sample"][0]
    assert check["lookahead_allowed"] and not check["passed"]  # the run's own check sees the look-ahead too
    assert "ttt (moshi_finetune_ttt, causal=false): lookahead" in (out / "leaderboard.md").read_text()

    capsys.readouterr()
    refused = tmp_path / "refused"
    assert main([*run, "--chunk_size", "6", "--output_path", str(refused)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "chunk_size 6 is not a multiple of the TTT mini_batch_size 4" in err
    assert not refused.exists()
