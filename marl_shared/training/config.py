"""Typed twins of the Hydra config groups, validated once at the edge.

Every group in ``marl_shared/conf`` has a dataclass here. ``validate_config`` merges the
composed Hydra config into them, so a misspelt key or a wrong type ends as one sentence
before anything runs, and the rest of the code reads plain, checked values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """The configuration is invalid; the message is one sentence."""


@dataclass
class BackendDefaults:
    num_envs: int = 1
    eval_num_envs: int = 1
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class TaskGroup:
    backends: dict[str, BackendDefaults] = field(default_factory=dict)
    per_task: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class AlgoGroup:
    name: str = "mappo"
    lr: float = 5e-4
    gamma: float = 0.99
    gae_lambda: float = 0.95
    clip_param: float = 0.2
    vf_clip_param: float = 10.0
    vf_loss_coeff: float = 0.5
    entropy_coeff: float = 0.01
    num_epochs: int = 4
    num_minibatches: int = 2
    rollout_length: int = 64
    grad_clip: float = 10.0
    normalize_advantages: bool = True
    task_weighting: str = "uniform"


@dataclass
class ModelGroup:
    perception_dim: int = 128
    backbone_hidden: list[int] = field(default_factory=lambda: [64])
    critic_hidden: list[int] = field(default_factory=lambda: [128, 128])
    head: str = "action_scoring"
    recurrent: bool = False


@dataclass
class ClusterGroup:
    address: str | None = None
    num_env_runners: int = 0
    num_cpus_per_env_runner: float = 1.0
    num_learners: int = 0
    num_cpus: int | None = None
    dashboard: bool = False
    # Ray resources every remote env runner asks for, e.g. {rollout: 1} to keep runners on
    # the nodes started with --resources='{"rollout": 8}'.
    custom_resources_per_env_runner: dict[str, float] = field(default_factory=dict)
    restart_delay_s: float = 1.0  # pause before a failed env runner process exits to restart
    health_probe_timeout_s: float = 10.0  # wait for a restarted env runner per probe


@dataclass
class TrainGroup:
    env_steps: float = 1e6
    max_iterations: int | None = None
    time_limit_min: float | None = None
    eval_interval: int = 10
    eval_episodes: int = 32
    checkpoint_interval: int = 10
    keep_checkpoints: int = 3
    progress: bool = True


@dataclass
class TrainConfig:
    experiment_name: str = "custom"
    tasks: list[str] = field(default_factory=list)
    seed: int = 0
    run_dir: str | None = None
    overwrite: bool = False
    resume: str | None = None
    task: TaskGroup = field(default_factory=TaskGroup)
    algo: AlgoGroup = field(default_factory=AlgoGroup)
    model: ModelGroup = field(default_factory=ModelGroup)
    cluster: ClusterGroup = field(default_factory=ClusterGroup)
    train: TrainGroup = field(default_factory=TrainGroup)


def validate_config(cfg: DictConfig | dict) -> TrainConfig:
    """Merge a composed config into the schema and check the values that types cannot."""
    raw = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)
    raw = OmegaConf.masked_copy(raw, [k for k in raw.keys() if k != "hydra"])
    try:
        OmegaConf.select(raw, "experiment_name", throw_on_resolution_failure=True)
    except OmegaConfBaseException:
        # Composed outside a Hydra app (tests, notebooks): no runtime choices to read.
        raw.experiment_name = "custom"
    try:
        merged = OmegaConf.merge(OmegaConf.structured(TrainConfig), raw)
        config: TrainConfig = OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        message = str(error).splitlines()[0].rstrip(".")
        key = getattr(error, "full_key", None)
        where = f" at {key}" if key else ""
        raise ConfigError(f"Invalid configuration{where}: {message}.") from None

    if not config.tasks:
        raise ConfigError("No tasks configured: set tasks='[smax/3m,...]' or pick an experiment.")
    if len(set(config.tasks)) != len(config.tasks):
        raise ConfigError(f"Each task may appear once, got {config.tasks}.")
    if config.algo.task_weighting not in ("uniform", "win_rate"):
        raise ConfigError(
            "algo.task_weighting must be 'uniform' or 'win_rate', "
            f"not {config.algo.task_weighting!r}."
        )
    if config.model.head not in ("action_scoring", "linear"):
        raise ConfigError(
            f"model.head must be 'action_scoring' or 'linear', not {config.model.head!r}."
        )
    positive = {
        "train.env_steps": config.train.env_steps,
        "train.eval_episodes": config.train.eval_episodes,
        "algo.rollout_length": config.algo.rollout_length,
        "algo.num_epochs": config.algo.num_epochs,
        "algo.num_minibatches": config.algo.num_minibatches,
        "algo.lr": config.algo.lr,
        "model.perception_dim": config.model.perception_dim,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key} must be positive, got {value}.")
    if config.cluster.num_env_runners < 0:
        raise ConfigError("cluster.num_env_runners must be 0 or more.")
    for name in config.tasks:
        task_placement(config, name)
    return config


def sampling_settings(config: TrainConfig, task_name: str) -> tuple[int, int, dict[str, Any]]:
    """(num_envs, eval_num_envs, adapter options) of one task, per_task entries winning."""
    backend = task_name.split("/", 1)[0]
    defaults = config.task.backends.get(backend, BackendDefaults())
    override = dict(config.task.per_task.get(task_name, {}))
    unknown = set(override) - {"num_envs", "eval_num_envs", "options", "env_runners"}
    if unknown:
        raise ConfigError(f"task.per_task[{task_name}] has unknown keys {sorted(unknown)}.")
    num_envs = int(override.get("num_envs", defaults.num_envs))
    eval_num_envs = int(override.get("eval_num_envs", defaults.eval_num_envs))
    options = {**defaults.options, **dict(override.get("options", {}))}
    if num_envs <= 0 or eval_num_envs <= 0:
        raise ConfigError(f"{task_name}: num_envs and eval_num_envs must be positive.")
    return num_envs, eval_num_envs, options


def task_placement(config: TrainConfig, task_name: str) -> list[int] | None:
    """The env runner indices (1..num_env_runners) that sample a task; None: every runner."""
    runners = config.task.per_task.get(task_name, {}).get("env_runners")
    if runners is None:
        return None
    count = config.cluster.num_env_runners
    indices = [runners] if isinstance(runners, int) else list(runners)
    if not indices or any(
        isinstance(i, bool) or not isinstance(i, int) or not 1 <= i <= count for i in indices
    ):
        raise ConfigError(
            f"task.per_task[{task_name}].env_runners must list env runner indices "
            f"between 1 and cluster.num_env_runners={count}, got {runners}."
        )
    return sorted(set(indices))
