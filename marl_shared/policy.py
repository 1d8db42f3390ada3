"""A trained multi-task policy outside the trainer: plain torch, no Ray, no pickle.

``Policy.load(path)`` reads an export (``marl-shared export``) or one of our training
checkpoints, rebuilds each task's perception layers and head around the one shared
backbone, and acts on raw batched observations and action masks::

    policy = Policy.load("exports/my_policy")
    out = policy.act("smax/3m", obs, avail, prev_actions, greedy=True)
    out.actions  # [B, N] ints

The module layout mirrors ``marl_shared.models.rl_modules`` (same attribute names, so
the same parameter keys), built from ``marl_shared.models.networks`` only, which keeps
this file importable without RLlib. Weights are read with safetensors and metadata
with JSON, so loading never runs code from the files.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load_file
from torch import nn

from marl_shared.envs.spec import TaskSpec
from marl_shared.models.networks import Critic, Perception, SharedBackbone, mask_logits
from marl_shared.training import checkpoint as ckpt

logger = logging.getLogger(__name__)

POLICY_FORMAT = "marl-shared-policy"
POLICY_FORMAT_VERSION = 1
POLICY_MANIFEST = "manifest.json"
POLICY_WEIGHTS = "policy.safetensors"
BACKBONE_ID = "shared_backbone"  # the same id as in rl_modules, kept here to avoid RLlib
ACTION_SCORING = "action_scoring"


def module_id_of(task_name: str) -> str:
    """The module id a task's weights are stored under (``smax/3m`` -> ``smax__3m``)."""
    return task_name.replace("/", "__")


class TaskPolicyModule(nn.Module):
    """One task's perception layers, head and (optionally) critic, around a shared backbone."""

    def __init__(self, spec: TaskSpec, model: dict[str, Any], *, with_critic: bool) -> None:
        super().__init__()
        scoring = model["head"] == ACTION_SCORING
        self.spec = spec
        self.recurrent = bool(model["recurrent"])
        self.perception = Perception(
            obs_dim=spec.obs_dim,
            num_agents=spec.num_agents,
            num_actions=spec.num_actions,
            hidden_dim=int(model["perception_dim"]),
            recurrent=self.recurrent,
            action_scoring=scoring,
        )
        hidden = list(model["backbone_hidden"])
        self.head = None if scoring else nn.Linear(hidden[-1], spec.num_actions)
        self.critic = (
            Critic(
                state_dim=spec.state_dim,
                num_agents=spec.num_agents,
                hidden=list(model["critic_hidden"]),
            )
            if with_critic
            else None
        )


class BackboneHolder(nn.Module):
    """Holds the shared layers under the attribute name the RLlib module uses."""

    def __init__(self, model: dict[str, Any]) -> None:
        super().__init__()
        self.backbone = SharedBackbone(
            in_dim=int(model["perception_dim"]),
            hidden=list(model["backbone_hidden"]),
            action_scoring=model["head"] == ACTION_SCORING,
        )


@dataclass
class PolicyOutput:
    """What one acting step returns; ``hidden`` goes back into the next call (recurrent only)."""

    actions: np.ndarray  # [B, N] int64
    log_probs: np.ndarray  # [B, N] log-probability of the chosen actions
    logits: np.ndarray  # [B, N, A] masked logits
    hidden: torch.Tensor | None  # [B, N, H] recurrent state to carry on, or None


class PolicyError(ValueError):
    """A policy export is missing, corrupt or asked for a task it does not hold; one sentence."""


