"""Throughput of the platform next to the raw simulators, measured side by side in one run.

For each task: raw simulator env steps/s (same batch size, one process), the platform's
sampling env steps/s (our env runner: simulator + policy forward + advantages), and their
ratio. Then the multi-task mix (one runner sampling every task, against the sum of the
single-task sampling times), and training env steps/s (sampling + learning) with the peak
memory of every process of the run.

    python benchmarks/throughput.py                  # full run, writes benchmarks/results/
    python benchmarks/throughput.py --quick          # tiny sizes: proves the script works
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402
import psutil  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SMAX_TASKS = ["smax/3m", "smax/2s3z"]
GRF_TASK = "grf/academy_3_vs_1_with_keeper"


# ----------------------------------------------------------------------------- raw simulators


def raw_smax_rate(map_name: str, num_envs: int, steps: int, seed: int = 0) -> float:
    """JaxMARL SMAX alone: one jitted vmapped step per batch, random valid actions from numpy."""
    import jax

    from marl_shared.envs.smax import _import_smax

    smax_env, heuristic = _import_smax()
    env = heuristic.HeuristicEnemySMAX(scenario=smax_env.map_name_to_scenario(map_name))
    agents = env.agents
    step = jax.jit(jax.vmap(env.step))
    avail_fn = jax.jit(jax.vmap(env.get_avail_actions))
    reset = jax.jit(jax.vmap(env.reset))
    rng = np.random.default_rng(seed)
    key = jax.random.PRNGKey(seed)
    key, sub = jax.random.split(key)
    _, state = reset(jax.random.split(sub, num_envs))

    def one_step(state, key):
        avail = jax.device_get(avail_fn(state))
        actions = {}
        for agent in agents:
            mask = np.asarray(avail[agent], bool)
            scores = rng.random(mask.shape) * mask
            actions[agent] = np.argmax(scores, axis=-1).astype(np.int32)
        key, sub = jax.random.split(key)
        obs, state, reward, done, info = step(jax.random.split(sub, num_envs), state, actions)
        jax.block_until_ready(reward)
        return state, key

    for _ in range(3):  # compile (SMAX's heuristic compiles twice), then warm
        state, key = one_step(state, key)
    start = time.perf_counter()
    for _ in range(steps):
        state, key = one_step(state, key)
    return steps * num_envs / (time.perf_counter() - start)


def raw_grf_rate(scenario: str, num_envs: int, steps: int, seed: int = 0) -> float:
    """The football engine alone: raw FootballEnv steps with random actions, engines in turn."""
    from gfootball.env import config as grf_config
    from gfootball.env import football_env

    from marl_shared.envs.grf import _QUIET_ENGINE, spec

    agents = spec(scenario).num_agents
    envs = []
    for index in range(num_envs):
        values = dict(_QUIET_ENGINE)  # the adapter's engine settings: no dumps, no rendering
        values.update(
            level=scenario,
            players=[f"agent:left_players={agents}"],
            game_engine_random_seed=seed + index,
        )
        cfg = grf_config.Config(values)
        env = football_env.FootballEnv(cfg)
        env.reset()
        envs.append(env)
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    for _ in range(steps):
        for env in envs:
            _, _, done, _ = env.step(rng.integers(0, 19, size=agents).tolist())
            if done:
                env.reset()
    rate = steps * num_envs / (time.perf_counter() - start)
    for env in envs:
        env.close()
    return rate


# ----------------------------------------------------------------------------- the platform


def make_runner(tasks: list[str], num_envs: dict[str, int], rollout_length: int):
    """Our env runner, built in this process exactly as RLlib builds its local runner."""
    from marl_shared.algorithms.env_runner import BatchedTaskEnvRunner
    from marl_shared.algorithms.mappo import MAPPOConfig
    from marl_shared.envs import task_spec

    config = MAPPOConfig().debugging(seed=0)
    config.marl_settings(
        task_specs=[task_spec(t).to_dict() for t in tasks],
        num_envs=num_envs,
        eval_num_envs={t: 1 for t in tasks},
        rollout_length=rollout_length,
    )
    return BatchedTaskEnvRunner(config=config, worker_index=0)


def sampling_rate(runner, repeats: int) -> tuple[float, dict[str, float]]:
    """Env steps/s of runner.sample() after one warm-up call; also seconds per task."""
    runner.sample()  # compiles SMAX, starts engines
    steps, per_task = 0, {}
    start = time.perf_counter()
    for _ in range(repeats):
        result = runner.sample()
        for name, stats in result["__stats__"].items():
            steps += stats["env_steps"]
            per_task[name] = per_task.get(name, 0.0) + stats["sample_time_s"]
    return steps / (time.perf_counter() - start), per_task


# ----------------------------------------------------------------------------- memory


class PeakMemory:
    """Largest summed RSS of this process and all its descendants (Ray workers included)."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _sample(self) -> int:
        root = psutil.Process()
        total = 0
        for proc in [root, *root.children(recursive=True)]:
            try:
                total += proc.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._sample())


