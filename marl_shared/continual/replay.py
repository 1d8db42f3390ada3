"""Policy data for replay and analysis: rollouts of one task's module, and a small buffer.

A rollout stores what the policy saw and what it did: observations, available-action
masks, previous actions, the masked logits at that time, the actions taken and which
agents were alive. FPF distils back to these logits later; representation analysis
feeds the observations through the layers again.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from marl_shared.algorithms.env_runner import active_agents, greedy_or_sample
from marl_shared.envs import BatchedTask
from marl_shared.models import columns as C
from marl_shared.models.rl_modules import TaskModule

# Columns a replayed sample needs: model inputs and the policy's output at the time.
REPLAY_KEYS = (C.OBS, C.AVAIL, C.PREV_ACTIONS, C.LOGITS, C.ACTIONS, C.ACTIVE)


@torch.no_grad()
def collect_policy_data(
    module: TaskModule,
    task: BatchedTask,
    num_steps: int,
    *,
    seed: int = 0,
    greedy: bool = False,
) -> dict[str, np.ndarray]:
    """Run ``module`` for ``num_steps`` steps of every environment; rows are env-steps.

    Limitation: recurrent perception is not supported (its hidden state is not stored).
    """
    if module.recurrent:
        raise ValueError("replay and representation analysis need a feed-forward perception")
    spec = task.spec
    generator = torch.Generator().manual_seed(seed)
    current = task.reset(seed=seed)
    prev = np.full((task.num_envs, spec.num_agents), -1, dtype=np.int64)
    rows: dict[str, list[np.ndarray]] = {key: [] for key in REPLAY_KEYS}
    for _ in range(num_steps):
        batch = {
            C.OBS: torch.from_numpy(np.asarray(current.obs, dtype=np.float32)),
            C.AVAIL: torch.from_numpy(np.asarray(current.avail_actions)),
            C.PREV_ACTIONS: torch.from_numpy(prev),
        }
        logits = module.forward_inference(batch)[C.LOGITS]
        actions, _ = greedy_or_sample(logits, greedy, generator)
        rows[C.OBS].append(batch[C.OBS].numpy())
        rows[C.AVAIL].append(np.asarray(current.avail_actions, dtype=bool))
        rows[C.PREV_ACTIONS].append(prev.copy())
        rows[C.LOGITS].append(logits.numpy().astype(np.float32))
        rows[C.ACTIONS].append(actions.numpy())
        rows[C.ACTIVE].append(active_agents(np.asarray(current.avail_actions), spec.noop_action))
        step = task.step(actions.numpy())
        done = step.terminated | step.truncated
        prev = np.where(done[:, None], -1, actions.numpy())
        current = step
    return {key: np.concatenate(values, axis=0) for key, values in rows.items()}


@dataclass
class ReplayBuffer:
    """Per-task reservoir of env-step rows, ``capacity`` rows in all, split evenly by task.

    Each task keeps a uniform sample of every row it was offered (reservoir sampling), so
    old and new data of one task are equally likely to stay.
    """

    capacity: int
    seed: int = 0
    data: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    seen: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)

    def per_task_capacity(self, num_tasks: int) -> int:
        return max(1, self.capacity // max(1, num_tasks))

    def add(self, task_name: str, rows: dict[str, np.ndarray]) -> None:
        """Offer rows of one task; older tasks shrink to make room for a new one."""
        if task_name not in self.data:
            self.data[task_name] = {key: value[:0] for key, value in rows.items()}
            self.seen[task_name] = 0
        cap = self.per_task_capacity(len(self.data))
        stored = self.data[task_name]
        count = len(next(iter(rows.values())))
        for index in range(count):
            self.seen[task_name] += 1
            size = len(stored[C.OBS])
            if size < cap:
                stored = {
                    k: np.concatenate([v, rows[k][index : index + 1]]) for k, v in stored.items()
                }
                continue
            slot = int(self.rng.integers(0, self.seen[task_name]))
            if slot < cap:
                for key in stored:
                    stored[key][slot] = rows[key][index]
        self.data[task_name] = stored
        for name, values in self.data.items():
            if len(values[C.OBS]) > cap:
                keep = np.sort(self.rng.choice(len(values[C.OBS]), cap, replace=False))
                self.data[name] = {k: v[keep] for k, v in values.items()}

    def tasks(self) -> list[str]:
        return [name for name, values in self.data.items() if len(values[C.OBS])]

    def size(self, task_name: str | None = None) -> int:
        names = [task_name] if task_name else list(self.data)
        return sum(len(self.data[name][C.OBS]) for name in names if name in self.data)

    def sample(self, task_name: str, batch_size: int) -> dict[str, np.ndarray]:
        values = self.data[task_name]
        rows = self.rng.integers(0, len(values[C.OBS]), size=batch_size)
        return {key: value[rows] for key, value in values.items()}
