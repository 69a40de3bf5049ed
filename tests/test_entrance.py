"""The one entrance: a run is checked before anything loads, its options are declared once, and
task configs can be validated on their own (``ttt-bench validate``)."""

import argparse
import inspect
import json
from pathlib import Path

import pytest

from ttt_bench import api
from ttt_bench.cli import main, parse_run_args
from ttt_bench.options import API_OPTIONS, CLI_OPTIONS, OPTIONS, RECORDED, RunOptions, check_options


@pytest.fixture(autouse=True)
def _own_task_config_dirs(monkeypatch):
    """--include_path folders added here stay here."""
    from ttt_bench import registry

    monkeypatch.setattr(registry, "_TASK_CONFIG_DIRS", list(registry._TASK_CONFIG_DIRS))


@pytest.fixture
def constructions(monkeypatch):
    """Counts every model and codec the entrance builds."""
    built = []
    real_get_model = api.get_model

    def counting_get_model(name, **kwargs):
        built.append(name)
        return real_get_model(name, **kwargs)

    monkeypatch.setattr(api, "get_model", counting_get_model)
    monkeypatch.setattr(api, "load_codec", lambda *a, **k: built.append("codec") or pytest.fail("codec loaded"))
    return built


@pytest.mark.parametrize("argv, message", [
    (["--model", "frozen", "--tasks", "librilight_strem"], "Did you mean: librilight_stream"),
    (["--model", "frozen", "--tasks", "nonexistent"], "unknown task 'nonexistent'"),
    (["--model", "frozen", "--tasks", "librilight_sample", "--task_args", "max_frame=10"], "unknown key(s) max_frame"),
    (["--model", "frozen", "--tasks", "librilight_sample", "--model_args", "preset=tiny,gate_init=0.5"],
     "model 'frozen': unknown model_args gate_init"),
    (["--model", "ttt", "--tasks", "librilight_sample", "--model_args", "preset=tiny,inner_lr=1"],
     "model 'ttt': unknown model_args inner_lr"),
    (["--model", "legacy", "--tasks", "librilight_sample", "--model_args", "preset=tiny,base=frozen,lr=1"],
     "model 'frozen': unknown model_args lr"),
    (["--model", "fozen", "--tasks", "librilight_sample"], "Did you mean: frozen"),
    (["--model", "ttt", "--tasks", "librilight_sample", "--chunk_size", "24",
      "--model_args", "preset=tiny,arch=moshi_finetune_ttt,causal=false,mini_batch_size=16"],
     "chunk_size 24 is not a multiple of the TTT mini_batch_size 16"),
    (["--model", "frozen", "--model_args", "frozen.preset=tiny,ttt.gate_init=0", "--tasks", "librilight_sample"],
     "'ttt' is not one of the models"),
])
def test_a_bad_run_exits_2_before_any_model_is_built(argv, message, constructions, capsys, tmp_path):
    assert main([*argv, "--output_path", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert constructions == []
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag", ["--chunk_size 0", "--chunk_size -3", "--limit 0", "--batch_size 0",
                                  "--batch_size many", "--dtype float8"])
def test_a_bad_option_value_is_a_usage_error(flag, constructions, capsys):
    with pytest.raises(SystemExit) as exit:
        main(["--model", "frozen", "--tasks", "librilight_sample", *flag.split()])
    assert exit.value.code == 2 and constructions == []
    assert flag.split()[0] in capsys.readouterr().err


def test_simple_evaluate_refuses_bad_options_before_loading(constructions):
    with pytest.raises(ValueError, match="chunk_size: expected a positive integer"):
        api.simple_evaluate("frozen", "preset=tiny", "librilight_sample", chunk_size=0)
    with pytest.raises(TypeError, match="unknown option.*'chunksize' \\(did you mean 'chunk_size'\\?\\)"):
        api.simple_evaluate("frozen", "preset=tiny", "librilight_sample", chunksize=8)
    assert constructions == []


def test_the_three_views_of_the_options_agree():
    """argparse flags, simple_evaluate's keyword arguments and results.json's config are all made
    from OPTIONS: the same names and defaults everywhere they appear."""
    parser_defaults = vars(argparse.Namespace(**{a.dest: a.default for a in
                                                  parse_parser_actions()}))
    signature = inspect.signature(api.simple_evaluate).parameters
    for option in OPTIONS:
        if option.cli:
            assert option.name in parser_defaults, option.name
            if not option.switch and not option.repeat:
                assert parser_defaults[option.name] == option.default, option.name
        if option.api:
            assert signature[option.name].default == option.default, option.name
    assert {o.name for o in API_OPTIONS} == set(signature) - {"model", "model_args", "tasks"}
    recorded = RunOptions(["frozen"], ["t"], **check_options({})).recorded()
    assert set(recorded) == {"model", "tasks", "model_args", *RECORDED}
    assert set(RECORDED) <= {o.name for o in API_OPTIONS}
    assert {o.name for o in CLI_OPTIONS} - set(RECORDED) == {"wandb_args", "tensorboard_dir"}  # not the run's config


def parse_parser_actions():
    from ttt_bench.cli import run_parser

    return [a for a in run_parser()._actions if a.dest != "help"]


def test_a_run_records_its_options_as_declared(tmp_path):
    out = tmp_path / "run"
    assert main(["--model", "frozen", "--model_args", "preset=tiny", "--tasks", "librilight_sample",
                 "--task_args", "max_frames=100", "--limit", "1", "--chunk_size", "32", "--output_path", str(out)]) == 0
    config = json.loads((out / "results.json").read_text())["config"]
    assert set(config) == {"model", "tasks", "model_args", *RECORDED}
    assert config["model"] == ["frozen"] and config["task_args"] == {"max_frames": 100}
    assert config["chunk_size"] == 32 and config["limit"] == 1 and config["dtype"] == "float32"


