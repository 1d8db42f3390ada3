"""Continual-learning metrics, layer dynamics, the replay buffer, FPF, and a real task stream."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from marl_shared.continual import metrics
from marl_shared.continual.dynamics import DynamicsTracker, flatten_layers, layer_name
from marl_shared.continual.fpf import FPFSettings, finetune_layers, select_layers
from marl_shared.continual.replay import ReplayBuffer
from marl_shared.models import columns as C

# R[j, i]: task i after stage j.
R = [
    [0.8, 0.1, 0.0],
    [0.5, 0.9, 0.2],
    [0.6, 0.3, 0.7],
]


def test_average_final_forgetting_and_transfer_by_hand():
    assert metrics.average_final(R) == pytest.approx((0.6 + 0.3 + 0.7) / 3)
    # Task 0: best before the end 0.8, final 0.6 -> 0.2; task 1: best 0.9, final 0.3 -> 0.6.
    assert metrics.average_forgetting(R) == pytest.approx((0.2 + 0.6) / 2)
    # BWT: (0.6 - 0.8 + 0.3 - 0.9) / 2.
    assert metrics.backward_transfer(R) == pytest.approx(-0.4)
    # FWT with untrained b = (0, 0.05, 0.1): (0.1 - 0.05 + 0.2 - 0.1) / 2.
    assert metrics.forward_transfer(R, [0.0, 0.05, 0.1]) == pytest.approx(0.075)


def test_metrics_of_a_single_stage_and_a_non_square_matrix():
    assert metrics.average_forgetting([[0.5]]) == 0.0
    assert metrics.backward_transfer([[0.5]]) == 0.0
    with pytest.raises(ValueError, match="square"):
        metrics.average_final([[0.1, 0.2]])


def test_layer_names_strip_weight_and_bias_only():
    assert (
        layer_name("smax__3m", "perception.input_layer.weight") == "smax__3m/perception.input_layer"
    )
    assert layer_name("smax__3m", "perception.cell.weight_hh") == "smax__3m/perception.cell"
    assert layer_name("smax__3m", "perception.candidate_action") == (
        "smax__3m/perception.candidate_action"
    )


def test_dynamics_measures_size_normalised_l1_change_per_layer_and_stage():
    state0 = {"m": {"a.weight": np.zeros((2, 2)), "a.bias": np.zeros(2), "b.weight": np.zeros(4)}}
    state1 = {"m": {"a.weight": np.ones((2, 2)), "a.bias": np.zeros(2), "b.weight": np.zeros(4)}}
    state2 = {"m": {"a.weight": np.ones((2, 2)), "a.bias": np.zeros(2), "b.weight": -np.ones(4)}}
    assert set(flatten_layers(state0)) == {"m/a", "m/b"}
    tracker = DynamicsTracker()
    tracker.begin(state0)
    tracker.begin_stage(state0)
    assert tracker.end_stage(state1, 0, "t0") == {"m/a": 4 / 6, "m/b": 0.0}
    tracker.begin_stage(state1)
    assert tracker.end_stage(state2, 1, "t1") == {"m/a": 0.0, "m/b": 1.0}
    assert tracker.total(state2) == {"m/a": 4 / 6, "m/b": 1.0}
    assert tracker.sensitivity() == {"m/a": pytest.approx(1 / 3), "m/b": 0.5}


def test_fpf_picks_the_most_sensitive_policy_layers_never_critics():
    sensitivity = {
        "t/critic.net.0.0": 9.0,
        "t/perception.input_layer": 0.5,
        "shared_backbone/backbone.layers.0": 2.0,
        "shared_backbone/backbone.score": 1.0,
    }
    chosen = select_layers(sensitivity, FPFSettings(num_modules=2))
    assert chosen == ["shared_backbone/backbone.layers.0", "shared_backbone/backbone.score"]
    named = select_layers(sensitivity, FPFSettings(modules=["shared_backbone"]))
    assert sorted(named) == ["shared_backbone/backbone.layers.0", "shared_backbone/backbone.score"]
    with pytest.raises(ValueError, match="matches no policy layer"):
        select_layers(sensitivity, FPFSettings(modules=["nope"]))


def test_replay_buffer_keeps_a_bounded_even_share_per_task():
    buffer = ReplayBuffer(capacity=20, seed=0)

    def rows(n, value):
        return {C.OBS: np.full((n, 1), value, np.float32)}

    buffer.add("a", rows(50, 1.0))
    assert buffer.size("a") == 20
    buffer.add("b", rows(50, 2.0))
    assert buffer.size("a") == 10 and buffer.size("b") == 10
    assert set(np.unique(buffer.data["b"][C.OBS])) == {2.0}
    assert buffer.tasks() == ["a", "b"]


def _tiny_module():
    from marl_shared.envs.spec import TaskSpec
    from marl_shared.models.rl_modules import build_module_spec

    spec = TaskSpec("smax/x", "smax", 2, 3, 4, 4, 10, "win", 0)
    model = {
        "perception_dim": 8,
        "backbone_hidden": [8],
        "critic_hidden": [8],
        "head": "action_scoring",
        "recurrent": False,
    }
    torch.manual_seed(0)
    return build_module_spec([spec], model).build()


def test_fpf_finetune_moves_only_chosen_layers_and_lowers_the_replay_loss():
    multi = _tiny_module()
    rng = np.random.default_rng(0)
    n = 64
    data = {
        C.OBS: rng.normal(size=(n, 2, 3)).astype(np.float32),
        C.AVAIL: np.ones((n, 2, 4), bool),
        C.PREV_ACTIONS: rng.integers(-1, 4, size=(n, 2)),
        C.ACTIONS: rng.integers(0, 4, size=(n, 2)),
        C.ACTIVE: np.ones((n, 2), bool),
    }
    # Targets: the policy with a perturbed first backbone layer, which FPF must recover.
    layer = multi["shared_backbone"].backbone.layers[0]
    original = layer.weight.detach().clone()
    with torch.no_grad():
        layer.weight.add_(0.5 * torch.randn_like(layer.weight))
        task = multi["smax__x"]
        features = task.perception.step(
            torch.from_numpy(data[C.OBS]), torch.from_numpy(data[C.PREV_ACTIONS]), None
        )
        data[C.LOGITS] = task.decide(features, torch.from_numpy(data[C.AVAIL])).numpy()
        layer.weight.copy_(original)
    before = {k: v.clone() for k, v in multi["shared_backbone"].state_dict().items()}
    perception_before = multi["smax__x"].perception.input_layer.weight.detach().clone()
    result = finetune_layers(
        multi,
        ["shared_backbone/backbone.layers.0"],
        {"smax/x": data},
        FPFSettings(steps=60, batch_size=32, lr=1e-2),
        seed=0,
    )
    after = multi["shared_backbone"].state_dict()
    assert result["loss_after"] < 0.5 * result["loss_before"]
    assert not torch.equal(after["backbone.layers.0.weight"], before["backbone.layers.0.weight"])
    assert torch.equal(after["backbone.score.weight"], before["backbone.score.weight"])
    assert torch.equal(multi["smax__x"].perception.input_layer.weight, perception_before)


@pytest.mark.slow
def test_stream_of_two_smax_maps_records_matrix_dynamics_fpf_and_kfpf(ray_local, tmp_path):
    from hydra import compose, initialize_config_dir

    from marl_shared.cli import CONF_DIR
    from marl_shared.continual.stream import StreamRunner, split_config

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(
            config_name="continual",
            overrides=[
                "tasks=[smax/3m,smax/2s3z]",
                f"run_dir={tmp_path}",
                "algo.rollout_length=8",
                "algo.num_epochs=2",
                "task.backends.smax.num_envs=4",
                "task.backends.smax.eval_num_envs=2",
                "model.perception_dim=32",
                "model.critic_hidden=[32]",
                "continual.stage_env_steps=64",
                "continual.eval_episodes=2",
                "continual.dynamics_interval=1",
                "continual.buffer.collect_interval=1",
                "continual.buffer.collect_steps=4",
                "continual.buffer.collect_envs=2",
                "continual.fpf.steps=5",
                "continual.fpf.batch_size=16",
                "continual.kfpf.k=2",
            ],
        )
    config, settings = split_config(cfg)
    runner = StreamRunner(config, settings, tmp_path)
    try:
        results = runner.run()
    finally:
        runner.stop()
    assert set(results["methods"]) == {"sequential", "fpf", "kfpf"}
    for data in results["methods"].values():
        assert np.asarray(data["rate_matrix"]).shape == (2, 2)
        assert set(data["summary"]) >= {"average_final", "average_forgetting", "backward_transfer"}
    assert len(results["methods"]["kfpf"]["fpf_runs"]) == 2
    fpf_run = results["methods"]["fpf"]["fpf_runs"][0]
    assert fpf_run["loss_after"] <= fpf_run["loss_before"]
    assert set(fpf_run["buffer_rows"]) == {"smax/3m", "smax/2s3z"}
    dynamics = json.loads((tmp_path / "dynamics.json").read_text())
    # In stage 1 only 2s3z is trained: 3m's own layers do not move, the backbone does.
    stage1 = dynamics["stages"][1]["change"]
    assert stage1["smax__3m/perception.input_layer"] == 0.0
    assert stage1["shared_backbone/backbone.layers.0"] > 0.0
    for name in ("continual.md", "continual.json", "accuracy_matrix.png", "dynamics.png"):
        assert (tmp_path / name).is_file()
