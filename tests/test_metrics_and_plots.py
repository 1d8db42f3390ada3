"""Metrics files (JSONL, CSV, TensorBoard) and the learning-curve plot, on synthetic records."""

from __future__ import annotations

import csv
import json
import math

import matplotlib.image
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from marl_shared.analysis.plots import plot_learning_curves
from marl_shared.training import metrics as metrics_module
from marl_shared.training.metrics import MetricsWriter, read_metrics

SMAX = "smax/3m"
GRF = "grf/academy_3_vs_1_with_keeper"


def smax_metrics(i: int) -> dict:
    finished = i != 3  # no episode finished in iteration 3
    return {
        "env_steps": 1000 * i,
        "episodes": 10 if finished else 0,
        "episode_return_mean": 2.5 * i if finished else float("nan"),
        "episode_len_mean": 30.0 + i if finished else None,
        "win_rate": 0.1 * i if finished else None,
        "score_rate": None,
        "goal_diff_mean": None,
        "eval_win_rate": 0.75 if i == 4 else None,
        "eval_return_mean": 9.5 if i == 4 else None,
        "loss_weight": 0.5,
    }


def grf_metrics(i: int) -> dict:
    return {
        "env_steps": 2000 * i,
        "episodes": 4,
        "episode_return_mean": -0.5 + 0.25 * i,
        "episode_len_mean": 120.0,
        "win_rate": None,
        "score_rate": 0.125 * i,
        "goal_diff_mean": 0.25,
        "eval_win_rate": None,
        "eval_return_mean": None,
        "loss_weight": 0.5,
    }


def record(i: int) -> dict:
    learner = {"policy_loss": -0.5 * i, "value_loss": 4.0 / i}
    if i >= 3:
        learner["entropy"] = 1.25  # a key that appears only from iteration 3 on
    return {
        "iteration": i,
        "time_s": 1.5 * i,
        "env_steps_total": 3000 * i,
        "tasks": {SMAX: smax_metrics(i), GRF: grf_metrics(i)},
        "learner": learner,
    }


def expected_readback(i: int) -> dict:
    """What reading a record returns: NaN became None, everything else exact."""
    expected = record(i)
    for metrics in expected["tasks"].values():
        for key, value in metrics.items():
            if isinstance(value, float) and math.isnan(value):
                metrics[key] = None
    return expected


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "run"
    with MetricsWriter(run) as writer:
        for i in range(1, 6):
            writer.write(record(i))
    return run


def test_records_read_back_exactly_with_nan_as_none(run_dir):
    records = read_metrics(run_dir)
    assert records == [expected_readback(i) for i in range(1, 6)]
    # The file is strict JSON: no NaN token anywhere.
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda name: pytest.fail(f"non-JSON constant {name}"))