def test_config_file_equals_the_same_flags(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("model: [frozen, ttt]\ntasks: librilight_sample\nmodel_args: {preset: tiny, ttt.layers: [1]}\n"
                      "task_args: {max_frames: 200}\nlimit: 2\nchunk_size: 32\nstrict: true\n"
                      "include_path: [task_configs]\n")
    flags = ["--model", "frozen,ttt", "--tasks", "librilight_sample", "--model_args", "preset=tiny,ttt.layers=[1]",
             "--task_args", "max_frames=200", "--limit", "2", "--chunk_size", "32", "--strict",
             "--include_path", "task_configs"]
    from_file = vars(parse_run_args(["--config", str(config)]))
    from_flags = vars(parse_run_args(flags))
    from_file.pop("config"), from_flags.pop("config")
    assert from_file == from_flags
    overridden = vars(parse_run_args(["--config", str(config), "--chunk_size", "64"]))
    assert overridden["chunk_size"] == 64 and overridden["limit"] == 2  # a flag wins over the file


def test_config_file_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: frozen\ntasks: librilight_sample\nchunk: 3\n")
    assert main(["--config", str(bad)]) == 2
    assert "unknown option(s) chunk" in capsys.readouterr().err


# ----------------------------------------------------------------------------- validate


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_validate_accepts_every_built_in_task(capsys):
    assert main(["validate"]) == 0
    assert "task config(s) valid" in capsys.readouterr().out


def test_validate_a_good_file(tmp_path, capsys):
    good = write(tmp_path / "mine.yaml", "task: mine\nclass: librilight_stream\nversion: 1\n"
                                         "source: {type: librilight_dir, path: data/librilight_sample}\n")
    assert main(["validate", str(good)]) == 0


@pytest.mark.parametrize("text, message", [
    ("task: mine\nclass: librilight_stream\nmax_frame: 10\n", "unknown key(s) max_frame"),
    ("task: mine\nclass: librilight_stream\nmax_frames: many\n", "key 'max_frames' must be a positive integer"),
    ("task: mine\nclass: librilight_stream\nsource: {type: librilight_dir\n", "at line 4, column 1: expected ',' or '}'"),
    ("task: mine\nclass: no_such_class\n", "unknown task class 'no_such_class'"),
])
def test_validate_reports_each_problem_in_one_line(tmp_path, text, message, capsys, constructions):
    bad = write(tmp_path / "bad.yaml", text)
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert message in err and str(bad) in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert constructions == []


def test_validate_an_include_path_lists_one_line_per_bad_file(tmp_path, capsys):
    folder = tmp_path / "tasks"
    folder.mkdir()
    write(folder / "ok_task.yaml", "task: ok_task\nsource: {type: librilight_dir, path: data/librilight_sample}\n")
    write(folder / "bad_one.yaml", "task: bad_one\nwindow: -1\n")
    write(folder / "bad_two.yaml", "task: bad_two\npositions: [a]\n")
    assert main(["validate", "--include_path", str(folder)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and any("bad_one" in line for line in lines) and any("bad_two" in line for line in lines)


# ----------------------------------------------------------------------------- first contact


def test_a_task_left_without_documents_is_one_line(tmp_path, capsys):
    code = main(["--model", "frozen", "--model_args", "preset=tiny", "--tasks", "librilight_sample",
                 "--task_args", "min_duration_s=300", "--output_path", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    error = [line for line in err if line.startswith("ttt-bench: error")]
    assert len(error) == 1 and "no documents to evaluate" in error[0] and "3 x too short" in error[0], err
    assert not any("Traceback" in line for line in err)
    assert not (tmp_path / "out").exists()


def test_ls_describes_each_task_and_model(capsys):
    assert main(["ls", "tasks"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert "offline" in lines["librilight_sample"] and "Packaged offline sample" in lines["librilight_sample"]
    assert " Hub " in lines["librilight_stream"] and " Hub " in lines["swuggy"]
    assert "pair_likelihood" not in lines  # a task class that reads its data from a config is not a task
    assert main(["ls", "models"]) == 0
    models = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert {"frozen", "ttt", "legacy", "dyneval"} <= set(models)
    assert "preset=tiny" in models["frozen"] and "Moshi with TTT layers" in models["ttt"]


def test_the_readme_config_file_is_valid(tmp_path):
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = readme.split("# run.yaml:", 1)[1].split("```", 1)[0].split("\n", 1)[1]
    (tmp_path / "run.yaml").write_text(block)
    args = vars(parse_run_args(["--config", str(tmp_path / "run.yaml"), "--limit", "2"]))
    assert args["model"] == "frozen,ttt" and args["model_args"] == "preset=tiny,ttt.layers=[1]"
    assert args["chunk_size"] == 128 and args["limit"] == 2


def test_an_adapter_takes_its_constructors_keyword_arguments():
    """The README's "Adding a model" example: its own option and frozen's loading arguments."""
    from ttt_bench.models.frozen import FrozenScorer

    class MyMoshi(FrozenScorer):
        name = "my_moshi"

        def __init__(self, my_option: float = 1.0, **load_args):
            super().__init__(**load_args)

    MyMoshi.check_args({"my_option": 2.0, "preset": "tiny", "hf_repo": "x", "checkpoint": "y"}, 64)
    with pytest.raises(ValueError, match="model 'my_moshi': unknown model_args my_optoin"):
        MyMoshi.check_args({"my_optoin": 2.0}, 64)
