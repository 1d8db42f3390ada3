"""A training run: check the inputs, build the RLlib algorithm, loop, record, checkpoint.

The loop reads top to bottom: validate tasks and simulators (nothing is written
before that), create the run directory, build Ray and the algorithm, then per
iteration sample + learn, evaluate now and then, write metrics, checkpoint atomically.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from marl_shared.algorithms.mappo import MAPPOConfig, MultiTaskMAPPO
from marl_shared.envs import TaskSpec, check_task_name, make_task
from marl_shared.models.rl_modules import task_module_id
from marl_shared.training import checkpoint as ckpt
from marl_shared.training.config import (
    ConfigError,
    TrainConfig,
    sampling_settings,
    task_placement,
)

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
TASKS_FILE = "tasks.json"
# Everything a training run writes into its directory (removed by overwrite=true).
RUN_ARTEFACTS = (
    CONFIG_FILE,
    TASKS_FILE,
    "checkpoints",
    "metrics.jsonl",
    "metrics.csv",
    "tb",
    "learning_curves.png",
)
RESUME_SEED_STRIDE = 104_729  # env runner seed offset per resumed iteration


class RunDirError(ValueError):
    """The run directory cannot be used as asked; one sentence."""


# ----------------------------------------------------------------------------- inputs


def resolve_tasks(config: TrainConfig) -> list[TaskSpec]:
    """Check every task name and that its simulator runs here; return the task specs.

    Each task is built once with one environment and closed again, so a missing
    simulator or a bad option fails here, before any file is written.
    """
    specs = []
    for name in config.tasks:
        check_task_name(name)
    for name in config.tasks:
        _, _, options = sampling_settings(config, name)
        task = make_task(name, num_envs=1, **options)
        try:
            specs.append(task.spec)
        finally:
            task.close()
    return specs


def default_run_dir(config: TrainConfig) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{config.experiment_name}"


def prepare_run_dir(path: Path, *, overwrite: bool, resuming: bool) -> Path:
    """Create the run directory; refuse to write into a used one unless told to."""
    if path.exists() and any(path.iterdir()) and not (overwrite or resuming):
        raise RunDirError(
            f"Run directory {path} already holds files; "
            "pass overwrite=true or pick another run_dir."
        )
    if overwrite and not resuming and path.exists():
        # A previous run's records would mix with the new one's (and its higher-numbered
        # checkpoints would win "latest"): remove exactly what a run writes, nothing else.
        for name in RUN_ARTEFACTS:
            target = path / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def removed_on_failure(path: Path, *, created: bool, kept: Callable[[], bool]) -> Iterator[None]:
    """A failing command removes the folder it created unless ``kept()``: it wrote something
    of value. Folders that existed before the command are never removed."""
    try:
        yield
    except BaseException:
        if created and not kept():
            shutil.rmtree(path, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------- building


def build_algorithm_config(config: TrainConfig, specs: list[TaskSpec]) -> MAPPOConfig:
    """The one place where our config becomes an RLlib config."""
    algo = config.algo
    num_envs, eval_num_envs, options = {}, {}, {}
    for spec in specs:
        num_envs[spec.name], eval_num_envs[spec.name], options[spec.name] = sampling_settings(
            config, spec.name
        )
    rllib_config = (
        MAPPOConfig()
        .env_runners(
            num_env_runners=config.cluster.num_env_runners,
            num_cpus_per_env_runner=config.cluster.num_cpus_per_env_runner,
            custom_resources_per_env_runner=dict(config.cluster.custom_resources_per_env_runner),
        )
        .learners(num_learners=config.cluster.num_learners)
        .training(lr=algo.lr, num_epochs=algo.num_epochs, grad_clip=algo.grad_clip)
        .debugging(seed=config.seed, log_level="ERROR")
        .fault_tolerance(
            restart_failed_env_runners=True,
            delay_between_env_runner_restarts_s=config.cluster.restart_delay_s,
            env_runner_health_probe_timeout_s=config.cluster.health_probe_timeout_s,
        )
    )
    placement = {}
    for spec in specs:
        runners = task_placement(config, spec.name)
        if runners is not None:
            placement[spec.name] = runners
    rllib_config.marl_settings(
        task_specs=[spec.to_dict() for spec in specs],
        task_options=options,
        num_envs=num_envs,
        eval_num_envs=eval_num_envs,
        task_placement=placement,
        rollout_length=algo.rollout_length,
        gamma=algo.gamma,
        gae_lambda=algo.gae_lambda,
        clip_param=algo.clip_param,
        vf_clip_param=algo.vf_clip_param,
        vf_loss_coeff=algo.vf_loss_coeff,
        entropy_coeff=algo.entropy_coeff,
        num_minibatches=algo.num_minibatches,
        normalize_advantages=algo.normalize_advantages,
        task_weighting=algo.task_weighting,
        model=asdict(config.model),
    )
    return rllib_config


def init_ray(config: TrainConfig) -> None:
    """Start embedded Ray on loopback with the dashboard off, or join a configured cluster."""
    # Must be set before Ray starts: keeps a local Ray on 127.0.0.1 (REFERENCE.md).
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if ray.is_initialized():
        return
    cluster = config.cluster
    if cluster.address:
        ray.init(
            address=cluster.address,
            include_dashboard=cluster.dashboard,
            log_to_driver=True,
            logging_level=logging.ERROR,
        )
        return
    ray.init(
        num_cpus=cluster.num_cpus,
        include_dashboard=cluster.dashboard,
        dashboard_host="127.0.0.1",
        _node_ip_address="127.0.0.1",
        log_to_driver=True,
        logging_level=logging.ERROR,
    )


# ----------------------------------------------------------------------------- records


def summarise_episodes(spec: TaskSpec, stats: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Mean return, length and outcome rates of a list of finished episodes."""
    returns = np.asarray(stats.get("returns", []), dtype=np.float64)
    lengths = np.asarray(stats.get("lengths", []), dtype=np.float64)
    outcomes = np.asarray(stats.get("outcomes", []), dtype=np.float64)
    has = returns.size > 0
    record = {
        f"{prefix}episodes": int(returns.size),
        f"{prefix}episode_return_mean": float(returns.mean()) if has else None,
        f"{prefix}episode_len_mean": float(lengths.mean()) if has else None,
    }
    if spec.outcome == "goal":
        record[f"{prefix}score_rate"] = float((outcomes > 0).mean()) if has else None
        record[f"{prefix}goal_diff_mean"] = float(outcomes.mean()) if has else None
    else:
        record[f"{prefix}win_rate"] = float((outcomes > 0).mean()) if has else None
    return record


