"""Multi-task MAPPO on RLlib: the algorithm config, its learner and its training step.

MAPPO (Yu et al., "The Surprising Effectiveness of PPO in Cooperative Multi-Agent
Games", 2022) is PPO with a centralised critic on the global state. Every task has
its own module (perception, head, critic); all tasks share the backbone module. One
optimizer owns every trainable parameter, so the backbone is stepped exactly once per
update, with the summed gradient of all task losses (RLlib's pattern for a shared
sub-module: one optimizer, else the shared part would be stepped once per module).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch
from ray.rllib.algorithms.algorithm import Algorithm
from ray.rllib.algorithms.algorithm_config import AlgorithmConfig
from ray.rllib.core.learner.torch.torch_learner import TorchLearner
from ray.rllib.policy.sample_batch import MultiAgentBatch, SampleBatch
from ray.rllib.utils.annotations import override
from ray.rllib.utils.metrics import NUM_ENV_STEPS_SAMPLED_LIFETIME

from marl_shared.algorithms.env_runner import STATS, WORKER, BatchedTaskEnvRunner
from marl_shared.envs.spec import TaskSpec
from marl_shared.models import columns as C
from marl_shared.models.rl_modules import BACKBONE_ID, build_module_spec, task_module_id

logger = logging.getLogger(__name__)

OPTIMIZER_NAME = "joint_adam"
BACKBONE_TRAIN = "train"
BACKBONE_FROZEN = "frozen"
BACKBONE_FINETUNE = "finetune"

# Seed paper: a task already at win rate 1.0 keeps a small weight instead of zero.
MIN_TASK_WEIGHT = 0.01


def default_marl_settings() -> dict[str, Any]:
    """Our algorithm's own settings, kept in one dict on the RLlib config."""
    return {
        "task_specs": [],  # TaskSpec dicts, resolved on the driver
        "task_options": {},  # task name -> adapter options
        "num_envs": {},  # task name -> environments per env runner
        "eval_num_envs": {},  # task name -> environments used for evaluation
        "task_placement": {},  # task name -> env runner indices that sample it (absent: all)
        "sample_retries": 1,  # rounds of re-sampling tasks whose env runners failed
        "active_tasks": None,  # task names sampled and trained (None: all); continual stages
        "rollout_length": 64,
        "gamma": 0.99,
        "gae_lambda": 0.95,
        "clip_param": 0.2,
        "vf_clip_param": 10.0,
        "vf_loss_coeff": 0.5,
        "entropy_coeff": 0.01,
        "num_minibatches": 2,
        "normalize_advantages": True,
        "task_weighting": "uniform",  # or "win_rate": w_t proportional to 1 - win rate
        "backbone_mode": BACKBONE_TRAIN,  # train | frozen | finetune
        "backbone_lr_scale": 0.1,  # learning-rate factor of the backbone in finetune mode
        "model": {
            "perception_dim": 128,
            "backbone_hidden": [64],
            "critic_hidden": [128, 128],
            "head": "action_scoring",
            "recurrent": False,
        },
    }


class MAPPOConfig(AlgorithmConfig):
    """RLlib config of multi-task MAPPO; our settings live in ``self.marl``."""

    def __init__(self, algo_class=None) -> None:
        super().__init__(algo_class=algo_class or MultiTaskMAPPO)
        self.marl = default_marl_settings()
        self.lr = 5e-4
        self.num_epochs = 5
        self.grad_clip = 10.0
        self.grad_clip_by = "global_norm"
        self.env_runner_cls = BatchedTaskEnvRunner
        # Weights travel to env runners from the learner in every training step; the
        # connector-state merging of RLlib's stock runners has nothing to merge here.
        self.merge_env_runner_states = False
        self.broadcast_env_runner_states = False

    def marl_settings(self, **settings: Any) -> MAPPOConfig:
        unknown = set(settings) - set(self.marl)
        if unknown:
            raise ValueError(f"unknown MAPPO settings: {sorted(unknown)}")
        self.marl.update(settings)
        return self

    @override(AlgorithmConfig)
    def get_default_learner_class(self):
        return MAPPOTorchLearner

    @override(AlgorithmConfig)
    def get_default_rl_module_spec(self):
        specs = [TaskSpec.from_dict(d) for d in self.marl["task_specs"]]
        return build_module_spec(specs, self.marl["model"])

    @override(AlgorithmConfig)
    def get_multi_rl_module_spec(self, *, env=None, spaces=None, inference_only=False):
        # Shapes come from the task specs, not from probing an environment.
        return self.get_default_rl_module_spec()