def test_csv_has_a_column_per_key_including_ones_that_appear_late(run_dir):
    with (run_dir / "metrics.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 5
    columns = list(rows[0])
    assert columns[:3] == ["iteration", "time_s", "env_steps_total"]
    assert f"tasks/{SMAX}/win_rate" in columns and f"tasks/{GRF}/score_rate" in columns
    assert "learner/entropy" in columns
    assert [row["learner/entropy"] for row in rows] == ["", "", "1.25", "1.25", "1.25"]
    assert [row[f"tasks/{SMAX}/episode_return_mean"] for row in rows] == [
        "2.5", "5.0", "", "10.0", "12.5",
    ]  # fmt: skip
    assert rows[4][f"tasks/{GRF}/env_steps"] == "10000"


def test_tensorboard_holds_the_scalars_per_task_and_learner(run_dir):
    events = list((run_dir / "tb").glob("events.out.tfevents.*"))
    assert len(events) == 1
    accumulator = EventAccumulator(str(run_dir / "tb"))
    accumulator.Reload()
    tags = accumulator.Tags()["scalars"]
    assert f"episode_return_mean/{SMAX}" in tags and "learner/value_loss" in tags
    returns = accumulator.Scalars(f"episode_return_mean/{SMAX}")
    # Iteration 3 measured nothing, so it has no point.
    assert [(e.step, e.value) for e in returns] == [(1, 2.5), (2, 5.0), (4, 10.0), (5, 12.5)]
    eval_win = accumulator.Scalars(f"eval_win_rate/{SMAX}")
    assert [(e.step, e.value) for e in eval_win] == [(4, 0.75)]
    assert f"win_rate/{GRF}" not in tags  # always None for the football task


def test_a_resumed_run_drops_tensorboard_points_after_its_checkpoint(run_dir):
    from marl_shared.training.run import truncate_metrics

    truncate_metrics(run_dir, 3)  # the run resumes from its iteration-3 checkpoint
    later = record(4)
    later["tasks"][SMAX]["episode_return_mean"] = -7.0
    with MetricsWriter(run_dir) as writer:
        writer.write(later)
    accumulator = EventAccumulator(str(run_dir / "tb"))
    accumulator.Reload()
    returns = accumulator.Scalars(f"episode_return_mean/{SMAX}")
    # Iterations 4 and 5 of the killed run are gone; 4 is the resumed run's point.
    assert [(e.step, e.value) for e in returns] == [(1, 2.5), (2, 5.0), (4, -7.0)]


def test_each_jsonl_line_is_fsynced(tmp_path, monkeypatch):
    synced = []
    real_fsync = metrics_module.os.fsync
    monkeypatch.setattr(metrics_module.os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    with MetricsWriter(tmp_path / "run", tensorboard=False) as writer:
        for i in range(1, 4):
            writer.write(record(i))
            assert len(synced) == i


def test_a_torn_last_line_is_skipped_and_cut_when_the_run_resumes(run_dir):
    path = run_dir / "metrics.jsonl"
    with path.open("a") as handle:
        handle.write('{"iteration": 6, "time_s": 9.')  # the run was killed mid-write
    assert [r["iteration"] for r in read_metrics(run_dir)] == [1, 2, 3, 4, 5]

    with MetricsWriter(run_dir, tensorboard=False) as writer:
        writer.write(record(6))
    assert read_metrics(run_dir) == [expected_readback(i) for i in range(1, 7)]
    with (run_dir / "metrics.csv").open(newline="") as handle:
        assert [row["iteration"] for row in csv.DictReader(handle)] == list("123456")


def test_a_corrupt_middle_line_is_an_error(run_dir):
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines()
    lines[1] = "not json"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="Line 2 of"):
        read_metrics(run_dir)


def test_a_record_without_an_integer_iteration_is_rejected(tmp_path):
    with MetricsWriter(tmp_path / "run", tensorboard=False) as writer:
        with pytest.raises(ValueError, match="integer 'iteration'"):
            writer.write({"iteration": 1.5, "tasks": {}})
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == ""


def test_learning_curves_png_is_written_and_loads(run_dir):
    path = plot_learning_curves(run_dir)
    assert path == run_dir / "learning_curves.png"
    assert path.stat().st_size > 10_000
    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 300 and pixels.shape[1] > 800
    with Image.open(path) as image:
        assert image.format == "PNG"
    assert not list(run_dir.glob(".*tmp*"))  # the temporary file was moved into place


def test_learning_curves_go_to_a_chosen_path_and_replace_an_old_plot(run_dir, tmp_path):
    out = tmp_path / "plots" / "curves.png"
    out.parent.mkdir()
    out.write_bytes(b"old")
    assert plot_learning_curves(run_dir, out_path=out) == out
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (run_dir / "learning_curves.png").exists()


def test_learning_curves_of_a_run_without_tasks_is_a_clear_error(tmp_path):
    with MetricsWriter(tmp_path / "run", tensorboard=False) as writer:
        writer.write({"iteration": 1, "time_s": 0.1, "env_steps_total": 0, "tasks": {}})
    with pytest.raises(ValueError, match="no task to plot"):
        plot_learning_curves(tmp_path / "run")
