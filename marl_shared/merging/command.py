"""``marl-shared merge``: merge backbones fine-tuned from one checkpoint, evaluate on every task.

Each source model is a checkpoint fine-tuned from the common ``base``; the tasks it was
fine-tuned on (its env steps grew past the base's, or the base lacks them) are its own,
and it lends the merged model its task modules for them. Backbones (and, optionally, the
task modules of a task several sources share) are merged; the result is evaluated on
every source task next to each individual model and the base, and written as one of our
checkpoints. With several scaling coefficients, each is tried on a validation budget
with other seeds than the final evaluation, and the best mean success rate is kept.
"""

from __future__ import annotations

import json
import logging
import os
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

from marl_shared.envs import TaskSpec
from marl_shared.merging.methods import average, dare, task_arithmetic, task_vector, ties_merge
from marl_shared.models.rl_modules import BACKBONE_ID, task_module_id
from marl_shared.training import checkpoint as ckpt
from marl_shared.training.config import ConfigError

logger = logging.getLogger(__name__)

METHODS = ("task_arithmetic", "ties", "average")
State = dict[str, dict[str, np.ndarray]]


class Source:
    """One checkpoint: its weights, manifest and the tasks it was fine-tuned on."""

    def __init__(self, path: str) -> None:
        self.path = ckpt.resolve_checkpoint(path)
        self.manifest = ckpt.read_manifest(self.path)
        self.modules: State = ckpt.load_module_state(self.path)
        self.specs = {d["name"]: TaskSpec.from_dict(d) for d in self.manifest["tasks"]}
        self.owned: list[str] = []

    def env_steps(self, task: str) -> int:
        return int(self.manifest.get("env_steps", {}).get(task, 0))


def owned_tasks(base: Source, model: Source) -> list[str]:
    """Tasks whose env steps grew since the base (or that the base does not have)."""
    return [t for t in model.specs if t not in base.specs or model.env_steps(t) > base.env_steps(t)]


def _tensors(params: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.asarray(v)) for k, v in params.items()}


def merge_params(
    base: dict[str, np.ndarray], models: list[dict[str, np.ndarray]], settings: dict, scaling
) -> dict[str, np.ndarray]:
    """One module's parameters merged with the configured method (DARE first, if asked)."""
    method = settings["method"]
    if method == "average":
        merged = average([_tensors(m) for m in models])
        return {k: v.numpy() for k, v in merged.items()}
    base_t = _tensors(base)
    vectors = [task_vector(base_t, _tensors(m)) for m in models]
    drop = float(settings["dare"]["drop_rate"])
    if drop > 0:
        generator = torch.Generator().manual_seed(int(settings["dare"]["seed"]))
        vectors = [dare(v, drop, generator) for v in vectors]
    if method == "task_arithmetic":
        coefficients = settings.get("coefficients") or None
        merged = task_arithmetic(base_t, vectors, scaling, coefficients)
    else:
        ties = settings["ties"]
        merged = ties_merge(
            base_t,
            vectors,
            density=float(ties["density"]),
            scaling=scaling,
            per_tensor=bool(ties["per_tensor"]),
        )
    return {k: v.numpy() for k, v in merged.items()}


def merged_state(base: Source, sources: list[Source], settings: dict, scaling: float) -> State:
    """The merged backbone plus each owned task's module (merged when several own it)."""
    state: State = {
        BACKBONE_ID: merge_params(
            base.modules[BACKBONE_ID], [s.modules[BACKBONE_ID] for s in sources], settings, scaling
        )
    }
    for task in union_tasks(sources):
        mid = task_module_id(task)
        owners = [s for s in sources if task in s.owned]
        if len(owners) > 1 and settings["merge_perception"] and mid in base.modules:
            state[mid] = merge_params(
                base.modules[mid], [s.modules[mid] for s in owners], settings, scaling
            )
        else:
            state[mid] = owners[0].modules[mid]
    return state


def union_tasks(sources: list[Source]) -> list[str]:
    names: list[str] = []
    for source in sources:
        names += [t for t in source.owned if t not in names]
    return names


def individual_state(source: Source, base: Source, tasks: list[str]) -> State:
    """A source model as it is; task modules it lacks come from the base when the base has
    them. Tasks neither has (a held-out task another model was trained on) are left out."""
    state: State = {BACKBONE_ID: source.modules[BACKBONE_ID]}
    for task in tasks:
        mid = task_module_id(task)
        module = source.modules.get(mid, base.modules.get(mid))
        if module is not None:
            state[mid] = module
    return state


def playable(state: State, tasks: list[str]) -> list[str]:
    return [t for t in tasks if task_module_id(t) in state]


# ----------------------------------------------------------------------------- evaluation


