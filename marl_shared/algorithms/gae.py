"""Generalised advantage estimation over [T, B, N] rollouts; terminations and truncations apart."""

from __future__ import annotations

import numpy as np


def compute_gae(
    *,
    rewards: np.ndarray,
    values: np.ndarray,
    next_values: np.ndarray,
    terminated: np.ndarray,
    truncated: np.ndarray,
    gamma: float,
    lam: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Advantages and value targets (Schulman et al. 2016) per agent.

    ``rewards``, ``terminated`` and ``truncated`` are [T, B] (one team reward per
    environment); ``values`` and ``next_values`` are [T, B, N]. ``next_values[t]`` is
    the value of the state that followed step t: the next state within the episode, or
    the episode's final state when it was truncated. A terminated step bootstraps
    nothing; any episode end stops the recursion from crossing into the next episode.
    """
    steps = rewards.shape[0]
    not_terminal = (~terminated.astype(bool)).astype(np.float32)[..., None]
    not_done = (~(terminated.astype(bool) | truncated.astype(bool))).astype(np.float32)[..., None]
    deltas = rewards[..., None] + gamma * not_terminal * next_values - values
    advantages = np.zeros_like(values, dtype=np.float32)
    running = np.zeros_like(values[0], dtype=np.float32)
    for t in reversed(range(steps)):
        running = deltas[t] + gamma * lam * not_done[t] * running
        advantages[t] = running
    return advantages, advantages + values
