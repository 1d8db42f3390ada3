"""Env steps and wall time for MAPPO to reach a greedy win rate, alone and inside a multi-task run.

Single-task runs train one task until its greedy evaluation reaches the target (or the
budget ends); a multi-task run directory, if given, is read for the iteration at which
each task first reached the target there. Every run writes its metrics and a learning
curve under the output folder, and a JSON summary.

    python benchmarks/learning.py --tasks smax/3m smax/2s3z --seeds 0 --budget 2e6
    python benchmarks/learning.py --multitask-run runs/<id>          # read a finished run
    python benchmarks/learning.py --quick                            # tiny, proves it works
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from throughput import machine  # noqa: E402


def rate_of(values: dict) -> float | None:
    return values.get("eval_win_rate", values.get("eval_score_rate"))


def single_task(task: str, seed: int, budget: float, target: float, out: Path, extra: list[str]):
    """Train one task until its greedy rate reaches ``target``; return when and how fast."""
    from hydra import compose, initialize_config_dir

    from marl_shared.analysis.plots import plot_learning_curves
    from marl_shared.cli import CONF_DIR
    from marl_shared.training.config import validate_config
    from marl_shared.training.metrics import MetricsWriter
    from marl_shared.training.run import Trainer, resolve_tasks

    run_dir = out / f"{task.replace('/', '__')}-seed{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    overrides = [
        f"tasks=[{task}]",
        f"seed={seed}",
        f"run_dir={run_dir}",
        f"train.env_steps={int(budget)}",
        "train.progress=false",
        *extra,
    ]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        config = validate_config(compose(config_name="train", overrides=overrides))
    trainer = Trainer(config, resolve_tasks(config), run_dir)
    reached = None
    start = time.perf_counter()
    try:
        trainer.build()
        with MetricsWriter(run_dir) as writer:
            while not trainer.done():
                record = trainer.step()
                writer.write(record)
                rate = rate_of(record["tasks"][task])
                if rate is not None and rate >= target and reached is None:
                    reached = {
                        "env_steps": record["tasks"][task]["env_steps"],
                        "wall_s": time.perf_counter() - start,
                        "iteration": record["iteration"],
                    }
                    break
        final = trainer.env_steps[task]
    finally:
        trainer.stop()
    plot_learning_curves(run_dir)
    return {
        "task": task,
        "seed": seed,
        "target": target,
        "reached": reached,
        "env_steps_run": final,
        "wall_s_run": time.perf_counter() - start,
        "run_dir": str(run_dir),
    }


def from_multitask_run(run_dir: Path, target: float) -> dict:
    """First evaluation at which each task of a finished multi-task run reached ``target``."""
    from marl_shared.training.metrics import read_metrics

    records = read_metrics(run_dir)
    first: dict[str, dict | None] = {}
    for record in records:
        if record.get("final_evaluation"):
            continue
        for task, values in record["tasks"].items():
            first.setdefault(task, None)
            rate = rate_of(values)
            if first[task] is None and rate is not None and rate >= target:
                first[task] = {
                    "env_steps": values["env_steps"],
                    "wall_s": record["time_s"],
                    "iteration": record["iteration"],
                }
    return {"run_dir": str(run_dir), "target": target, "first_reached": first}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="*", default=["smax/3m", "smax/2s3z"])
    parser.add_argument("--seeds", nargs="*", type=int, default=[0])
    parser.add_argument("--budget", type=float, default=2e6, help="env steps per single run")
    parser.add_argument("--target", type=float, default=0.9)
    parser.add_argument("--multitask-run", default=None, help="a finished multi-task run dir")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "learning"))
    args = parser.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    extra = ["train.eval_interval=5", "train.eval_episodes=32", "train.checkpoint_interval=1000"]
    if args.quick:
        extra = [
            "train.eval_interval=1",
            "train.eval_episodes=2",
            "algo.rollout_length=8",
            "task.backends.smax.num_envs=4",
            "task.backends.smax.eval_num_envs=2",
        ]
        args.budget = 96
        args.tasks = args.tasks[:1]
    summary: dict = {"machine": machine(), "single_task": []}
    for task in args.tasks:
        for seed in args.seeds:
            result = single_task(task, seed, args.budget, args.target, out, extra)
            summary["single_task"].append(result)
            reached = result["reached"]
            print(
                f"{task} seed {seed}: "
                + (
                    f"{args.target:.0%} greedy at {reached['env_steps']:,} env steps, "
                    f"{reached['wall_s'] / 60:.1f} min"
                    if reached
                    else f"not reached in {result['env_steps_run']:,} env steps"
                )
            )
    if args.multitask_run:
        summary["multitask"] = from_multitask_run(Path(args.multitask_run), args.target)
        print(json.dumps(summary["multitask"], indent=1))
    path = out / "summary.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(summary, indent=1))
    os.replace(tmp, path)
    print(f"summary: {path}")


if __name__ == "__main__":
    main()
