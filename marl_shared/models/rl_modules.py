"""RLlib modules: one module per task plus the shared backbone, held by one MultiRLModule.

This follows the shared-sub-module pattern of RLlib's new API stack: the backbone is
its own ``RLModule`` inside the ``MultiRLModule``; after construction every task module
receives a reference to that one instance, without registering it as its own child, so
the backbone's tensors appear exactly once in ``parameters()`` and in checkpoints.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import torch
from ray.rllib.core.rl_module.multi_rl_module import MultiRLModule, MultiRLModuleSpec
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.core.rl_module.torch.torch_rl_module import TorchRLModule
from ray.rllib.utils.annotations import override

from marl_shared.envs.spec import TaskSpec
from marl_shared.models import columns as C
from marl_shared.models.networks import Critic, Perception, SharedBackbone, mask_logits

BACKBONE_ID = "shared_backbone"
ACTION_SCORING = "action_scoring"
LINEAR = "linear"


def task_module_id(task_name: str) -> str:
    """Module ids double as checkpoint folder names, so the task's slash is replaced."""
    return task_name.replace("/", "__")


def task_name_of(module_id: str) -> str:
    return module_id.replace("__", "/", 1)


class BackboneModule(TorchRLModule):
    """Holds the shared decision layers; task modules call it, it is never sampled alone."""

    @override(TorchRLModule)
    def setup(self) -> None:
        cfg = self.model_config
        self.backbone = SharedBackbone(
            in_dim=cfg["perception_dim"],
            hidden=list(cfg["backbone_hidden"]),
            action_scoring=cfg["head"] == ACTION_SCORING,
        )

    @override(TorchRLModule)
    def _forward(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        return {"decision": self.backbone(batch["features"])}


class TaskModule(TorchRLModule):
    """Perception, head and centralised critic of one task; decisions come from the backbone."""

    @override(TorchRLModule)
    def setup(self) -> None:
        cfg = self.model_config
        self.task = TaskSpec.from_dict(cfg["task"])
        self.head_type = cfg["head"]
        self.recurrent = bool(cfg["recurrent"])
        scoring = self.head_type == ACTION_SCORING
        self.perception = Perception(
            obs_dim=self.task.obs_dim,
            num_agents=self.task.num_agents,
            num_actions=self.task.num_actions,
            hidden_dim=cfg["perception_dim"],
            recurrent=self.recurrent,
            action_scoring=scoring,
        )
        backbone_out = cfg["backbone_hidden"][-1] if cfg["backbone_hidden"] else None
        self.head = None if scoring else torch.nn.Linear(backbone_out, self.task.num_actions)
        self.critic = Critic(
            state_dim=self.task.state_dim,
            num_agents=self.task.num_agents,
            hidden=list(cfg["critic_hidden"]),
        )
        self._backbone_holder: list[BackboneModule] = []

    def attach_backbone(self, backbone: BackboneModule) -> None:
        """Point at the shared instance without making it a child (no duplicate tensors)."""
        self._backbone_holder[:] = [backbone]

    @property
    def backbone(self) -> SharedBackbone:
        if not self._backbone_holder:
            raise RuntimeError(f"task module for {self.task.name} has no backbone attached")
        return self._backbone_holder[0].backbone

    def initial_hidden(self, batch_shape: tuple[int, ...]) -> torch.Tensor:
        return torch.zeros(*batch_shape, self.task.num_agents, self.perception.hidden_dim)

    def decide(self, features: torch.Tensor, avail: torch.Tensor) -> torch.Tensor:
        """Perception features -> masked logits [..., N, A]."""
        out = self.backbone(features)
        logits = out if self.head is None else self.head(out)
        return mask_logits(logits, avail)

    def select_hidden(self, hidden_out: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """The recurrent state carried on is the one of the action actually taken."""
        if self.head is not None:
            return hidden_out
        index = actions.long().clamp(min=0)[..., None, None]
        index = index.expand(*actions.shape, 1, hidden_out.shape[-1])
        return hidden_out.gather(-2, index).squeeze(-2)

    def _act(self, batch: dict[str, Any]) -> dict[str, Any]:
        """One acting step over [B, N, ...] inputs."""
        hidden = batch.get(C.HIDDEN) if self.recurrent else None
        features = self.perception.step(batch[C.OBS], batch[C.PREV_ACTIONS], hidden)
        out = {C.LOGITS: self.decide(features, batch[C.AVAIL])}
        if self.recurrent:
            out[C.HIDDEN_OUT] = features
        if C.STATE in batch:
            out[C.VF_PREDS] = self.critic(batch[C.STATE])
        return out

    @override(TorchRLModule)
    def _forward_inference(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        return self._act(batch)

    @override(TorchRLModule)
    def _forward_exploration(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        return self._act(batch)

    @override(TorchRLModule)
    def _forward_train(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        """Inputs of shape [R, T, N, ...] (R segments of T steps); recurrent ones are unrolled."""
        values = self.critic(batch[C.STATE])
        if not self.recurrent:
            features = self.perception.step(batch[C.OBS], batch[C.PREV_ACTIONS], None)
            return {C.LOGITS: self.decide(features, batch[C.AVAIL]), C.VF_PREDS: values}
        hidden = batch[C.HIDDEN]
        resets = batch[C.RESETS].bool()
        logits = []
        for t in range(batch[C.OBS].shape[1]):
            hidden = torch.where(resets[:, t, None, None], torch.zeros_like(hidden), hidden)
            features = self.perception.step(batch[C.OBS][:, t], batch[C.PREV_ACTIONS][:, t], hidden)
            logits.append(self.decide(features, batch[C.AVAIL][:, t]))
            hidden = self.select_hidden(features, batch[C.ACTIONS][:, t])
        return {C.LOGITS: torch.stack(logits, dim=1), C.VF_PREDS: values}


class SharedBackboneMultiModule(MultiRLModule):
    """Task modules plus the one backbone they all reference."""

    @override(MultiRLModule)
    def setup(self) -> None:
        super().setup()
        if BACKBONE_ID not in self._rl_modules:
            raise ValueError(f"the multi-task module needs a {BACKBONE_ID!r} sub-module")
        backbone = self._rl_modules[BACKBONE_ID]
        for module_id, module in self._rl_modules.items():
            if module_id != BACKBONE_ID:
                module.attach_backbone(backbone)

    def task_ids(self) -> list[str]:
        return [mid for mid in self._rl_modules if mid != BACKBONE_ID]

    def _route(self, batch: dict[str, Any], forward_type: str, **kwargs) -> dict[str, Any]:
        return {
            mid: getattr(self._rl_modules[mid], forward_type)(task_batch, **kwargs)
            for mid, task_batch in batch.items()
            if mid != BACKBONE_ID
        }

    @override(MultiRLModule)
    def _forward_inference(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        return self._route(batch, "forward_inference", **kwargs)

    @override(MultiRLModule)
    def _forward_exploration(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        return self._route(batch, "forward_exploration", **kwargs)

    @override(MultiRLModule)
    def _forward_train(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        return self._route(batch, "forward_train", **kwargs)


def _placeholder_spaces(spec: TaskSpec | None) -> tuple[gym.Space, gym.Space]:
    if spec is None:
        return gym.spaces.Box(-1.0, 1.0, (1,), np.float32), gym.spaces.Discrete(1)
    obs = gym.spaces.Box(-np.inf, np.inf, (spec.num_agents, spec.obs_dim), np.float32)
    return obs, gym.spaces.MultiDiscrete([spec.num_actions] * spec.num_agents)


def build_module_spec(tasks: list[TaskSpec], model: dict[str, Any]) -> MultiRLModuleSpec:
    """The MultiRLModuleSpec for these tasks and the ``model`` config group."""
    base = {
        "perception_dim": int(model["perception_dim"]),
        "backbone_hidden": [int(h) for h in model["backbone_hidden"]],
        "critic_hidden": [int(h) for h in model["critic_hidden"]],
        "head": str(model["head"]),
        "recurrent": bool(model["recurrent"]),
    }
    if base["head"] not in (ACTION_SCORING, LINEAR):
        raise ValueError(
            f"model.head must be {ACTION_SCORING!r} or {LINEAR!r}, not {base['head']!r}"
        )
    if base["head"] == LINEAR and not base["backbone_hidden"]:
        raise ValueError("model.backbone_hidden needs at least one layer for the linear head")
    obs, act = _placeholder_spaces(None)
    specs = {
        BACKBONE_ID: RLModuleSpec(
            module_class=BackboneModule,
            observation_space=obs,
            action_space=act,
            model_config=dict(base),
        )
    }
    for spec in tasks:
        obs, act = _placeholder_spaces(spec)
        specs[task_module_id(spec.name)] = RLModuleSpec(
            module_class=TaskModule,
            observation_space=obs,
            action_space=act,
            model_config={**base, "task": spec.to_dict()},
        )
    return MultiRLModuleSpec(multi_rl_module_class=SharedBackboneMultiModule, rl_module_specs=specs)
