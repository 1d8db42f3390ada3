"""Any task of this project as a PettingZoo ``ParallelEnv``, so it is usable outside it.

``TaskParallelEnv("smax/3m")`` drives one environment of the batched adapter
(``make_task(name, num_envs=1)``). Each agent observes a dict in the masking convention
that PettingZoo's own environments and RLlib's masking examples share:
``{"observation": float32 vector, "action_mask": int8 vector}``; ``state()`` is the
global state the centralised critic sees.

The batched adapters reset an environment as soon as its episode ends. This wrapper hides
that: the step that ends an episode returns the observations the episode ended in,
terminations or truncations for every agent at once (never both), the outcome in each
agent's info, and leaves ``agents`` empty; the next ``reset()`` without a seed starts the
episode the adapter already began, so no simulator work is wasted.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from gymnasium import spaces
from pettingzoo import ParallelEnv

from marl_shared.envs import make_task

logger = logging.getLogger(__name__)


class TaskParallelEnv(ParallelEnv):
    """One environment of a ``<backend>/<scenario>`` task behind PettingZoo's parallel API."""

    metadata = {"name": "marl_shared_task_v0", "render_modes": [], "is_parallelizable": True}

    def __init__(self, task_name: str, **options: Any) -> None:
        self._task = make_task(task_name, num_envs=1, **options)
        spec = self._task.spec
        self.task_spec = spec
        self.render_mode = None
        self.possible_agents = [f"agent_{index}" for index in range(spec.num_agents)]
        self.agents: list[str] = []
        self._agent_index = {agent: index for index, agent in enumerate(self.possible_agents)}

        # One space object per agent, built once: PettingZoo requires the same object on
        # every call so that seeding a space sticks.
        self.observation_spaces = {
            agent: spaces.Dict(
                {
                    "observation": spaces.Box(
                        -np.inf, np.inf, shape=(spec.obs_dim,), dtype=np.float32
                    ),
                    "action_mask": spaces.MultiBinary(spec.num_actions),
                }
            )
            for agent in self.possible_agents
        }
        self.action_spaces = {
            agent: spaces.Discrete(spec.num_actions) for agent in self.possible_agents
        }
        self.state_space = spaces.Box(-np.inf, np.inf, shape=(spec.state_dim,), dtype=np.float32)

        # Only the no-op is left once an episode has ended, as for a dead unit in SMAC.
        self._ended_mask = np.zeros((spec.num_agents, spec.num_actions), dtype=np.int8)
        self._ended_mask[:, spec.noop_action] = 1
        self._seed_stream: np.random.Generator | None = None  # seeds for unseeded resets
        self._next_start = None  # the batch that opened the episode the adapter began
        self._obs = np.zeros((spec.num_agents, spec.obs_dim), dtype=np.float32)
        self._state = np.zeros(spec.state_dim, dtype=np.float32)

    def observation_space(self, agent: str) -> spaces.Space:
        return self.observation_spaces[agent]

    def action_space(self, agent: str) -> spaces.Space:
        return self.action_spaces[agent]

    def reset(
        self, seed: int | None = None, options: dict | None = None
    ) -> tuple[dict[str, dict], dict[str, dict]]:
        """Start an episode; a seed fixes it and every later unseeded episode."""
        if seed is not None:
            self._seed_stream = np.random.default_rng(seed)
            batch = self._task.reset(seed)
        elif self._next_start is not None:
            batch = self._next_start
        else:
            if self._seed_stream is None:
                self._seed_stream = np.random.default_rng()
            batch = self._task.reset(int(self._seed_stream.integers(2**63)))
        self._next_start = None
        self.agents = list(self.possible_agents)
        self._obs = np.array(batch.obs[0], dtype=np.float32)
        self._state = np.array(batch.state[0], dtype=np.float32)
        observations = self._observations(self._obs, batch.avail_actions[0])
        return observations, {agent: {} for agent in self.agents}

    def step(self, actions: dict[str, int]) -> tuple[dict, dict, dict, dict, dict]:
        """Step every agent at once; an agent missing from ``actions`` takes the no-op."""
        if not self.agents:
            raise RuntimeError("The episode has ended or not begun; call reset() before step().")
        spec = self.task_spec
        joint = np.full((1, spec.num_agents), spec.noop_action, dtype=np.int64)
        for agent, action in actions.items():
            if agent not in self._agent_index:
                raise KeyError(f"Unknown agent {agent!r}; agents are {', '.join(self.agents)}.")
            joint[0, self._agent_index[agent]] = int(action)
        batch = self._task.step(joint)

        terminated = bool(batch.terminated[0])
        truncated = bool(batch.truncated[0])
        agents = self.agents
        reward = float(batch.reward[0])
        if terminated or truncated:
            # The adapter has already begun the next episode; report the one that ended.
            final_obs = getattr(batch, "final_obs", None)
            if final_obs is not None:
                self._obs = np.array(final_obs[0], dtype=np.float32)
            # Limitation: an adapter without final_obs leaves the last observation in place.
            self._state = np.array(batch.final_state[0], dtype=np.float32)
            observations = self._observations(self._obs, self._ended_mask)
            infos = {agent: {"outcome": float(batch.outcome[0])} for agent in agents}
            self._next_start = batch
            self.agents = []
        else:
            self._obs = np.array(batch.obs[0], dtype=np.float32)
            self._state = np.array(batch.state[0], dtype=np.float32)
            observations = self._observations(self._obs, batch.avail_actions[0])
            infos = {agent: {} for agent in agents}
        rewards = dict.fromkeys(agents, reward)
        terminations = dict.fromkeys(agents, terminated)
        truncations = dict.fromkeys(agents, truncated)
        return observations, rewards, terminations, truncations, infos

    def state(self) -> np.ndarray:
        """The global state; after the last step of an episode, the state it ended in."""
        return self._state.copy()

    def render(self) -> None:
        """Rendering is not offered through this wrapper."""
        return None

    def close(self) -> None:
        self._task.close()

    def _observations(self, obs: np.ndarray, masks: np.ndarray) -> dict[str, dict]:
        masks = np.asarray(masks, dtype=np.int8)
        return {
            agent: {"observation": obs[index].copy(), "action_mask": masks[index].copy()}
            for index, agent in enumerate(self.possible_agents)
        }
