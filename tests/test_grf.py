"""The football adapter against the real gfootball engine: shapes, rewards, episode ends."""

from __future__ import annotations

import sys

import numpy as np
import pytest

pytest.importorskip("gfootball_engine", reason="gfootball is not installed (envs/install_grf.sh)")

from marl_shared.envs import grf, make_task, task_spec  # noqa: E402
from marl_shared.envs.spec import (  # noqa: E402
    SimulatorMissingError,
    TaskError,
    UnknownTaskError,
)

pytestmark = pytest.mark.grf

IDLE, RIGHT, SHOT = 0, 5, 12
ACTIVE = slice(97, 108)  # simple115v2: one-hot of the player this agent controls

# scenario -> (controlled agents, start position of left player 1 in the engine's frame)
SHAPE_CASES = {
    "academy_3_vs_1_with_keeper": (3, (0.6, 0.0)),
    "academy_counterattack_easy": (4, (-0.672, -0.19576)),
    "academy_run_to_score_with_keeper": (2, (0.0, 0.0)),
}


def run_episode(task, seed: int, actions: np.ndarray, max_steps: int = 200):
    """Step one env with fixed actions until its episode ends; return rewards and last batch."""
    task.reset(seed)
    rewards = []
    for _ in range(max_steps):
        batch = task.step(actions)
        rewards.append(float(batch.reward[0]))
        if batch.terminated[0] or batch.truncated[0]:
            return np.array(rewards), batch
    raise AssertionError(f"episode did not end within {max_steps} steps")


@pytest.fixture(scope="module", params=list(SHAPE_CASES))
def scenario_task(request):
    task = grf.make(request.param, num_envs=2)
    yield request.param, task
    task.close()


@pytest.fixture(scope="module")
def empty_goal_tasks():
    tasks = {
        rewards: grf.make("academy_empty_goal_close", num_envs=1, rewards=rewards)
        for rewards in ("scoring", "scoring,checkpoints")
    }
    yield tasks
    for task in tasks.values():
        task.close()


def test_scenario_table_matches_the_engine_scenario_files():
    from gfootball.env import config, scenario_builder

    engine_names = set(scenario_builder.all_scenarios()) - {"tests", "test_example_multiagent"}
    assert set(grf.scenario_names()) == engine_names
    for name in grf.scenario_names():
        left_team = config.Config({"level": name}).ScenarioConfig().left_team
        controllable = sum(player.controllable for player in left_team)
        default_agents, table_controllable = grf._SCENARIOS[name]
        assert table_controllable == controllable, name
        assert 1 <= default_agents <= controllable, name


def test_spec_has_seed_paper_shapes_without_an_engine():
    spec = task_spec("grf/academy_counterattack_easy")
    assert (spec.backend, spec.num_agents, spec.obs_dim, spec.state_dim) == ("grf", 4, 115, 460)
    assert (spec.num_actions, spec.episode_limit, spec.outcome, spec.noop_action) == (
        19,
        150,
        "goal",
        0,
    )
    assert grf.spec("academy_3_vs_1_with_keeper", num_agents=4, episode_limit=400).state_dim == 460
    assert grf.spec("academy_3_vs_1_with_keeper", episode_limit=400).episode_limit == 400


