"""A task stream: train one task per stage on the shared backbone and measure forgetting.

The algorithm is built once with a module for every task of the stream, so the backbone is
one object throughout; each stage samples and trains only its own task (MultiTaskMAPPO's
active tasks) for a budget of env steps, then every task is evaluated greedily. The
stream yields the accuracy matrix, per-layer training dynamics and, on request, FPF
applied to the end of the stream and a k-FPF stream from the same initial weights.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from marl_shared.continual import metrics as cl_metrics
from marl_shared.continual.dynamics import DynamicsTracker, plot_dynamics, ranking_table
from marl_shared.continual.fpf import CROSS_ENTROPY, DISTILL, FPFSettings, run_fpf, select_layers
from marl_shared.continual.replay import ReplayBuffer, collect_policy_data
from marl_shared.envs import make_task
from marl_shared.models.rl_modules import task_module_id
from marl_shared.training.config import ConfigError, TrainConfig, sampling_settings, validate_config
from marl_shared.training.run import Trainer, prepare_run_dir, rate_key, resolve_tasks

logger = logging.getLogger(__name__)

SEQUENTIAL = "sequential"
FPF = "fpf"
KFPF = "kfpf"
METHODS = (SEQUENTIAL, FPF, KFPF)


@dataclass
class StreamSettings:
    stage_env_steps: int = 150_000
    eval_episodes: int = 16
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    dynamics_interval: int = 5
    buffer_size: int = 2048
    collect_interval: int = 2
    collect_steps: int = 8
    collect_envs: int = 8
    fpf: FPFSettings = field(default_factory=FPFSettings)
    k: int = 3


def parse_settings(raw: dict[str, Any]) -> StreamSettings:
    """The ``continual`` config block, checked; one sentence on a bad value."""
    try:
        buffer, fpf, kfpf = raw.get("buffer", {}), raw.get("fpf", {}), raw.get("kfpf", {})
        settings = StreamSettings(
            stage_env_steps=int(float(raw["stage_env_steps"])),
            eval_episodes=int(raw["eval_episodes"]),
            methods=list(raw["methods"]),
            dynamics_interval=int(raw["dynamics_interval"]),
            buffer_size=int(buffer["size"]),
            collect_interval=int(buffer["collect_interval"]),
            collect_steps=int(buffer["collect_steps"]),
            collect_envs=int(buffer["collect_envs"]),
            fpf=FPFSettings(
                modules=list(fpf["modules"]) if fpf.get("modules") else None,
                num_modules=int(fpf["num_modules"]),
                steps=int(fpf["steps"]),
                batch_size=int(fpf["batch_size"]),
                lr=float(fpf["lr"]),
                loss=str(fpf["loss"]),
            ),
            k=int(kfpf["k"]),
        )
    except (KeyError, TypeError, ValueError) as error:
        raise ConfigError(f"Invalid continual settings: {error}.") from None
    unknown = [m for m in settings.methods if m not in METHODS]
    if unknown or not settings.methods:
        raise ConfigError(f"continual.methods must be a non-empty subset of {list(METHODS)}.")
    if settings.fpf.loss not in (DISTILL, CROSS_ENTROPY):
        raise ConfigError(f"continual.fpf.loss must be {DISTILL!r} or {CROSS_ENTROPY!r}.")
    positive = {
        "continual.stage_env_steps": settings.stage_env_steps,
        "continual.eval_episodes": settings.eval_episodes,
        "continual.dynamics_interval": settings.dynamics_interval,
        "continual.buffer.size": settings.buffer_size,
        "continual.buffer.collect_interval": settings.collect_interval,
        "continual.buffer.collect_steps": settings.collect_steps,
        "continual.buffer.collect_envs": settings.collect_envs,
        "continual.fpf.steps": settings.fpf.steps,
        "continual.fpf.batch_size": settings.fpf.batch_size,
        "continual.fpf.num_modules": settings.fpf.num_modules,
        "continual.kfpf.k": settings.k,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key} must be positive, got {value}.")
    return settings


def split_config(cfg: DictConfig) -> tuple[TrainConfig, StreamSettings]:
    raw = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)
    if "continual" not in raw:
        raise ConfigError("The continual command needs a 'continual' config block.")
    settings = parse_settings(OmegaConf.to_container(raw.continual, resolve=True))
    train_part = OmegaConf.masked_copy(raw, [k for k in raw.keys() if k != "continual"])
    config = validate_config(train_part)
    if config.model.recurrent and ({FPF, KFPF} & set(settings.methods)):
        raise ConfigError("FPF and k-FPF need a feed-forward perception (model.recurrent=false).")
    if config.cluster.num_learners > 1:
        raise ConfigError("The continual command runs on one learner (cluster.num_learners <= 1).")
    config.train.eval_episodes = settings.eval_episodes
    config.train.eval_interval = 0
    return config, settings


# ----------------------------------------------------------------------------- the stream


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=float))
    os.replace(tmp, path)


class StreamRunner:
    """Runs the stream's methods on one algorithm, restoring the initial weights in between."""

    def __init__(self, config: TrainConfig, settings: StreamSettings, run_dir: Path) -> None:
        self.config = config
        self.settings = settings
        self.run_dir = run_dir
        self.specs = resolve_tasks(config)
        self.trainer = Trainer(config, self.specs, run_dir)
        self._collect_tasks: dict[str, Any] = {}
        self._collections = 0

    # -- small pieces

    @property
    def algo(self):
        return self.trainer.algo

    def module_state(self) -> dict[str, dict[str, np.ndarray]]:
        state = self.algo.learner_group.get_state(components="learner/rl_module")
        return state["learner"]["rl_module"]

    def evaluate(self) -> tuple[list[float], list[float]]:
        """(greedy success rate, mean return) of every task, in stream order."""
        report = self.trainer.evaluate()
        rates = [float(report[s.name][f"eval_{rate_key(s)}"] or 0.0) for s in self.specs]
        returns = [float(report[s.name]["eval_episode_return_mean"] or 0.0) for s in self.specs]
        return rates, returns

    def collect(self, task_name: str, buffer: ReplayBuffer) -> int:
        """Store the current policy's data on one task in the buffer; returns env steps used."""
        if task_name not in self._collect_tasks:
            options = sampling_settings(self.config, task_name)[2]
            self._collect_tasks[task_name] = make_task(
                task_name, num_envs=self.settings.collect_envs, **options
            )
        task = self._collect_tasks[task_name]
        module = self.algo.env_runner.module[task_module_id(task_name)]
        self._collections += 1
        rows = collect_policy_data(
            module,
            task,
            self.settings.collect_steps,
            seed=self.config.seed * 1_000_003 + self._collections,
        )
        buffer.add(task_name, rows)
        return self.settings.collect_steps * task.num_envs

    def fpf(self, buffer: ReplayBuffer, tracker: DynamicsTracker) -> dict[str, Any]:
        try:
            layers = select_layers(tracker.sensitivity(), self.settings.fpf)
            start = time.perf_counter()
            result = run_fpf(self.algo, buffer, layers, self.settings.fpf, seed=self.config.seed)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        result["time_s"] = time.perf_counter() - start
        result["samples"] = (
            self.settings.fpf.steps * self.settings.fpf.batch_size * len(buffer.tasks())
        )
        return result

    # -- one stream

    def run_stream(self, method: str, writer) -> dict[str, Any]:
        """Stages in order; k-FPF triggers every 1/k of the stream's env steps."""
        trainer, settings = self.trainer, self.settings
        tasks = [spec.name for spec in self.specs]
        kfpf = method == KFPF
        buffer = ReplayBuffer(settings.buffer_size, seed=self.config.seed)
        tracker = DynamicsTracker()
        tracker.begin(self.module_state())
        total_budget = settings.stage_env_steps * len(tasks)
        trigger_every = total_budget / settings.k
        next_trigger, steps_done, collect_steps = trigger_every, 0, 0
        rates, returns, fpf_runs, stage_times = [], [], [], []
        for stage, task in enumerate(tasks):
            self.algo.set_active_tasks([task])
            tracker.begin_stage(self.module_state())
            start, stage_steps, stage_iter = time.perf_counter(), 0, 0
            logger.info("[%s] stage %d: %s", method, stage, task)
            while stage_steps < settings.stage_env_steps:
                before = trainer.env_steps[task]
                record = trainer.step()
                stage_iter += 1
                gained = trainer.env_steps[task] - before
                stage_steps += gained
                steps_done += gained
                writer.write({**record, "method": method, "stage": stage, "stage_task": task})
                if stage_iter % settings.dynamics_interval == 0:
                    tracker.snapshot(self.module_state(), trainer.iteration, stage)
                if FPF in settings.methods or kfpf:
                    if stage_iter % settings.collect_interval == 0:
                        collect_steps += self.collect(task, buffer)
                if kfpf and len(fpf_runs) < settings.k and steps_done >= next_trigger - 1e-9:
                    if not buffer.tasks():
                        collect_steps += self.collect(task, buffer)
                    run = self.fpf(buffer, tracker)
                    run.update(iteration=trainer.iteration, env_steps=steps_done, stage=stage)
                    fpf_runs.append(run)
                    next_trigger += trigger_every
            tracker.end_stage(self.module_state(), stage, task)
            stage_times.append(time.perf_counter() - start)
            stage_rates, stage_returns = self.evaluate()
            rates.append(stage_rates)
            returns.append(stage_returns)
            logger.info(
                "[%s] after stage %d: %s",
                method,
                stage,
                ", ".join(f"{t} {r:.2f}" for t, r in zip(tasks, stage_rates, strict=True)),
            )
            trainer.save_checkpoint()
        return {
            "rate_matrix": rates,
            "return_matrix": returns,
            "fpf_runs": fpf_runs,
            "collect_env_steps": collect_steps,
            "stage_time_s": stage_times,
            "buffer": buffer,
            "tracker": tracker,
        }

    # -- all methods

    def run(self) -> dict[str, Any]:
        from marl_shared.training.metrics import MetricsWriter

        trainer, settings = self.trainer, self.settings
        trainer.build()
        trainer.write_config()
        initial = self.algo.learner_group.get_state(components="learner")
        untrained_rates, untrained_returns = self.evaluate()
        results: dict[str, Any] = {
            "tasks": [spec.name for spec in self.specs],
            "stage_env_steps": settings.stage_env_steps,
            "eval_episodes": settings.eval_episodes,
            "untrained": {"rate": untrained_rates, "return": untrained_returns},
            "methods": {},
        }
        streams = []
        if SEQUENTIAL in settings.methods or FPF in settings.methods:
            streams.append(SEQUENTIAL)
        if KFPF in settings.methods:
            streams.append(KFPF)
        for index, method in enumerate(streams):
            if index > 0:
                # Limitation: weights, optimizer and counters restart; environments in the
                # middle of an episode carry on from the previous stream.
                self.algo.learner_group.set_state(initial)
                self.algo.env_runner_group.sync_weights(
                    from_worker_or_learner_group=self.algo.learner_group, inference_only=True
                )
                trainer.iteration = 0
                trainer.env_steps = {spec.name: 0 for spec in self.specs}
                trainer.last_checkpoint = None
            trainer.run_dir = self.run_dir / method
            trainer.run_dir.mkdir(parents=True, exist_ok=True)
            with MetricsWriter(trainer.run_dir, tensorboard=False) as writer:
                stream = self.run_stream(method, writer)
            tracker, buffer = stream.pop("tracker"), stream.pop("buffer")
            if method == SEQUENTIAL:
                dynamics = tracker.report(self.module_state())
                self._write_dynamics(dynamics)
                results["dynamics_file"] = "dynamics.json"
            results["methods"][method] = self._summarise(stream, untrained_rates)
            if method == SEQUENTIAL and FPF in settings.methods:
                run = self.fpf(buffer, tracker)
                rates, returns = self.evaluate()
                trainer.run_dir = self.run_dir / FPF
                trainer.run_dir.mkdir(parents=True, exist_ok=True)
                trainer.save_checkpoint()
                fpf_stream = {
                    **stream,
                    "rate_matrix": [*stream["rate_matrix"][:-1], rates],
                    "return_matrix": [*stream["return_matrix"][:-1], returns],
                    "fpf_runs": [run],
                }
                results["methods"][FPF] = self._summarise(fpf_stream, untrained_rates)
        if SEQUENTIAL not in settings.methods:
            results["methods"].pop(SEQUENTIAL, None)
        self._write_results(results)
        return results

    def _summarise(self, stream: dict[str, Any], untrained: list[float]) -> dict[str, Any]:
        summary = cl_metrics.summarise(stream["rate_matrix"], untrained)
        returns = cl_metrics.summarise(stream["return_matrix"])
        return {
            **stream,
            "summary": summary,
            "return_summary": returns,
            "fpf_samples": sum(run["samples"] for run in stream["fpf_runs"]),
            "fpf_time_s": sum(run["time_s"] for run in stream["fpf_runs"]),
        }

    # -- outputs

    def _write_dynamics(self, dynamics: dict[str, Any]) -> None:
        _write_json(self.run_dir / "dynamics.json", dynamics)
        tmp = self.run_dir / ".dynamics.md.tmp"
        tmp.write_text(
            "Size-normalised L1 change per layer (sequential stream), largest first.\n\n"
            + ranking_table(dynamics)
        )
        os.replace(tmp, self.run_dir / "dynamics.md")
        try:
            plot_dynamics(dynamics, self.run_dir / "dynamics.png")
        except Exception as error:  # noqa: BLE001 - a plot must never lose a run
            logger.warning("could not draw the dynamics plot: %s", error)

    def _write_results(self, results: dict[str, Any]) -> None:
        _write_json(self.run_dir / "continual.json", results)
        tmp = self.run_dir / ".continual.md.tmp"
        tmp.write_text(comparison_table(results))
        os.replace(tmp, self.run_dir / "continual.md")
        try:
            plot_matrices(results, self.run_dir / "accuracy_matrix.png")
        except Exception as error:  # noqa: BLE001
            logger.warning("could not draw the accuracy matrices: %s", error)

    def stop(self) -> None:
        for task in self._collect_tasks.values():
            task.close()
        self._collect_tasks = {}
        self.trainer.stop()


