"""Real StarCraft II through the ``smacv2`` package (github oxwhirl/smacv2) as ``sc2/<scenario>``.

Scenarios are the SMAC maps (``sc2/3m``, ``sc2/MMM2``, ...) and the procedurally generated
SMACv2 battles (``sc2/protoss_5_vs_5``, ``sc2/zerg_10_vs_11``, ...). The game binary and the
maps are not on any package registry: ``bash envs/install_sc2.sh`` fetches them on a machine
with internet access.

Each environment of a batch lives in its own worker process, started with
``python -c`` (not ``multiprocessing``, whose start methods re-import the caller's main
module). The reason is protobuf: smacv2 needs ``s2clientprotocol``, whose generated code
only loads under protobuf's pure-Python implementation, while TensorBoard and Ray in the
training process need protobuf >= 6 with its fast implementation. A worker sets
``PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python`` for itself only. The batch sends a
command to every worker and then collects the answers, so the games step concurrently.

Per step a worker calls ``StarCraft2Env.step`` and reads ``get_obs``, ``get_avail_actions``
and ``get_state``. smacv2 ends an episode with ``terminated=True`` both when the battle is
decided and when the step limit is hit; with ``continuing_episode=True`` (our default) it
marks the latter with ``info["episode_limit"]``, which this adapter turns into
``truncated``. ``info["battle_won"]`` is the outcome. Dead agents may only take the no-op
action 0, as in SMAC; their actions are replaced by it before stepping.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import logging
import os
import random
import socket
import subprocess
import sys
import weakref
from multiprocessing.connection import Connection
from pathlib import Path
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

BACKEND = "sc2"
NOOP_ACTION = 0  # SMAC's no-op, the only action of a dead agent
INSTALL_HINT = "bash envs/install_sc2.sh"
PROTOBUF_IMPL_VAR = "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION"
DEFAULT_WORKER_TIMEOUT_S = 600.0  # launching StarCraft II can take a minute on a slow disk

# The SMAC maps of smacv2's map registry (smacv2/env/starcraft2/maps/smac_maps.py).
SMAC_MAPS = (
    "3m",
    "8m",
    "25m",
    "5m_vs_6m",
    "8m_vs_9m",
    "10m_vs_11m",
    "27m_vs_30m",
    "MMM",
    "MMM2",
    "2s3z",
    "3s5z",
    "3s5z_vs_3s6z",
    "3s_vs_3z",
    "3s_vs_4z",
    "3s_vs_5z",
    "1c3s5z",
    "2m_vs_1z",
    "corridor",
    "6h_vs_8z",
    "2s_vs_1sc",
    "so_many_baneling",
    "bane_vs_bane",
    "2c_vs_64zg",
)

# SMACv2 races: unit types with their spawn weights, and the rare unit that may not make up
# a whole team (values of the SMACv2 paper, arXiv 2212.07489, and its example configs).
SMACV2_RACES: dict[str, tuple[tuple[tuple[str, float], ...], str | None]] = {
    "protoss": ((("stalker", 0.45), ("zealot", 0.45), ("colossus", 0.1)), None),
    "terran": ((("marine", 0.45), ("marauder", 0.45), ("medivac", 0.1)), "medivac"),
    "zerg": ((("zergling", 0.45), ("hydralisk", 0.45), ("baneling", 0.1)), "baneling"),
}
SMACV2_SIZES = ((5, 5), (10, 10), (20, 20), (10, 11), (20, 23))  # (allies, enemies)
SMACV2_MAP_SIZE = 32  # the 32x32_flat map every SMACv2 battle is played on

# StarCraft2Env settings of SMACv2's published configs; SMAC maps keep smacv2's defaults.
SMACV2_ENV_KWARGS = {
    "use_unit_ranges": True,
    "min_attack_range": 2,
    "obs_own_pos": True,
    "conic_fov": False,
}
# continuing_episode=True only adds info["episode_limit"] on timeouts, which we need to
# tell truncation from termination; it changes nothing else in smacv2.
COMMON_ENV_KWARGS = {"continuing_episode": True}
_RESERVED_OPTIONS = ("map_name", "seed")


def _smacv2_scenarios() -> dict[str, tuple[str, int, int]]:
    """SMACv2 scenario name -> (race, allies, enemies)."""
    return {
        f"{race}_{allies}_vs_{enemies}": (race, allies, enemies)
        for race in SMACV2_RACES
        for allies, enemies in SMACV2_SIZES
    }


def scenario_names() -> list[str]:
    """Every SMAC map and SMACv2 scenario this backend knows."""
    return list(SMAC_MAPS) + list(_smacv2_scenarios())


def smacv2_capability_config(race: str, allies: int, enemies: int) -> dict:
    """The capability config of a SMACv2 battle: weighted random teams and random starts."""
    units, exception = SMACV2_RACES[race]
    team_gen: dict[str, Any] = {
        "dist_type": "weighted_teams",
        "unit_types": [name for name, _ in units],
        "weights": [weight for _, weight in units],
        "observe": True,
    }
    if exception is not None:
        team_gen["exception_unit_types"] = [exception]
    return {
        "n_units": allies,
        "n_enemies": enemies,
        "team_gen": team_gen,
        "start_positions": {
            "dist_type": "surrounded_and_reflect",
            "p": 0.5,
            "map_x": SMACV2_MAP_SIZE,
            "map_y": SMACV2_MAP_SIZE,
        },
    }


def env_arguments(scenario: str, **options: Any) -> dict:
    """Keyword arguments of the smacv2 environment for a scenario, with user options on top."""
    if scenario not in scenario_names():
        raise UnknownTaskError(
            f"Unknown sc2 scenario {scenario!r}; valid ones are: {', '.join(scenario_names())}."
        )
    reserved = [name for name in _RESERVED_OPTIONS if name in options]
    if reserved:
        raise TaskError(
            f"Option {reserved[0]!r} is set by the sc2 adapter itself and cannot be passed."
        )
    kwargs: dict[str, Any] = dict(COMMON_ENV_KWARGS)
    generated = _smacv2_scenarios().get(scenario)
    if generated is None:
        kwargs["map_name"] = scenario
    else:
        race, allies, enemies = generated
        kwargs["map_name"] = f"10gen_{race}"  # smacv2's registry entry for the race
        kwargs["capability_config"] = smacv2_capability_config(race, allies, enemies)
        kwargs.update(SMACV2_ENV_KWARGS)
    kwargs.update(options)
    return kwargs


def game_dir() -> Path:
    """Where pysc2 looks for the game: $SC2PATH, else ~/StarCraftII."""
    return Path(os.environ.get("SC2PATH") or Path.home() / "StarCraftII").expanduser()


def smacv2_installed() -> bool:
    """Whether the smacv2 package can be found (it is not imported: see the module docstring)."""
    return importlib.util.find_spec("smacv2") is not None


def simulator_problem() -> str | None:
    """Why StarCraft II cannot run here, as a clause for a sentence, or None when it can.

    Nothing is imported or launched: smacv2 is only located, so this is cheap and safe to
    call from a process that already uses protobuf.
    """
    if not smacv2_installed():
        return "the smacv2 package is not installed"
    game = game_dir()
    if not (game / "Versions").is_dir():
        return f"no StarCraft II game was found at {game} (set SC2PATH to the game folder)"
    if not (game / "Maps" / "SMAC_Maps").is_dir():
        return f"the SMAC maps are missing from {game / 'Maps' / 'SMAC_Maps'}"
    return None


def game_versions() -> list[str]:
    """Installed game builds, e.g. ['Base75689'] for StarCraft II 4.10."""
    versions = game_dir() / "Versions"
    if not versions.is_dir():
        return []
    return sorted(path.name for path in versions.iterdir() if path.name.startswith("Base"))


def _missing_error(scenario: str, problem: str) -> SimulatorMissingError:
    return SimulatorMissingError(
        f"StarCraft II cannot run task sc2/{scenario} because {problem}; install it with "
        f"`{INSTALL_HINT}` on a machine with internet access, or use the smax backend."
    )


def _require_simulator(scenario: str) -> None:
    problem = simulator_problem()
    if problem is not None:
        raise _missing_error(scenario, problem)


# ---------------------------------------------------------------------------------------
# Inside a worker process: one smacv2 environment.


def _reseed_distributions(root: Any, seed: int) -> None:
    """Give every numpy Generator held by smacv2's distributions a seeded replacement.

    smacv2's distributions create ``numpy.random.default_rng()`` without a seed, some of
    them nested in others, so the walk follows attributes of objects that have ``generate``.
    """
    seeds = np.random.SeedSequence(seed)
    seen: set[int] = set()
    stack = list(root.values()) if isinstance(root, dict) else [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or not hasattr(obj, "__dict__"):
            continue
        seen.add(id(obj))
        for name, value in sorted(vars(obj).items()):
            if isinstance(value, np.random.Generator):
                setattr(obj, name, np.random.default_rng(seeds.spawn(1)[0]))
            elif hasattr(value, "generate"):
                stack.append(value)


def build_smacv2_env(seed: int | None = None, **kwargs: Any):
    """Build (without launching the game) the smacv2 environment for the given arguments."""
    from smacv2.env import StarCraft2Env, StarCraftCapabilityEnvWrapper

    if "capability_config" not in kwargs:
        return StarCraft2Env(seed=seed, **kwargs)
    # The wrapper adds keys to the config it is given, so it gets its own copy.
    kwargs["capability_config"] = copy.deepcopy(kwargs["capability_config"])
    env = StarCraftCapabilityEnvWrapper(seed=seed, **kwargs)
    if seed is not None:
        _reseed_distributions(env.env_key_to_distribution_map, seed)
    return env


class EnvRunner:
    """Drives one smacv2-style environment: arrays out, terminated vs truncated, auto-reset."""

    def __init__(self, env: Any, num_actions: int):
        self.env = env
        self.num_actions = num_actions

    def observe(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-agent observations, availability masks and the global state, as arrays."""
        obs = np.asarray(self.env.get_obs(), dtype=np.float32)
        avail = np.asarray(self.env.get_avail_actions(), dtype=np.float32).reshape(
            obs.shape[0], self.num_actions
        )
        avail = avail > 0
        avail[~avail.any(axis=1), NOOP_ACTION] = True  # an agent always has some action
        state = np.asarray(self.env.get_state(), dtype=np.float32)
        return obs, avail, state

    def reset(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        # The SMACv2 wrapper's reset may return None after an internal retry, so the
        # observation is read back rather than taken from reset's return value.
        self.env.reset()
        return self.observe()

    def step(self, actions: list[int]) -> tuple:
        """One step; on the episode's end the environment is reset and the final state kept."""
        reward, done, info = self.env.step(actions)
        terminated = truncated = False
        outcome = 0.0
        if done:
            if not info:
                # smacv2 answers (0, True, {}) after it had to restart a crashed game.
                logger.warning("StarCraft II restarted mid-episode; the episode is truncated.")
                truncated = True
            elif info.get("episode_limit", False):
                truncated = True
            else:
                terminated = True
            outcome = float(bool(info.get("battle_won", False)))
        if done:
            final_state = np.asarray(self.env.get_state(), dtype=np.float32)
            obs, avail, state = self.reset()
        else:
            obs, avail, state = self.observe()
            final_state = state
        return obs, avail, state, float(reward), terminated, truncated, final_state, outcome


def _resolve_factory(path: str):
    module_name, _, attr = path.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def _build(factory, kwargs: dict, seed: int | None):
    if seed is not None:
        # The worker owns this process, so seeding the global generators is harmless; smacv2
        # shuffles teams with Python's ``random``.
        random.seed(seed)
        np.random.seed(seed)
    return factory(seed=seed, **copy.deepcopy(kwargs))


def worker_main(fd: int) -> None:
    """Serve one environment over the connection on file descriptor ``fd`` until closed."""
    os.environ[PROTOBUF_IMPL_VAR] = "python"  # before anything imports protobuf here
    conn = Connection(fd)
    env = None
    try:
        _, payload = conn.recv()
        try:
            factory = _resolve_factory(payload["factory"])
            for module in payload["imports"]:
                importlib.import_module(module)
        except Exception as exc:  # ImportError, or protobuf refusing old generated code
            conn.send(("missing", f"{type(exc).__name__}: {exc}"))
            return
        kwargs, seed = payload["kwargs"], None
        try:
            env = _build(factory, kwargs, seed)
        except TypeError as exc:  # an unknown or ill-typed StarCraft2Env option
            conn.send(("bad_option", str(exc)))
            return
        info = env.get_env_info()
        runner = EnvRunner(env, int(info["n_actions"]))
        conn.send(("ok", info))
        while True:
            command, payload = conn.recv()
            if command == "close":
                break
            if command == "reset":
                if payload is not None and payload != seed:
                    env.close()
                    seed = payload
                    env = _build(factory, kwargs, seed)
                    runner = EnvRunner(env, runner.num_actions)
                conn.send(("ok", runner.reset()))
            elif command == "step":
                conn.send(("ok", runner.step(payload)))
            else:
                raise ValueError(f"unknown worker command {command!r}")
    except EOFError:
        pass  # the parent went away
    except Exception as exc:  # reported to the parent, which raises it as one sentence
        try:
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
        except OSError:
            pass
    finally:
        if env is not None:
            try:
                env.close()
            except Exception:  # closing a broken game must not hide the original error
                logger.debug("closing a StarCraft II environment failed", exc_info=True)
        conn.close()


# ---------------------------------------------------------------------------------------
# In the training process.


class _Worker:
    """The parent's handle on one worker process."""

    def __init__(self, factory: str, imports: list[str], kwargs: dict, timeout_s: float):
        self.timeout_s = timeout_s
        parent_sock, child_sock = socket.socketpair()
        env = dict(os.environ)
        env[PROTOBUF_IMPL_VAR] = "python"
        env["PYTHONPATH"] = os.pathsep.join(path for path in sys.path if path)
        code = f"from marl_shared.envs.sc2 import worker_main; worker_main({child_sock.fileno()})"
        self.process = subprocess.Popen(
            [sys.executable, "-c", code],
            pass_fds=(child_sock.fileno(),),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=2,  # the game's chatter goes to stderr, never to our stdout
        )
        child_sock.close()
        self.conn = Connection(parent_sock.detach())
        self.conn.send(("init", {"factory": factory, "imports": imports, "kwargs": kwargs}))

    def send(self, command: str, payload: Any = None) -> None:
        self.conn.send((command, payload))

    def receive(self) -> tuple[str, Any]:
        if not self.conn.poll(self.timeout_s):
            raise RuntimeError(
                f"A StarCraft II worker gave no answer within {self.timeout_s:.0f} s."
            )
        try:
            return self.conn.recv()
        except EOFError as exc:
            raise RuntimeError(
                f"A StarCraft II worker died with exit code {self.process.wait()}."
            ) from exc

    def stop(self) -> None:
        try:
            self.conn.send(("close", None))
        except OSError:
            pass
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.conn.close()


def _stop_all(workers: list[_Worker]) -> None:
    for worker in workers:
        worker.stop()


def _child_seeds(seed: int, count: int) -> list[int]:
    """Distinct 31-bit seeds for ``count`` games, all fixed by ``seed``."""
    children = np.random.SeedSequence(seed).spawn(count)
    return [int(child.generate_state(1)[0] % (2**31 - 1)) for child in children]


class SC2Task:
    """A batch of StarCraft II games of one scenario, one worker process per game."""

    def __init__(
        self,
        scenario: str,
        num_envs: int,
        env_kwargs: dict,
        factory: str = "marl_shared.envs.sc2:build_smacv2_env",
        imports: tuple[str, ...] = ("smacv2.env",),
        worker_timeout_s: float = DEFAULT_WORKER_TIMEOUT_S,
    ):
        """Start the workers; ``factory`` ("module:function") builds one environment there."""
        if int(num_envs) < 1:
            raise TaskError(f"num_envs must be at least 1, got {num_envs}.")
        self.num_envs = int(num_envs)
        self._scenario = scenario
        self._workers = [
            _Worker(factory, list(imports), env_kwargs, worker_timeout_s)
            for _ in range(self.num_envs)
        ]
        self._finalizer = weakref.finalize(self, _stop_all, self._workers)
        infos = self._gather("init")
        first = infos[0]
        self.spec = TaskSpec(
            name=f"{BACKEND}/{scenario}",
            backend=BACKEND,
            num_agents=int(first["n_agents"]),
            obs_dim=int(first["obs_shape"]),
            state_dim=int(first["state_shape"]),
            num_actions=int(first["n_actions"]),
            episode_limit=int(first["episode_limit"]),
            outcome="win",
            noop_action=NOOP_ACTION,
        )
        self._avail: np.ndarray | None = None

    def _gather(self, what: str) -> list[Any]:
        """Collect one answer from every worker, raising one sentence on the first failure."""
        answers, failure = [], None
        for worker in self._workers:
            try:
                status, payload = worker.receive()
            except RuntimeError as exc:
                status, payload = "error", str(exc)
            if status == "missing" and failure is None:
                logger.debug("smacv2 import failed in a worker: %s", payload)
                failure = _missing_error(self._scenario, "smacv2 cannot be imported")
            elif status == "bad_option" and failure is None:
                failure = TaskError(
                    f"smacv2 rejected the options of task sc2/{self._scenario} ({payload})."
                )
            elif status != "ok" and failure is None:
                failure = RuntimeError(
                    f"StarCraft II failed during {what} of sc2/{self._scenario}: {payload}"
                )
            answers.append(payload)
        if failure is not None:
            self.close()
            raise failure
        return answers

    def _batch(self, answers: list[tuple], reset: bool) -> StepBatch:
        obs, avail, state = (np.stack([a[i] for a in answers]) for i in range(3))
        self._avail = avail
        if reset:
            zeros = np.zeros(self.num_envs, dtype=np.float32)
            flags = np.zeros(self.num_envs, dtype=bool)
            return StepBatch(obs, avail, state, zeros, flags, flags.copy(), state.copy(), zeros)
        return StepBatch(
            obs=obs,
            avail_actions=avail,
            state=state,
            reward=np.array([a[3] for a in answers], dtype=np.float32),
            terminated=np.array([a[4] for a in answers], dtype=bool),
            truncated=np.array([a[5] for a in answers], dtype=bool),
            final_state=np.stack([a[6] for a in answers]),
            outcome=np.array([a[7] for a in answers], dtype=np.float32),
        )

    def reset(self, seed: int) -> StepBatch:
        # Limitation: StarCraft II takes its seed when the game launches, so a worker relaunches
        # its game only when the seed changes; a second reset with the same seed continues
        # the game's random stream instead of replaying it.
        for worker, child_seed in zip(
            self._workers, _child_seeds(seed, self.num_envs), strict=True
        ):
            worker.send("reset", child_seed)
        return self._batch(self._gather("reset"), reset=True)

    def _checked_actions(self, actions: np.ndarray) -> np.ndarray:
        if self._avail is None:
            raise RuntimeError("Call reset before step on an sc2 task.")
        shape = (self.num_envs, self.spec.num_agents)
        actions = np.asarray(actions)
        if actions.shape != shape:
            raise ValueError(f"Expected sc2 actions of shape {shape}, got {actions.shape}.")
        actions = actions.astype(np.int64)
        if actions.min() < 0 or actions.max() >= self.spec.num_actions:
            raise ValueError(f"sc2 actions must lie in [0, {self.spec.num_actions}).")
        dead = self._avail.sum(axis=-1) == 1
        dead &= self._avail[..., NOOP_ACTION]
        actions = np.where(dead, NOOP_ACTION, actions)
        chosen = np.take_along_axis(self._avail, actions[..., None], axis=-1)[..., 0]
        if not chosen.all():
            env, agent = np.argwhere(~chosen)[0]
            raise ValueError(
                f"Action {actions[env, agent]} is not available to agent {agent} "
                f"of sc2 environment {env}."
            )
        return actions

    def step(self, actions: np.ndarray) -> StepBatch:
        actions = self._checked_actions(actions)
        for worker, env_actions in zip(self._workers, actions, strict=True):
            worker.send("step", [int(a) for a in env_actions])
        return self._batch(self._gather("step"), reset=False)

    def close(self) -> None:
        self._finalizer()


def spec(scenario: str, **options: Any) -> TaskSpec:
    """The task's shapes, read from one worker that never launches the game."""
    task = make(scenario, num_envs=1, **options)
    try:
        return task.spec
    finally:
        task.close()


def make(scenario: str, num_envs: int, **options: Any) -> SC2Task:
    """Start ``num_envs`` workers for a scenario; the games launch at the first reset.

    Options are StarCraft2Env keyword arguments (e.g. ``difficulty="7"``,
    ``reward_sparse=True``) except ``map_name`` and ``seed``, plus ``worker_timeout_s``.
    Setting ``continuing_episode=False`` makes every timeout look like a termination.
    """
    worker_timeout_s = float(options.pop("worker_timeout_s", DEFAULT_WORKER_TIMEOUT_S))
    kwargs = env_arguments(scenario, **options)
    _require_simulator(scenario)
    return SC2Task(scenario, num_envs, kwargs, worker_timeout_s=worker_timeout_s)
