"""SMAX, JaxMARL's JAX re-implementation of SMAC, as a batched task: ``smax/<map>``.

The enemy team is JaxMARL's built-in heuristic (``HeuristicEnemySMAX``), the standard
SMAX setting, and agents see SMAX's ``unit_list`` observations. The whole batch is one
``jax.jit`` of a ``jax.vmap`` over single environments: it steps, auto-resets finished
environments and stacks every output, and the host receives all of it in a single
``jax.device_get`` per step. Actions travel as one int32 ``[B, N]`` array, so a task
compiles once per batch size and never again.

Conventions of this adapter:

- team reward: SMAX gives every ally the same reward (the enemies' normalised health lost
  in the step plus a bonus for winning), so the team reward is ally 0's;
- terminated: one team has no unit left; truncated: ``episode_limit`` steps passed with
  both teams standing (SMAX itself reports both as ``done``; they are told apart here from
  the unit-alive flags);
- outcome: 1.0 when every enemy is dead and at least one ally is alive, else 0.0; a
  simultaneous wipe-out is a draw, not a win, as in SMAC and in SMAX's own win bonus;
- actions: 0-3 move (north, east, south, west), 4 stop, ``5 + j`` attack enemy ``j``; a
  dead unit is left only the stop action, which is therefore ``noop_action``.

JAX runs on the CPU device, even where a GPU build of JAX is installed, through a
scoped ``jax.default_device``; the adapter sets no global JAX or XLA flag.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import sys
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from marl_shared.envs.spec import (
    SimulatorMissingError,
    StepBatch,
    TaskError,
    TaskSpec,
    UnknownTaskError,
)

logger = logging.getLogger(__name__)

BACKEND = "smax"
DEFAULT_EPISODE_LIMIT = 100  # SMAX's own max_steps
NUM_MOVE_ACTIONS = 5  # SMAX's four moves and stop; attack actions follow
NOOP_ACTION = 4  # "stop": the only action SMAX leaves to a dead unit
ATTACK_MODES = ("closest", "random")
_NEVER = 2**31 - 1  # a step count no episode reaches (SMAX counts steps in int32)

# SMAX unit type indices (smax_env.SMAX defaults).
MARINE, MARAUDER, STALKER, ZEALOT, ZERGLING, HYDRALISK = range(6)

# Maps registered here on top of the ones JaxMARL ships: SMAC maps whose units SMAX has
# (no terrain is modelled, as for every SMAX map), plus one larger marine battle.
# name -> (ally unit types, enemy unit types).
EXTRA_MAPS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "8m_vs_9m": ((MARINE,) * 8, (MARINE,) * 9),  # the seed paper's pre-training map
    "25m_vs_27m": ((MARINE,) * 25, (MARINE,) * 27),
    "2m_vs_1z": ((MARINE,) * 2, (ZEALOT,)),
    "3s_vs_3z": ((STALKER,) * 3, (ZEALOT,) * 3),
    "3s_vs_4z": ((STALKER,) * 3, (ZEALOT,) * 4),
}


@contextlib.contextmanager
def _stdout_into(buffer: io.StringIO):
    """Send prints to ``buffer`` and restore both streams after, as ``sys.std*`` were."""
    # JaxMARL prints a banner at import, and its optional brax import resets sys.stdout
    # and sys.stderr to sys.__stdout__ / sys.__stderr__, so both are saved and restored.
    saved = sys.stdout, sys.stderr, sys.__stdout__
    sys.stdout = sys.__stdout__ = buffer
    try:
        yield
    finally:
        sys.stdout, sys.stderr, sys.__stdout__ = saved


@functools.cache
def _import_smax():
    """Import JaxMARL's SMAX modules; what JaxMARL prints on import goes to the debug log."""
    banner = io.StringIO()
    try:
        with _stdout_into(banner):
            from jaxmarl.environments.smax import heuristic_enemy_smax_env, smax_env
    except ImportError as error:
        raise SimulatorMissingError(
            "SMAX needs the jaxmarl package; install it with `pip install jaxmarl==0.2.0`."
        ) from error
    if banner.getvalue().strip():
        logger.debug("jaxmarl at import: %s", " ".join(banner.getvalue().split()))
    return smax_env, heuristic_enemy_smax_env