def comparison_table(results: dict[str, Any]) -> str:
    """Markdown: one row per method, then each method's accuracy matrix."""
    tasks = results["tasks"]
    lines = [
        f"Stream {' -> '.join(tasks)}; {results['stage_env_steps']:,} env steps per stage; "
        f"greedy success rate over {results['eval_episodes']} episodes per task.",
        "",
        "| method | avg final | avg forgetting | BWT | FWT | avg final return | "
        "FPF runs | FPF samples | FPF time s | replay collection env steps |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method, data in results["methods"].items():
        s = data["summary"]
        lines.append(
            f"| {method} | {s['average_final']:.3f} | {s['average_forgetting']:.3f} | "
            f"{s['backward_transfer']:+.3f} | {s.get('forward_transfer', 0.0):+.3f} | "
            f"{data['return_summary']['average_final']:.3f} | {len(data['fpf_runs'])} | "
            f"{data['fpf_samples']:,} | {data['fpf_time_s']:.1f} | "
            f"{data['collect_env_steps'] if method != SEQUENTIAL else 0:,} |"
        )
    for method, data in results["methods"].items():
        lines += ["", f"Accuracy matrix, {method} (row: after stage; column: task):", ""]
        lines.append("| after \\ task | " + " | ".join(tasks) + " |")
        lines.append("|---" * (len(tasks) + 1) + "|")
        lines.append(
            "| untrained | " + " | ".join(f"{v:.2f}" for v in results["untrained"]["rate"]) + " |"
        )
        for stage, row in enumerate(data["rate_matrix"]):
            lines.append(
                f"| {stage}: {tasks[stage]} | " + " | ".join(f"{v:.2f}" for v in row) + " |"
            )
    return "\n".join(lines) + "\n"


def plot_matrices(results: dict[str, Any], path: Path) -> None:
    from matplotlib.figure import Figure

    from marl_shared.analysis.representations import draw_heatmap, save_figure

    methods = list(results["methods"])
    short = [t.split("/", 1)[-1] for t in results["tasks"]]
    figure = Figure(figsize=(3.6 * len(methods), 3.4))
    for index, method in enumerate(methods):
        ax = figure.add_subplot(1, len(methods), index + 1)
        draw_heatmap(ax, results["methods"][method]["rate_matrix"], short, short, method)
        ax.set_xlabel("task")
        ax.set_ylabel("after stage")
    save_figure(figure, path)


def continual_command(cfg) -> None:
    """``marl-shared continual``: run the stream's methods and print the comparison table."""
    from rich.console import Console
    from rich.markdown import Markdown

    config, settings = split_config(cfg)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = Path(config.run_dir) if config.run_dir else Path("runs") / f"{stamp}-continual"
    runner = StreamRunner(config, settings, run_dir)  # resolves tasks before writing
    prepare_run_dir(run_dir, overwrite=config.overwrite, resuming=False)
    try:
        runner.run()
    finally:
        runner.stop()
    console = Console()
    console.print(Markdown((run_dir / "continual.md").read_text()))
    console.print(f"run directory: {run_dir}")
