"""The StarCraft II backend without StarCraft II.

The game cannot run here, so these tests prove what can be proved without it: the
scenario list, the one-sentence error when the simulator is missing, the smacv2 arguments
of each scenario, and the adapter's own logic (terminated vs truncated, auto-reset,
dead-agent no-ops, worker processes) driven by ``StandInEnv``, a small class with
smacv2's ``StarCraft2Env`` method names. Nothing here claims that a game ran.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from marl_shared.envs import (
    SimulatorMissingError,
    TaskError,
    UnknownTaskError,
    check_task_name,
    make_task,
    sc2,
    scenario_names,
    task_spec,
)

STAND_IN_FACTORY = "test_sc2:make_stand_in_env"


def assert_one_sentence(message: str) -> None:
    assert message.endswith("."), message
    assert not re.search(r"[.!?]\s+[A-Z`]", message[:-1]), message


class StandInEnv:
    """Two agents, five actions, three steps per episode; mimics StarCraft2Env's methods.

    Agent 0 decides the story: action 4 kills agent 1, action 3 wins the battle, action 2
    makes the "game" crash the way smacv2 reports it (0, True, {}).
    """

    n_agents, n_actions, episode_limit = 2, 5, 3

    def __init__(self, seed=None, explode_at_step=None):
        self.seed_marker = float((seed or 0) % 1000)
        self.explode_at_step = explode_at_step
        self.t = 0
        self.dead = [False, False]
        self.resets = 0

    def get_env_info(self):
        return {
            "state_shape": 4,
            "obs_shape": 3,
            "cap_shape": 0,
            "n_actions": self.n_actions,
            "n_agents": self.n_agents,
            "episode_limit": self.episode_limit,
        }

    def reset(self):
        self.t, self.dead, self.resets = 0, [False, False], self.resets + 1

    def get_obs(self):
        return [
            [0.0, 0.0, 0.0] if self.dead[a] else [self.seed_marker, float(self.t), float(a)]
            for a in range(self.n_agents)
        ]

    def get_avail_actions(self):
        return [[1, 0, 0, 0, 0] if dead else [0, 1, 1, 1, 1] for dead in self.dead]

    def get_state(self):
        return [float(self.t), float(self.dead[0]), float(self.dead[1]), self.seed_marker]

    def step(self, actions):
        for agent, action in enumerate(actions):
            assert self.get_avail_actions()[agent][action] == 1, "unavailable action"
        self.t += 1
        if self.explode_at_step == self.t:
            raise RuntimeError("stand-in failure")
        if actions[0] == 4:
            self.dead[1] = True
        if actions[0] == 3:
            return 10.0, True, {"battle_won": True, "dead_allies": 0, "dead_enemies": 2}
        if actions[0] == 2:
            return 0, True, {}
        if self.t >= self.episode_limit:
            return 1.0, True, {"battle_won": False, "episode_limit": True}
        return 1.0, False, {"battle_won": False}

    def close(self):
        pass


def make_stand_in_env(seed=None, explode_at_step=None):
    """Factory the worker processes import by name (``test_sc2:make_stand_in_env``)."""
    return StandInEnv(seed=seed, explode_at_step=explode_at_step)


# --- scenario names and smacv2 arguments ---------------------------------------------


def test_scenario_names_cover_smac_maps_and_smacv2_scenarios():
    names = scenario_names("sc2")
    for smac_map in ("3m", "8m", "2s3z", "3s5z", "5m_vs_6m", "8m_vs_9m", "10m_vs_11m",
                     "27m_vs_30m", "MMM2", "corridor", "2c_vs_64zg", "3s5z_vs_3s6z",
                     "6h_vs_8z", "3s_vs_5z"):  # fmt: skip
        assert smac_map in names
    for race in ("protoss", "terran", "zerg"):
        for size in ("5_vs_5", "10_vs_10", "20_vs_20", "10_vs_11", "20_vs_23"):
            assert f"{race}_{size}" in names
    assert len(names) == len(set(names)) == len(sc2.SMAC_MAPS) + 15
    assert check_task_name("sc2/MMM2") == "sc2/MMM2"
    with pytest.raises(UnknownTaskError):
        check_task_name("sc2/no_such_map")


def test_smacv2_scenario_arguments_follow_the_published_configs():
    kwargs = sc2.env_arguments("zerg_10_vs_11")
    assert kwargs["map_name"] == "10gen_zerg"
    assert kwargs["continuing_episode"] is True  # needed to tell truncation apart
    assert kwargs["use_unit_ranges"] is True and kwargs["obs_own_pos"] is True
    config = kwargs["capability_config"]
    assert (config["n_units"], config["n_enemies"]) == (10, 11)
    team = config["team_gen"]
    assert team["unit_types"] == ["zergling", "hydralisk", "baneling"]
    assert team["weights"] == [0.45, 0.45, 0.1]
    assert team["exception_unit_types"] == ["baneling"]
    assert config["start_positions"]["dist_type"] == "surrounded_and_reflect"
    assert (
        "exception_unit_types"
        not in sc2.env_arguments("protoss_5_vs_5")["capability_config"]["team_gen"]
    )


def test_smac_map_arguments_keep_smacv2_defaults_and_take_options():
    kwargs = sc2.env_arguments("MMM2", difficulty="6")
    assert kwargs == {"map_name": "MMM2", "continuing_episode": True, "difficulty": "6"}
    with pytest.raises(TaskError, match="map_name"):
        sc2.env_arguments("3m", map_name="8m")


# --- the simulator is missing -----------------------------------------------------------


@pytest.fixture
def no_game(monkeypatch, tmp_path):
    monkeypatch.setenv("SC2PATH", str(tmp_path / "StarCraftII"))
    return tmp_path / "StarCraftII"


def test_missing_simulator_error_is_one_sentence_naming_the_install_script(no_game):
    with pytest.raises(SimulatorMissingError) as caught:
        make_task("sc2/3m", num_envs=2)
    message = str(caught.value)
    assert_one_sentence(message)
    assert "bash envs/install_sc2.sh" in message
    assert "sc2/3m" in message


def test_task_spec_of_sc2_raises_the_same_missing_simulator_error(no_game):
    with pytest.raises(SimulatorMissingError, match="bash envs/install_sc2.sh"):
        task_spec("sc2/protoss_5_vs_5")


def test_missing_game_and_missing_maps_are_named(no_game, monkeypatch):
    monkeypatch.setattr(sc2, "smacv2_installed", lambda: True)
    with pytest.raises(SimulatorMissingError) as caught:
        make_task("sc2/8m", num_envs=1)
    message = str(caught.value)
    assert_one_sentence(message)
    assert str(no_game) in message and "SC2PATH" in message
    assert "bash envs/install_sc2.sh" in message

    (no_game / "Versions" / "Base75689").mkdir(parents=True)
    assert sc2.game_versions() == ["Base75689"]
    with pytest.raises(SimulatorMissingError) as caught:
        make_task("sc2/8m", num_envs=1)
    assert_one_sentence(str(caught.value))
    assert "SMAC maps are missing" in str(caught.value)

    (no_game / "Maps" / "SMAC_Maps").mkdir(parents=True)
    assert sc2.simulator_problem() is None


def test_install_script_refuses_to_download_without_license_acceptance(tmp_path):
    script = Path(__file__).resolve().parents[1] / "envs" / "install_sc2.sh"
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path)}
    result = subprocess.run(
        ["bash", str(script)], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    assert "ACCEPT_SC2_EULA=yes" in result.stderr
    assert list(tmp_path.iterdir()) == []  # nothing downloaded or created


def test_smacv2_that_fails_to_import_in_the_worker_is_a_missing_simulator():
    with pytest.raises(SimulatorMissingError) as caught:
        sc2.SC2Task("3m", 1, {}, factory=STAND_IN_FACTORY, imports=("no_such_module_xyz",))
    assert_one_sentence(str(caught.value))
    assert "bash envs/install_sc2.sh" in str(caught.value)


# --- adapter logic on the stand-in environment ----------------------------------------


def test_runner_tells_timeout_truncation_from_battle_end():
    runner = sc2.EnvRunner(StandInEnv(), num_actions=5)
    runner.reset()
    for _ in range(2):
        *_, terminated, truncated, _, _ = runner.step([1, 1])
        assert not terminated and not truncated
    obs, avail, state, reward, terminated, truncated, final_state, outcome = runner.step([1, 1])
    assert (terminated, truncated, outcome, reward) == (False, True, 0.0, 1.0)
    assert final_state[0] == 3.0  # the state the episode ended in
    assert state[0] == 0.0 and obs[:, 1].tolist() == [0.0, 0.0]  # already the next episode
    assert runner.env.resets == 2

    *_, reward, terminated, truncated, _, outcome = runner.step([3, 1])
    assert (terminated, truncated, outcome, reward) == (True, False, 1.0, 10.0)


def test_runner_truncates_an_episode_the_game_restarted(caplog):
    runner = sc2.EnvRunner(StandInEnv(), num_actions=5)
    runner.reset()
    *_, terminated, truncated, _, outcome = runner.step([2, 1])
    assert (terminated, truncated, outcome) == (False, True, 0.0)
    assert "restarted" in caplog.text


def test_runner_masks_are_bool_and_dead_agents_keep_only_the_noop():
    runner = sc2.EnvRunner(StandInEnv(), num_actions=5)
    runner.reset()
    obs, avail, *_ = runner.step([4, 1])
    assert avail.dtype == bool and obs.dtype == np.float32
    assert avail[1].tolist() == [True, False, False, False, False]
    assert obs[1].tolist() == [0.0, 0.0, 0.0]


def test_reseeding_distributions_makes_their_draws_repeatable():
    class Inner:
        def __init__(self):
            self.rng = np.random.default_rng()

        def generate(self):
            return self.rng.random()

    class Outer(Inner):
        def __init__(self):
            super().__init__()
            self.inner = Inner()

        def generate(self):
            return self.rng.random() + 10 * self.inner.generate()

    def draws(seed):
        tree = {"positions": Outer(), "teams": Inner()}
        sc2._reseed_distributions(tree, seed)
        return [tree["positions"].generate(), tree["teams"].generate()]

    assert draws(3) == draws(3)
    assert draws(3) != draws(4)


@pytest.fixture
def stand_in_task():
    task = sc2.SC2Task("3m", 2, {}, factory=STAND_IN_FACTORY, imports=())
    yield task
    task.close()


def test_worker_batch_reports_spec_and_seeds_each_game_differently(stand_in_task):
    spec = stand_in_task.spec
    assert (spec.name, spec.backend, spec.outcome, spec.noop_action) == ("sc2/3m", "sc2", "win", 0)
    assert (spec.num_agents, spec.obs_dim, spec.state_dim, spec.num_actions) == (2, 3, 4, 5)
    assert spec.episode_limit == 3

    batch = stand_in_task.reset(seed=7)
    expected = [float(seed % 1000) for seed in sc2._child_seeds(7, 2)]
    assert batch.obs[:, 0, 0].tolist() == expected
    assert expected[0] != expected[1]
    assert batch.obs.shape == (2, 2, 3) and batch.state.shape == (2, 4)
    assert batch.avail_actions.shape == (2, 2, 5) and batch.avail_actions.dtype == bool
    assert not batch.terminated.any() and not batch.truncated.any()
    assert batch.reward.tolist() == [0.0, 0.0]


def test_worker_batch_steps_auto_resets_and_gives_dead_agents_the_noop(stand_in_task):
    stand_in_task.reset(seed=0)
    batch = stand_in_task.step(np.array([[4, 1], [3, 1]]))
    # env 0: agent 1 died; env 1: battle won, already reset into a new episode.
    assert batch.avail_actions[0, 1].tolist() == [True, False, False, False, False]
    assert batch.terminated.tolist() == [False, True]
    assert batch.outcome[1] == 1.0 and batch.reward.tolist() == [1.0, 10.0]
    assert batch.final_state[1, 0] == 1.0 and batch.state[1, 0] == 0.0

    # Agent 1 of env 0 is dead: its action 3 is replaced by the no-op (the stand-in would
    # raise on an unavailable action), and the episode then hits its limit.
    batch = stand_in_task.step(np.array([[1, 3], [1, 1]]))
    batch = stand_in_task.step(np.array([[1, 2], [1, 1]]))
    assert batch.truncated.tolist() == [True, False]
    assert not batch.terminated[0]
    assert batch.final_state[0].tolist()[:2] == [3.0, 0.0]
    assert batch.obs[0, 1, 1] == 0.0  # the new episode started with both agents alive


def test_worker_batch_rejects_bad_actions_with_one_sentence(stand_in_task):
    stand_in_task.reset(seed=0)
    with pytest.raises(ValueError) as caught:
        stand_in_task.step(np.array([[0, 1], [1, 1]]))  # no-op is not for the living
    assert_one_sentence(str(caught.value))
    with pytest.raises(ValueError, match="shape"):
        stand_in_task.step(np.array([1, 1]))
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        stand_in_task.step(np.array([[9, 1], [1, 1]]))


def test_worker_failure_surfaces_as_an_error_naming_the_task():
    task = sc2.SC2Task("3m", 1, {"explode_at_step": 1}, factory=STAND_IN_FACTORY, imports=())
    task.reset(seed=0)
    with pytest.raises(RuntimeError, match="sc2/3m.*stand-in failure"):
        task.step(np.array([[1, 1]]))
    assert all(worker.process.poll() is not None for worker in task._workers)


def test_unknown_option_is_a_task_error():
    with pytest.raises(TaskError, match="rejected the options"):
        sc2.SC2Task("3m", 1, {"no_such_option": 1}, factory=STAND_IN_FACTORY, imports=())


def test_close_ends_every_worker_process(stand_in_task):
    workers = list(stand_in_task._workers)
    stand_in_task.close()
    assert all(worker.process.poll() is not None for worker in workers)
    stand_in_task.close()  # closing twice is harmless
