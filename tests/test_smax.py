"""The SMAX adapter: shapes, action masks, episode ends, outcomes and seeding."""

from __future__ import annotations

import numpy as np
import pytest

from marl_shared.envs import TaskError, UnknownTaskError, make_task, smax, task_spec

NUM_ENVS = 4
MARINE_ATTACK_RANGE = 5.0  # SMAX's default for marines
OWN_FEATURES = 10  # per unit in SMAX's world state: health, x, y, cooldown, 6 type bits
STOP = 4
MOVE_EAST = 1
FIRST_ATTACK = 5  # attack enemy j is action 5 + j


@pytest.fixture(scope="module")
def task3m():
    """One 3m batch shared by the tests of this module, so its program compiles once."""
    task = make_task("smax/3m", num_envs=NUM_ENVS)
    yield task
    task.close()


def alive_units(task) -> np.ndarray:
    """[B, allies + enemies] alive flags of the states the last batch describes."""
    return np.asarray(task.env_states.state.unit_alive)


def focus_fire(avail: np.ndarray) -> np.ndarray:
    """Scripted focus fire: shoot the team's lowest reachable enemy, else any, else go east."""
    attacks = avail[..., FIRST_ATTACK:]
    team_target = np.where(attacks.any(axis=1).any(-1), attacks.any(axis=1).argmax(-1), -1)
    actions = np.full(avail.shape[:2], MOVE_EAST)
    for env, agent in np.ndindex(*avail.shape[:2]):
        target = team_target[env]
        if target >= 0 and attacks[env, agent, target]:
            actions[env, agent] = FIRST_ATTACK + target
        elif attacks[env, agent].any():
            actions[env, agent] = FIRST_ATTACK + attacks[env, agent].argmax()
        elif not avail[env, agent, MOVE_EAST]:
            actions[env, agent] = STOP
    return actions


def random_valid(rng: np.random.Generator, avail: np.ndarray) -> np.ndarray:
    return np.argmax(rng.random(avail.shape) * avail, axis=-1)


@pytest.mark.parametrize(
    "scenario, agents, enemies, obs_dim, state_dim",
    [("3m", 3, 3, 75, 72), ("2s3z", 5, 5, 127, 120), ("8m_vs_9m", 8, 9, 218, 204)],
)
def test_spec_and_batch_shapes_match_the_map(scenario, agents, enemies, obs_dim, state_dim):
    spec = task_spec(f"smax/{scenario}")
    assert (spec.num_agents, spec.obs_dim, spec.state_dim) == (agents, obs_dim, state_dim)
    assert spec.num_actions == enemies + 5
    assert (spec.noop_action, spec.episode_limit, spec.outcome) == (4, 100, "win")
    assert spec.backend == "smax" and spec.name == f"smax/{scenario}"

    task = make_task(f"smax/{scenario}", num_envs=NUM_ENVS)
    assert task.spec == spec
    envs, actions = NUM_ENVS, spec.num_actions
    for batch in (task.reset(seed=0), task.step(np.full((envs, agents), STOP))):
        assert batch.obs.shape == (envs, agents, obs_dim) and batch.obs.dtype == np.float32
        assert batch.avail_actions.shape == (envs, agents, actions)
        assert batch.avail_actions.dtype == np.bool_
        assert batch.state.shape == (envs, state_dim) and batch.state.dtype == np.float32
        assert batch.final_state.shape == (envs, state_dim)
        assert batch.final_obs.shape == (envs, agents, obs_dim)
        for flags in (batch.reward, batch.outcome):
            assert flags.shape == (envs,) and flags.dtype == np.float32
        for flags in (batch.terminated, batch.truncated):
            assert flags.shape == (envs,) and flags.dtype == np.bool_
        assert batch.obs.flags.writeable
    task.close()


def test_episode_limit_option_sets_the_spec():
    assert task_spec("smax/3m", episode_limit=7).episode_limit == 7


def test_start_masks_allow_moves_and_stop_but_no_attack(task3m):
    batch = task3m.reset(seed=0)
    # The teams start 16 units apart, far beyond a marine's range of 5.
    expected = np.array([1, 1, 1, 1, 1, 0, 0, 0], dtype=bool)
    assert (batch.avail_actions == expected).all()


def test_masks_leave_dead_allies_only_the_noop_and_track_attack_range(task3m):
    batch = task3m.reset(seed=0)
    num_allies = task3m.spec.num_agents
    noop_only = np.eye(task3m.spec.num_actions, dtype=bool)[STOP]
    seen = {"dead ally": 0, "dead enemy": 0, "in range": 0, "out of range": 0}
    for _ in range(40):
        batch = task3m.step(focus_fire(batch.avail_actions))
        alive = alive_units(task3m)
        state = task3m.env_states.state
        positions = np.asarray(state.unit_positions)
        for env, agent in np.ndindex(NUM_ENVS, num_allies):
            mask = batch.avail_actions[env, agent]
            if not alive[env, agent]:
                seen["dead ally"] += 1
                np.testing.assert_array_equal(mask, noop_only)
                continue
            assert mask[:5].all()
            distance = np.linalg.norm(positions[env, num_allies:] - positions[env, agent], axis=-1)
            expected = alive[env, num_allies:] & (distance < MARINE_ATTACK_RANGE)
            clear = np.abs(distance - MARINE_ATTACK_RANGE) > 1e-3  # skip float ties
            np.testing.assert_array_equal(mask[5:][clear], expected[clear])
            seen["dead enemy"] += int((~alive[env, num_allies:]).sum())
            seen["in range"] += int(expected.sum())
            seen["out of range"] += int((alive[env, num_allies:] & ~expected).sum())
    assert all(count > 0 for count in seen.values()), seen