def scenario_names() -> list[str]:
    """Every map JaxMARL's SMAX ships, then the ones registered in this module."""
    smax_env, _ = _import_smax()
    shipped = list(smax_env.MAP_NAME_TO_SCENARIO)
    return shipped + [name for name in EXTRA_MAPS if name not in shipped]


def _scenario(name: str):
    """The SMAX ``Scenario`` of a map name, ours or JaxMARL's, without registering ours."""
    smax_env, _ = _import_smax()
    if name in smax_env.MAP_NAME_TO_SCENARIO:
        return smax_env.MAP_NAME_TO_SCENARIO[name]
    if name in EXTRA_MAPS:
        allies, enemies = EXTRA_MAPS[name]
        unit_types = np.array(allies + enemies, dtype=np.uint8)
        return smax_env.Scenario(unit_types, len(allies), len(enemies), False, False)
    raise UnknownTaskError(
        f"Unknown smax scenario {name!r}; valid ones are: {', '.join(scenario_names())}."
    )


@dataclass(frozen=True)
class _Simulator:
    """What fixes a compiled SMAX program: the map and the enemy heuristic's settings."""

    scenario: str
    attack_mode: str
    enemy_shoots: bool


def _options(
    scenario: str,
    episode_limit: int | None = None,
    attack_mode: str = "closest",
    enemy_shoots: bool = True,
    **unknown: Any,
) -> tuple[_Simulator, int]:
    """Check a task's options at the edge and split them into simulator and episode limit."""
    if unknown:
        raise TaskError(
            f"Unknown smax option(s) {', '.join(sorted(unknown))}; "
            "valid ones are episode_limit, attack_mode and enemy_shoots."
        )
    limit = DEFAULT_EPISODE_LIMIT if episode_limit is None else int(episode_limit)
    if not 1 <= limit < _NEVER:
        raise TaskError(f"episode_limit must be a positive number of steps, got {limit}.")
    if attack_mode not in ATTACK_MODES:
        raise TaskError(
            f"smax attack_mode must be one of {', '.join(ATTACK_MODES)}, got {attack_mode!r}."
        )
    _scenario(scenario)  # raises UnknownTaskError for an unknown map
    return _Simulator(scenario, attack_mode, bool(enemy_shoots)), limit


def _make_env(simulator: _Simulator):
    """A JaxMARL ``HeuristicEnemySMAX`` that never ends an episode on time; compiles nothing."""
    _, heuristic_enemy_smax_env = _import_smax()
    # The step limit is applied by this adapter as a runtime argument instead, so tasks
    # that differ only in episode_limit share one compiled program.
    return heuristic_enemy_smax_env.HeuristicEnemySMAX(
        scenario=_scenario(simulator.scenario),
        max_steps=_NEVER,
        observation_type="unit_list",
        action_type="discrete",
        attack_mode=simulator.attack_mode,
        enemy_shoots=simulator.enemy_shoots,
    )


def _spec_of(env, simulator: _Simulator, episode_limit: int) -> TaskSpec:
    return TaskSpec(
        name=f"{BACKEND}/{simulator.scenario}",
        backend=BACKEND,
        num_agents=env.num_allies,
        obs_dim=int(env.obs_size),
        state_dim=int(env.state_size),
        num_actions=env.num_enemies + NUM_MOVE_ACTIONS,
        episode_limit=episode_limit,
        outcome="win",
        noop_action=NOOP_ACTION,
    )


def spec(scenario: str, **options: Any) -> TaskSpec:
    """The static shapes of a SMAX task, read from the environment without compiling it."""
    simulator, episode_limit = _options(scenario, **options)
    return _spec_of(_make_env(simulator), simulator, episode_limit)


