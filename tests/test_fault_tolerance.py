"""Env runners that die or whose simulator raises are replaced; every task is still sampled."""

from __future__ import annotations

import os
import signal
import time

import pytest
from conftest import gfootball_available
from test_training import make_config

from marl_shared.training.run import Trainer, resolve_tasks

GRF = "grf/academy_3_vs_1_with_keeper"
needs_grf = pytest.mark.skipif(not gfootball_available(), reason="football engine not built")
FAULT_SETTINGS = [
    "train.eval_interval=0",
    "cluster.num_cpus_per_env_runner=0.5",
    "cluster.restart_delay_s=0.2",
    "cluster.health_probe_timeout_s=5",
]
RESTART_WAIT_S = 120  # a restarted runner imports torch and JAX again: ~10-20 s on 2 cores


def step_until_runner_back(trainer: Trainer, index: int) -> list[dict]:
    """Train until runner ``index`` samples again (bounded); return the records on the way."""
    records = []
    deadline = time.monotonic() + RESTART_WAIT_S
    while time.monotonic() < deadline:
        records.append(trainer.step())
        if index in [w["index"] for w in trainer.algo.last_report["workers"]]:
            return records
        time.sleep(1.0)
    pytest.fail(f"env runner {index} did not come back within {RESTART_WAIT_S} s")


def build_trainer(tmp_path, *overrides) -> Trainer:
    config = make_config(tmp_path, *FAULT_SETTINGS, *overrides)
    (tmp_path / "run").mkdir(exist_ok=True)
    trainer = Trainer(config, resolve_tasks(config), tmp_path / "run")
    trainer.build()
    return trainer


# Football only: a SMAX runner compiles with JAX in each new process (~40-80 s here).
@needs_grf
def test_killed_env_runner_is_restarted_and_every_task_still_sampled(ray_local, tmp_path):
    trainer = build_trainer(tmp_path, f"tasks=[{GRF}]", "cluster.num_env_runners=2")
    try:
        first = trainer.step()
        pids = {w["index"]: w["pid"] for w in trainer.algo.last_report["workers"]}
        assert sorted(pids) == [1, 2]
        os.kill(pids[2], signal.SIGKILL)  # a real crash of the runner's process

        hit = trainer.step()
        hit_workers = trainer.algo.last_report["workers"]
        later = step_until_runner_back(trainer, 2)
        later_workers = trainer.algo.last_report["workers"]
    finally:
        trainer.stop()

    assert first["faults"]["env_runners_lost"] == 0
    assert hit["faults"]["env_runners_lost"] == 1 and hit["faults"]["rollouts_lost"] == 1
    assert [w["index"] for w in hit_workers] == [1]
    # Both tasks were sampled in the faulty iteration (by the surviving runner) ...
    for name in [GRF]:
        assert hit["tasks"][name]["env_steps"] == first["tasks"][name]["env_steps"] + 8
    # ... and so was every later one, until runner 2 came back in a new process.
    for record in later:
        assert all(record["tasks"][n]["env_steps"] > 0 for n in [GRF])
    assert sum(record["faults"]["restored"] for record in later) == 1
    restarted = {w["index"]: w["pid"] for w in later_workers}
    assert sorted(restarted) == [1, 2] and restarted[2] != pids[2]
    assert trainer.iteration == 2 + len(later)


# Slow only to keep the default suite in budget (~30 s here); run with -m slow.
@pytest.mark.slow
@needs_grf
def test_simulator_error_mid_rollout_is_survived_and_logged(ray_local, tmp_path):
    trainer = build_trainer(
        tmp_path, f"tasks=[{GRF},grf/academy_empty_goal_close]", "cluster.num_env_runners=1"
    )
    try:
        trainer.step()
        old_pid = trainer.algo.last_report["workers"][0]["pid"]

        def break_engine(runner) -> int:
            # Close one football engine under the adapter: its next step raises inside gfootball.
            runner.slots[GRF].task._envs[0].close()
            return os.getpid()

        assert trainer.algo.env_runner_group.foreach_env_runner(
            break_engine, local_env_runner=False
        ) == [old_pid]
        hit = trainer.step()
        after = step_until_runner_back(trainer, 1)
        workers = trainer.algo.last_report["workers"]
    finally:
        trainer.stop()

    assert hit["faults"]["env_runners_lost"] == 1 and hit["faults"]["rollouts_lost"] == 2
    # The runner's whole rollout was lost; both tasks were sampled again in the same iteration.
    assert hit["tasks"]["grf/academy_empty_goal_close"]["env_steps"] == 16
    assert hit["tasks"][GRF]["env_steps"] == 16
    assert after[-1]["tasks"][GRF]["env_steps"] == 16 + 8 * len(after)
    assert workers[0]["index"] == 1 and workers[0]["pid"] != old_pid