def rate_key(spec: TaskSpec) -> str:
    return "score_rate" if spec.outcome == "goal" else "win_rate"


def wilson_interval(successes: int, trials: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a success rate (95% by default)."""
    if trials == 0:
        return (math.nan, math.nan)
    p = successes / trials
    denom = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denom
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


# ----------------------------------------------------------------------------- the run


@dataclass
class RunResult:
    run_dir: Path
    iterations: int
    env_steps: dict[str, int]
    final_eval: dict[str, dict[str, Any]]
    checkpoint: Path | None
    history: list[dict[str, Any]]


class Trainer:
    """Owns one run directory and one algorithm; see the module docstring."""

    def __init__(self, config: TrainConfig, specs: list[TaskSpec], run_dir: Path) -> None:
        self.config = config
        self.specs = specs
        self.run_dir = run_dir
        self.algo: MultiTaskMAPPO | None = None
        self.iteration = 0
        self.start_iteration = 0
        self.env_steps: dict[str, int] = {spec.name: 0 for spec in specs}
        self.history: list[dict[str, Any]] = []
        self.elapsed_before = 0.0
        self.last_checkpoint: Path | None = None
        self._t0 = time.perf_counter()

    # -- set-up

    def write_config(self) -> None:
        OmegaConf.save(OmegaConf.structured(self.config), self.run_dir / CONFIG_FILE)
        (self.run_dir / TASKS_FILE).write_text(
            json.dumps([spec.to_dict() for spec in self.specs], indent=1)
        )

    def build(self) -> MultiTaskMAPPO:
        init_ray(self.config)
        self.algo = build_algorithm_config(self.config, self.specs).build_algo()
        return self.algo

    # -- checkpoints

    def manifest(self) -> dict[str, Any]:
        import ray
        import torch

        from marl_shared import __version__

        return {
            "tasks": [spec.to_dict() for spec in self.specs],
            "model": asdict(self.config.model),
            "module_ids": {spec.name: task_module_id(spec.name) for spec in self.specs},
            "iteration": self.iteration,
            "env_steps": dict(self.env_steps),
            "versions": {
                "marl_shared": __version__,
                "torch": torch.__version__,
                "ray": ray.__version__,
            },
        }

    def save_checkpoint(self) -> Path:
        assert self.algo is not None
        learner_state = self.algo.learner_group.get_state(components="learner")["learner"]
        module_state = learner_state.pop("rl_module")
        trainer_state = {
            "iteration": self.iteration,
            "env_steps": self.env_steps,
            "elapsed_s": self.elapsed(),
            "win_rate_ema": self.algo.win_rate_ema,
            "rng": self.algo.rng.bit_generator.state,
            "metrics_lines": len(self.history),
        }
        self.last_checkpoint = ckpt.write_checkpoint(
            self.run_dir / "checkpoints",
            name=f"iter_{self.iteration:06d}",
            manifest=self.manifest(),
            module_state=module_state,
            learner_state=learner_state,
            trainer_state=trainer_state,
            keep=self.config.train.keep_checkpoints,
        )
        return self.last_checkpoint

    def load_checkpoint(self, path: Path) -> None:
        """Restore weights, optimizer state and counters from one of our checkpoints."""
        assert self.algo is not None
        checkpoint = ckpt.resolve_checkpoint(path)
        manifest = ckpt.read_manifest(checkpoint)
        saved = [d["name"] for d in manifest["tasks"]]
        if saved != [spec.name for spec in self.specs]:
            raise ckpt.CheckpointError(
                f"Checkpoint {checkpoint} was trained on {saved}, this run has "
                f"{[spec.name for spec in self.specs]}."
            )
        modules = ckpt.load_module_state(checkpoint)
        check_shapes(self.algo, modules, checkpoint)
        learner_state = ckpt.load_learner_state(checkpoint) or {}
        learner_state["rl_module"] = modules
        self.algo.learner_group.set_state({"learner": learner_state})
        trainer = ckpt.load_trainer_state(checkpoint)
        self.iteration = self.start_iteration = int(trainer["iteration"])
        self.env_steps.update({k: int(v) for k, v in trainer["env_steps"].items()})
        self.elapsed_before = float(trainer.get("elapsed_s", 0.0))
        self.algo.win_rate_ema.update(trainer.get("win_rate_ema", {}))
        if "rng" in trainer:
            self.algo.rng.bit_generator.state = trainer["rng"]
        self.algo._iteration = self.iteration  # RLlib's own counter (evaluation seeds use it)
        self.algo.env_steps_sampled = dict(self.env_steps)
        # Limitation: simulator states are not checkpointed; a resumed run starts fresh
        # episodes, seeded apart from the first run's streams by the iteration it resumes at.
        offset = RESUME_SEED_STRIDE * self.iteration
        self.algo.env_runner_group.foreach_env_runner(
            lambda runner: runner.reseed(offset), local_env_runner=True
        )
        self.algo.env_runner_group.sync_weights(
            from_worker_or_learner_group=self.algo.learner_group, inference_only=True
        )
        logger.info("resumed from %s at iteration %d", checkpoint, self.iteration)

    # -- loop

    def elapsed(self) -> float:
        return self.elapsed_before + (time.perf_counter() - self._t0)

    def done(self) -> bool:
        train = self.config.train
        if sum(self.env_steps.values()) >= train.env_steps:
            return True
        if train.max_iterations is not None and self.iteration >= train.max_iterations:
            return True
        if train.time_limit_min is not None and self.elapsed() >= 60 * train.time_limit_min:
            return True
        return False

    def evaluate(self) -> dict[str, dict[str, Any]]:
        assert self.algo is not None
        raw = self.algo.evaluate_tasks(self.config.train.eval_episodes)
        report = {}
        for spec in self.specs:
            summary = summarise_episodes(spec, raw[spec.name], prefix="eval_")
            wins = int(np.sum(np.asarray(raw[spec.name]["outcomes"]) > 0))
            low, high = wilson_interval(wins, len(raw[spec.name]["outcomes"]))
            summary[f"eval_{rate_key(spec)}_ci95"] = [low, high]
            report[spec.name] = summary
        return report

    def step(self) -> dict[str, Any]:
        """One training iteration and its metrics record."""
        assert self.algo is not None
        self.algo.train()
        self.iteration += 1
        report = self.algo.last_report
        record: dict[str, Any] = {"iteration": self.iteration, "tasks": {}}
        for spec in self.specs:
            stats = report["tasks"].get(spec.name, {})
            self.env_steps[spec.name] += int(stats.get("env_steps", 0))
            task_record = {
                "env_steps": self.env_steps[spec.name],
                **summarise_episodes(spec, stats),
            }
            task_record["loss_weight"] = report["task_weights"].get(task_module_id(spec.name))
            record["tasks"][spec.name] = task_record
        interval = self.config.train.eval_interval
        if interval > 0 and self.iteration % interval == 0:
            for name, values in self.evaluate().items():
                record["tasks"][name].update(values)
        record["env_steps_total"] = sum(self.env_steps.values())
        record["time_s"] = self.elapsed()
        record["sample_time_s"] = report["sample_time_s"]
        record["learn_time_s"] = report["learn_time_s"]
        record["learner"] = report["learner"]
        faults = report.get("faults") or {}
        record["faults"] = {
            "env_runners_lost": faults.get("env_runners_lost", 0),
            "rollouts_lost": faults.get("rollouts_lost", 0),
            "local_fallback": len(faults.get("local_fallback", [])),
            "restored": faults.get("restored", 0),
        }
        return record

    def run(
        self,
        *,
        resume_from: Path | None = None,
        on_iteration: Callable[[Trainer, dict[str, Any]], None] | None = None,
    ) -> RunResult:
        from marl_shared.analysis.plots import plot_learning_curves
        from marl_shared.training.metrics import MetricsWriter

        self._t0 = time.perf_counter()
        if self.algo is None:
            self.build()
        if resume_from is not None:
            self.load_checkpoint(resume_from)
            self._t0 = time.perf_counter()
            self.history = truncate_metrics(self.run_dir, self.iteration)
        else:
            self.write_config()
        writer = MetricsWriter(self.run_dir)
        final_eval: dict[str, dict[str, Any]] = {}
        try:
            while not self.done():
                record = self.step()
                writer.write(record)
                self.history.append(record)
                if self.iteration % max(1, self.config.train.checkpoint_interval) == 0:
                    self.save_checkpoint()
                if on_iteration is not None:
                    on_iteration(self, record)
            final_eval = self.evaluate()
            final = {
                "iteration": self.iteration,
                "final_evaluation": True,
                "env_steps_total": sum(self.env_steps.values()),
                "time_s": self.elapsed(),
                "tasks": {
                    name: {"env_steps": self.env_steps[name], **values}
                    for name, values in final_eval.items()
                },
            }
            writer.write(final)
        finally:
            writer.close()
            if self.algo is not None and self.iteration > self.start_iteration:
                if self.last_checkpoint is None or not self.last_checkpoint.name.endswith(
                    f"{self.iteration:06d}"
                ):
                    self.save_checkpoint()
            if self.history:
                try:
                    plot_learning_curves(self.run_dir)
                except Exception as error:  # noqa: BLE001 - a plot must never lose a run
                    logger.warning("could not draw the learning curves: %s", error)
        return RunResult(
            run_dir=self.run_dir,
            iterations=self.iteration,
            env_steps=dict(self.env_steps),
            final_eval=final_eval,
            checkpoint=self.last_checkpoint,
            history=self.history,
        )

    def stop(self) -> None:
        if self.algo is not None:
            self.algo.stop()
            self.algo = None


def check_shapes(
    algo: MultiTaskMAPPO, modules: dict[str, dict[str, np.ndarray]], path: Path
) -> None:
    """Every tensor of the checkpoint must exist in the built model with the same shape."""
    current = algo.learner_group.get_state(components="learner/rl_module")["learner"]["rl_module"]
    for module_id, params in modules.items():
        if module_id not in current:
            raise ckpt.CheckpointError(
                f"Checkpoint {path} has module {module_id!r}, the model has not."
            )
        for name, value in params.items():
            have = current[module_id].get(name)
            if have is None:
                raise ckpt.CheckpointError(
                    f"Checkpoint {path} has parameter {module_id}/{name}, the model has not."
                )
            if tuple(np.shape(have)) != tuple(value.shape):
                raise ckpt.CheckpointError(
                    f"Checkpoint {path} has {module_id}/{name} of shape {list(value.shape)}, "
                    f"the configured model needs {list(np.shape(have))}."
                )


def truncate_metrics(run_dir: Path, iteration: int) -> list[dict[str, Any]]:
    """Keep the metrics records up to a resumed checkpoint's iteration; rewrite the file."""
    from marl_shared.training.metrics import CSV_NAME, JSONL_NAME, read_metrics

    path = run_dir / JSONL_NAME
    if not path.is_file():
        return []
    records = read_metrics(run_dir)
    kept = [r for r in records if r["iteration"] <= iteration and not r.get("final_evaluation")]
    if len(kept) != len(records):
        logger.info(
            "dropping %d metrics records written after the checkpoint", len(records) - len(kept)
        )
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "w", encoding="utf-8") as handle:
            for record in kept:
                handle.write(json.dumps(record, allow_nan=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        (run_dir / CSV_NAME).unlink(missing_ok=True)  # rebuilt from the JSONL by the writer
    return kept


def load_run_config(run_dir: Path) -> TrainConfig:
    """The config a run was started with (for resume and evaluation)."""
    from marl_shared.training.config import validate_config

    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a run directory: it has no {CONFIG_FILE}.")
    return validate_config(OmegaConf.load(path))
