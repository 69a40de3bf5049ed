"""The CLI end to end on the packaged sample with the tiny preset, and its error paths."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ttt_bench.cli import main, parse_kv
from ttt_bench.config import ConfigError, load_task_config
from ttt_bench.registry import UnknownNameError, get_model, get_task

SMALL = ["--task_args", "max_frames=300", "--limit", "2"]


@pytest.fixture(scope="module")
def two_model_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    code = main(["--model", "frozen,ttt", "--model_args", "preset=tiny,ttt.gate_init=0.5",
                 "--tasks", "librilight_sample", "--output_path", str(out), *SMALL])
    assert code == 0
    return out


def test_run_writes_every_output(two_model_run, capsys):
    for name in ("results.json", "curves.npz", "leaderboard.md", "loss_vs_position.png"):
        assert (two_model_run / name).stat().st_size > 0, name
    results = json.loads((two_model_run / "results.json").read_text())
    for key in ("config", "environment", "git_hash", "command"):
        assert key in results
    assert results["environment"]["torch"] and results["environment"]["moshi"]
    assert "librilight_sample" in results["command"]
    task = results["results"]["librilight_sample"]
    assert set(task) == {"frozen", "ttt"}
    for model in task.values():
        assert model["n_docs"] == 2
        assert model["n_frames"] == 600
        assert isinstance(model["mean_nll"], float) and np.isfinite(model["mean_nll"])
        assert model["frames_per_second"] > 0
    assert task["frozen"]["mean_nll"] != task["ttt"]["mean_nll"]  # gate 0.5: the TTT branch matters
    curves = np.load(two_model_run / "curves.npz")
    assert len(curves.files) > 0


def test_the_sample_is_measured_on_voiced_frames_too(two_model_run):
    """The sample's segments come from its LibriLight .json; the voiced metrics, their deltas and a
    voiced curve per model are reported beside the others."""
    results = json.loads((two_model_run / "results.json").read_text())
    assert results["tasks"]["librilight_sample"]["voice_activity"] == {"source": "librilight_json",
                                                                       "n_docs": {"librilight_json": 2}}
    task = results["results"]["librilight_sample"]
    for model in task.values():
        assert 0.5 < model["voiced_fraction"] < 1 and model["n"]["voiced_mean_nll"] == 2
        assert model["silence_mean_nll"] != model["voiced_mean_nll"]
    assert task["ttt"]["delta_vs_baseline"]["delta"]["voiced_mean_nll"] == pytest.approx(
        task["ttt"]["voiced_mean_nll"] - task["frozen"]["voiced_mean_nll"])
    assert results["higher_is_better"]["librilight_sample"]["voiced_improvement"] is True
    curves = np.load(two_model_run / "curves.npz")
    for model in ("frozen", "ttt"):
        voiced, count = curves[f"librilight_sample/{model}/voiced/mean"], curves[f"librilight_sample/{model}/voiced/count"]
        assert voiced.shape == (300,) and count.max() == 2 and np.isfinite(voiced).sum() > 250
    header = (two_model_run / "leaderboard.md").read_text().splitlines()[2]
    assert "voiced_mean_nll" in header and "Δ voiced_improvement" in header


def test_leaderboard_has_one_row_per_model(two_model_run):
    table = (two_model_run / "leaderboard.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "model" not in line]
    assert len(rows) == 2
    assert rows[0].startswith("| frozen") and rows[1].startswith("| ttt")


def test_existing_run_is_not_overwritten(two_model_run, capsys):
    before = (two_model_run / "results.json").read_text()
    code = main(["--model", "frozen", "--model_args", "preset=tiny", "--tasks", "librilight_sample",
                 "--output_path", str(two_model_run), *SMALL])
    assert code != 0
    assert "--overwrite" in capsys.readouterr().err
    assert (two_model_run / "results.json").read_text() == before


def test_leaderboard_command_merges_two_runs(two_model_run, tmp_path, capsys):
    other = tmp_path / "other"
    assert main(["--model", "dyneval", "--model_args", "preset=tiny,lr=1e-3", "--tasks", "librilight_sample",
                 "--output_path", str(other), *SMALL]) == 0
    capsys.readouterr()
    assert main(["leaderboard", str(two_model_run), str(other)]) == 0
    merged = capsys.readouterr().out
    rows = [line for line in merged.splitlines() if line.startswith("| ") and "model" not in line]
    assert [r.split("|")[1].strip().split()[0] for r in rows] == ["frozen", "ttt", "dyneval"]


def test_unknown_names_list_close_matches(capsys):
    with pytest.raises(UnknownNameError, match="Did you mean: frozen"):
        get_model("frozn")
    with pytest.raises(UnknownNameError, match="librilight_sample"):
        get_task("librilight_sampel")
    assert main(["--model", "frozen", "--model_args", "preset=tiny", "--tasks", "librilight_smaple"]) == 2
    assert "Did you mean: librilight_sample" in capsys.readouterr().err


@pytest.mark.parametrize("text, key", [
    ("task: t\nmax_frames: many\n", "max_frames"),
    ("task: t\npositions: [100, -5]\n", "positions"),
    ("task: t\ntext_stream: music\n", "text_stream"),
    ("task: t\nwindw: 10\n", "windw"),
    ("task: t\ntargets: {late_nll: 'lower please'}\n", "targets.late_nll"),
])
def test_broken_yaml_names_the_file_and_key(tmp_path, text, key):
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_task_config(path)
    assert str(path) in str(info.value) and key in str(info.value)


def test_yaml_is_data_only(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("task: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_task_config(path)


def test_include_path_adds_task_configs(tmp_path, capsys, monkeypatch):
    from ttt_bench import registry

    monkeypatch.setattr(registry, "_TASK_CONFIG_DIRS", list(registry._TASK_CONFIG_DIRS))
    (tmp_path / "my_task.yaml").write_text(
        "task: my_task\nclass: librilight_stream\nsource: {type: librilight_dir, path: nowhere}\n")
    assert main(["ls", "tasks", "--include_path", str(tmp_path)]) == 0
    assert "my_task" in capsys.readouterr().out
    assert get_task("my_task").config.source["path"] == "nowhere"


def test_model_args_are_typed():
    args = parse_kv("preset=tiny,lr=1e-4,layers=[1,2],gate_init=0,strict=true,x=none", "--model_args")
    assert args == {"preset": "tiny", "lr": 1e-4, "layers": [1, 2], "gate_init": 0, "strict": True, "x": None}


def test_module_entry_point_help():
    out = subprocess.run([sys.executable, "-m", "ttt_bench", "--help"], capture_output=True, text=True,
                         cwd=Path(__file__).parents[1], timeout=120)
    assert out.returncode == 0
    for flag in ("--model_args", "--limit", "--batch_size", "--chunk_size", "--device", "--dtype", "--seed",
                 "--output_path", "--resume", "--include_path"):
        assert flag in out.stdout
    assert "(default:" in out.stdout


def test_entry_point_plugins_register_models(monkeypatch):
    from importlib.metadata import EntryPoint

    from ttt_bench import names, registry

    plugin = EntryPoint(name="mine", value="plugin_model_for_tests", group="ttt_bench.models")
    monkeypatch.setattr(names, "entry_points", lambda group: [plugin] if group == "ttt_bench.models" else [])
    monkeypatch.setattr(names, "_plugins_loaded", False)
    monkeypatch.setattr(names, "_MODELS", dict(names._MODELS))
    monkeypatch.syspath_prepend(str(Path(__file__).parent / "plugins"))
    assert "plugin_model" in registry.list_models()
    assert get_model("plugin_model").name == "plugin_model"


def test_stream_layout_is_a_task_option_recorded_in_the_results(two_model_run, tmp_path):
    out = tmp_path / "layout"
    assert main(["--model", "frozen", "--model_args", "preset=tiny", "--tasks", "librilight_sample",
                 "--task_args", "max_frames=300,text_stream=zero,user_stream=silence", "--limit", "2",
                 "--output_path", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    default = json.loads((two_model_run / "results.json").read_text())
    assert results["tasks"]["librilight_sample"]["layout"] == {"text_stream": "zero", "user_stream": "silence"}
    assert default["tasks"]["librilight_sample"]["layout"] == {"text_stream": "pad", "user_stream": "zero"}
    assert results["verification"]["librilight_sample"][0]["passed"]
    assert (results["results"]["librilight_sample"]["frozen"]["mean_nll"]
            != default["results"]["librilight_sample"]["frozen"]["mean_nll"])


def test_use_fixed_method_false_scores_with_the_legacy_method(tmp_path):
    out = tmp_path / "legacy"
    assert main(["--model", "frozen,ttt", "--model_args", "preset=tiny,ttt.gate_init=0.5", "--tasks",
                 "librilight_sample", "--task_args", "max_frames=300,use_fixed_method=false", "--limit", "1",
                 "--output_path", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    rows = results["results"]["librilight_sample"]
    assert set(rows) == {"legacy(frozen)", "legacy(ttt)"}
    assert all(results["models"][name]["legacy"] for name in rows)
    assert results["results"]["librilight_sample"]["legacy(ttt)"]["delta_vs_baseline"]["baseline"] == "legacy(frozen)"
    rows = [line for line in (out / "leaderboard.md").read_text().splitlines()
            if line.startswith("| ") and "model" not in line]
    assert len(rows) == 2 and all(row.startswith("| legacy") for row in rows)


def test_a_run_that_fails_before_scoring_leaves_no_run_behind(tmp_path, capsys, monkeypatch):
    from ttt_bench import registry

    monkeypatch.setattr(registry, "_TASK_CONFIG_DIRS", list(registry._TASK_CONFIG_DIRS))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "empty_dir.yaml").write_text(
        f"task: empty_dir\nclass: librilight_stream\nsource: {{type: librilight_dir, path: {tmp_path / 'nothing'}}}\n")
    args = ["--model", "frozen", "--model_args", "preset=tiny", "--tasks", "empty_dir",
            "--include_path", str(tmp_path / "tasks"), "--output_path", str(tmp_path / "out")]
    assert main(args) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert not (tmp_path / "out" / "records").exists() and not (tmp_path / "out" / "results.json").exists()
    assert main(args) != 0
    assert "already holds a run" not in capsys.readouterr().err


def test_network_failures_say_what_to_do():
    import requests

    from ttt_bench.audio.sources import reading

    with pytest.raises(ConnectionError, match="hub-data: could not read the dataset.*local copy"):
        with reading("hub-data"):
            raise requests.exceptions.ConnectionError("Failed to resolve 'huggingface.co'")


def test_a_run_whose_loss_fails_verification_stops_with_no_results(tmp_path, capsys, monkeypatch):
    from test_verify import SeparatePassScorer

    from ttt_bench import names

    monkeypatch.setattr(names, "_MODELS", {**names._MODELS, "separate_pass": SeparatePassScorer})
    out = tmp_path / "out"
    code = main(["--model", "separate_pass", "--model_args", "preset=tiny", "--tasks", "librilight_sample",
                 "--chunk_size", "16", "--output_path", str(out), *SMALL])
    assert code == 3
    assert "differs from LMModel.forward" in capsys.readouterr().err
    assert not (out / "results.json").exists() and not (out / "records").exists()


def test_terminal_table_is_narrow_and_keeps_deltas_and_flags(two_model_run):
    from ttt_bench.reporting.report import render_terminal

    results = json.loads((two_model_run / "results.json").read_text())
    row = results["results"]["librilight_sample"]["ttt"]
    row["flags"] = row.get("flags", []) + [{"code": "lookahead", "message": "m"}]
    text = render_terminal(results, width=100)
    assert max(len(line) for line in text.splitlines()) <= 100
    header = next(line for line in text.splitlines() if line.startswith("model"))
    assert "mean_nll" in header and "Δ mean_nll" in header and header.rstrip().endswith("flags")
    [ttt] = [line for line in text.splitlines() if line.startswith("ttt")]
    assert "lookahead" in ttt and f"{row['mean_nll']:.4f}" in ttt
    full = render_terminal(results, width=1000)
    assert "Δ slope" in full and "Δ slope" not in text  # dropped to fit, still in the full rendering
