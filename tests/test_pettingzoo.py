"""The PettingZoo wrapper: the official parallel API test and how episodes end."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from pettingzoo.test import parallel_api_test, parallel_seed_test

from marl_shared.envs.pettingzoo import TaskParallelEnv


def run_api_test(env: TaskParallelEnv) -> None:
    """PettingZoo's parallel API test, with its warnings about agent bookkeeping as failures."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        parallel_api_test(env, num_cycles=1000)
    messages = [str(warning.message) for warning in caught]
    assert not [m for m in messages if "agent" in m.lower() or "given" in m.lower()], messages


@pytest.mark.parametrize("task_name", ["smax/3m", "smax/2s3z"])
def test_smax_passes_the_parallel_api_test(task_name):
    env = TaskParallelEnv(task_name)
    run_api_test(env)
    env.close()


def test_smax_passes_the_parallel_seed_test():
    parallel_seed_test(lambda: TaskParallelEnv("smax/3m"), num_cycles=50)


def test_grf_passes_the_parallel_api_test():
    pytest.importorskip("gfootball")
    env = TaskParallelEnv("grf/academy_3_vs_1_with_keeper")
    run_api_test(env)
    env.close()


def test_spaces_follow_the_masking_convention():
    env = TaskParallelEnv("smax/3m")
    assert env.possible_agents == ["agent_0", "agent_1", "agent_2"]
    observations, infos = env.reset(seed=0)
    assert set(observations) == set(infos) == set(env.possible_agents)
    for agent, observation in observations.items():
        space = env.observation_space(agent)
        assert set(space.spaces) == {"observation", "action_mask"}
        assert space.contains(observation)
        assert observation["observation"].shape == (75,)
        np.testing.assert_array_equal(observation["action_mask"], [1, 1, 1, 1, 1, 0, 0, 0])
        assert env.action_space(agent).n == 8
    assert env.state().shape == (72,) and env.state_space.contains(env.state())
    env.close()


def test_episode_end_is_reported_once_for_all_agents_then_agents_are_gone():
    env = TaskParallelEnv("smax/3m", episode_limit=4)
    env.reset(seed=1)
    stop = dict.fromkeys(env.possible_agents, 4)
    for _ in range(3):
        _, rewards, terminations, truncations, infos = env.step(stop)
        assert not any(terminations.values()) and not any(truncations.values())
        assert infos == {agent: {} for agent in env.possible_agents}
    observations, rewards, terminations, truncations, infos = env.step(stop)
    assert all(truncations.values()) and not any(terminations.values())
    assert set(truncations) == set(env.possible_agents)
    assert all(info == {"outcome": 0.0} for info in infos.values())
    assert env.agents == []
    for observation in observations.values():
        np.testing.assert_array_equal(observation["action_mask"], [0, 0, 0, 0, 1, 0, 0, 0])
    final_state = env.state()
    with pytest.raises(RuntimeError, match="reset"):
        env.step(stop)

    # The next unseeded episode is the one the batched task already started.
    observations, _ = env.reset()
    assert env.agents == env.possible_agents
    assert not np.allclose(env.state(), final_state)
    assert all(obs["action_mask"][:5].all() for obs in observations.values())
    env.close()


def test_won_episode_reports_outcome_and_terminations():
    env = TaskParallelEnv("smax/3m")
    observations, _ = env.reset(seed=0)
    outcomes = []
    while len(outcomes) < 6:
        actions = {}
        for agent, observation in observations.items():
            attacks = np.flatnonzero(observation["action_mask"][5:])
            actions[agent] = 5 + attacks[0] if attacks.size else 1  # shoot, else go east
        observations, rewards, terminations, truncations, infos = env.step(actions)
        assert len(set(rewards.values())) == 1  # one team reward
        if any(terminations.values()) or any(truncations.values()):
            assert all(terminations.values()) and not any(truncations.values())
            outcomes.append(infos["agent_0"]["outcome"])
            observations, _ = env.reset()
    assert 1.0 in outcomes and 0.0 in outcomes
    env.close()
