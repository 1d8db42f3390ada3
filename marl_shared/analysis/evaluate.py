"""``marl-shared evaluate``: a checkpoint or export played for N episodes on its tasks.

Greedy by default (arg-max over the masked logits), stochastic on request. Reports the
win rate (SMAC-style tasks) or score rate (football) with a 95% Wilson interval, the
mean return and the mean episode length, as a table on the console and as JSON. Runs
with the plain-torch :class:`~marl_shared.policy.Policy`, so no Ray is started.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from marl_shared.envs import make_task
from marl_shared.policy import Policy
from marl_shared.training import checkpoint as ckpt
from marl_shared.training.config import ConfigError

logger = logging.getLogger(__name__)


def task_options(source: str | os.PathLike, task_name: str) -> dict[str, Any]:
    """Adapter options the policy was trained with (run config or export manifest), else {}."""
    path = Path(source).expanduser()
    exported = path / "manifest.json"
    if exported.is_file():
        manifest = json.loads(exported.read_text())
        if "task_options" in manifest:
            return dict(manifest["task_options"].get(task_name, {}))
    from marl_shared.training.config import sampling_settings
    from marl_shared.training.run import CONFIG_FILE, load_run_config

    for run_dir in (path, *path.parents[:2]):
        if (run_dir / CONFIG_FILE).is_file():
            config = load_run_config(run_dir)
            return sampling_settings(config, task_name)[2] if task_name in config.tasks else {}
    return {}


def play_episodes(
    policy: Policy,
    task_name: str,
    *,
    episodes: int,
    greedy: bool = True,
    seed: int = 0,
    num_envs: int = 8,
    options: dict[str, Any] | None = None,
) -> dict[str, list[float]]:
    """Returns, lengths and outcomes of ``episodes`` fresh episodes (each env once a round)."""
    spec = policy.spec(task_name)
    width = max(1, min(int(num_envs), int(episodes)))
    task = make_task(task_name, num_envs=width, **(options or {}))
    generator = torch.Generator().manual_seed(int(seed))
    returns: list[float] = []
    lengths: list[int] = []
    outcomes: list[float] = []
    try:
        round_index = 0
        while len(returns) < episodes:
            current = task.reset(seed=int(seed) * 100_003 + round_index)
            round_index += 1
            prev = np.full((width, spec.num_agents), -1, dtype=np.int64)
            hidden = policy.initial_hidden(task_name, width)
            running = np.ones(width, dtype=bool)
            ret = np.zeros(width)
            length = np.zeros(width, dtype=np.int64)
            while running.any():
                out = policy.act(
                    task_name,
                    current.obs,
                    current.avail_actions,
                    prev,
                    hidden=hidden,
                    greedy=greedy,
                    generator=generator,
                )
                step = task.step(out.actions)
                done = step.terminated | step.truncated
                ret += np.where(running, step.reward, 0.0)
                length += running
                for env in np.flatnonzero(done & running):
                    if len(returns) < episodes:
                        returns.append(float(ret[env]))
                        lengths.append(int(length[env]))
                        outcomes.append(float(step.outcome[env]))
                running &= ~done
                prev = np.where(done[:, None], -1, out.actions)
                hidden = policy.reset_hidden(out.hidden, done)
                current = step
    finally:
        task.close()
    return {"returns": returns, "lengths": lengths, "outcomes": outcomes}


def summarise(policy: Policy, task_name: str, raw: dict[str, list[float]]) -> dict[str, Any]:
    """Rate with its 95% Wilson interval, mean and spread of return and length."""
    from marl_shared.training.run import wilson_interval

    spec = policy.spec(task_name)
    outcomes = np.asarray(raw["outcomes"], dtype=np.float64)
    returns = np.asarray(raw["returns"], dtype=np.float64)
    lengths = np.asarray(raw["lengths"], dtype=np.float64)
    successes = int(np.sum(outcomes > 0))
    low, high = wilson_interval(successes, int(outcomes.size))
    record = {
        "task": task_name,
        "rate_name": "score_rate" if spec.outcome == "goal" else "win_rate",
        "episodes": int(outcomes.size),
        "successes": successes,
        "rate": successes / max(1, outcomes.size),
        "rate_ci95": [low, high],
        "return_mean": float(returns.mean()),
        "return_std": float(returns.std()),
        "length_mean": float(lengths.mean()),
    }
    if spec.outcome == "goal":
        record["goal_diff_mean"] = float(outcomes.mean())
    return record


def evaluate(
    source: str | os.PathLike,
    tasks: list[str] | None = None,
    *,
    episodes: int = 32,
    greedy: bool = True,
    seed: int = 0,
    num_envs: int = 8,
) -> dict[str, Any]:
    """Evaluate a checkpoint, run folder or export on some (default: all) of its tasks."""
    if episodes <= 0:
        raise ConfigError(f"episodes must be positive, got {episodes}.")
    policy = Policy.load(source)
    names = list(tasks) if tasks else list(policy.specs)
    for name in names:
        policy.spec(name)  # one sentence naming the tasks the policy holds
    results = {}
    for name in names:
        raw = play_episodes(
            policy,
            name,
            episodes=episodes,
            greedy=greedy,
            seed=seed,
            num_envs=num_envs,
            options=task_options(source, name),
        )
        results[name] = summarise(policy, name, raw)
        logger.info("%s: %s %.3f", name, results[name]["rate_name"], results[name]["rate"])
    return {
        "source": policy.source,
        "greedy": bool(greedy),
        "seed": int(seed),
        "episodes": int(episodes),
        "tasks": results,
    }


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON into a temporary file and rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def default_output(source: str | os.PathLike, greedy: bool) -> Path:
    """``<run>/evaluation_<checkpoint>_<mode>.json`` for a run's checkpoint, else in the cwd."""
    mode = "greedy" if greedy else "stochastic"
    path = Path(source).expanduser()
    try:
        checkpoint = ckpt.resolve_checkpoint(path)
    except ckpt.CheckpointError:
        return Path(f"evaluation_{path.name}_{mode}.json")
    run_dir = checkpoint.parent.parent
    return run_dir / f"evaluation_{checkpoint.name}_{mode}.json"