class MAPPOTorchLearner(TorchLearner):
    """The clipped-surrogate MAPPO loss per task, weighted, summed, and one optimizer."""

    @override(TorchLearner)
    def build(self) -> None:
        self.task_weights: dict[str, float] = {}
        super().build()

    def set_task_weights(self, weights: dict[str, float]) -> None:
        self.task_weights = dict(weights)

    def trainable_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """(module_id, parameter) pairs, every tensor once, the frozen backbone left out."""
        frozen = self.config.marl["backbone_mode"] == BACKBONE_FROZEN
        pairs, seen = [], set()
        for module_id, module in self.module._rl_modules.items():
            for param in module.parameters():
                if id(param) in seen:
                    continue
                seen.add(id(param))
                if module_id == BACKBONE_ID and frozen:
                    param.requires_grad_(False)
                    continue
                pairs.append((module_id, param))
        return pairs

    @override(TorchLearner)
    def configure_optimizers(self) -> None:
        settings = self.config.marl
        pairs = self.trainable_parameters()
        backbone = [p for mid, p in pairs if mid == BACKBONE_ID]
        others = [p for mid, p in pairs if mid != BACKBONE_ID]
        groups = [{"params": others, "lr": self.config.lr}]
        if backbone:
            scale = settings["backbone_lr_scale"] if settings["backbone_mode"] == "finetune" else 1
            groups.append({"params": backbone, "lr": self.config.lr * float(scale)})
        optimizer = torch.optim.Adam(groups)
        self.register_optimizer(
            optimizer_name=OPTIMIZER_NAME,
            optimizer=optimizer,
            params=others + backbone,
            # Learning rates are per parameter group (the backbone may run slower).
            lr_or_lr_schedule=None,
        )

    @override(TorchLearner)
    def configure_optimizers_for_module(self, module_id, config=None) -> None:
        raise NotImplementedError("multi-task MAPPO registers one optimizer for all modules")

    @override(TorchLearner)
    def compute_loss_for_module(self, *, module_id, config, batch, fwd_out) -> torch.Tensor:
        settings = self.config.marl
        active = batch[C.ACTIVE].float()
        count = active.sum().clamp(min=1.0)

        def masked_mean(x: torch.Tensor) -> torch.Tensor:
            return (x * active).sum() / count

        log_probs = torch.log_softmax(fwd_out[C.LOGITS], dim=-1)
        logp = log_probs.gather(-1, batch[C.ACTIONS].long().unsqueeze(-1)).squeeze(-1)
        ratio = torch.exp(logp - batch[C.LOGP])
        adv = batch[C.ADVANTAGES]
        if settings["normalize_advantages"]:
            mean = masked_mean(adv)
            std = torch.sqrt(masked_mean((adv - mean) ** 2) + 1e-8)
            adv = (adv - mean) / std
        clip = settings["clip_param"]
        surrogate = torch.min(ratio * adv, torch.clamp(ratio, 1 - clip, 1 + clip) * adv)
        policy_loss = -masked_mean(surrogate)

        # Value loss clipped around the sampling-time prediction, as in MAPPO.
        values, old_values = fwd_out[C.VF_PREDS], batch[C.VF_PREDS]
        targets = batch[C.VALUE_TARGETS]
        vclip = settings["vf_clip_param"]
        clipped = old_values + torch.clamp(values - old_values, -vclip, vclip)
        vf_loss = masked_mean(torch.max((values - targets) ** 2, (clipped - targets) ** 2))

        probs = log_probs.exp()
        entropy = masked_mean(-(probs * log_probs).sum(-1))
        # KL(old || new) estimated as E[(r - 1) - log r] (Schulman's k3): never negative.
        log_ratio = logp - batch[C.LOGP]
        approx_kl = masked_mean(torch.exp(log_ratio) - 1 - log_ratio)

        weight = float(self.task_weights.get(module_id, 1.0))
        total = policy_loss + settings["vf_loss_coeff"] * vf_loss
        total = weight * (total - settings["entropy_coeff"] * entropy)
        for key, value in (
            ("policy_loss", policy_loss),
            ("vf_loss", vf_loss),
            ("entropy", entropy),
            ("approx_kl", approx_kl),
            ("task_weight", weight),
        ):
            self.metrics.log_value((module_id, key), value, window=1)
        return total