def training_rate(overrides: list[str], iterations: int) -> dict[str, float]:
    """Env steps/s of whole training iterations (sampling + learning) of a real run."""
    import tempfile

    from hydra import compose, initialize_config_dir

    from marl_shared.cli import CONF_DIR
    from marl_shared.training.config import validate_config
    from marl_shared.training.run import Trainer, resolve_tasks

    with tempfile.TemporaryDirectory() as tmp, PeakMemory() as memory:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(config_name="train", overrides=[f"run_dir={tmp}", *overrides])
        config = validate_config(cfg)
        trainer = Trainer(config, resolve_tasks(config), Path(tmp))
        try:
            trainer.build()
            trainer.step()  # compile and warm up
            before = sum(trainer.env_steps.values())
            start = time.perf_counter()
            sample = learn = 0.0
            for _ in range(iterations):
                record = trainer.step()
                sample += record["sample_time_s"]
                learn += record["learn_time_s"]
            elapsed = time.perf_counter() - start
            steps = sum(trainer.env_steps.values()) - before
        finally:
            trainer.stop()
    return {
        "env_steps_per_s": steps / elapsed,
        "sample_share": sample / elapsed,
        "learn_share": learn / elapsed,
        "peak_rss_gib": memory.peak / 2**30,
        "iterations": iterations,
        "env_steps": steps,
    }


# ----------------------------------------------------------------------------- main


def machine() -> dict[str, str]:
    import torch

    rev = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "code": rev + ("+uncommitted" if dirty else ""),
        "cpu": platform.processor() or platform.machine(),
        "cores": str(psutil.cpu_count()),
        "memory_gib": f"{psutil.virtual_memory().total / 2**30:.0f}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "load_average_at_start": " ".join(f"{x:.1f}" for x in os.getloadavg()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for CI")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "throughput.json"))
    args = parser.parse_args()
    quick = args.quick
    smax_envs = 8 if quick else 128
    grf_envs = 1
    smax_steps = 5 if quick else 200
    grf_steps = 10 if quick else 600
    rollout = 8 if quick else 64
    repeats = 1 if quick else 3

    results: dict = {"machine": machine(), "quick": quick, "tasks": {}}
    single_times: dict[str, float] = {}
    for task in [*SMAX_TASKS, GRF_TASK]:
        backend, scenario = task.split("/")
        envs = smax_envs if backend == "smax" else grf_envs
        if backend == "smax":
            raw = raw_smax_rate(scenario, envs, smax_steps)
        else:
            raw = raw_grf_rate(scenario, envs, grf_steps)
        runner = make_runner([task], {task: envs}, rollout)
        rate, per_task = sampling_rate(runner, repeats)
        runner.stop()
        single_times[task] = per_task[task]
        results["tasks"][task] = {
            "num_envs": envs,
            "raw_env_steps_per_s": raw,
            "platform_sampling_env_steps_per_s": rate,
            "ratio": rate / raw,
        }
        print(f"{task}: raw {raw:,.0f}/s  platform {rate:,.0f}/s  ratio {rate / raw:.2f}")

    mix = [*SMAX_TASKS, GRF_TASK]
    envs = {t: (smax_envs if t.startswith("smax") else grf_envs) for t in mix}
    runner = make_runner(mix, envs, rollout)
    rate, per_task = sampling_rate(runner, repeats)
    runner.stop()
    multi_time = sum(per_task.values())
    separate_time = sum(single_times.values())
    results["multitask_sampling"] = {
        "env_steps_per_s": rate,
        "seconds_multitask": multi_time,
        "seconds_single_tasks_summed": separate_time,
        "ratio": separate_time / multi_time,
    }
    print(f"multi-task mix: {rate:,.0f}/s; sharing ratio {separate_time / multi_time:.2f}")

    overrides = ["train.progress=false", "train.eval_interval=0"]
    if quick:
        overrides += ["experiment=quick"]
    train = training_rate(overrides, iterations=1 if quick else 5)
    results["training_default_multitask"] = train
    print(
        f"training (default multi-task): {train['env_steps_per_s']:,.0f} env steps/s, "
        f"peak RSS {train['peak_rss_gib']:.2f} GiB"
    )

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, out)
    print(f"results: {out}")


if __name__ == "__main__":
    sys.exit(main())