def results_table(report: dict[str, Any]):
    from rich.table import Table

    mode = "greedy" if report["greedy"] else "stochastic"
    table = Table(title=f"{mode} evaluation, {report['episodes']} episodes per task")
    for column in ("task", "win / score rate", "95% CI", "return", "length"):
        table.add_column(column, justify="left" if column == "task" else "right")
    for name, values in report["tasks"].items():
        low, high = values["rate_ci95"]
        table.add_row(
            name,
            f"{values['rate']:.1%}",
            f"{low:.0%}-{high:.0%}",
            f"{values['return_mean']:.3f} ± {values['return_std']:.3f}",
            f"{values['length_mean']:.1f}",
        )
    return table


def evaluate_command(cfg) -> None:
    """Evaluate, print the table, write the JSON."""
    from rich.console import Console

    if not cfg.get("checkpoint"):
        raise ConfigError("evaluate needs checkpoint=<run folder, checkpoint or policy export>.")
    tasks = cfg.get("tasks")
    if isinstance(tasks, str):
        tasks = [tasks]
    report = evaluate(
        cfg.checkpoint,
        list(tasks) if tasks else None,
        episodes=int(cfg.episodes),
        greedy=bool(cfg.greedy),
        seed=int(cfg.seed),
        num_envs=int(cfg.num_envs),
    )
    out = Path(cfg.out) if cfg.get("out") else default_output(cfg.checkpoint, bool(cfg.greedy))
    write_json_atomic(out, report)
    console = Console()
    console.print(results_table(report))
    console.print(f"written: {out}")
