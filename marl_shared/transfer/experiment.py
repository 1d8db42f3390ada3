"""Transfer versus scratch: does a pre-trained shared backbone make a new task cheaper?

The protocol (``marl-shared transfer experiment=transfer_vs_scratch``):

1. pre-train one multi-task run on ``comparison.pretrain.tasks`` (skipped with ``from=``);
2. for every held-out task, mode (frozen, finetune, scratch) and seed, train that task
   alone with the same budget and settings; only the backbone's start and treatment differ;
3. per task and mode, over seeds: env steps until the greedy evaluation first reaches
   ``comparison.target_rate``, the area under the greedy learning curve (mean rate over
   the budget), and the final greedy rate, each as mean and standard deviation, written
   as ``comparison.md`` / ``comparison.json`` and drawn in ``comparison.png``.

Every finished run leaves ``result.json``; running the command again skips those, so an
interrupted protocol continues where it stopped.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from marl_shared.envs import TaskSpec
from marl_shared.models.rl_modules import task_module_id
from marl_shared.training.config import ConfigError, TrainConfig
from marl_shared.training.run import Trainer, prepare_run_dir, resolve_tasks
from marl_shared.transfer.backbone import read_pretrained
from marl_shared.transfer.run import (
    MODES,
    SCRATCH,
    TransferSettings,
    TransferTrainer,
    default_transfer_dir,
)

logger = logging.getLogger(__name__)

RESULT_FILE = "result.json"
MODE_COLORS = {"frozen": "tab:blue", "finetune": "tab:green", "train": "tab:purple"}
MODE_COLORS[SCRATCH] = "tab:red"


@dataclass
class ComparisonSettings:
    modes: list[str] = field(default_factory=lambda: ["frozen", "finetune", SCRATCH])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    target_rate: float = 0.5
    pretrain_tasks: list[str] = field(default_factory=list)
    pretrain_env_steps: float = 1e6
    env_steps: dict[str, float] = field(default_factory=dict)  # per-task budget overrides

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ComparisonSettings:
        pretrain = dict(raw.get("pretrain") or {})
        unknown = set(raw) - {"modes", "seeds", "target_rate", "pretrain", "env_steps"}
        unknown |= {f"pretrain.{k}" for k in set(pretrain) - {"tasks", "env_steps"}}
        if unknown:
            raise ConfigError(f"comparison has unknown keys {sorted(unknown)}.")
        settings = cls(
            modes=[str(m) for m in raw.get("modes", cls().modes)],
            seeds=[int(s) for s in raw.get("seeds", cls().seeds)],
            target_rate=float(raw.get("target_rate", 0.5)),
            pretrain_tasks=[str(t) for t in pretrain.get("tasks", [])],
            pretrain_env_steps=float(pretrain.get("env_steps", 1e6)),
            env_steps={str(k): float(v) for k, v in (raw.get("env_steps") or {}).items()},
        )
        bad = [m for m in settings.modes if m not in MODES]
        if bad or not settings.modes:
            raise ConfigError(f"comparison.modes must be among {', '.join(MODES)}, got {bad}.")
        if not settings.seeds:
            raise ConfigError("comparison.seeds needs at least one seed.")
        return settings


def _done(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / RESULT_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _record(run_dir: Path, result, spec_names: list[str]) -> dict[str, Any]:
    """The learning curve (greedy evaluations) and final numbers of one finished run."""
    curves: dict[str, list[list[float]]] = {name: [] for name in spec_names}
    for record in result.history:
        for name in spec_names:
            values = record["tasks"].get(name, {})
            for key in ("eval_win_rate", "eval_score_rate"):
                if values.get(key) is not None:
                    curves[name].append([values["env_steps"], values[key]])
    final = {}
    for name in spec_names:
        values = result.final_eval.get(name, {})
        rate = values.get("eval_win_rate", values.get("eval_score_rate"))
        final[name] = rate
        curves[name].append([result.env_steps[name], rate])
    data = {"curves": curves, "final_rate": final, "env_steps": result.env_steps}
    (run_dir / RESULT_FILE).write_text(json.dumps(data, indent=1))
    return data


def _run_one(trainer: Trainer, spec_names: list[str]) -> dict[str, Any]:
    try:
        result = trainer.run()
    finally:
        trainer.stop()
    return _record(trainer.run_dir, result, spec_names)


def pretrain(config: TrainConfig, settings: ComparisonSettings, out: Path) -> Path:
    """Stage 1: the multi-task pre-training run (reused when it already finished)."""
    run_dir = out / "pretrain"
    if _done(run_dir):
        return run_dir
    if not settings.pretrain_tasks:
        raise ConfigError("comparison.pretrain.tasks is empty and no from= was given.")
    pre = copy.deepcopy(config)
    pre.tasks = list(settings.pretrain_tasks)
    pre.train.env_steps = settings.pretrain_env_steps
    pre.run_dir = str(run_dir)
    specs = resolve_tasks(pre)
    prepare_run_dir(run_dir, overwrite=True, resuming=False)
    logger.info("pre-training on %s for %g env steps", pre.tasks, pre.train.env_steps)
    _run_one(Trainer(pre, specs, run_dir), pre.tasks)
    return run_dir


def run_comparison(config: TrainConfig, transfer: TransferSettings) -> Path:
    """Run the whole protocol; returns the experiment folder."""
    settings = ComparisonSettings.from_dict(transfer.comparison or {})
    out = (
        Path(config.run_dir)
        if config.run_dir
        else default_transfer_dir(config, "transfer_vs_scratch")
    )
    specs = {spec.name: spec for spec in resolve_tasks(config)}  # fail early on a bad task
    out.mkdir(parents=True, exist_ok=True)
    source = Path(transfer.source) if transfer.source else pretrain(config, settings, out)
    pretrained = read_pretrained(source)

    # Seeds outermost: a protocol stopped part-way has every task and mode on the seeds
    # it finished, and the table is rewritten after each run so it is never stale.
    results: dict[str, dict[str, list[dict[str, Any]]]] = {
        name: {mode: [] for mode in settings.modes} for name in specs
    }
    for seed in settings.seeds:
        for name, spec in specs.items():
            for mode in settings.modes:
                run_dir = out / "runs" / task_module_id(name) / mode / f"seed_{seed}"
                data = _done(run_dir)
                if data is None:
                    budget = settings.env_steps.get(name, config.train.env_steps)
                    data = _train_mode(
                        config, transfer, spec, mode, seed, run_dir, pretrained, budget
                    )
                results[name][mode].append(data)
                logger.info("%s %s seed %d: final rate %s", name, mode, seed, data["final_rate"])
                write_comparison(results, settings, out)
    logger.info("transfer versus scratch written to %s", out)
    return out


def write_comparison(results, settings: ComparisonSettings, out: Path) -> None:
    """comparison.json / .md / .png from the runs finished so far."""
    finished = {
        name: {mode: runs for mode, runs in modes.items() if runs}
        for name, modes in results.items()
    }
    finished = {name: modes for name, modes in finished.items() if modes}
    table = summarise(finished, settings)
    (out / "comparison.json").write_text(json.dumps(table, indent=1))
    (out / "comparison.md").write_text(markdown_table(table, settings))
    plot_comparison(finished, out / "comparison.png")


def _train_mode(config, transfer, spec: TaskSpec, mode, seed, run_dir, pretrained, budget):
    one = copy.deepcopy(config)
    one.train.env_steps = float(budget)
    one.tasks = [spec.name]
    one.seed = int(seed)
    one.run_dir = str(run_dir)
    prepare_run_dir(run_dir, overwrite=True, resuming=False)
    settings = TransferSettings(
        source=str(pretrained.checkpoint),
        backbone=mode,
        backbone_lr_scale=transfer.backbone_lr_scale,
        reuse_perception={},
    )
    trainer = TransferTrainer(one, [spec], run_dir, settings, pretrained)
    return _run_one(trainer, [spec.name])


def _steps_to_target(curve: list[list[float]], target: float) -> float:
    for steps, rate in curve:
        if rate is not None and rate >= target:
            return float(steps)
    return math.nan


def _area(curve: list[list[float]]) -> float:
    """Mean greedy rate over training (trapezoids from the first evaluation to the last)."""
    points = [(s, r) for s, r in curve if r is not None]
    if len(points) < 2:
        return float(points[0][1]) if points else math.nan
    xs, ys = np.asarray(points, dtype=float).T
    return float(np.trapezoid(ys, xs) / max(xs[-1] - xs[0], 1.0))


def _spread(values: list[float]) -> dict[str, Any]:
    arr = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    return {
        "mean": float(arr.mean()) if arr.size else None,
        "std": float(arr.std()) if arr.size else None,
        "n": int(arr.size),
        "of": len(values),
    }


def summarise(results, settings: ComparisonSettings) -> dict[str, Any]:
    table: dict[str, Any] = {"target_rate": settings.target_rate, "tasks": {}}
    for name, modes in results.items():
        rows = {}
        for mode, runs in modes.items():
            curves = [run["curves"][name] for run in runs]
            rows[mode] = {
                "steps_to_target": _spread(
                    [_steps_to_target(c, settings.target_rate) for c in curves]
                ),
                "auc": _spread([_area(c) for c in curves]),
                "final_rate": _spread([run["final_rate"][name] for run in runs]),
            }
        table["tasks"][name] = rows
    return table


def _fmt(cell: dict[str, Any], digits: int, integer: bool = False) -> str:
    if cell["mean"] is None:
        return f"not reached (0/{cell['of']})"
    text = (
        f"{cell['mean']:,.0f} ± {cell['std']:,.0f}"
        if integer
        else (f"{cell['mean']:.{digits}f} ± {cell['std']:.{digits}f}")
    )
    return text if cell["n"] == cell["of"] else f"{text} ({cell['n']}/{cell['of']})"


def markdown_table(table: dict[str, Any], settings: ComparisonSettings) -> str:
    lines = [
        f"# Transfer versus scratch (target rate {settings.target_rate:.0%}, "
        f"seeds {settings.seeds}; mean ± std over the seeds finished)",
        "",
        "| task | mode | seeds | env steps to target | area under curve | final greedy rate |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for name, rows in table["tasks"].items():
        for mode, row in rows.items():
            lines.append(
                f"| {name} | {mode} | {row['final_rate']['of']} | "
                f"{_fmt(row['steps_to_target'], 0, integer=True)} | "
                f"{_fmt(row['auc'], 3)} | {_fmt(row['final_rate'], 3)} |"
            )
    return "\n".join(lines) + "\n"


def plot_comparison(results, path: Path) -> None:
    """One panel per task: mean greedy rate against env steps per mode, band = ± std."""
    names = list(results)
    figure = Figure(figsize=(4.5 * len(names), 3.4), dpi=100)
    FigureCanvasAgg(figure)
    for index, name in enumerate(names):
        axes = figure.add_subplot(1, len(names), index + 1)
        for mode, runs in results[name].items():
            curves = [
                np.asarray([p for p in run["curves"][name] if p[1] is not None]) for run in runs
            ]
            curves = [c for c in curves if len(c)]
            if not curves:
                continue
            grid = np.linspace(0, max(c[-1, 0] for c in curves), 50)
            stacked = np.stack([np.interp(grid, c[:, 0], c[:, 1]) for c in curves])
            mean, std = stacked.mean(0), stacked.std(0)
            color = MODE_COLORS.get(mode)
            axes.plot(grid, mean, label=mode, color=color)
            axes.fill_between(grid, mean - std, mean + std, color=color, alpha=0.2)
        axes.set_title(name, fontsize=10)
        axes.set_xlabel("env steps")
        axes.set_ylabel("greedy win / score rate")
        axes.set_ylim(-0.02, 1.02)
        axes.legend(fontsize=8)
    figure.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(tmp)
    tmp.replace(path)
