"""The built-in task configs live in the top-level task_configs/ and are found by `ttt-bench ls tasks`
both from the source tree (editable install) and from an installed wheel."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from ttt_bench.cli import main

ROOT = Path(__file__).resolve().parent.parent
CONFIG_NAMES = sorted(p.stem for p in (ROOT / "task_configs").glob("*.yaml"))


def test_task_configs_live_at_the_top_level():
    assert CONFIG_NAMES, "no YAML in task_configs/"
    assert not (ROOT / "ttt_bench" / "task_configs").exists()


def test_source_tree_lists_every_top_level_config(capsys):
    assert main(["ls", "tasks"]) == 0
    listed = capsys.readouterr().out.split()
    assert set(CONFIG_NAMES) <= set(listed)


def _wheel_members(src: Path) -> set[str]:
    return {p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file() and "__pycache__" not in p.parts}


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory):
    """Build the wheel from a copy of the project (no build/ or egg-info in the checkout), no network."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("ttt_bench", "task_configs"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(tmp / "dist"),
                    str(src)], check=True, cwd=tmp)
    (wheel,) = (tmp / "dist").glob("ttt_bench-*.whl")
    target = tmp / "site"
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(target), str(wheel)],
                   check=True, cwd=tmp)
    return wheel, target, src


def test_wheel_ships_every_module_config_and_sample_file(installed_wheel):
    wheel, _, src = installed_wheel
    members = set(zipfile.ZipFile(wheel).namelist())
    expected = {"ttt_bench/" + name for name in _wheel_members(src / "ttt_bench")}
    expected |= {f"ttt_bench/task_configs/{name}.yaml" for name in CONFIG_NAMES}
    assert expected - members == set(), "missing from the wheel (a new subpackage not listed in setup.cfg?)"


def test_installed_wheel_lists_every_config(installed_wheel):
    _, target, _ = installed_wheel
    env = {**os.environ, "PYTHONPATH": str(target)}
    code = ("import ttt_bench, sys; from ttt_bench.cli import main; print(ttt_bench.__file__); "
            "sys.exit(main(['ls', 'tasks']))")
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=target.parent, check=True,
                         capture_output=True, text=True).stdout.split()
    assert out[0].startswith(str(target)), f"imported {out[0]}, not the installed wheel"
    assert set(CONFIG_NAMES) <= set(out[1:])
