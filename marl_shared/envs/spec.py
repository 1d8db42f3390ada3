"""The batched task protocol every simulator adapter speaks.

A task is a simulator plus a scenario, named ``<backend>/<scenario>``. An adapter
owns a batch of ``num_envs`` environments of one task and steps all of them at
once, so a vectorised simulator (SMAX under ``jax.vmap``) and a process-bound one
(the football engine) look the same to the trainer. Arrays keep the environment
and agent dimensions inside them; nothing is split per agent in Python.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Protocol

import numpy as np


class TaskError(ValueError):
    """A user-facing problem with a task name or its simulator; the message is one sentence."""


class UnknownTaskError(TaskError):
    """The task or scenario name is not one this product knows."""


class SimulatorMissingError(TaskError):
    """The simulator behind a task is not installed on this machine."""


@dataclass(frozen=True)
class TaskSpec:
    """Static shapes and names of one task, shared by adapters, models and checkpoints."""

    name: str  # "<backend>/<scenario>", e.g. "smax/3m"
    backend: str  # "smax", "grf" or "sc2"
    num_agents: int  # agents the team controls
    obs_dim: int  # per-agent observation size
    state_dim: int  # global state size (centralised critic input)
    num_actions: int  # discrete actions per agent
    episode_limit: int  # steps after which an episode is truncated
    outcome: str  # "win" (SMAC-style) or "goal" (football)
    noop_action: int  # the only action left to a dead or inactive agent

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TaskSpec:
        return cls(**data)


@dataclass
class StepBatch:
    """What reset and step return for a batch of B environments with N agents and A actions.

    Environments reset themselves when an episode ends: on the step where
    ``terminated | truncated`` is true, ``obs``, ``avail_actions`` and ``state``
    already belong to the first step of the next episode, while ``final_state``
    holds the global state the finished episode ended in (a truncated episode
    bootstraps its value from it).
    """

    obs: np.ndarray  # [B, N, obs_dim] float32
    avail_actions: np.ndarray  # [B, N, A] bool; dead agents: only spec.noop_action
    state: np.ndarray  # [B, state_dim] float32
    reward: np.ndarray  # [B] float32, team reward of the step (zeros after reset)
    terminated: np.ndarray  # [B] bool: the episode ended by the task's own rules
    truncated: np.ndarray  # [B] bool: the episode hit episode_limit and did not terminate
    final_state: np.ndarray  # [B, state_dim] float32, valid where terminated | truncated
    outcome: np.ndarray  # [B] float32, valid where an episode ended: SMAC 1 won / 0 not;
    # football: goals scored minus conceded in the episode (>0 counts as a score)
    final_obs: np.ndarray | None = None  # [B, N, obs_dim] where an episode ended, if supplied


class BatchedTask(Protocol):
    """A batch of environments of one task, stepped together."""

    spec: TaskSpec
    num_envs: int

    def reset(self, seed: int) -> StepBatch:
        """Reset every environment; the seed fixes all randomness of the batch."""
        ...

    def step(self, actions: np.ndarray) -> StepBatch:
        """Step every environment with int actions of shape [B, N]; finished ones auto-reset."""
        ...

    def close(self) -> None:
        """Release simulator resources."""
        ...
