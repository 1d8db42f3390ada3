"""Fault-injection soak: train while killing random env runner processes; count what was lost.

Every ``--kill-every`` iterations one live remote env runner gets SIGKILL (a real crash).
The run passes when every iteration completes and every task is sampled in each of them.

    .venv/bin/python benchmarks/soak_faults.py --iterations 100 --kills 20 --runners 2
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # before Ray starts
os.environ.setdefault("JAX_PLATFORMS", "cpu")

logger = logging.getLogger("soak_faults")


def compose_config(args: argparse.Namespace, run_dir: Path):
    from hydra import compose, initialize_config_dir

    from marl_shared.cli import CONF_DIR
    from marl_shared.training.config import validate_config

    overrides = [
        f"tasks=[{','.join(args.tasks)}]",
        f"run_dir={run_dir}",
        "algo.rollout_length=8",
        "algo.num_epochs=1",
        "task.backends.smax.num_envs=8",
        "task.backends.grf.num_envs=1",
        "model.perception_dim=32",
        "model.critic_hidden=[32]",
        "train.eval_interval=0",
        "train.eval_episodes=2",
        f"train.checkpoint_interval={args.iterations}",
        "train.progress=false",
        f"cluster.num_env_runners={args.runners}",
        f"cluster.num_cpus_per_env_runner={1.0 / args.runners}",
        "cluster.num_cpus=2",
        "cluster.restart_delay_s=0.2",
        "cluster.health_probe_timeout_s=2",
    ]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return validate_config(compose(config_name="train", overrides=overrides))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["smax/3m"])
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--runners", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write the summary JSON here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    import numpy as np

    from marl_shared.training.metrics import MetricsWriter
    from marl_shared.training.run import Trainer, init_ray, resolve_tasks

    rng = np.random.default_rng(args.seed)
    kill_every = max(1, args.iterations // max(1, args.kills))
    run_dir = Path(tempfile.mkdtemp(prefix="soak-faults-")) / "run"
    config = compose_config(args, run_dir)
    run_dir.mkdir(parents=True)
    init_ray(config)
    trainer = Trainer(config, resolve_tasks(config), run_dir)
    kills, missing, iterations = [], [], 0
    totals = {"env_runners_lost": 0, "rollouts_lost": 0, "local_fallback": 0, "restored": 0}
    start = time.perf_counter()
    try:
        trainer.build()
        writer = MetricsWriter(run_dir, tensorboard=False)
        for _ in range(args.iterations):
            record = trainer.step()
            writer.write(record)
            iterations += 1
            for key in totals:
                totals[key] += int(record["faults"][key])
            missing += [
                (record["iteration"], name)
                for name in config.tasks
                if record["tasks"][name]["env_steps"] <= 0
            ]
            live = [w for w in trainer.algo.last_report["workers"] if w["index"] > 0]
            if len(kills) < args.kills and iterations % kill_every == 0 and live:
                victim = live[int(rng.integers(len(live)))]
                try:
                    os.kill(victim["pid"], signal.SIGKILL)
                    kills.append({"iteration": iterations, "runner": victim["index"]})
                except ProcessLookupError:
                    pass
        writer.close()
        trainer.save_checkpoint()
    finally:
        trainer.stop()
    summary = {
        "command": " ".join(sys.argv),
        "tasks": args.tasks,
        "runners": args.runners,
        "iterations_requested": args.iterations,
        "iterations_completed": iterations,
        "kills": len(kills),
        "iterations_with_a_task_unsampled": len(missing),
        "env_steps": trainer.env_steps,
        "wall_s": round(time.perf_counter() - start, 1),
        **totals,
        "run_dir": str(run_dir),
    }
    text = json.dumps(summary, indent=1)
    sys.stdout.write(text + "\n")
    if args.out is not None:
        args.out.write_text(text + "\n")
    if iterations != args.iterations or missing:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
