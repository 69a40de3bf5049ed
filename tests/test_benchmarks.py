"""The speed-up paths give exactly the plain path's numbers, and every benchmark script still runs.

The scripts run in their ``--quick`` mode (the tiny preset's shape, on the CPU), in this process;
their own checks (e.g. skipping the text head must not change the NLL) end them with an error.
"""

import importlib.util
from pathlib import Path

import pytest
import torch
from conftest import assert_exactly_equal, tiny_lm
from torch.utils.flop_counter import FlopCounterMode

from ttt_bench.models.dyneval import DynEvalScorer
from ttt_bench.models.frozen import FrozenScorer
from ttt_bench.models.streaming import chunk_nll, delayed_inputs, stream_codes, text_head_skipped, widen_kv_caches
from ttt_bench.models.base import StreamLayout
from ttt_bench.models.ttt import TTTScorer

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def codes():
    return torch.randint(0, 256, (2, 8, 70), generator=torch.Generator().manual_seed(3))


SCORERS = {
    "frozen": lambda: FrozenScorer(lm=tiny_lm(context=32)),
    "ttt": lambda: TTTScorer(lm=tiny_lm(context=32), layers="last 1", inner="mlp", mini_batch_size=4),
    "dyneval": lambda: DynEvalScorer(lm=tiny_lm(context=32), lr=1e-2, optimizer="adam"),
}


@pytest.mark.parametrize("name", SCORERS)
def test_skipping_the_text_head_changes_no_nll(name, codes):
    scorer = SCORERS[name]()
    head = scorer.lm.text_linear
    calls = []
    head.register_forward_hook(lambda *args: calls.append(1))
    skipped = scorer.score(codes, chunk_size=16)
    assert not calls, "the text head still ran"
    scorer.skip_text_head = False
    computed = scorer.score(codes, chunk_size=16)
    assert calls, "the plain path must compute the text head"
    assert_exactly_equal(skipped, computed)
    assert scorer.lm.text_linear is head


def test_text_head_is_put_back_after_an_error(lm32):
    head = lm32.text_linear
    with pytest.raises(RuntimeError, match="boom"):
        with text_head_skipped(lm32):
            assert lm32.text_linear is not head
            raise RuntimeError("boom")
    assert lm32.text_linear is head


def test_flops_per_frame_match_the_counted_matmuls():
    """bench_gpu's FLOPs from the configuration == the matrix products torch counts running a
    chunk. Attention is left out: torch does not count its CPU kernel, and moshi computes it over
    the whole ring where the formula counts the ``context`` keys the mask lets through."""
    bench_gpu = load_script("bench_gpu")
    lm = tiny_lm(context=32)
    chunk = 8
    delayed = delayed_inputs(lm, stream_codes(lm, torch.randint(0, lm.card, (1, 8, chunk)), StreamLayout()))
    for text_head in (False, True):
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), lm.streaming(1), text_head_skipped(lm, not text_head):
            widen_kv_caches(lm.transformer, chunk - 1)
            with counter:
                chunk_nll(lm, delayed, 0, chunk)
        counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
        matmuls = sum(n for op, n in counts.items() if "attention" not in op)
        parts = bench_gpu.flops_per_frame(lm, text_head=text_head)
        depformer_attention = 2 * 2 * (lm.dep_q * (lm.dep_q + 1) // 2) * lm.depformer_in[0].weight.shape[0]
        assert matmuls == chunk * (parts["total"] - parts["attention"] - depformer_attention * len(lm.depformer.layers))
    assert parts["text head"] == 2 * lm.dim * lm.text_card


SCRIPTS = {
    "bench_scoring": (["--quick"], "b/b' (text head skipped vs computed"),
    "bench_ttt": (["--quick"], "dyneval-norms"),
    "bench_data": (["--quick"], "cached second pass, tiny 0.2 min"),
    "bench_gpu": (["--device", "cpu", "--quick", "--dtype", "float32"], "== headline =="),  # bf16 is slow on CPUs
    "bench_series": (["--quick", "--checkpoints", "2"], "series / separate: whole run"),
}


@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_script_runs_quick(script, capsys):
    argv, expected = SCRIPTS[script]
    load_script(script).main(argv)
    out = capsys.readouterr().out
    assert expected in out
    assert torch.is_grad_enabled(), "a script must not leave autograd switched off"
