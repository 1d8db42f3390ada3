"""Learning-curve figures drawn from a run's ``metrics.jsonl``.

One subplot per task: episode return against that task's environment steps on the left
axis, win rate (SMAC-style tasks) or score rate (football) on a twin right axis, and
greedy-evaluation results as hollow markers on the same axes. Iterations where nothing
was measured (None or NaN) are skipped, so a curve joins the points on either side of a
gap. Figures are drawn with matplotlib's Agg canvas directly, without pyplot, so plotting
never opens a window and never changes the process-wide backend.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter

from marl_shared.training.metrics import read_metrics

PLOT_NAME = "learning_curves.png"
MAX_COLUMNS = 3
RETURN_COLOR = "tab:blue"
RATE_COLOR = "tab:orange"
# Per task: the first of these rates with any measured value goes on the right axis.
RATE_KEYS = (
    ("win_rate", "eval_win_rate", "win rate"),
    ("score_rate", "eval_score_rate", "score rate"),
)


def _series(records: list[dict], task: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(env steps, values) of one task metric, keeping only measured finite points."""
    xs, ys = [], []
    for record in records:
        metrics = (record.get("tasks") or {}).get(task)
        if not metrics:
            continue
        x, y = metrics.get("env_steps"), metrics.get(key)
        if x is None or y is None or isinstance(y, bool):
            continue
        if isinstance(y, (int, float)) and math.isfinite(y) and math.isfinite(x):
            xs.append(float(x))
            ys.append(float(y))
    return np.asarray(xs), np.asarray(ys)


def _task_names(records: list[dict]) -> list[str]:
    names: dict[str, None] = {}
    for record in records:
        for task in record.get("tasks") or {}:
            names.setdefault(task, None)
    return list(names)


def _draw_task(axes, records: list[dict], task: str) -> None:
    axes.set_title(task, fontsize=10)
    axes.set_xlabel("env steps")
    axes.xaxis.set_major_formatter(EngFormatter(sep=""))  # 20k, 1.5M
    axes.set_ylabel("episode return", color=RETURN_COLOR)
    axes.tick_params(axis="y", labelcolor=RETURN_COLOR)
    axes.grid(alpha=0.3)
    handles = []
    x, y = _series(records, task, "episode_return_mean")
    if x.size:
        handles += axes.plot(x, y, color=RETURN_COLOR, marker=".", markersize=3, label="return")
    x, y = _series(records, task, "eval_return_mean")
    if x.size:
        handles += axes.plot(
            x,
            y,
            linestyle="none",
            marker="o",
            markerfacecolor="none",
            color=RETURN_COLOR,
            label="eval return",
        )

    for train_key, eval_key, label in RATE_KEYS:
        x, y = _series(records, task, train_key)
        ex, ey = _series(records, task, eval_key)
        if not (x.size or ex.size):
            continue
        rate_axes = axes.twinx()
        rate_axes.set_ylim(-0.02, 1.02)
        rate_axes.set_ylabel(label, color=RATE_COLOR)
        rate_axes.tick_params(axis="y", labelcolor=RATE_COLOR)
        if x.size:
            handles += rate_axes.plot(x, y, color=RATE_COLOR, marker=".", markersize=3, label=label)
        if ex.size:
            handles += rate_axes.plot(
                ex,
                ey,
                linestyle="none",
                marker="s",
                markerfacecolor="none",
                color=RATE_COLOR,
                label=f"eval {label}",
            )
        break

    if handles:
        axes.legend(handles=handles, loc="best", fontsize=7, framealpha=0.8)
    else:
        axes.text(
            0.5,
            0.5,
            "no episode finished yet",
            ha="center",
            va="center",
            transform=axes.transAxes,
            color="gray",
        )


def plot_learning_curves(
    run_dir: str | os.PathLike, out_path: str | os.PathLike | None = None
) -> Path:
    """Draw every task's learning curve into one PNG (default ``run_dir/learning_curves.png``).

    The PNG is written to a temporary file first and then moved into place, so an existing
    plot is only ever replaced by a complete one.
    """
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    tasks = _task_names(records)
    if not tasks:
        raise ValueError(f"The metrics of {run_dir} have no task to plot yet.")
    out_path = Path(out_path) if out_path is not None else run_dir / PLOT_NAME

    columns = min(MAX_COLUMNS, len(tasks))
    rows = math.ceil(len(tasks) / columns)
    figure = Figure(figsize=(5.2 * columns, 3.8 * rows), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    grid = figure.subplots(rows, columns, squeeze=False)
    for index, task in enumerate(tasks):
        _draw_task(grid[index // columns][index % columns], records, task)
    for index in range(len(tasks), rows * columns):
        grid[index // columns][index % columns].set_visible(False)
    last = records[-1]
    figure.suptitle(
        f"{run_dir.name}: iteration {last.get('iteration')}, "
        f"{last.get('env_steps_total', 0) or 0:,} env steps",
        fontsize=11,
    )

    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.stem}.tmp.png")
    try:
        figure.savefig(tmp, format="png")
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    return out_path