def test_shapes_positions_and_masks_per_scenario(scenario_task):
    scenario, task = scenario_task
    agents, (start_x, start_y) = SHAPE_CASES[scenario]
    assert task.spec.num_agents == agents
    batch = task.reset(seed=0)
    for _ in range(3):
        assert batch.obs.shape == (2, agents, 115) and batch.obs.dtype == np.float32
        assert batch.state.shape == (2, agents * 115) and batch.state.dtype == np.float32
        np.testing.assert_array_equal(batch.state, batch.obs.reshape(2, -1))
        assert batch.avail_actions.shape == (2, agents, 19)
        assert batch.avail_actions.dtype == bool and batch.avail_actions.all()
        for field in ("reward", "terminated", "truncated", "outcome"):
            assert getattr(batch, field).shape == (2,)
        # Every agent controls exactly one player, and no two agents the same one.
        active = batch.obs[..., ACTIVE]
        np.testing.assert_array_equal(active.sum(-1), np.ones((2, agents)))
        for env in range(2):
            assert len(set(active[env].argmax(-1).tolist())) == agents
        batch = task.step(np.full((2, agents), IDLE))
    reset = task.reset(seed=0)
    np.testing.assert_allclose(reset.obs[:, :, 2:4], [[[start_x, start_y]] * agents] * 2, atol=0.02)
    np.testing.assert_array_equal(reset.reward, [0.0, 0.0])


@pytest.mark.parametrize("scenario", grf.scenario_names())
def test_every_scenario_starts_with_one_distinct_player_per_agent(scenario):
    with grf.make(scenario, num_envs=1) as task:
        agents = task.spec.num_agents
        batch = task.reset(seed=0)
        batch = task.step(np.full((1, agents), IDLE))
    assert batch.obs.shape == (1, agents, 115) and np.isfinite(batch.obs).all()
    assert np.unique(batch.obs[0, :, ACTIVE].argmax(-1)).size == agents


def test_goal_terminates_with_outcome_plus_one(empty_goal_tasks):
    rewards, batch = run_episode(empty_goal_tasks["scoring"], seed=0, actions=np.array([[SHOT]]))
    assert batch.terminated[0] and not batch.truncated[0]
    assert batch.outcome[0] == 1.0
    assert rewards[-1] == 1.0 and rewards[:-1].sum() == 0.0
    # The env already reset itself: the player is back at his start and owns nothing yet.
    np.testing.assert_allclose(batch.obs[0, 0, 2:4], [0.75, 0.0], atol=0.02)


def test_checkpoints_pay_ten_zones_per_episode_on_top_of_scoring(empty_goal_tasks):
    run_right = np.array([[RIGHT]])
    plain, plain_end = run_episode(empty_goal_tasks["scoring"], seed=0, actions=run_right)
    shaped, shaped_end = run_episode(
        empty_goal_tasks["scoring,checkpoints"], seed=0, actions=run_right
    )
    assert plain_end.outcome[0] == shaped_end.outcome[0] == 1.0
    assert plain.sum() == 1.0 and plain[:-1].sum() == 0.0
    # The player starts 0.25 from goal, inside nine of the ten zones: 0.9 on first possession,
    # then 0.1 for the last zone, and a goal worth 1 with no zone left to pay.
    nonzero = shaped[shaped != 0]
    np.testing.assert_allclose(nonzero, [0.9, 0.1, 1.0], atol=1e-6)
    assert shaped.sum() == pytest.approx(2.0, abs=1e-5)
    # A shot straight away scores before any zone was collected: all ten are paid with it.
    shot, _ = run_episode(
        empty_goal_tasks["scoring,checkpoints"], seed=0, actions=np.array([[SHOT]])
    )
    assert shot[-1] == pytest.approx(2.0, abs=1e-6) and shot[:-1].sum() == 0.0


def test_checkpoint_reward_is_the_mean_over_agents():
    actions = np.array([[IDLE, RIGHT]])  # the keeper waits, the striker dribbles towards goal
    with grf.make("academy_run_to_score_with_keeper", num_envs=1) as task:
        shaped, _ = run_episode(task, seed=0, actions=actions)
    with grf.make("academy_run_to_score_with_keeper", num_envs=1, rewards="scoring") as task:
        plain, plain_end = run_episode(task, seed=0, actions=actions)
    assert plain_end.outcome[0] == 0.0 and not plain.any()
    # Each zone is worth 0.1 to the striker and 0 to the keeper: 0.05 for the team.
    gains = shaped[shaped != 0]
    assert len(gains) >= 3
    np.testing.assert_allclose(gains, 0.05, atol=1e-6)


