"""Evaluate, render and export a trained policy; the exported Policy acts like the trainer's."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import gfootball_available
from hydra import compose, initialize_config_dir

from marl_shared.analysis.evaluate import evaluate
from marl_shared.cli import CONF_DIR
from marl_shared.envs import task_spec
from marl_shared.export import export_policy
from marl_shared.models import columns as C
from marl_shared.models.rl_modules import build_module_spec, task_module_id
from marl_shared.policy import Policy, PolicyError
from marl_shared.training import checkpoint as ckpt
from marl_shared.training.config import ConfigError, validate_config
from marl_shared.training.run import Trainer, resolve_tasks

GRF_TASK = "grf/academy_3_vs_1_with_keeper"
TINY = [
    "algo.rollout_length=8",
    "algo.num_epochs=1",
    "task.backends.smax.num_envs=4",
    "task.backends.grf.num_envs=1",
    "train.eval_interval=0",
    "train.eval_episodes=2",
    "model.perception_dim=32",
    "model.critic_hidden=[32]",
    "model.recurrent=true",
    "train.progress=false",
    "train.max_iterations=2",
]


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
def trained_run(ray_local, tmp_path_factory):
    """Two iterations of a recurrent model on SMAX (and football when its engine is built)."""
    tasks = ["smax/3m", GRF_TASK] if gfootball_available() else ["smax/3m"]
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(
            config_name="train",
            overrides=[*TINY, f"tasks=[{','.join(tasks)}]", f"run_dir={run_dir}"],
        )
    config = validate_config(cfg)
    run_dir.mkdir()
    trainer = Trainer(config, resolve_tasks(config), run_dir)
    try:
        trainer.run()
    finally:
        trainer.stop()
    return run_dir


@pytest.mark.parametrize(
    "head,recurrent", [("action_scoring", False), ("action_scoring", True), ("linear", True)]
)
def test_policy_acts_exactly_like_the_rllib_module(head, recurrent):
    spec = task_spec("smax/3m")
    model = {
        "perception_dim": 16,
        "backbone_hidden": [8],
        "critic_hidden": [8],
        "head": head,
        "recurrent": recurrent,
    }
    torch.manual_seed(3)
    rllib = build_module_spec([spec], model).build()
    state = {
        mid: {k: v.detach().numpy() for k, v in module.state_dict().items()}
        for mid, module in rllib._rl_modules.items()
    }
    policy = Policy([spec], model, state, source="test")

    rng = np.random.default_rng(0)
    obs = rng.normal(size=(5, spec.num_agents, spec.obs_dim)).astype(np.float32)
    avail = rng.random((5, spec.num_agents, spec.num_actions)) < 0.6
    avail[..., spec.noop_action] = True
    prev = rng.integers(-1, spec.num_actions, size=(5, spec.num_agents))
    module = rllib[task_module_id("smax/3m")]
    batch = {C.OBS: torch.from_numpy(obs), C.AVAIL: torch.from_numpy(avail)}
    batch[C.PREV_ACTIONS] = torch.from_numpy(prev)
    hidden = policy.initial_hidden("smax/3m", 5)
    if recurrent:
        hidden = torch.randn_like(hidden)
        batch[C.HIDDEN] = hidden
    with torch.no_grad():
        expected = module.forward_inference(batch)
    out = policy.act("smax/3m", obs, avail, prev, hidden=hidden, greedy=True)

    np.testing.assert_array_equal(out.logits, expected[C.LOGITS].numpy())
    np.testing.assert_array_equal(out.actions, expected[C.LOGITS].argmax(-1).numpy())
    assert avail[np.arange(5)[:, None], np.arange(spec.num_agents), out.actions].all()
    if recurrent:
        carried = module.select_hidden(expected[C.HIDDEN_OUT], torch.from_numpy(out.actions))
        np.testing.assert_array_equal(out.hidden.numpy(), carried.numpy())
    with pytest.raises(PolicyError, match=r"shape \[B, 3, "):
        policy.act("smax/3m", obs[:, :2], avail)
    with pytest.raises(PolicyError, match="holds smax/3m"):
        policy.act("smax/8m", obs, avail)


def test_export_loads_without_ray_and_acts_like_the_checkpoint(trained_run, tmp_path):
    out = export_policy(trained_run, tmp_path / "export")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "marl-shared-policy"
    assert not any(".critic." in key or "/critic." in key for key in manifest["shapes"])
    assert "shared_backbone/backbone.layers.0.weight" in manifest["shapes"]
    assert [t["name"] for t in manifest["tasks"]][0] == "smax/3m"
    assert not list(tmp_path.glob(".export.tmp-*"))

    from_export = Policy.load(out)
    from_checkpoint = Policy.load(trained_run)
    spec = from_export.spec("smax/3m")
    rng = np.random.default_rng(1)
    obs = rng.normal(size=(4, spec.num_agents, spec.obs_dim)).astype(np.float32)
    avail = np.ones((4, spec.num_agents, spec.num_actions), dtype=bool)
    a = from_export.act("smax/3m", obs, avail)
    b = from_checkpoint.act("smax/3m", obs, avail)
    np.testing.assert_array_equal(a.logits, b.logits)
    np.testing.assert_array_equal(a.hidden.numpy(), b.hidden.numpy())

    # A second export into the same folder is refused; a corrupt one is one sentence.
    with pytest.raises(Exception, match="already holds files"):
        export_policy(trained_run, out)
    # Flipped bytes that still decode as safetensors are caught by the recorded sha256.
    weights = out / "policy.safetensors"
    data = bytearray(weights.read_bytes())
    data[-64:] = bytes(255 - b for b in data[-64:])
    weights.write_bytes(bytes(data))
    with pytest.raises(PolicyError, match="does not match its sha256"):
        Policy.load(out)


def test_evaluate_reports_rates_with_intervals_and_is_reproducible(trained_run):
    report = evaluate(trained_run, episodes=2, seed=5, num_envs=2)
    again = evaluate(trained_run, ["smax/3m"], episodes=2, seed=5, num_envs=2)
    assert report["tasks"]["smax/3m"] == again["tasks"]["smax/3m"]
    for name, values in report["tasks"].items():
        assert values["episodes"] == 2
        low, high = values["rate_ci95"]
        assert 0.0 <= low <= values["rate"] <= high <= 1.0
        assert values["length_mean"] >= 1
        expected = "score_rate" if name.startswith("grf/") else "win_rate"
        assert values["rate_name"] == expected
    stochastic = evaluate(trained_run, ["smax/3m"], episodes=3, greedy=False, seed=5, num_envs=2)
    assert list(stochastic["tasks"]) == ["smax/3m"] and stochastic["greedy"] is False


def test_evaluate_command_writes_json_and_refuses_unknown_tasks(trained_run, tmp_path):
    out = tmp_path / "eval.json"
    done = run_cli(
        "evaluate", f"checkpoint={trained_run}", "tasks=[smax/3m]", "episodes=2", f"out={out}"
    )
    assert done.returncode == 0, done.stderr
    data = json.loads(out.read_text())
    assert data["tasks"]["smax/3m"]["episodes"] == 2
    assert "smax/3m" in done.stdout
    done = run_cli("evaluate", f"checkpoint={trained_run}", "tasks=[smax/8m]", "episodes=2")
    assert done.returncode == 2
    assert "has no task 'smax/8m'" in done.stderr.strip().splitlines()[-1]


def test_checkpoint_with_corrupt_manifest_is_one_sentence(trained_run, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(trained_run, broken)
    manifest = ckpt.resolve_checkpoint(broken) / ckpt.MANIFEST
    manifest.write_text("{not json")
    with pytest.raises(
        ckpt.CheckpointError, match="corrupt|unreadable manifest|No complete checkpoint"
    ):
        Policy.load(broken)


def _colour_pixels(image, rgb) -> int:
    pixels = np.asarray(image.convert("RGB")).reshape(-1, 3).astype(int)
    return int((np.abs(pixels - np.asarray(rgb)).sum(axis=1) < 40).sum())


def test_render_writes_a_gif_of_a_smax_episode_with_both_teams(trained_run, tmp_path):
    from PIL import Image

    from marl_shared.analysis.render import record_episode, save_gif

    policy = Policy.load(trained_run)
    frames, summary = record_episode(policy, "smax/3m", seed=2, max_steps=12)
    assert 2 <= len(frames) <= 13 and summary["steps"] >= 1
    assert not np.array_equal(np.asarray(frames[0]), np.asarray(frames[-1])), "units never moved"
    assert _colour_pixels(frames[0], (31, 119, 180)) > 20  # allies (tab:blue)
    assert _colour_pixels(frames[0], (214, 39, 40)) > 20  # enemies (tab:red)
    path = save_gif(frames, tmp_path / "3m.gif")
    with Image.open(path) as gif:
        assert gif.format == "GIF" and gif.n_frames == len(frames)


def test_render_refuses_a_step_limit_below_one(trained_run):
    from marl_shared.analysis.render import record_episode

    with pytest.raises(ConfigError, match="max_steps >= 1"):
        record_episode(Policy.load(trained_run), "smax/3m", max_steps=0)


@pytest.mark.skipif(not gfootball_available(), reason="football engine not built")
def test_render_draws_the_football_pitch_from_raw_observations(trained_run, tmp_path):
    from marl_shared.analysis.render import record_episode

    policy = Policy.load(trained_run)
    frames, summary = record_episode(policy, GRF_TASK, seed=1, max_steps=6)
    assert len(frames) >= 2
    assert _colour_pixels(frames[0], (0x3A, 0x7D, 0x44)) > 1000  # the pitch
    assert _colour_pixels(frames[0], (214, 39, 40)) > 5  # the keeper
