"""Without the Hugging Face Hub (offline, or no network), the default model fails at once with one
line that names the repository and the three ways out; a filled cache is used without waiting for
huggingface_hub's five retries; a Hub that answers is left to huggingface_hub.

The network cases run ttt-bench in a subprocess (huggingface_hub reads HF_HUB_OFFLINE and
HF_ENDPOINT once, at import) against loopback addresses only: port 9 of 127.0.0.1, where nothing
listens (connection refused), a socket that never answers, or a local HTTP server that answers
404 to everything."""

import http.server
import logging
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from runner_fixtures import subprocess_env

DEFAULT_REPO = "kyutai/moshiko-pytorch-bf16"
CLOSED_PORT = "http://127.0.0.1:9"  # loopback, discard port: nothing listens, the connection is refused
WAYS_OUT = ("HF_HUB_OFFLINE=1", "hf_repo=LOCAL_DIR", "preset=tiny")
TESTS = Path(__file__).resolve().parent


def hub_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A subprocess environment with an empty private HF cache and HF_HUB_OFFLINE unset unless given."""
    env = subprocess_env(HF_HOME=str(tmp_path / "hf_home"), TTT_BENCH_CACHE=str(tmp_path / "codes"), **extra)
    env.pop("HF_HUB_CACHE", None)
    if "HF_HUB_OFFLINE" not in extra:
        env.pop("HF_HUB_OFFLINE")
    return env


def run_cli(tmp_path: Path, env: dict[str, str], *model_args: str) -> subprocess.CompletedProcess:
    args = ["--model_args", ",".join(model_args)] if model_args else []
    return subprocess.run([sys.executable, "-m", "ttt_bench", "--model", "frozen", "--tasks", "librilight_sample",
                           "--limit", "1", "--output_path", str(tmp_path / "out"), "--verbosity", "WARNING", *args],
                          capture_output=True, text=True, env=env, timeout=300)


def assert_one_line_with_the_ways_out(stderr: str, reason: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line, got {len(lines)}:\n{stderr}"  # no retry warnings, no traceback
    line = lines[0]
    assert line.startswith("ttt-bench: error: ") and DEFAULT_REPO in line and reason in line, line
    for way in WAYS_OUT:
        assert way in line, f"{way} missing from: {line}"


def test_offline_default_model_with_an_empty_cache_is_one_line_with_the_ways_out(tmp_path):
    out = run_cli(tmp_path, hub_env(tmp_path, HF_HUB_OFFLINE="1"))
    assert out.returncode == 2, out.stderr
    assert_one_line_with_the_ways_out(out.stderr, "HF_HUB_OFFLINE is set")
    assert str(tmp_path / "hf_home" / "hub") in out.stderr  # where the cache is


def test_connection_refused_is_the_same_one_line_without_retries(tmp_path):
    out = run_cli(tmp_path, hub_env(tmp_path, HF_ENDPOINT=CLOSED_PORT))
    assert out.returncode == 2, out.stderr
    assert_one_line_with_the_ways_out(out.stderr, f"{CLOSED_PORT}: [Errno 111] Connection refused")
    assert "Retrying" not in out.stderr


def test_a_hub_that_never_answers_costs_one_etag_timeout(tmp_path):
    """A loopback socket that takes connections and never answers (as a stalled proxy would):
    one request, waiting HF_HUB_ETAG_TIMEOUT seconds, not five."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # the kernel completes the connection; nothing ever reads or answers
        env = hub_env(tmp_path, HF_ENDPOINT=f"http://127.0.0.1:{silent.getsockname()[1]}", HF_HUB_ETAG_TIMEOUT="1")
        out = run_cli(tmp_path, env)
    assert out.returncode == 2, out.stderr
    assert_one_line_with_the_ways_out(out.stderr, "no answer in time (ReadTimeout)")


def test_an_unreachable_hub_uses_a_filled_cache_without_retrying(tmp_path):
    """The tiny checkpoint in the HF cache, the Hub refused: loaded from the cache (as huggingface_hub
    falls back to it, but without its 26 s of retries), with one warning saying so."""
    script = f"""
import logging, sys
sys.path.insert(0, {str(TESTS)!r})
logging.basicConfig(level="WARNING", format="%(levelname)s %(name)s: %(message)s")
import torch
from huggingface_hub import constants
from hf_cache import write_tiny_hf_checkpoint
from ttt_bench.registry import get_model
write_tiny_hf_checkpoint(constants.HF_HUB_CACHE, "ttt-bench-test/cached", seed=5)
codes = torch.randint(0, 256, (1, 8, 12), generator=torch.Generator().manual_seed(0))
cached = get_model("frozen", hf_repo="ttt-bench-test/cached").score(codes, chunk_size=4)
preset = get_model("frozen", preset="tiny", seed=5).score(codes, chunk_size=4)
torch.testing.assert_close(cached, preset, rtol=0, atol=0, equal_nan=True)  # NaN: unscored
print("same nll")
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=hub_env(tmp_path, HF_ENDPOINT=CLOSED_PORT), timeout=300)
    assert out.returncode == 0 and "same nll" in out.stdout, out.stderr
    warnings = [line for line in out.stderr.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1, out.stderr
    assert "cannot be reached" in warnings[0] and "cached copy of ttt-bench-test/cached" in warnings[0]


class _NotFound(http.server.BaseHTTPRequestHandler):
    def do_HEAD(self):
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_HEAD

    def log_message(self, *args):  # quiet
        pass


@pytest.fixture
def answering_hub():
    """A local HTTP server that answers 404 to every request: a Hub that is reachable."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NotFound)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_hub_that_answers_is_not_reported_unreachable(tmp_path, answering_hub):
    out = run_cli(tmp_path, hub_env(tmp_path, HF_ENDPOINT=answering_hub))
    assert out.returncode == 2, out.stderr
    assert "cannot be reached" not in out.stderr, out.stderr
    assert f"of Moshi checkpoint '{DEFAULT_REPO}'" in out.stderr, out.stderr


def test_in_process_offline_error_is_a_checkpoint_error_and_nothing_is_logged(hf_hub_cache, caplog):
    from ttt_bench.models.loading.checkpoints import CheckpointError
    from ttt_bench.registry import get_model

    with caplog.at_level(logging.WARNING), pytest.raises(CheckpointError) as info:
        get_model("frozen")
    message = str(info.value)
    assert "\n" not in message and DEFAULT_REPO in message and str(hf_hub_cache) in message
    assert all(way in message for way in WAYS_OUT), message
    assert not [r for r in caplog.records if r.name.startswith("huggingface_hub")], caplog.text
