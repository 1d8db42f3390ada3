"""Exact resume after SIGKILL, checkpoint integrity, and run directories kept unless told."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from ray.rllib.core import ALL_MODULES
from test_training import TINY, make_config, module_weights

from marl_shared.algorithms.mappo import OPTIMIZER_NAME
from marl_shared.cli import CONF_DIR, train_command
from marl_shared.training import checkpoint as ckpt
from marl_shared.training.run import (
    RunDirError,
    Trainer,
    load_run_config,
    prepare_run_dir,
    resolve_tasks,
)

KILLED_RUN = [
    "tasks=[smax/3m]",
    "train.max_iterations=8",
    "train.checkpoint_interval=3",
    "train.eval_interval=0",
    "cluster.num_cpus=1",
]


def metrics_iterations(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["iteration"] for line in lines if line.strip()]


def start_and_sigkill(run_dir, kill_after_lines: int) -> int:
    """Start ``marl-shared train`` in its own process group and SIGKILL the whole group."""
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "JAX_PLATFORMS": "cpu"}
    command = [sys.executable, "-m", "marl_shared.cli", "train", *TINY, *KILLED_RUN]
    command.append(f"run_dir={run_dir}")
    proc = subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline:
            path = run_dir / "metrics.jsonl"
            if path.is_file() and len(path.read_text().splitlines()) >= kill_after_lines:
                break
            if proc.poll() is not None:
                pytest.fail(
                    f"training ended before the kill: {proc.stderr.read().decode()[-2000:]}"
                )
            time.sleep(0.02)
        else:
            pytest.fail("training wrote no metrics within 240 s")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the trainer and the Ray processes it started
        proc.wait(timeout=30)
        proc.stderr.close()
    return proc.returncode


def test_sigkilled_run_resumes_from_its_last_checkpoint_with_exact_state(ray_local, tmp_path):
    run_dir = tmp_path / "run"
    returncode = start_and_sigkill(run_dir, kill_after_lines=4)
    assert returncode == -signal.SIGKILL

    # The kill landed after iteration 4 and before the checkpoint of iteration 6.
    killed_lines = metrics_iterations(run_dir)
    checkpoint = ckpt.resolve_checkpoint(run_dir)
    assert checkpoint.name == "iter_000003"
    assert killed_lines[:4] == [1, 2, 3, 4] and max(killed_lines) < 6
    saved_modules = ckpt.load_module_state(checkpoint)
    saved_learner = ckpt.load_learner_state(checkpoint)
    saved_trainer = ckpt.load_trainer_state(checkpoint)

    # Restoring gives the checkpoint's weights, optimizer moments and counters bit for bit.
    config = load_run_config(run_dir)
    assert config.train.max_iterations == 8 and config.tasks == ["smax/3m"]
    trainer = Trainer(config, resolve_tasks(config), run_dir)
    try:
        trainer.build()
        trainer.load_checkpoint(run_dir)
        weights = module_weights(trainer)
        learner = trainer.algo.learner_group.get_state(components="learner")["learner"]
        optimizer = trainer.algo.learner_group._learner.get_optimizer(ALL_MODULES, OPTIMIZER_NAME)
        opt_params = [p for group in optimizer.param_groups for p in group["params"]]
        moments = [optimizer.state[p]["exp_avg"].numpy().copy() for p in opt_params]
        rng_state = trainer.algo.rng.bit_generator.state
        algo_iteration = trainer.algo.iteration
        runner_seed = trainer.algo.env_runner.seed
    finally:
        trainer.stop()
    compared = 0
    for module_id, params in saved_modules.items():
        for name, value in params.items():
            got = np.asarray(weights[module_id][name])
            assert got.dtype == value.dtype
            np.testing.assert_array_equal(got, value)
            compared += 1
    assert compared > 4
    # The live torch optimizer holds the saved Adam moments for every parameter.
    saved_moments = next(iter(saved_learner["optimizer"].values()))["state"]["state"]
    assert sorted(saved_moments) == list(range(len(opt_params)))
    for index, moment in enumerate(moments):
        np.testing.assert_array_equal(moment, saved_moments[index]["exp_avg"])
    restored_opt = ckpt.split_tree(learner["optimizer"])[1]
    saved_opt = ckpt.split_tree(saved_learner["optimizer"])[1]
    assert restored_opt.keys() == saved_opt.keys() and saved_opt
    for key, value in saved_opt.items():
        np.testing.assert_array_equal(np.asarray(restored_opt[key]), value)
    assert trainer.iteration == algo_iteration == 3
    assert trainer.env_steps == {k: int(v) for k, v in saved_trainer["env_steps"].items()}
    assert rng_state == saved_trainer["rng"]
    assert runner_seed != config.seed  # the resumed run does not replay its first streams

    # The command line continues the run with the config it was started with.
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"resume={run_dir}", "tasks=[smax/2s3z]"])
    train_command(cfg)

    lines = metrics_iterations(run_dir)
    # Records 4.. of the killed run were dropped; 4..8 were trained again, then the final line.
    assert lines == [1, 2, 3, 4, 5, 6, 7, 8, 8]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert list(records[-2]["tasks"]) == ["smax/3m"]
    steps = [r["tasks"]["smax/3m"]["env_steps"] for r in records[:-1]]
    assert steps == [32 * i for i in range(1, 9)]
    csv_rows = (run_dir / "metrics.csv").read_text().splitlines()
    assert len(csv_rows) == 1 + len(lines)
    final = ckpt.resolve_checkpoint(run_dir)
    assert final.name == "iter_000008"
    assert ckpt.load_trainer_state(final)["iteration"] == 8


def write_tiny_checkpoint(checkpoint_dir, iteration: int, value: float):
    return ckpt.write_checkpoint(
        checkpoint_dir,
        name=f"iter_{iteration:06d}",
        manifest={"tasks": [], "iteration": iteration},
        module_state={"smax__3m": {"weight": np.full((3, 2), value, np.float32)}},
        learner_state={"optimizer": {"step": np.array([iteration], np.int64)}},
        trainer_state={"iteration": iteration},
    )


def test_corrupt_latest_checkpoint_is_reported_and_the_previous_good_one_used(tmp_path, caplog):
    checkpoints = tmp_path / "run" / "checkpoints"
    write_tiny_checkpoint(checkpoints, 1, 1.0)
    newest = write_tiny_checkpoint(checkpoints, 2, 2.0)
    manifest = json.loads((newest / ckpt.MANIFEST).read_text())
    assert set(manifest["sha256"]) == {
        ckpt.MODULES,
        ckpt.LEARNER_TENSORS,
        ckpt.LEARNER_TREE,
        ckpt.TRAINER,
    }

    # Flip one byte in the tensor data of the newest checkpoint: it still parses.
    data = bytearray((newest / ckpt.MODULES).read_bytes())
    data[-1] ^= 0x01
    (newest / ckpt.MODULES).write_bytes(bytes(data))

    with pytest.raises(
        ckpt.CheckpointError, match=r"modules.safetensors does not match its sha256"
    ):
        ckpt.resolve_checkpoint(newest)
    with pytest.raises(ckpt.CheckpointError, match="does not match its sha256"):
        ckpt.load_module_state(newest)
    with caplog.at_level("WARNING"):
        chosen = ckpt.resolve_checkpoint(tmp_path / "run")
    assert chosen.name == "iter_000001"
    assert "iter_000002 is corrupt" in caplog.text
    np.testing.assert_array_equal(ckpt.load_module_state(chosen)["smax__3m"]["weight"], 1.0)

    # A damaged trainer state is caught too, and with nothing good left the error says so.
    (chosen / ckpt.TRAINER).write_text('{"iteration": 7}')
    with pytest.raises(ckpt.CheckpointError, match="Every checkpoint under .* is corrupt"):
        ckpt.resolve_checkpoint(tmp_path / "run")


def test_used_run_directory_is_refused_without_overwrite_or_resume(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"iteration": 1}\n')
    with pytest.raises(RunDirError, match="already holds files"):
        prepare_run_dir(run_dir, overwrite=False, resuming=False)
    assert (run_dir / "metrics.jsonl").read_text() == '{"iteration": 1}\n'
    assert prepare_run_dir(run_dir, overwrite=True, resuming=False) == run_dir
    assert prepare_run_dir(run_dir, overwrite=False, resuming=True) == run_dir
    empty = tmp_path / "empty"
    empty.mkdir()
    assert prepare_run_dir(empty, overwrite=False, resuming=False) == empty


def test_default_cluster_is_embedded_on_loopback_with_the_dashboard_off(tmp_path):
    config = make_config(tmp_path, "tasks=[smax/3m]")
    assert config.cluster.address is None
    assert config.cluster.dashboard is False
    joined = make_config(tmp_path, "tasks=[smax/3m]", "cluster=address", "cluster.address=x:1")
    assert joined.cluster.address == "x:1" and joined.cluster.dashboard is False
