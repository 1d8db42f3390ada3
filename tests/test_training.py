"""Short real multi-task runs: SMAX + football on RLlib, checkpoints that restore bit for bit."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from conftest import gfootball_available
from hydra import compose, initialize_config_dir

from marl_shared.cli import CONF_DIR
from marl_shared.training import checkpoint as ckpt
from marl_shared.training.config import validate_config
from marl_shared.training.run import Trainer, resolve_tasks

needs_grf = pytest.mark.skipif(not gfootball_available(), reason="football engine not built")

TINY = [
    "algo.rollout_length=8",
    "algo.num_epochs=2",
    "task.backends.smax.num_envs=4",
    "task.backends.smax.eval_num_envs=2",
    "task.backends.grf.num_envs=1",
    "task.backends.grf.eval_num_envs=1",
    "train.eval_episodes=2",
    "train.eval_interval=2",
    "train.checkpoint_interval=2",
    "model.perception_dim=32",
    "model.critic_hidden=[32]",
    "train.progress=false",
]


def make_config(tmp_path, *overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(
            config_name="train",
            overrides=[*TINY, f"run_dir={tmp_path / 'run'}", *overrides],
        )
    return validate_config(cfg)


def module_weights(trainer):
    state = trainer.algo.learner_group.get_state(components="learner/rl_module")
    return state["learner"]["rl_module"]


@needs_grf
def test_multitask_run_on_smax_and_football_records_every_task_and_restores_exactly(
    ray_local, tmp_path
):
    tasks = "tasks=[smax/3m,smax/2s3z,grf/academy_3_vs_1_with_keeper]"
    config = make_config(tmp_path, tasks, "train.max_iterations=3")
    specs = resolve_tasks(config)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    trainer = Trainer(config, specs, run_dir)
    try:
        result = trainer.run()
        weights = module_weights(trainer)
        learner_state = trainer.algo.learner_group.get_state(components="learner")["learner"]
    finally:
        trainer.stop()

    assert result.iterations == 3
    # Every task was sampled in every iteration.
    for record in result.history:
        steps = [record["tasks"][name]["env_steps"] for name in config.tasks]
        assert all(s > 0 for s in steps)
    assert result.env_steps == {
        "smax/3m": 96,
        "smax/2s3z": 96,
        "grf/academy_3_vs_1_with_keeper": 24,
    }
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["iteration"] for line in lines] == [1, 2, 3, 3]
    assert "eval_win_rate" in lines[1]["tasks"]["smax/3m"]
    assert "eval_score_rate" in lines[1]["tasks"]["grf/academy_3_vs_1_with_keeper"]
    assert (run_dir / "learning_curves.png").stat().st_size > 10_000
    assert (run_dir / "config.yaml").is_file()
    checkpoint = ckpt.resolve_checkpoint(run_dir)
    assert checkpoint.name == "iter_000003"

    # A fresh algorithm restored from the checkpoint holds identical bytes.
    fresh = Trainer(config, specs, run_dir)
    try:
        fresh.build()
        before = module_weights(fresh)
        fresh.load_checkpoint(run_dir)
        after = module_weights(fresh)
        restored_learner = fresh.algo.learner_group.get_state(components="learner")["learner"]
        runner_state = fresh.algo.env_runner.module.get_state()
    finally:
        fresh.stop()
    assert fresh.iteration == 3 and fresh.env_steps == result.env_steps
    changed = 0
    for module_id, params in weights.items():
        for name, value in params.items():
            np.testing.assert_array_equal(after[module_id][name], value)
            np.testing.assert_array_equal(np.asarray(runner_state[module_id][name]), value)
            changed += not np.array_equal(before[module_id][name], value)
    assert changed > 0, "a fresh build differs from the trained weights before restoring"
    saved_opt, restored_opt = (
        ckpt.split_tree(learner_state["optimizer"])[1],
        ckpt.split_tree(restored_learner["optimizer"])[1],
    )
    assert saved_opt.keys() == restored_opt.keys() and saved_opt
    for key in saved_opt:
        np.testing.assert_array_equal(saved_opt[key], restored_opt[key])


@needs_grf
def test_remote_env_runner_samples_every_task(ray_local, tmp_path):
    config = make_config(
        tmp_path,
        "tasks=[smax/3m,grf/academy_3_vs_1_with_keeper]",
        "cluster.num_env_runners=1",
        "train.max_iterations=1",
        "train.eval_interval=0",
    )
    specs = resolve_tasks(config)
    (tmp_path / "run").mkdir()
    trainer = Trainer(config, specs, tmp_path / "run")
    try:
        trainer.build()
        record = trainer.step()
        workers = trainer.algo.last_report["workers"]
    finally:
        trainer.stop()
    assert [w["index"] for w in workers] == [1]
    assert workers[0]["pid"] != os.getpid()
    assert record["tasks"]["smax/3m"]["env_steps"] == 32
    assert record["tasks"]["grf/academy_3_vs_1_with_keeper"]["env_steps"] == 8


def test_checkpoint_of_another_shape_is_refused_with_both_shapes(ray_local, tmp_path):
    config = make_config(tmp_path, "tasks=[smax/3m]", "train.max_iterations=1")
    specs = resolve_tasks(config)
    (tmp_path / "run").mkdir()
    trainer = Trainer(config, specs, tmp_path / "run")
    try:
        trainer.run()
    finally:
        trainer.stop()
    wider = make_config(tmp_path, "tasks=[smax/3m]", "model.perception_dim=48")
    other = Trainer(wider, specs, tmp_path / "other")
    try:
        other.build()
        with pytest.raises(ckpt.CheckpointError, match=r"shape \[.*\].*needs \[.*\]"):
            other.load_checkpoint(tmp_path / "run")
    finally:
        other.stop()


def test_overwrite_removes_the_previous_runs_records_and_keeps_other_files(tmp_path):
    from marl_shared.training.run import prepare_run_dir

    run = tmp_path / "run"
    (run / "checkpoints" / "iter_000008").mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"iteration": 1}\n')
    (run / "tb").mkdir()
    (run / "notes.txt").write_text("mine")
    prepare_run_dir(run, overwrite=True, resuming=False)
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]
    assert (run / "notes.txt").read_text() == "mine"


def test_resume_changes_only_the_train_keys_named_on_the_command_line(tmp_path, monkeypatch):
    from marl_shared import cli

    started = make_config(tmp_path, "tasks=[smax/3m]", "train.eval_episodes=4")
    composed = make_config(tmp_path, "tasks=[smax/2s3z]", "train.env_steps=900", "algo.lr=0.1")
    monkeypatch.setattr(
        "sys.argv", ["marl-shared train", "resume=x", "train.env_steps=900", "algo.lr=0.1"]
    )
    cli._apply_resume_overrides(started, composed)
    assert started.train.env_steps == 900
    assert started.train.eval_episodes == 4  # kept from the run, not reset to the default
    assert started.tasks == ["smax/3m"] and started.algo.lr == 5e-4


def test_an_evaluation_does_not_depend_on_the_evaluations_before_it(ray_local, tmp_path):
    """Same weights, seed and episode count give the same episodes, whatever ran before."""
    config = make_config(
        tmp_path, "tasks=[smax/3m,smax/2s3z]", "task.backends.smax.eval_num_envs=4"
    )
    trainer = Trainer(config, resolve_tasks(config), tmp_path / "run")
    try:
        trainer.build()
        runner = trainer.algo.env_runner
        fresh = runner.evaluate(4, greedy=False, seed=7)
        runner.evaluate(2, greedy=False, seed=3)  # two environments per task this time
        assert {task.num_envs for task in runner._eval_tasks.values()} == {2}
        again = runner.evaluate(4, greedy=False, seed=7)
        assert {task.num_envs for task in runner._eval_tasks.values()} == {4}
        only = runner.evaluate(4, greedy=False, seed=7, tasks=["smax/2s3z"])
    finally:
        trainer.stop()
    for name in ("smax/3m", "smax/2s3z"):
        assert again[name]["returns"] == fresh[name]["returns"]
        assert again[name]["lengths"] == fresh[name]["lengths"]
    assert set(only) == {"smax/2s3z"}
    assert only["smax/2s3z"]["returns"] == fresh["smax/2s3z"]["returns"]
