"""The benchmarks run end to end on tiny sizes (the full runs are made on purpose)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import gfootball_available

ROOT = Path(__file__).resolve().parents[1]


def run_script(*args, timeout=900):
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env
    )


@pytest.mark.skipif(not gfootball_available(), reason="football engine not built")
def test_throughput_benchmark_measures_every_task_side_by_side(tmp_path):
    out = tmp_path / "throughput.json"
    result = run_script("benchmarks/throughput.py", "--quick", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert set(data["tasks"]) == {"smax/3m", "smax/2s3z", "grf/academy_3_vs_1_with_keeper"}
    for values in data["tasks"].values():
        assert values["raw_env_steps_per_s"] > 0 and values["platform_sampling_env_steps_per_s"] > 0
        ratio = values["platform_sampling_env_steps_per_s"] / values["raw_env_steps_per_s"]
        assert values["ratio"] == pytest.approx(ratio)
    assert data["multitask_sampling"]["ratio"] > 0
    assert data["training_default_multitask"]["peak_rss_gib"] > 0.1
    assert data["machine"]["cores"]


def test_learning_benchmark_records_a_single_task_run(tmp_path):
    result = run_script("benchmarks/learning.py", "--quick", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    (run,) = summary["single_task"]
    assert run["task"] == "smax/3m" and run["env_steps_run"] >= 96
    assert (Path(run["run_dir"]) / "learning_curves.png").is_file()