class Policy:
    """The shared backbone plus every task's perception layers and head, ready to act."""

    def __init__(
        self,
        specs: list[TaskSpec],
        model: dict[str, Any],
        weights: dict[str, dict[str, np.ndarray]],
        *,
        source: str = "",
    ) -> None:
        self.specs = {spec.name: spec for spec in specs}
        self.model = dict(model)
        self.source = source
        has_critic = any(
            key.startswith("critic.")
            for mid, p in weights.items()
            for key in p
            if mid != BACKBONE_ID
        )
        self.backbone = BackboneHolder(self.model)
        self.tasks = nn.ModuleDict(
            {
                module_id_of(spec.name): TaskPolicyModule(spec, self.model, with_critic=has_critic)
                for spec in specs
            }
        )
        self._load(weights)
        self.backbone.eval()
        self.tasks.eval()

    # ----------------------------------------------------------------- loading

    def _load(self, weights: dict[str, dict[str, np.ndarray]]) -> None:
        modules: dict[str, nn.Module] = {BACKBONE_ID: self.backbone, **self.tasks}
        for module_id, module in modules.items():
            saved = weights.get(module_id)
            if saved is None:
                raise PolicyError(f"{self.source} holds no weights for module {module_id!r}.")
            expected = module.state_dict()
            missing = sorted(set(expected) - set(saved))
            if missing:
                raise PolicyError(
                    f"{self.source} lacks {module_id}/{missing[0]} (and {len(missing) - 1} more)."
                )
            state = {}
            for name, target in expected.items():
                value = saved[name]
                if tuple(value.shape) != tuple(target.shape):
                    raise PolicyError(
                        f"{self.source} has {module_id}/{name} of shape {list(value.shape)}, "
                        f"its manifest's model needs {list(target.shape)}."
                    )
                state[name] = torch.from_numpy(np.array(value, copy=True))
            module.load_state_dict(state, strict=True)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Policy:
        """Load an export folder, or a checkpoint / run folder of ours."""
        path = Path(path).expanduser()
        if (path / POLICY_MANIFEST).is_file() and (path / POLICY_WEIGHTS).is_file():
            return cls._load_export(path)
        checkpoint = ckpt.resolve_checkpoint(path)
        manifest = ckpt.read_manifest(checkpoint)
        weights = ckpt.load_module_state(checkpoint)
        specs = [TaskSpec.from_dict(d) for d in manifest["tasks"]]
        return cls(specs, manifest["model"], weights, source=str(checkpoint))

    @classmethod
    def _load_export(cls, path: Path) -> Policy:
        try:
            manifest = json.loads((path / POLICY_MANIFEST).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise PolicyError(
                f"Policy export {path} has an unreadable manifest ({error})."
            ) from None
        if manifest.get("format") != POLICY_FORMAT:
            raise PolicyError(f"{path} is not a marl-shared policy export.")
        if manifest.get("format_version") != POLICY_FORMAT_VERSION:
            raise PolicyError(
                f"Policy export {path} has format version {manifest.get('format_version')}, "
                f"this version reads {POLICY_FORMAT_VERSION}."
            )
        expected = manifest.get("sha256", {}).get(POLICY_WEIGHTS)
        if expected is None or ckpt.file_sha256(path / POLICY_WEIGHTS) != expected:
            raise PolicyError(
                f"Policy export {path} is corrupt: {POLICY_WEIGHTS} does not match its sha256."
            )
        try:
            flat = load_file(str(path / POLICY_WEIGHTS))
        except Exception as error:  # noqa: BLE001 - any decoding failure means a corrupt file
            raise PolicyError(f"Policy export {path} has corrupt weights ({error}).") from None
        shapes = manifest.get("shapes", {})
        if set(flat) != set(shapes) or any(list(v.shape) != shapes[k] for k, v in flat.items()):
            raise PolicyError(f"Policy export {path} weights do not match its manifest.")
        specs = [TaskSpec.from_dict(d) for d in manifest["tasks"]]
        weights = ckpt.unflatten_module_state(flat)
        return cls(specs, manifest["model"], weights, source=str(path))

    # ----------------------------------------------------------------- acting

    def spec(self, task_name: str) -> TaskSpec:
        if task_name not in self.specs:
            raise PolicyError(
                f"This policy has no task {task_name!r}; it holds {', '.join(self.specs)}."
            )
        return self.specs[task_name]

    @property
    def recurrent(self) -> bool:
        return bool(self.model["recurrent"])

    def initial_hidden(self, task_name: str, batch_size: int) -> torch.Tensor | None:
        """Zero recurrent state for ``batch_size`` environments (None for a feed-forward model)."""
        spec = self.spec(task_name)
        if not self.recurrent:
            return None
        return torch.zeros(batch_size, spec.num_agents, int(self.model["perception_dim"]))

    @torch.no_grad()
    def logits(
        self,
        task_name: str,
        obs: np.ndarray,
        avail: np.ndarray,
        prev_actions: np.ndarray | None = None,
        hidden: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Masked logits [B, N, A] and, for a recurrent model, the per-candidate features."""
        spec = self.spec(task_name)
        obs_t = torch.as_tensor(np.asarray(obs, dtype=np.float32))
        avail_t = torch.as_tensor(np.asarray(avail, dtype=bool))
        expected = (spec.num_agents, spec.obs_dim)
        if obs_t.ndim != 3 or tuple(obs_t.shape[1:]) != expected:
            raise PolicyError(
                f"{task_name} needs observations of shape [B, {expected[0]}, {expected[1]}], "
                f"got {list(obs_t.shape)}."
            )
        if tuple(avail_t.shape) != (obs_t.shape[0], spec.num_agents, spec.num_actions):
            raise PolicyError(
                f"{task_name} needs action masks of shape "
                f"[{obs_t.shape[0]}, {spec.num_agents}, {spec.num_actions}], "
                f"got {list(avail_t.shape)}."
            )
        if prev_actions is None:
            prev_actions = np.full(obs_t.shape[:2], -1, dtype=np.int64)
        prev_t = torch.as_tensor(np.asarray(prev_actions, dtype=np.int64))
        if self.recurrent and hidden is None:
            hidden = self.initial_hidden(task_name, obs_t.shape[0])
        module = self.tasks[module_id_of(task_name)]
        features = module.perception.step(obs_t, prev_t, hidden if self.recurrent else None)
        out = self.backbone.backbone(features)
        logits = out if module.head is None else module.head(out)
        return mask_logits(logits, avail_t), (features if self.recurrent else None)

    def act(
        self,
        task_name: str,
        obs: np.ndarray,
        avail: np.ndarray,
        prev_actions: np.ndarray | None = None,
        *,
        hidden: torch.Tensor | None = None,
        greedy: bool = True,
        generator: torch.Generator | None = None,
    ) -> PolicyOutput:
        """Actions for obs [B, N, O], avail [B, N, A], prev_actions [B, N] (-1: none)."""
        logits, features = self.logits(task_name, obs, avail, prev_actions, hidden)
        log_probs = torch.log_softmax(logits, dim=-1)
        if greedy:
            actions = logits.argmax(dim=-1)
        else:
            probs = log_probs.exp().reshape(-1, logits.shape[-1])
            drawn = torch.multinomial(probs, 1, generator=generator)
            actions = drawn.reshape(logits.shape[:-1])
        chosen = log_probs.gather(-1, actions.unsqueeze(-1)).squeeze(-1)
        carried = None
        if features is not None:
            carried = features
            if self.tasks[module_id_of(task_name)].head is None:
                index = actions[..., None, None].expand(*actions.shape, 1, features.shape[-1])
                carried = features.gather(-2, index).squeeze(-2)
        return PolicyOutput(
            actions=actions.numpy().astype(np.int64),
            log_probs=chosen.numpy(),
            logits=logits.numpy(),
            hidden=carried,
        )

    def reset_hidden(self, hidden: torch.Tensor | None, done: np.ndarray) -> torch.Tensor | None:
        """Zero the recurrent state of environments whose episode just ended."""
        if hidden is None:
            return None
        mask = torch.as_tensor(np.asarray(done, dtype=bool))[:, None, None]
        return torch.where(mask, torch.zeros_like(hidden), hidden)