class Evaluator:
    """One algorithm with every source task; candidates' weights are swapped in and evaluated."""

    def __init__(self, base: Source, specs: list[TaskSpec], eval_cfg: dict, run_dir: Path):
        from marl_shared.analysis.representations import run_config_of
        from marl_shared.training.config import TrainConfig
        from marl_shared.training.run import Trainer

        config = run_config_of(base.path) or TrainConfig(tasks=[s.name for s in specs])
        config.tasks = [s.name for s in specs]
        config.model = type(config.model)(**base.manifest["model"])
        config.cluster.num_env_runners = 0
        config.cluster.num_learners = 0
        for backend, width in (eval_cfg.get("num_envs") or {}).items():
            if backend in config.task.backends:
                config.task.backends[backend].eval_num_envs = int(width)
        self.specs = specs
        self.trainer = Trainer(config, specs, run_dir)
        self.trainer.build()

    def evaluate(self, state: State, episodes: int, seed: int) -> dict[str, dict[str, float]]:
        """Success rate and return on every task ``state`` has modules for; the others'
        modules keep whatever the previous candidate left and are not played."""
        from marl_shared.training.run import rate_key

        algo = self.trainer.algo
        modules = {
            mid: {k: torch.from_numpy(np.array(v)) for k, v in p.items()}
            for mid, p in state.items()
        }
        algo.learner_group.set_state({"learner": {"rl_module": modules}})
        algo.env_runner_group.sync_weights(
            from_worker_or_learner_group=algo.learner_group, inference_only=True
        )
        tasks = playable(state, [spec.name for spec in self.specs])
        raw = algo.env_runner.evaluate(episodes, greedy=True, seed=seed, tasks=tasks)
        report = {}
        for spec in (spec for spec in self.specs if spec.name in raw):
            outcomes = np.asarray(raw[spec.name]["outcomes"], dtype=float)
            returns = np.asarray(raw[spec.name]["returns"], dtype=float)
            report[spec.name] = {
                "rate": float((outcomes > 0).mean()),
                "return": float(returns.mean()),
                "rate_name": rate_key(spec),
            }
        return report

    def stop(self) -> None:
        self.trainer.stop()


def mean_score(report: dict[str, dict[str, float]]) -> tuple[float, float]:
    """Mean rate and return over the tasks played (a model missing a task is not scored on it)."""
    rates = [v["rate"] for v in report.values()]
    returns = [v["return"] for v in report.values()]
    return float(np.mean(rates)), float(np.mean(returns))


# ----------------------------------------------------------------------------- command


def _settings(cfg) -> dict[str, Any]:
    settings = OmegaConf.to_container(cfg, resolve=True)
    if settings["method"] not in METHODS:
        raise ConfigError(f"method must be one of {list(METHODS)}, not {settings['method']!r}.")
    if not settings.get("models") or len(settings["models"]) < 1:
        raise ConfigError("Pass models=[<checkpoint>,...]: the fine-tuned models to merge.")
    if not settings.get("base"):
        raise ConfigError("Pass base=<checkpoint>: the common starting point of the models.")
    scaling = settings["scaling"]
    settings["scaling"] = [float(s) for s in (scaling if isinstance(scaling, list) else [scaling])]
    if not 0 <= float(settings["dare"]["drop_rate"]) < 1:
        raise ConfigError("dare.drop_rate must be in [0, 1).")
    if not 0 < float(settings["ties"]["density"]) <= 1:
        raise ConfigError("ties.density must be in (0, 1].")
    coefficients = settings.get("coefficients")
    if coefficients and len(coefficients) != len(settings["models"]):
        raise ConfigError("coefficients needs one value per model (negative: forget that task).")
    return settings


def load_sources(settings: dict[str, Any]) -> tuple[Source, list[Source]]:
    base = Source(settings["base"])
    sources = [Source(path) for path in settings["models"]]
    shapes = {k: v.shape for k, v in base.modules[BACKBONE_ID].items()}
    for source in sources:
        if BACKBONE_ID not in source.modules:
            raise ckpt.CheckpointError(f"{source.path} has no {BACKBONE_ID} module.")
        theirs = {k: v.shape for k, v in source.modules[BACKBONE_ID].items()}
        if theirs != shapes:
            raise ckpt.CheckpointError(
                f"{source.path} has a backbone of other shapes than the base {base.path}."
            )
        source.owned = owned_tasks(base, source)
        if not source.owned:
            raise ckpt.CheckpointError(
                f"{source.path} was not fine-tuned on any task since the base {base.path}."
            )
    return base, sources


