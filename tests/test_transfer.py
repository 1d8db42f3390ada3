"""Transfer of a pre-trained shared backbone: frozen bytes stay, fine-tuning moves slowly."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from marl_shared.cli import CONF_DIR
from marl_shared.models.rl_modules import BACKBONE_ID, task_module_id
from marl_shared.training import checkpoint as ckpt
from marl_shared.training.config import validate_config
from marl_shared.training.run import Trainer, resolve_tasks
from marl_shared.transfer.backbone import (
    backbone_bytes,
    backbone_freeze_state,
    module_state,
    read_pretrained,
)
from marl_shared.transfer.run import TransferTrainer, validate_transfer_config

TINY = [
    "algo.rollout_length=8",
    "algo.num_epochs=2",
    "task.backends.smax.num_envs=4",
    "task.backends.smax.eval_num_envs=2",
    "task.backends.grf.num_envs=1",
    "task.backends.grf.eval_num_envs=1",
    "train.eval_episodes=2",
    "train.eval_interval=0",
    "train.checkpoint_interval=2",
    "model.perception_dim=32",
    "model.critic_hidden=[32]",
    "train.progress=false",
]


def compose_config(name: str, *overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name=name, overrides=[*TINY, *overrides])


def run_cli(*args: str):
    """The real command line in its own process: exit code, stdout and stderr."""
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "marl_shared.cli", *args],
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def pretrained_run(ray_local, tmp_path_factory):
    """Two iterations of smax/3m: a real checkpoint of our format to transfer from."""
    run_dir = tmp_path_factory.mktemp("pretrain") / "run"
    config = validate_config(
        compose_config("train", "tasks=[smax/3m]", "train.max_iterations=2", f"run_dir={run_dir}")
    )
    run_dir.mkdir()
    trainer = Trainer(config, resolve_tasks(config), run_dir)
    try:
        trainer.run()
    finally:
        trainer.stop()
    return run_dir


def transfer_trainer(tmp_path, source, *overrides):
    config, settings = validate_transfer_config(
        compose_config(
            "transfer",
            f"from={source}",
            f"run_dir={tmp_path / 'transfer'}",
            "tasks=[smax/2s3z]",
            *overrides,
        )
    )
    (tmp_path / "transfer").mkdir(exist_ok=True)
    pretrained = read_pretrained(settings.source) if settings.backbone != "scratch" else None
    return TransferTrainer(
        config, resolve_tasks(config), tmp_path / "transfer", settings, pretrained
    )


def saved_backbone(run_dir) -> dict[str, bytes]:
    modules = ckpt.load_module_state(ckpt.resolve_checkpoint(run_dir))
    return {k: np.ascontiguousarray(v).tobytes() for k, v in modules[BACKBONE_ID].items()}


def test_frozen_backbone_bytes_do_not_change(pretrained_run, tmp_path):
    trainer = transfer_trainer(
        tmp_path, pretrained_run, "backbone=frozen", "train.max_iterations=2"
    )
    try:
        trainer.build()
        loaded = backbone_bytes(trainer.algo)
        perception_before = module_state(trainer.algo)[task_module_id("smax/2s3z")]
        freeze = backbone_freeze_state(trainer.algo)
        result = trainer.run()
        after = backbone_bytes(trainer.algo)
        perception_after = module_state(trainer.algo)[task_module_id("smax/2s3z")]
        runner = trainer.algo.env_runner.module[BACKBONE_ID].get_state()
    finally:
        trainer.stop()

    assert loaded == saved_backbone(pretrained_run), "the backbone was not loaded"
    assert freeze["requires_grad"] and not any(freeze["requires_grad"])
    assert freeze["backbone_in_optimizer"] == 0
    assert result.iterations == 2
    assert after == loaded
    assert {k: np.asarray(v).tobytes() for k, v in runner.items()} == loaded
    moved = [
        k
        for k in perception_before
        if not np.array_equal(perception_before[k], perception_after[k])
    ]
    assert moved, "the new task's own layers did not learn"
    # The transfer's own checkpoint records where the backbone came from.
    manifest = ckpt.read_manifest(ckpt.resolve_checkpoint(tmp_path / "transfer"))
    assert manifest["transfer"]["backbone"] == "frozen"
    assert manifest["transfer"]["source_tasks"] == ["smax/3m"]
    assert json.loads((tmp_path / "transfer" / "transfer.json").read_text())["loaded"][
        "backbone_tensors"
    ] == len(loaded)


def test_finetuned_backbone_learns_at_the_reduced_rate(pretrained_run, tmp_path):
    trainer = transfer_trainer(
        tmp_path,
        pretrained_run,
        "backbone=finetune",
        "backbone_lr_scale=0.1",
        "algo.lr=0.001",
        "train.max_iterations=2",
    )
    try:
        trainer.build()
        loaded = backbone_bytes(trainer.algo)
        freeze = backbone_freeze_state(trainer.algo)
        trainer.run()
        after = backbone_bytes(trainer.algo)
    finally:
        trainer.stop()

    assert loaded == saved_backbone(pretrained_run)
    assert all(freeze["requires_grad"])
    groups = freeze["optimizer_groups"]
    backbone_groups = [g for g in groups if g["backbone_params"]]
    assert len(backbone_groups) == 1
    assert backbone_groups[0]["backbone_params"] == len(freeze["requires_grad"])
    assert backbone_groups[0]["lr"] == pytest.approx(0.001 * 0.1)
    assert [g["lr"] for g in groups if not g["backbone_params"]] == [pytest.approx(0.001)]
    assert after != loaded


def test_reused_perception_layers_start_from_the_pretrained_task(pretrained_run, tmp_path):
    trainer = transfer_trainer(
        tmp_path, pretrained_run, "tasks=[smax/3m]", "reuse_perception={smax/3m:smax/3m}"
    )
    try:
        trainer.build()
        mine = module_state(trainer.algo)[task_module_id("smax/3m")]
    finally:
        trainer.stop()
    saved = ckpt.load_module_state(ckpt.resolve_checkpoint(pretrained_run))["smax__3m"]
    perception = [k for k in saved if k.startswith("perception.")]
    assert perception
    for key in perception:
        np.testing.assert_array_equal(mine[key], saved[key])
    assert trainer.load_report.perception == {"smax/3m": "smax/3m"}
    # The critic is fresh: only perception layers were asked for.
    critic = [k for k in saved if k.startswith("critic.")]
    assert any(not np.array_equal(mine[k], saved[k]) for k in critic)


def test_backbone_of_another_shape_is_refused_naming_both_shapes(pretrained_run, tmp_path):
    trainer = transfer_trainer(tmp_path, pretrained_run, "model.backbone_hidden=[48]")
    try:
        with pytest.raises(ckpt.CheckpointError) as error:
            trainer.build()
    finally:
        trainer.stop()
    message = str(error.value)
    assert "backbone.layers.0.weight [64, 32]" in message
    assert "backbone.layers.0.weight [48, 32]" in message
    assert "\n" not in message


def test_corrupt_checkpoint_ends_the_command_with_one_sentence(pretrained_run, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(pretrained_run, broken)
    weights = ckpt.resolve_checkpoint(broken) / ckpt.MODULES
    weights.write_bytes(weights.read_bytes()[:100])
    done = run_cli("transfer", f"from={broken}", f"run_dir={tmp_path / 'never'}", "tasks=[smax/3m]")
    assert done.returncode == 2
    err = done.stderr.strip().splitlines()
    assert len(err) == 1 and "corrupt" in err[0]
    assert not (tmp_path / "never").exists()


def test_transfer_without_a_source_is_a_config_error(tmp_path):
    done = run_cli("transfer", f"run_dir={tmp_path / 'never'}")
    assert done.returncode == 2
    assert "from=" in done.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_transfer_vs_scratch_protocol_runs_end_to_end(ray_local, tmp_path):
    from marl_shared.transfer.experiment import run_comparison

    out = tmp_path / "tvs"
    config, settings = validate_transfer_config(
        compose_config(
            "transfer",
            "experiment=transfer_vs_scratch",
            f"run_dir={out}",
            "tasks=[smax/3m]",
            "comparison.seeds=[0,1]",
            "comparison.pretrain.tasks=[smax/2s3z]",
            "comparison.pretrain.env_steps=300",
            "train.env_steps=300",
            "train.eval_interval=2",
            "task.backends.smax.num_envs=4",
            "task.backends.smax.eval_num_envs=2",
        )
    )
    run_comparison(config, settings)
    table = json.loads((out / "comparison.json").read_text())
    rows = table["tasks"]["smax/3m"]
    assert set(rows) == {"frozen", "finetune", "scratch"}
    for row in rows.values():
        assert row["final_rate"]["of"] == 2 and row["final_rate"]["n"] == 2
        assert 0.0 <= row["final_rate"]["mean"] <= 1.0
    assert "| smax/3m | frozen | 2 |" in (out / "comparison.md").read_text()
    # Seeds run outermost, so a protocol stopped part-way has every mode on its seeds.
    finished = {
        seed: [(out / f"runs/smax__3m/{mode}/seed_{seed}/result.json").stat().st_mtime
               for mode in rows]
        for seed in (0, 1)
    }  # fmt: skip
    assert max(finished[0]) <= min(finished[1])
    assert (out / "comparison.png").stat().st_size > 5_000
    frozen = ckpt.load_module_state(ckpt.resolve_checkpoint(out / "runs/smax__3m/frozen/seed_0"))
    source = ckpt.load_module_state(ckpt.resolve_checkpoint(out / "pretrain"))
    for name, value in source[BACKBONE_ID].items():
        np.testing.assert_array_equal(frozen[BACKBONE_ID][name], value)
