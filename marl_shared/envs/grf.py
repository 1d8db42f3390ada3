"""Google Research Football (``gfootball`` 2.10.2) as a batched task: ``grf/<scenario>``.

The adapter drives the raw engine API (``football_env.FootballEnv`` built from a
``config.Config``), not ``gfootball.env.create_environment``: the bundled gym wrappers
assume the old gym reset API. Everything those wrappers did for us is done here:

- observations: simple115v2 per controlled player (``fixed_positions=True``), computed by
  the engine's own static ``Simple115StateWrapper.convert_observation``;
- global state: the controlled players' observations concatenated, as in the seed paper
  (arXiv 2312.15674). The copies differ only in their active-player one-hot, so the state
  carries who controls whom;
- reward: "scoring" (+1 per goal scored, -1 per goal conceded) and optionally
  "checkpoints", the football paper's (arXiv 1907.11180) shaping term re-implemented below.
  The team reward is the MEAN over agents of the per-agent rewards, so the scoring part
  keeps its +-1 scale whatever the team size and the checkpoint part adds at most +1 per
  episode;
- all 19 actions of the default action set are always available; 0 is ``action_idle``.

An episode is terminated when the engine ends it (goal, ball out of play or possession
lost in academy scenarios, end of the game) and truncated when it reaches
``episode_limit`` steps without termination. Environments of a batch are stepped one after
the other in this process; parallelism across processes is the env runners' job.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
from typing import Any

import numpy as np

from marl_shared.envs.spec import (
    SimulatorMissingError,
    StepBatch,
    TaskError,
    TaskSpec,
    UnknownTaskError,
)

logger = logging.getLogger(__name__)

BACKEND = "grf"
OBS_DIM = 115  # simple115v2
NUM_ACTIONS = 19  # the engine's "default" action set
NOOP_ACTION = 0  # action_idle
# Limitation: the seed paper's limit of 150 steps is also the default for full games, which
# the engine runs for 3000 steps; pass episode_limit to play 5 vs 5 or 11 vs 11 to the end.
DEFAULT_EPISODE_LIMIT = 150
DEFAULT_REWARDS = "scoring,checkpoints"
INSTALL_HINT = "bash envs/install_grf.sh"

# Checkpoint shaping: 10 zones by distance of the ball to the opponent goal centre (1, 0);
# zone c is reached at distance <= 0.99 - c * 0.8 / 9, worth 0.1 each, once per episode,
# and the zones still missing are paid at once when the team scores.
NUM_CHECKPOINTS = 10
CHECKPOINT_REWARD = 0.1
_CHECKPOINT_THRESHOLDS = 0.99 - 0.8 / (NUM_CHECKPOINTS - 1) * np.arange(NUM_CHECKPOINTS)

# scenario -> (left players we control by default, controllable left players), read from
# the scenario files of gfootball 2.10.2. Academy defaults follow the seed paper
# (3 vs 1: 3, counterattack: 4, run to score with keeper: 2, run pass and shoot: 2);
# 11-player scenarios default to the whole team, one agent per fixed player.
_SCENARIOS: dict[str, tuple[int, int]] = {
    "academy_empty_goal_close": (1, 2),
    "academy_empty_goal": (1, 2),
    "academy_run_to_score": (1, 2),
    "academy_run_to_score_with_keeper": (2, 2),
    "academy_pass_and_shoot_with_keeper": (2, 3),
    "academy_run_pass_and_shoot_with_keeper": (2, 3),
    "academy_3_vs_1_with_keeper": (3, 4),
    "academy_corner": (11, 11),
    "academy_counterattack_easy": (4, 11),
    "academy_counterattack_hard": (4, 11),
    "academy_single_goal_versus_lazy": (11, 11),
    "1_vs_1_easy": (1, 1),  # each side has only its goalkeeper
    "5_vs_5": (4, 4),  # both goalkeepers are engine-controlled in this scenario
    "11_vs_11_stochastic": (11, 11),
    "11_vs_11_easy_stochastic": (11, 11),
    "11_vs_11_hard_stochastic": (11, 11),
    "11_vs_11_competition": (11, 11),
    "11_vs_11_kaggle": (11, 11),
}

# Engine settings that keep it headless and silent on disk.
_QUIET_ENGINE = {
    "action_set": "default",
    "dump_full_episodes": False,
    "dump_scores": False,
    "write_video": False,
    "real_time": False,
    "display_game_stats": False,
}


def scenario_names() -> list[str]:
    """Every football scenario this adapter supports; needs no engine."""
    return list(_SCENARIOS)


def _check_scenario(scenario: str) -> tuple[int, int]:
    if scenario not in _SCENARIOS:
        raise UnknownTaskError(
            f"Unknown grf scenario {scenario!r}; valid ones are: {', '.join(_SCENARIOS)}."
        )
    return _SCENARIOS[scenario]


def _parse_rewards(rewards: str) -> bool:
    """Return whether checkpoint shaping is on; "scoring" must always be present."""
    parts = {part.strip() for part in str(rewards).split(",") if part.strip()}
    if "scoring" not in parts or not parts <= {"scoring", "checkpoints"}:
        raise TaskError(f"grf rewards must be 'scoring' or 'scoring,checkpoints', got {rewards!r}.")
    return "checkpoints" in parts


def _resolve(
    scenario: str,
    rewards: str,
    episode_limit: int | None,
    num_agents: int | None,
    unknown: dict[str, Any],
) -> tuple[TaskSpec, bool]:
    """Validate the options of one task and return its spec and whether checkpoints are on."""
    default_agents, controllable = _check_scenario(scenario)
    if unknown:
        raise TaskError(
            f"Unknown grf option(s) {', '.join(sorted(unknown))}; "
            "valid ones are rewards, episode_limit and num_agents."
        )
    checkpoints = _parse_rewards(rewards)
    agents = default_agents if num_agents is None else int(num_agents)
    if not 1 <= agents <= controllable:
        raise TaskError(
            f"grf/{scenario} can control 1 to {controllable} players, got num_agents={agents}."
        )
    limit = DEFAULT_EPISODE_LIMIT if episode_limit is None else int(episode_limit)
    if limit < 1:
        raise TaskError(f"episode_limit must be a positive number of steps, got {limit}.")
    task_spec = TaskSpec(
        name=f"{BACKEND}/{scenario}",
        backend=BACKEND,
        num_agents=agents,
        obs_dim=OBS_DIM,
        state_dim=OBS_DIM * agents,
        num_actions=NUM_ACTIONS,
        episode_limit=limit,
        outcome="goal",
        noop_action=NOOP_ACTION,
    )
    return task_spec, checkpoints


def spec(
    scenario: str,
    rewards: str = DEFAULT_REWARDS,
    episode_limit: int | None = None,
    num_agents: int | None = None,
    **unknown: Any,
) -> TaskSpec:
    """The static shapes of a football task, computed without starting the engine."""
    return _resolve(scenario, rewards, episode_limit, num_agents, unknown)[0]


def _import_engine():
    """Import the engine modules, or raise the one-sentence install hint."""
    # gfootball imports the legacy gym package, which prints a deprecation notice to stderr;
    # we never use gym's API, so the notice goes to the debug log instead of the console.
    notices = io.StringIO()
    try:
        with contextlib.redirect_stderr(notices):
            config = importlib.import_module("gfootball.env.config")
            football_env = importlib.import_module("gfootball.env.football_env")
            wrappers = importlib.import_module("gfootball.env.wrappers")
    except ImportError as error:
        raise SimulatorMissingError(
            f"The football engine (gfootball) is not installed; run `{INSTALL_HINT}` to build it."
        ) from error
    finally:
        if notices.getvalue().strip():
            logger.debug("gfootball import wrote: %s", notices.getvalue().strip())
    return config, football_env, wrappers


class _DropEngineInfo(logging.Filter):
    """Drop the engine's per-episode info lines (it logs through absl) but keep its warnings."""

    def filter(self, record: logging.LogRecord) -> bool:
        from_engine = "gfootball" in record.pathname.replace("\\", "/")
        return record.levelno >= logging.WARNING or not from_engine