def run_merge(cfg, run_dir: Path) -> dict[str, Any]:
    settings = _settings(cfg)
    base, sources = load_sources(settings)
    tasks = union_tasks(sources)
    specs = []
    for name in tasks:
        owner = next(s for s in sources if name in s.owned)
        specs.append(owner.specs[name])
    evaluation = settings["eval"]
    evaluator = Evaluator(base, specs, evaluation, run_dir)
    seed = int(settings["seed"])
    try:
        sweep = []
        best = settings["scaling"][0]
        if len(settings["scaling"]) > 1 and settings["method"] != "average":
            best_score = None
            for scaling in settings["scaling"]:
                report = evaluator.evaluate(
                    merged_state(base, sources, settings, scaling),
                    int(evaluation["validation_episodes"]),
                    seed=seed + 1,
                )
                score = mean_score(report)
                sweep.append({"scaling": scaling, "mean_rate": score[0], "mean_return": score[1]})
                logger.info("scaling %.2f: mean rate %.3f, mean return %.3f", scaling, *score)
                if best_score is None or score > best_score:
                    best, best_score = scaling, score
        merged = merged_state(base, sources, settings, best)
        episodes, test_seed = int(evaluation["episodes"]), seed + 2
        rows = {"merged": evaluator.evaluate(merged, episodes, test_seed)}
        for index, source in enumerate(sources):
            state = individual_state(source, base, tasks)
            rows[f"model {index}: {source.path}"] = evaluator.evaluate(state, episodes, test_seed)
        if all(task_module_id(t) in base.modules for t in tasks):
            rows[f"base: {base.path}"] = evaluator.evaluate(
                individual_state(base, base, tasks), episodes, test_seed
            )
    finally:
        evaluator.stop()

    manifest = {
        "tasks": [spec.to_dict() for spec in specs],
        "model": base.manifest["model"],
        "module_ids": {t: task_module_id(t) for t in tasks},
        "iteration": 0,
        "env_steps": {t: 0 for t in tasks},
        "merge": {
            "method": settings["method"],
            "scaling": best,
            "base": str(base.path),
            "models": [str(s.path) for s in sources],
            "owned": {str(s.path): s.owned for s in sources},
            "dare_drop_rate": settings["dare"]["drop_rate"],
            "ties_density": settings["ties"]["density"],
        },
    }
    checkpoint = ckpt.write_checkpoint(
        run_dir / "checkpoints",
        name="iter_000000",
        manifest=manifest,
        module_state=merged,
        learner_state=None,
        trainer_state={"iteration": 0, "env_steps": manifest["env_steps"]},
    )
    result = {
        "tasks": tasks,
        "method": settings["method"],
        "scaling": best,
        "sweep": sweep,
        "episodes": episodes,
        "rows": rows,
        "owned": [s.owned for s in sources],
        "checkpoint": str(checkpoint),
    }
    tmp = run_dir / ".merge.json.tmp"
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, run_dir / "merge.json")
    tmp = run_dir / ".merge.md.tmp"
    tmp.write_text(merge_table(result, sources))
    os.replace(tmp, run_dir / "merge.md")
    return result


def merge_table(result: dict[str, Any], sources: list[Source]) -> str:
    tasks = result["tasks"]
    owners = {t: i for i, s in enumerate(sources) for t in s.owned}
    lines = [
        f"Merge: {result['method']}"
        + ("" if result["method"] == "average" else f", scaling {result['scaling']}")
        + "; greedy success rate (return) "
        f"over {result['episodes']} episodes per task. * = the model's own fine-tuned task; "
        "- = the model has no modules for that task; mean rate over the tasks played.",
        "",
        "| model | " + " | ".join(tasks) + " | mean rate |",
        "|---" * (len(tasks) + 2) + "|",
    ]
    for name, report in result["rows"].items():
        cells = []
        for task in tasks:
            if task not in report:
                cells.append("-")  # the model has no modules for this task
                continue
            own = name.startswith(f"model {owners[task]}:")
            cells.append(
                f"{report[task]['rate']:.2f} ({report[task]['return']:.2f}){'*' if own else ''}"
            )
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {mean_score(report)[0]:.3f} |")
    if result["sweep"]:
        lines += [
            "",
            "| scaling | validation mean rate | validation mean return |",
            "|---|---|---|",
        ]
        for row in result["sweep"]:
            lines.append(
                f"| {row['scaling']} | {row['mean_rate']:.3f} | {row['mean_return']:.3f} |"
            )
    return "\n".join(lines) + "\n"


def merge_command(cfg) -> None:
    from rich.console import Console
    from rich.markdown import Markdown

    from marl_shared.training.run import prepare_run_dir, removed_on_failure

    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = Path(cfg.output) if cfg.output else Path("runs") / f"{stamp}-merge-{cfg.method}"
    _settings(cfg)  # fail before anything is written
    created = not run_dir.exists()
    prepare_run_dir(run_dir, overwrite=bool(cfg.overwrite), resuming=False)
    with removed_on_failure(run_dir, created=created, kept=(run_dir / "merge.json").exists):
        run_merge(cfg, run_dir)
    Console().print(Markdown((run_dir / "merge.md").read_text()))
    Console().print(f"merged checkpoint: {run_dir / 'checkpoints'}")
