"""Plain torch building blocks: per-task perception, the shared decision backbone, heads, critic.

Shapes follow the batched protocol: every tensor keeps its leading batch dimensions
(environments, time) and the agent dimension ``N``; nothing is split per agent.

The default head follows the seed paper (Wang et al., "Multi-task multi-agent shared
layers are universal cognition of multi-agent coordination", arXiv 2312.15674): every
candidate action ``a`` is appended as a one-hot to the agent's input and scored by the
shared decision layers, so tasks with different action counts share every decision
weight. Appending a one-hot to the input of a linear layer equals adding one column
of its weight matrix, which is how it is computed here: the perception trunk runs once
per agent and the ``A`` candidates differ by one learned vector each.
"""

from __future__ import annotations

import torch
from torch import nn

# A masked logit: finite, so that softmax and entropy stay free of NaN.
MASKED_LOGIT = -1e9


def mlp(in_dim: int, hidden: list[int], *, activate_last: bool = True) -> nn.Sequential:
    """Linear layers with ReLU between them (and after the last one if asked)."""
    layers: list[nn.Module] = []
    dims = [in_dim, *hidden]
    for index, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        layers.append(nn.Linear(d_in, d_out))
        if activate_last or index < len(hidden) - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def one_hot_or_zero(index: torch.Tensor, size: int) -> torch.Tensor:
    """One-hot of integer ``index`` with an all-zero row where the index is negative."""
    valid = index >= 0
    hot = nn.functional.one_hot(index.clamp(min=0).long(), size).float()
    return hot * valid.unsqueeze(-1).float()


class Perception(nn.Module):
    """Task-specific layers: [obs, last action, agent id] -> features, optionally recurrent.

    With ``action_scoring`` a one-hot candidate action joins the input, so the output
    gains an action axis: [..., N, A, H] instead of [..., N, H]. The recurrent variant
    is the seed paper's (Linear, ReLU, GRUCell; the candidate enters at the input layer,
    so the GRU runs once per candidate). The feed-forward variant (Linear, ReLU,
    Linear, ReLU) lets the candidate enter at its second layer, which keeps the first
    layer's work per agent rather than per candidate.
    """

    def __init__(
        self,
        *,
        obs_dim: int,
        num_agents: int,
        num_actions: int,
        hidden_dim: int,
        recurrent: bool,
        action_scoring: bool,
    ) -> None:
        super().__init__()
        self.num_agents = num_agents
        self.num_actions = num_actions
        self.hidden_dim = hidden_dim
        self.recurrent = recurrent
        self.action_scoring = action_scoring
        self.input_layer = nn.Linear(obs_dim + num_actions + num_agents, hidden_dim)
        # The weight columns that a one-hot candidate action would select.
        self.candidate_action = (
            nn.Parameter(torch.zeros(num_actions, hidden_dim)) if action_scoring else None
        )
        if self.candidate_action is not None:
            nn.init.normal_(self.candidate_action, std=(1.0 / hidden_dim) ** 0.5)
        if recurrent:
            self.cell = nn.GRUCell(hidden_dim, hidden_dim)
        else:
            self.second_layer = nn.Linear(hidden_dim, hidden_dim)

    def inputs(self, obs: torch.Tensor, prev_actions: torch.Tensor) -> torch.Tensor:
        """Concatenate obs, one-hot last action (zero at an episode start) and one-hot agent id."""
        agent_ids = torch.eye(self.num_agents, device=obs.device).expand(*obs.shape[:-1], -1)
        last = one_hot_or_zero(prev_actions, self.num_actions)
        return torch.cat([obs, last, agent_ids], dim=-1)

    def with_candidates(self, pre_activation: torch.Tensor) -> torch.Tensor:
        """Add each candidate action's weight column: [..., N, H] -> [..., N, A, H]."""
        if self.candidate_action is None:
            return pre_activation
        return pre_activation.unsqueeze(-2) + self.candidate_action

    def step(
        self, obs: torch.Tensor, prev_actions: torch.Tensor, hidden: torch.Tensor | None
    ) -> torch.Tensor:
        """One step. ``hidden`` is [..., N, H] (recurrent only); output [..., N, (A,) H]."""
        x = self.input_layer(self.inputs(obs, prev_actions))
        if not self.recurrent:
            return torch.relu(self.with_candidates(self.second_layer(torch.relu(x))))
        assert hidden is not None, "a recurrent perception needs its hidden state"
        x = torch.relu(self.with_candidates(x))
        if self.candidate_action is not None:
            hidden = hidden.unsqueeze(-2).expand_as(x)
        flat_x = x.reshape(-1, self.hidden_dim)
        flat_h = hidden.reshape(-1, self.hidden_dim)
        return self.cell(flat_x, flat_h).reshape(x.shape)


class SharedBackbone(nn.Module):
    """The decision layers every task shares; with action scoring it ends in one score."""

    def __init__(self, *, in_dim: int, hidden: list[int], action_scoring: bool) -> None:
        super().__init__()
        self.action_scoring = action_scoring
        self.layers = mlp(in_dim, hidden)
        self.out_dim = hidden[-1] if hidden else in_dim
        self.score = nn.Linear(self.out_dim, 1) if action_scoring else None

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        z = self.layers(features)
        if self.score is None:
            return z
        return self.score(z).squeeze(-1)


class Critic(nn.Module):
    """Centralised per-task value: V(global state, agent id) for every agent."""

    def __init__(self, *, state_dim: int, num_agents: int, hidden: list[int]) -> None:
        super().__init__()
        self.num_agents = num_agents
        self.net = nn.Sequential(mlp(state_dim + num_agents, hidden), nn.Linear(hidden[-1], 1))

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        """[..., S] -> [..., N] values."""
        expanded = state.unsqueeze(-2).expand(*state.shape[:-1], self.num_agents, -1)
        agent_ids = torch.eye(self.num_agents, device=state.device).expand(
            *state.shape[:-1], -1, -1
        )
        return self.net(torch.cat([expanded, agent_ids], dim=-1)).squeeze(-1)


def mask_logits(logits: torch.Tensor, avail: torch.Tensor) -> torch.Tensor:
    """Unavailable actions get a large negative logit (finite, so no NaN appears)."""
    return torch.where(avail.bool(), logits, torch.full_like(logits, MASKED_LOGIT))
