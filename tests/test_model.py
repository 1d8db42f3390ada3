"""The shared backbone: one set of tensors, reached by every task's gradient, stepped once."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ray.rllib.policy.sample_batch import MultiAgentBatch, SampleBatch

from marl_shared.algorithms.env_runner import active_agents, greedy_or_sample
from marl_shared.algorithms.mappo import MAPPOConfig
from marl_shared.envs import task_spec
from marl_shared.models import columns as C
from marl_shared.models.networks import MASKED_LOGIT
from marl_shared.models.rl_modules import BACKBONE_ID, build_module_spec, task_module_id

TASKS = ["smax/3m", "smax/2s3z", "grf/academy_3_vs_1_with_keeper"]
MODEL = {
    "perception_dim": 32,
    "backbone_hidden": [16],
    "critic_hidden": [32],
    "head": "action_scoring",
    "recurrent": False,
}


@pytest.fixture(scope="module")
def specs():
    return [task_spec(name) for name in TASKS]


def random_batch(spec, rows=3, steps=4, seed=0):
    """A learner batch [R, T, N, ...] with random but valid contents."""
    rng = np.random.default_rng(seed)
    n, a = spec.num_agents, spec.num_actions
    avail = rng.random((rows, steps, n, a)) < 0.7
    avail[..., spec.noop_action] = True
    actions = np.argmax(avail * rng.random(avail.shape), axis=-1)
    return {
        C.OBS: rng.normal(size=(rows, steps, n, spec.obs_dim)).astype(np.float32),
        C.AVAIL: avail,
        C.PREV_ACTIONS: rng.integers(-1, a, size=(rows, steps, n)),
        C.STATE: rng.normal(size=(rows, steps, spec.state_dim)).astype(np.float32),
        C.ACTIONS: actions,
        C.LOGP: np.full((rows, steps, n), -1.0, np.float32),
        C.VF_PREDS: np.zeros((rows, steps, n), np.float32),
        C.ADVANTAGES: rng.normal(size=(rows, steps, n)).astype(np.float32),
        C.VALUE_TARGETS: rng.normal(size=(rows, steps, n)).astype(np.float32),
        C.ACTIVE: np.ones((rows, steps, n), bool),
        C.RESETS: np.zeros((rows, steps), bool),
    }


def to_torch(batch):
    return {k: torch.as_tensor(v) for k, v in batch.items()}


@pytest.mark.parametrize("head", ["action_scoring", "linear"])
def test_backbone_is_one_set_of_tensors_shared_by_every_task_module(specs, head):
    module = build_module_spec(specs, {**MODEL, "head": head}).build()
    backbone = module[BACKBONE_ID].backbone
    backbone_ptrs = {p.data_ptr() for p in backbone.parameters()}
    assert backbone_ptrs
    for spec in specs:
        task = module[task_module_id(spec.name)]
        assert task.backbone is backbone
        # The backbone is referenced, not owned: none of its tensors in the task's state.
        assert not backbone_ptrs & {p.data_ptr() for p in task.parameters()}
        assert not any("backbone" in key for key in task.state_dict())
    all_params = [p for m in module._rl_modules.values() for p in m.parameters()]
    assert len({p.data_ptr() for p in all_params}) == len(all_params)


@pytest.mark.parametrize("recurrent", [False, True])
def test_a_gradient_from_each_task_reaches_the_backbone(specs, recurrent):
    module = build_module_spec(specs, {**MODEL, "recurrent": recurrent}).build()
    backbone = module[BACKBONE_ID].backbone
    for index, spec in enumerate(specs):
        task = module[task_module_id(spec.name)]
        batch = to_torch(random_batch(spec, seed=index))
        if recurrent:
            batch[C.HIDDEN] = task.initial_hidden((3,))
        for p in backbone.parameters():
            p.grad = None
        out = task.forward_train(batch)
        assert out[C.LOGITS].shape == (3, 4, spec.num_agents, spec.num_actions)
        masked = out[C.LOGITS].masked_select(~batch[C.AVAIL])
        assert torch.all(masked == MASKED_LOGIT)
        torch.log_softmax(out[C.LOGITS], -1).gather(
            -1, batch[C.ACTIONS][..., None]
        ).sum().backward()
        grads = [p.grad for p in backbone.parameters()]
        assert all(g is not None for g in grads), spec.name
        assert sum(float(g.abs().sum()) for g in grads) > 0, spec.name


def test_the_backbone_is_stepped_exactly_once_per_update(specs):
    config = MAPPOConfig()
    config.marl_settings(task_specs=[s.to_dict() for s in specs], model=MODEL)
    learner = config.build_learner()
    learner.build()
    optimizers = list(learner._named_optimizers.values())
    assert len(optimizers) == 1, "one optimizer owns every parameter"
    optimizer = optimizers[0]
    backbone_params = list(learner.module[BACKBONE_ID].parameters())
    grouped = [p for g in optimizer.param_groups for p in g["params"]]
    for p in backbone_params:
        assert sum(q is p for q in grouped) == 1
    before = [p.detach().clone() for p in backbone_params]

    policy_batches = {
        task_module_id(s.name): SampleBatch(random_batch(s, seed=i)) for i, s in enumerate(specs)
    }
    for update in (1, 2):
        learner.update(batch=MultiAgentBatch(policy_batches, env_steps=12))
        # Adam counts its steps per parameter: once per update, not once per task.
        for p in backbone_params:
            assert int(optimizer.state[p]["step"]) == update
    assert any(not torch.equal(b, p) for b, p in zip(before, backbone_params, strict=True))


def test_masked_actions_are_never_sampled():
    generator = torch.Generator().manual_seed(0)
    avail = torch.zeros(512, 3, 6, dtype=torch.bool)
    avail[..., 2] = True
    avail[:256, :, 5] = True
    logits = torch.where(avail, torch.zeros(avail.shape), torch.full(avail.shape, MASKED_LOGIT))
    actions, logp = greedy_or_sample(logits, greedy=False, generator=generator)
    assert set(actions.unique().tolist()) == {2, 5}
    assert torch.all(actions[256:] == 2)
    assert torch.allclose(logp[256:], torch.zeros(256, 3))
    assert torch.allclose(logp[:256], torch.full((256, 3), float(np.log(0.5))))


def test_agents_left_only_the_noop_are_inactive():
    avail = np.zeros((2, 3, 5), bool)
    avail[0, :, :] = True
    avail[1, 0, 4] = True  # only the no-op: dead
    avail[1, 1, [0, 4]] = True
    avail[1, 2, 0] = True  # a single action that is not the no-op: still acting
    assert active_agents(avail, noop_action=4).tolist() == [[True] * 3, [False, True, True]]
