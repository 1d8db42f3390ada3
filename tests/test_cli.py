"""Bad input at the command line: one clear line, a non-zero exit, no run directory left."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def run_cli(tmp_path, *args, timeout=240):
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, "-m", "marl_shared.cli", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("marl-shared: error:")]
    assert len(lines) == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_unknown_map_lists_the_valid_names(tmp_path):
    result = run_cli(tmp_path, "train", "tasks=[smax/3m,smax/4m]", "run_dir=r")
    assert_one_line_error(result, "'4m'", "smax/3m", "smax/2s3z", "smax/8m_vs_9m")
    assert not (tmp_path / "r").exists() and not (tmp_path / "runs").exists()


def test_unknown_backend_is_named(tmp_path):
    result = run_cli(tmp_path, "train", "tasks=[mpe/simple]", "run_dir=r")
    assert_one_line_error(result, "'mpe'", "smax, grf, sc2")
    assert not (tmp_path / "r").exists()


def test_missing_simulator_names_the_setup_step(tmp_path):
    result = run_cli(tmp_path, "train", "tasks=[sc2/3m]", "run_dir=r")
    assert_one_line_error(result, "envs/install_sc2.sh")
    assert not (tmp_path / "r").exists()


def test_wrong_type_in_an_override_is_one_line(tmp_path):
    result = run_cli(tmp_path, "train", "algo.lr=fast", "run_dir=r")
    assert_one_line_error(result, "lr")
    assert not (tmp_path / "r").exists()


def test_invalid_override_gets_hydras_message_and_fails(tmp_path):
    result = run_cli(tmp_path, "train", "model=no_such_model")
    assert result.returncode != 0
    assert "no_such_model" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_used_run_directory_is_not_overwritten(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "keep.txt").write_text("data")
    result = run_cli(tmp_path, "train", "tasks=[smax/3m]", "run_dir=r")
    assert_one_line_error(result, "overwrite=true")
    assert (tmp_path / "r" / "keep.txt").read_text() == "data"


def test_unknown_command(tmp_path):
    result = run_cli(tmp_path, "fly", timeout=60)
    assert_one_line_error(result, "'fly'")


@pytest.mark.parametrize("command", ["doctor"])
def test_doctor_reports_smax_usable(tmp_path, command):
    result = run_cli(tmp_path, command)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "smax" in result.stdout


@pytest.mark.parametrize(
    ("command", "groups"),
    [
        ("train", True),
        ("transfer", True),
        ("continual", True),
        ("evaluate", False),
        ("merge", False),
    ],
)
def test_help_names_the_command_and_only_groups_it_composes(tmp_path, command, groups):
    result = run_cli(tmp_path, command, "--help")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith(f"marl-shared {command}: ")
    assert ("experiment: multitask" in result.stdout) is groups
    assert "Keys and their defaults" in result.stdout