_ENGINE_FILTER = _DropEngineInfo()


def _silence_engine_logs() -> None:
    absl_logger = logging.getLogger("absl")
    if _ENGINE_FILTER not in absl_logger.filters:
        absl_logger.addFilter(_ENGINE_FILTER)


class FootballTask:
    """``num_envs`` football engines of one scenario, stepped in turn, with auto-reset."""

    def __init__(
        self,
        scenario: str,
        num_envs: int,
        rewards: str = DEFAULT_REWARDS,
        episode_limit: int | None = None,
        num_agents: int | None = None,
        **unknown: Any,
    ) -> None:
        self.spec, self._checkpoints = _resolve(
            scenario, rewards, episode_limit, num_agents, unknown
        )
        if int(num_envs) < 1:
            raise TaskError(f"num_envs must be at least 1, got {num_envs}.")
        config_module, football_env, wrappers = _import_engine()
        _silence_engine_logs()
        self.num_envs = int(num_envs)
        self.scenario = scenario
        self._to_simple115 = wrappers.Simple115StateWrapper.convert_observation

        num = self.spec.num_agents
        self._configs = []
        self._envs = []
        try:
            for index in range(self.num_envs):
                values = dict(_QUIET_ENGINE)
                values.update(
                    level=scenario,
                    players=[f"agent:left_players={num}"],
                    game_engine_random_seed=index,
                    reverse_team_processing=bool(index % 2),
                )
                config = config_module.Config(values)
                self._configs.append(config)
                self._envs.append(football_env.FootballEnv(config))
        except BaseException:
            self.close()
            raise
        logger.debug("Started %d football engine(s) for %s", self.num_envs, self.spec.name)

        shape = (self.num_envs, num)
        self._obs = np.zeros((*shape, OBS_DIM), dtype=np.float32)  # current observations
        self._collected = np.zeros(shape, dtype=np.int64)  # checkpoints collected per agent
        self._episode_steps = np.zeros(self.num_envs, dtype=np.int64)
        self._seed_streams: list[np.random.Generator] = []
        self._all_actions = np.ones((*shape, NUM_ACTIONS), dtype=bool)
        self._last_raw: list[list[dict] | None] = [None] * self.num_envs  # for render_state

    def reset(self, seed: int) -> StepBatch:
        """Reset every environment; env ``i`` draws its episode seeds from ``(seed, i)``."""
        if not self._envs:
            raise RuntimeError("reset() was called on a closed football task.")
        root = np.random.SeedSequence(int(seed))
        self._seed_streams = [np.random.default_rng(child) for child in root.spawn(self.num_envs)]
        for index in range(self.num_envs):
            self._reset_env(index)
        batch = self._new_batch()
        batch.obs[:] = self._obs
        batch.state[:] = self._obs.reshape(self.num_envs, -1)
        return batch

    def step(self, actions: np.ndarray) -> StepBatch:
        """Step every environment with int actions [B, N]; finished ones reset themselves."""
        actions = np.asarray(actions)
        if actions.shape != (self.num_envs, self.spec.num_agents):
            raise ValueError(
                f"Expected actions of shape {(self.num_envs, self.spec.num_agents)}, "
                f"got {actions.shape}."
            )
        if not self._seed_streams or not self._envs:
            raise RuntimeError("step() needs an open task that was reset(seed) first.")
        batch = self._new_batch()
        action_lists = actions.tolist()
        limit = self.spec.episode_limit
        for index, env in enumerate(self._envs):
            raw, _, done, info = env.step(action_lists[index])
            self._last_raw[index] = raw
            self._obs[index] = self._to_simple115(raw, True)
            score = info["score_reward"]
            batch.reward[index] = score + self._checkpoint_reward(index, raw, score)
            self._episode_steps[index] += 1
            truncated = not done and self._episode_steps[index] >= limit
            if done or truncated:
                batch.terminated[index] = done
                batch.truncated[index] = truncated
                batch.final_state[index] = self._obs[index].reshape(-1)
                goals_for, goals_against = raw[0]["score"]
                batch.outcome[index] = goals_for - goals_against
                self._reset_env(index)
        batch.obs[:] = self._obs
        batch.state[:] = self._obs.reshape(self.num_envs, -1)
        return batch

    def render_state(self, index: int = 0) -> dict[str, Any]:
        """Read-only raw engine observation of env ``index`` (positions, ball, score) for drawing.

        On the step an episode ends this is the first observation of the next episode.
        """
        raw = self._last_raw[index]
        if raw is None:
            raise RuntimeError("reset(seed) must be called before render_state().")
        first = raw[0]
        return {
            "left_team": np.asarray(first["left_team"]),
            "right_team": np.asarray(first["right_team"]),
            "ball": np.asarray(first["ball"]),
            "ball_owned_team": int(first["ball_owned_team"]),
            "score": tuple(first["score"]),
            "controlled": [int(obs["active"]) for obs in raw],
        }

    def close(self) -> None:
        """Hand the engines back to gfootball's in-process pool."""
        for env in self._envs:
            env.close()
        self._envs = []

    def __enter__(self) -> FootballTask:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _new_batch(self) -> StepBatch:
        """Fresh output arrays, so callers may keep a batch while the task steps on."""
        envs, state_dim = self.num_envs, self.spec.state_dim
        return StepBatch(
            obs=np.empty_like(self._obs),
            avail_actions=self._all_actions.copy(),
            state=np.empty((envs, state_dim), dtype=np.float32),
            reward=np.zeros(envs, dtype=np.float32),
            terminated=np.zeros(envs, dtype=bool),
            truncated=np.zeros(envs, dtype=bool),
            final_state=np.zeros((envs, state_dim), dtype=np.float32),
            outcome=np.zeros(envs, dtype=np.float32),
        )

    def _reset_env(self, index: int) -> None:
        """Start a new episode in env ``index`` with the next seed of its stream."""
        engine_seed = int(self._seed_streams[index].integers(0, 2**31 - 1))
        # The engine reads these when it builds the next episode's scenario; its own rule
        # ties the team processing order to the seed's parity.
        self._configs[index].update(
            {
                "game_engine_random_seed": engine_seed,
                "reverse_team_processing": bool(engine_seed % 2),
            }
        )
        raw = self._envs[index].reset()
        self._last_raw[index] = raw
        self._obs[index] = self._to_simple115(raw, True)
        self._collected[index] = 0
        self._episode_steps[index] = 0

    def _checkpoint_reward(self, index: int, raw: list[dict], score: int) -> float:
        """Mean over agents of this step's checkpoint shaping, updating the collected zones."""
        if not self._checkpoints:
            return 0.0
        collected = self._collected[index]
        if score == 1:
            # Scoring pays every zone an agent has not collected yet.
            paid = NUM_CHECKPOINTS * collected.size - int(collected.sum())
            collected[:] = NUM_CHECKPOINTS
            return CHECKPOINT_REWARD * paid / collected.size
        first = raw[0]
        if first["ball_owned_team"] != 0:
            return 0.0
        owner = first["ball_owned_player"]
        for agent, observation in enumerate(raw):
            if observation["active"] != owner:
                continue
            ball_x, ball_y = first["ball"][0], first["ball"][1]
            distance = ((ball_x - 1.0) ** 2 + ball_y**2) ** 0.5
            reached = int(np.count_nonzero(distance <= _CHECKPOINT_THRESHOLDS))
            new = reached - int(collected[agent])
            if new <= 0:
                return 0.0
            collected[agent] = reached
            return CHECKPOINT_REWARD * new / collected.size
        return 0.0


def make(scenario: str, num_envs: int, **options: Any) -> FootballTask:
    """Build ``num_envs`` engines of a scenario; options: rewards, episode_limit, num_agents."""
    return FootballTask(scenario, num_envs, **options)