def test_truncation_is_not_termination_and_auto_resets():
    task = make_task("smax/3m", num_envs=NUM_ENVS, episode_limit=3)
    stop = np.full((NUM_ENVS, 3), STOP)
    previous = task.reset(seed=1)
    for step in (1, 2, 3, 4, 5, 6):
        batch = task.step(stop)
        counters = np.asarray(task.env_states.state.step)
        if step % 3:
            assert not batch.truncated.any() and not batch.terminated.any()
            np.testing.assert_array_equal(counters, step % 3)
        else:
            assert batch.truncated.all() and not batch.terminated.any()
            # The batch already shows a fresh episode: counter 0, units back at the start.
            np.testing.assert_array_equal(counters, 0)
            assert not np.allclose(batch.final_state, batch.state)
            assert not np.allclose(batch.final_obs, batch.obs)
            # The final state continues the episode that ended: its units kept moving.
            assert not np.allclose(batch.final_state, previous.state)
            assert (batch.outcome == 0.0).all()
        previous = batch
    task.close()


def test_outcome_is_a_win_exactly_when_only_allies_stand(task3m):
    batch = task3m.reset(seed=0)
    num_allies = task3m.spec.num_agents
    returns = np.zeros(NUM_ENVS)
    wins = losses = 0
    for _ in range(40):
        batch = task3m.step(focus_fire(batch.avail_actions))
        returns += batch.reward
        ended = batch.terminated | batch.truncated
        for env in np.flatnonzero(ended):
            health = batch.final_state[env, : 2 * num_allies * OWN_FEATURES : OWN_FEATURES]
            allies_standing = (health[:num_allies] > 0).any()
            enemies_standing = (health[num_allies:] > 0).any()
            assert batch.terminated[env] and not batch.truncated[env]
            assert not (allies_standing and enemies_standing)
            won = allies_standing and not enemies_standing
            assert batch.outcome[env] == float(won)
            # SMAX's team reward: all enemy health (1.0 in total) plus a win bonus of 1.
            if won:
                assert returns[env] == pytest.approx(2.0, abs=1e-4)
                wins += 1
            else:
                assert returns[env] < 1.0 + 1e-4
                losses += 1
            returns[env] = 0.0
    assert wins > 0 and losses > 0


def test_same_seed_same_trajectory_other_seed_differs(task3m):
    other = make_task("smax/3m", num_envs=NUM_ENVS)

    def rollout(task, seed):
        rng = np.random.default_rng(0)
        batch = task.reset(seed=seed)
        frames = [batch]
        for _ in range(25):
            batch = task.step(random_valid(rng, batch.avail_actions))
            frames.append(batch)
        return frames

    first, second = rollout(task3m, 7), rollout(other, 7)
    for one, two in zip(first, second, strict=True):
        for field in ("obs", "avail_actions", "state", "reward", "terminated", "outcome"):
            np.testing.assert_array_equal(getattr(one, field), getattr(two, field))
    assert not np.array_equal(first[0].obs[0], first[0].obs[1])  # each env draws its own
    assert not np.array_equal(task3m.reset(seed=8).obs, first[0].obs)
    np.testing.assert_array_equal(task3m.reset(seed=7).obs, first[0].obs)
    other.close()


def test_stepping_never_recompiles(task3m):
    batch = task3m.reset(seed=3)
    batch = task3m.step(np.full((NUM_ENVS, 3), STOP))
    compiled = task3m._program.step._cache_size()
    rng = np.random.default_rng(0)
    for _ in range(5):
        batch = task3m.step(random_valid(rng, batch.avail_actions))
    task3m.reset(seed=4)
    task3m.step(np.full((NUM_ENVS, 3), STOP))
    assert task3m._program.step._cache_size() == compiled


def test_bad_actions_are_refused(task3m):
    task3m.reset(seed=0)
    with pytest.raises(ValueError, match="shape"):
        task3m.step(np.zeros((NUM_ENVS, 2), dtype=np.int32))
    with pytest.raises(ValueError, match="must lie in"):
        task3m.step(np.full((NUM_ENVS, 3), 8))


def test_scenarios_include_jaxmarl_maps_and_ours_without_touching_jaxmarl():
    from jaxmarl.environments.smax.smax_env import MAP_NAME_TO_SCENARIO

    names = smax.scenario_names()
    assert set(MAP_NAME_TO_SCENARIO) <= set(names)
    assert {"8m_vs_9m", "25m_vs_27m"} <= set(names)
    assert len(names) == len(set(names))
    assert "8m_vs_9m" not in MAP_NAME_TO_SCENARIO


def test_unknown_map_lists_the_valid_names():
    with pytest.raises(UnknownTaskError) as error:
        make_task("smax/4m", num_envs=1)
    message = str(error.value)
    assert "'4m'" in message and "smax/3m" in message and "smax/8m_vs_9m" in message
    assert message.count("\n") == 0


def test_unknown_option_is_a_task_error():
    with pytest.raises(TaskError, match="valid ones are episode_limit"):
        make_task("smax/3m", num_envs=1, difficulty=7)