class _Program:
    """The jitted batch functions of one SMAX simulator, shared by every task that uses it."""

    # Both functions are pure: reset(key, num_envs) and step(keys, states, actions, limit)
    # return new per-environment keys and states with the outputs, so tasks of one map
    # share a jit cache whatever their batch size or episode limit.

    def __init__(self, simulator: _Simulator) -> None:
        self.device = jax.devices("cpu")[0]
        with jax.default_device(self.device):
            env = _make_env(simulator)
        self.env = env
        agents = list(env.agents)
        num_allies = env.num_allies

        def strong(tree):
            # The heuristic's initial state holds weakly typed ints; stepped states do not.
            # Fixing every leaf's type keeps the jitted step at one compilation.
            return jax.tree.map(lambda leaf: jnp.asarray(leaf).astype(leaf.dtype), tree)

        def stack(per_agent: dict) -> jax.Array:
            return jnp.stack([per_agent[agent] for agent in agents])

        def avail_of(env_state) -> jax.Array:
            return stack(env.get_avail_actions(env_state)).astype(jnp.bool_)

        def reset_one(key):
            next_key, reset_key = jax.random.split(key)
            obs, env_state = env.reset(reset_key)
            outputs = (stack(obs), avail_of(env_state), obs["world_state"])
            return next_key, strong(env_state), outputs

        def step_one(key, env_state, actions, limit):
            next_key, step_key, reset_key = jax.random.split(key, 3)
            action_dict = {agent: actions[i] for i, agent in enumerate(agents)}
            end_obs, end_state, rewards, _, _ = env.step_env(step_key, env_state, action_dict)
            alive = end_state.state.unit_alive
            allies_standing = jnp.any(alive[:num_allies])
            enemies_standing = jnp.any(alive[num_allies:])
            terminated = ~(allies_standing & enemies_standing)
            truncated = ~terminated & (end_state.state.step >= limit)
            ended = terminated | truncated
            won = allies_standing & ~enemies_standing

            # Auto-reset as JaxMARL's own step does: a fresh episode is drawn for every
            # environment and the finished ones take it.
            start_obs, start_state = env.reset(reset_key)
            new_state = jax.tree.map(
                lambda fresh, old: jnp.where(ended, fresh, old), start_state, end_state
            )
            final_obs = stack(end_obs)
            outputs = (
                jnp.where(ended, stack(start_obs), final_obs),
                avail_of(new_state),
                jnp.where(ended, start_obs["world_state"], end_obs["world_state"]),
                rewards[agents[0]].astype(jnp.float32),
                terminated,
                truncated,
                end_obs["world_state"],
                won.astype(jnp.float32),
                final_obs,
            )
            return next_key, strong(new_state), outputs

        def reset_batch(key, num_envs):
            return jax.vmap(reset_one)(jax.random.split(key, num_envs))

        def step_batch(keys, env_states, actions, limit):
            return jax.vmap(step_one, in_axes=(0, 0, 0, None))(keys, env_states, actions, limit)

        self.reset = jax.jit(reset_batch, static_argnums=1)
        self.step = jax.jit(step_batch, donate_argnums=(0, 1))


@functools.lru_cache(maxsize=16)
def _program(simulator: _Simulator) -> _Program:
    logger.debug("Building the SMAX program for %s", simulator)
    return _Program(simulator)


def _seed_key(seed: int) -> np.ndarray:
    """A raw threefry key from any integer seed: its low 64 bits as (high, low) words."""
    value = int(seed) % 2**64
    return np.array([value >> 32, value & 0xFFFFFFFF], dtype=np.uint32)


def _to_host(outputs: tuple) -> list[np.ndarray]:
    """One device-to-host transfer of all outputs, as writable arrays the caller may keep."""
    # On the CPU device, device_get hands out read-only views of JAX's buffers; one copy
    # makes them ordinary arrays, as the other adapters return.
    return [np.array(array) for array in jax.device_get(outputs)]