def test_checkpoint_shaping_matches_the_engine_reference_wrapper():
    from gfootball.env import wrappers

    rng = np.random.default_rng(0)
    with grf.make("academy_counterattack_easy", num_envs=1, episode_limit=60) as task:
        # gfootball's own per-agent CheckpointRewardWrapper, fed the same engine; only its
        # reward() is used, since its gym step API predates gym 0.26.
        reference = wrappers.CheckpointRewardWrapper(task._envs[0])
        task.reset(seed=1)
        compared = paying = 0
        for _ in range(200):
            noise = rng.integers(0, 19, size=(1, 4))
            actions = np.where(rng.random((1, 4)) < 0.7, RIGHT, noise)
            batch = task.step(actions)
            if batch.terminated[0] or batch.truncated[0]:
                reference._collected_checkpoints = {}  # the env has already moved on
                continue
            expected = float(np.mean(reference.reward(np.zeros(4))))
            assert batch.reward[0] == pytest.approx(expected, abs=1e-6)
            compared += 1
            paying += expected > 0
    assert compared > 100 and paying >= 3


def test_truncation_at_episode_limit_auto_resets():
    limit = 3
    with grf.make("academy_3_vs_1_with_keeper", num_envs=2, episode_limit=limit) as task:
        first = task.reset(seed=0)
        for step in range(1, 2 * limit + 1):
            batch = task.step(np.full((2, 3), IDLE))
            ended = step % limit == 0
            np.testing.assert_array_equal(batch.truncated, [ended, ended])
            np.testing.assert_array_equal(batch.terminated, [False, False])
            if ended:
                # final_state is where the episode stopped; state is already the next start.
                assert not np.allclose(batch.final_state, batch.state)
                assert np.abs(batch.final_state).sum() > 0
                np.testing.assert_allclose(batch.state, first.state, atol=1e-5)
            else:
                np.testing.assert_array_equal(batch.final_state, 0.0)


def test_same_seed_replays_and_envs_get_distinct_engine_seeds():
    rng = np.random.default_rng(3)
    actions = rng.integers(0, 19, size=(20, 2, 3))
    with grf.make("academy_3_vs_1_with_keeper", num_envs=2) as task:
        runs = []
        for _ in range(2):
            task.reset(seed=7)
            runs.append(np.stack([task.step(a).state for a in actions]))
        seeds = {config["game_engine_random_seed"] for config in task._configs}
    np.testing.assert_array_equal(runs[0], runs[1])
    assert len(seeds) == 2


def test_unknown_scenario_is_one_clear_error():
    with pytest.raises(UnknownTaskError, match="Unknown grf scenario 'academy_nope'"):
        grf.make("academy_nope", num_envs=1)
    with pytest.raises(UnknownTaskError, match="grf/academy_3_vs_1_with_keeper"):
        make_task("grf/academy_nope", num_envs=1)


def test_invalid_options_are_rejected_before_the_engine_starts():
    with pytest.raises(TaskError, match="1 to 4 players"):
        grf.spec("academy_3_vs_1_with_keeper", num_agents=5)
    with pytest.raises(TaskError, match="rewards"):
        grf.spec("academy_3_vs_1_with_keeper", rewards="checkpoints")
    with pytest.raises(TaskError, match="Unknown grf option"):
        grf.make("academy_3_vs_1_with_keeper", num_envs=1, representation="pixels")


def test_missing_engine_names_the_install_script(monkeypatch):
    monkeypatch.setitem(sys.modules, "gfootball.env.football_env", None)
    with pytest.raises(SimulatorMissingError) as error:
        grf.make("academy_3_vs_1_with_keeper", num_envs=1)
    message = str(error.value)
    assert "bash envs/install_grf.sh" in message
    assert message.count(". ") == 0 and message.endswith(".")