class MultiTaskMAPPO(Algorithm):
    """Samples every task on every env runner, then one joint MAPPO update per minibatch."""

    @classmethod
    @override(Algorithm)
    def get_default_config(cls) -> MAPPOConfig:
        return MAPPOConfig()

    @override(Algorithm)
    def setup(self, config: MAPPOConfig) -> None:
        super().setup(config)
        self.rng = np.random.default_rng(int(config.seed or 0))
        self.win_rate_ema: dict[str, float] = {}
        self.last_report: dict[str, Any] = {}
        self.env_steps_sampled: dict[str, int] = {}
        self.sample_workers: list[dict] = []
        self.active_tasks: list[str] | None = None
        self.set_active_tasks(config.marl["active_tasks"])
        self.last_faults: dict[str, Any] = {}
        self.fault_totals = {"env_runners_lost": 0, "rollouts_lost": 0, "local_fallbacks": 0}

    # ----------------------------------------------------------------- sampling

    def set_active_tasks(self, names: list[str] | None) -> None:
        """Sample and train only these tasks from now on (None: all); every module stays."""
        known = [d["name"] for d in self.config.marl["task_specs"]]
        if names is not None:
            unknown = [name for name in names if name not in known]
            if unknown or not names:
                raise ValueError(
                    f"active tasks {list(names)} must be a non-empty subset of {known}"
                )
        self.active_tasks = None if names is None else [n for n in known if n in names]

    def sampled_task_names(self) -> list[str]:
        """The tasks sampled and trained in the next iteration."""
        return self.active_tasks or [d["name"] for d in self.config.marl["task_specs"]]

    def _runner_tasks(self, runner_ids: list[int], pending: list[str]) -> dict[int, list[str]]:
        """Env runner index -> the pending tasks it may sample (``task_placement``, else all)."""
        placement = self.config.marl["task_placement"]
        assignment = {}
        for index in runner_ids:
            tasks = [name for name in pending if index in placement.get(name, [index])]
            if tasks:
                assignment[index] = tasks
        return assignment

    def _sample_all(self) -> list[dict[str, Any]]:
        """One rollout of every task; lost runners are counted and their tasks sampled again.

        A remote env runner that dies or raises loses its rollout of this iteration. Its
        tasks are sampled again on healthy runners allowed to take them (after RLlib has had
        a chance to bring restarted runners back), and as a last resort on the local env
        runner, so every task is sampled in every iteration.
        """
        group = self.env_runner_group
        names = self.sampled_task_names()
        faults = {"env_runners_lost": 0, "rollouts_lost": 0, "local_fallback": [], "restored": 0}
        self.last_faults = faults
        if group.num_remote_env_runners() == 0:
            return [self.env_runner.sample(tasks=names)]

        results: list[dict[str, Any]] = []
        pending = list(names)
        for attempt in range(1 + int(self.config.marl["sample_retries"])):
            if attempt > 0:
                self.restore_env_runners(group)
            assignment = self._runner_tasks(group.healthy_env_runner_ids(), pending)
            if not assignment:
                continue
            returned = group.foreach_env_runner(
                lambda runner, tasks=assignment: runner.sample(tasks=tasks[runner.worker_index]),
                local_env_runner=False,
                healthy_only=True,
                remote_worker_ids=list(assignment),
            )
            answered = {result[WORKER]["index"] for result in returned}
            for index in set(assignment) - answered:
                faults["env_runners_lost"] += 1
                faults["rollouts_lost"] += len(assignment[index])
                logger.warning(
                    "env runner %d failed while sampling %s; its rollout is lost",
                    index,
                    assignment[index],
                )
            results += returned
            sampled = {name for result in returned for name in result[STATS]}
            pending = [name for name in pending if name not in sampled]
            if not pending:
                break

        if pending:
            # Limitation: the fallback samples on the driver, which slows the iteration.
            logger.warning("no healthy env runner for %s; sampling on the driver", pending)
            faults["local_fallback"] = list(pending)
            results.append(self.env_runner.sample(tasks=pending))
        # Restarted runners come back here or in RLlib's restore before each training step.
        restored_total = int(self._counters["total_num_restored_workers"])
        faults["restored"] = restored_total - self.fault_totals.get("restored", 0)
        self.fault_totals["restored"] = restored_total
        for key in ("env_runners_lost", "rollouts_lost"):
            self.fault_totals[key] += faults[key]
        self.fault_totals["local_fallbacks"] += len(faults["local_fallback"])
        return results

    def evaluate_tasks(self, num_episodes: int, *, greedy: bool = True) -> dict[str, Any]:
        """Greedy evaluation of every task on the local env runner, with the learner's weights."""
        self.env_runner_group.sync_weights(
            from_worker_or_learner_group=self.learner_group, inference_only=True
        )
        seed = int(self.config.seed or 0) + 10_000 + self.iteration
        return self.env_runner.evaluate(num_episodes, greedy=greedy, seed=seed)

    # ----------------------------------------------------------------- weights

    def _task_weights(self, module_ids: list[str]) -> dict[str, float]:
        if self.config.marl["task_weighting"] != "win_rate":
            return {mid: 1.0 for mid in module_ids}
        gaps = {}
        for mid in module_ids:
            win = self.win_rate_ema.get(mid, 0.0)
            gaps[mid] = 1.0 - win
        total = sum(gaps.values())
        weights = {}
        for mid, gap in gaps.items():
            # Scaled so that the weights sum to the number of tasks (uniform = all ones).
            share = gap / total if total > 0 else 1.0 / len(gaps)
            weights[mid] = max(share, MIN_TASK_WEIGHT) * len(gaps)
        return weights

    # ----------------------------------------------------------------- training step

    @override(Algorithm)
    def training_step(self) -> None:
        settings = self.config.marl
        start = time.perf_counter()
        results = self._sample_all()
        sample_time = time.perf_counter() - start

        # Merge the env runners' rollouts per task (rows are environment segments).
        module_ids = [task_module_id(name) for name in self.sampled_task_names()]
        merged: dict[str, dict[str, np.ndarray]] = {}
        task_stats: dict[str, dict[str, Any]] = {}
        self.sample_workers = [r[WORKER] for r in results]
        for mid in module_ids:
            # A runner returns only the tasks placed on it; every task has at least one.
            parts = [r[mid] for r in results if mid in r]
            merged[mid] = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
        for result in results:
            for name, stats in result[STATS].items():
                agg = task_stats.setdefault(
                    name, {"returns": [], "lengths": [], "outcomes": [], "env_steps": 0}
                )
                for key in ("returns", "lengths", "outcomes"):
                    agg[key].extend(stats[key])
                agg["env_steps"] += stats["env_steps"]

        for name, stats in task_stats.items():
            mid = task_module_id(name)
            self.env_steps_sampled[name] = self.env_steps_sampled.get(name, 0) + stats["env_steps"]
            if stats["outcomes"]:
                rate = float(np.mean(np.asarray(stats["outcomes"]) > 0))
                old = self.win_rate_ema.get(mid)
                self.win_rate_ema[mid] = rate if old is None else 0.8 * old + 0.2 * rate

        weights = self._task_weights(module_ids)
        self.learner_group.foreach_learner(lambda learner: learner.set_task_weights(weights))

        # Epochs over shuffled minibatches; every minibatch holds a slice of every task,
        # so each optimizer step sees all tasks' gradients on the shared backbone.
        start = time.perf_counter()
        env_steps = sum(s["env_steps"] for s in task_stats.values())
        learner_results = []
        num_minibatches = int(settings["num_minibatches"])
        for _ in range(int(self.config.num_epochs)):
            orders = {mid: self.rng.permutation(len(merged[mid][C.OBS])) for mid in module_ids}
            for k in range(num_minibatches):
                policy_batches = {}
                for mid in module_ids:
                    rows = np.array_split(orders[mid], num_minibatches)[k]
                    if len(rows) == 0:
                        continue
                    policy_batches[mid] = SampleBatch(
                        {key: value[rows] for key, value in merged[mid].items()}
                    )
                if not policy_batches:
                    continue  # fewer environment segments than minibatches (e.g. one task)
                learner_results = self.learner_group.update(
                    batch=MultiAgentBatch(policy_batches, env_steps=env_steps),
                    timesteps={
                        NUM_ENV_STEPS_SAMPLED_LIFETIME: sum(self.env_steps_sampled.values())
                    },
                )
        learn_time = time.perf_counter() - start

        self.env_runner_group.sync_weights(
            from_worker_or_learner_group=self.learner_group,
            inference_only=True,
            timeout_seconds=None,
        )

        learner_stats = _flatten_learner_results(learner_results)
        self.last_report = {
            "tasks": task_stats,
            "task_weights": weights,
            "learner": learner_stats,
            "sample_time_s": sample_time,
            "learn_time_s": learn_time,
            "workers": self.sample_workers,
            "faults": {**self.last_faults, "totals": dict(self.fault_totals)},
        }
        self.metrics.log_value("marl_env_steps", env_steps, reduce="sum")


def _flatten_learner_results(results: Any) -> dict[str, float]:
    """Last values of the learner's per-module stats as plain floats: {"smax__3m/vf_loss": ...}."""
    flat: dict[str, float] = {}
    if not results:
        return flat
    first = results[0] if isinstance(results, list) else results

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}/{key}" if prefix else str(key), value)
            return
        value = node.peek() if hasattr(node, "peek") else node
        try:
            flat[prefix] = float(value)
        except (TypeError, ValueError):
            pass

    walk("", first)
    return flat