class SmaxTask:
    """``num_envs`` SMAX environments of one map, stepped together in one jitted call."""

    def __init__(self, scenario: str, num_envs: int, **options: Any) -> None:
        if int(num_envs) < 1:
            raise TaskError(f"num_envs must be at least 1, got {num_envs}.")
        simulator, episode_limit = _options(scenario, **options)
        self._program = _program(simulator)
        self.spec = _spec_of(self._program.env, simulator, episode_limit)
        self.num_envs = int(num_envs)
        self._limit = np.int32(episode_limit)
        self._action_shape = (self.num_envs, self.spec.num_agents)
        self._keys = None  # per-environment PRNG keys, on the device
        self._states = None  # per-environment SMAX states, on the device

    def reset(self, seed: int) -> StepBatch:
        """Reset every environment; the seed fixes all randomness of the batch from here on."""
        device = self._program.device
        with jax.default_device(device):
            key = jax.device_put(_seed_key(seed), device)
            self._keys, self._states, outputs = self._program.reset(key, self.num_envs)
        obs, avail, world = _to_host(outputs)
        envs = self.num_envs
        return StepBatch(
            obs=obs,
            avail_actions=avail,
            state=world,
            reward=np.zeros(envs, dtype=np.float32),
            terminated=np.zeros(envs, dtype=bool),
            truncated=np.zeros(envs, dtype=bool),
            final_state=np.zeros_like(world),
            outcome=np.zeros(envs, dtype=np.float32),
            final_obs=np.zeros_like(obs),
        )

    def step(self, actions: np.ndarray) -> StepBatch:
        """Step every environment with int actions [B, N]; finished ones reset themselves."""
        if self._states is None:
            raise RuntimeError("reset(seed) must be called before step().")
        actions = np.asarray(actions)
        if actions.shape != self._action_shape:
            raise ValueError(
                f"Expected actions of shape {self._action_shape}, got {actions.shape}."
            )
        if actions.min() < 0 or actions.max() >= self.spec.num_actions:
            raise ValueError(
                f"Actions of {self.spec.name} must lie in [0, {self.spec.num_actions})."
            )
        with jax.default_device(self._program.device):
            self._keys, self._states, outputs = self._program.step(
                self._keys, self._states, actions.astype(np.int32, copy=False), self._limit
            )
        obs, avail, world, reward, terminated, truncated, final_state, outcome, final_obs = (
            _to_host(outputs)
        )
        return StepBatch(
            obs=obs,
            avail_actions=avail,
            state=world,
            reward=reward,
            terminated=terminated,
            truncated=truncated,
            final_state=final_state,
            outcome=outcome,
            final_obs=final_obs,
        )

    @property
    def env_states(self):
        """The batched JaxMARL states on the device; valid until the next step or reset."""
        return self._states

    def render_state(self, index: int = 0) -> dict[str, Any]:
        """Read-only snapshot of environment ``index`` for drawing (units, health, attacks)."""
        if self._states is None:
            raise RuntimeError("reset(seed) must be called before render_state().")
        env = self._program.env
        inner = self._states.state
        pick = {
            name: np.asarray(getattr(inner, name))[index]
            for name in ("unit_positions", "unit_alive", "unit_teams", "unit_health", "unit_types")
        }
        pick["prev_attack_actions"] = np.asarray(inner.prev_attack_actions)[index]
        pick["max_health"] = np.asarray(env.unit_type_health)[pick["unit_types"]]
        pick["attack_range"] = np.asarray(env.unit_type_attack_ranges)[pick["unit_types"]]
        pick.update(
            num_allies=int(env.num_allies),
            num_movement_actions=int(env.num_movement_actions),
            map_size=(float(env.map_width), float(env.map_height)),
        )
        return pick

    def close(self) -> None:
        """Drop the device buffers; the compiled program stays cached for the next task."""
        self._keys = None
        self._states = None

    def __enter__(self) -> SmaxTask:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def make(scenario: str, num_envs: int, **options: Any) -> SmaxTask:
    """Build a batch of SMAX environments; options: episode_limit, attack_mode, enemy_shoots."""
    return SmaxTask(scenario, num_envs, **options)
