"""Partial loading of a multi-task checkpoint into a freshly built model, checked to the byte.

The seed paper's released transfer loader filtered weights by name while the names
carried a wrapper prefix, so it loaded and froze nothing without a word. Here every
step is checked: the checkpoint must hold a backbone whose parameter names and shapes
are exactly those of the configured model, and after loading the learner's tensors
are read back and compared with the checkpoint's bytes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from marl_shared.models.rl_modules import BACKBONE_ID, task_module_id
from marl_shared.training import checkpoint as ckpt

logger = logging.getLogger(__name__)

PERCEPTION_PREFIX = "perception."


@dataclass
class Pretrained:
    """What a transfer reads from a pre-training checkpoint."""

    checkpoint: Path
    manifest: dict[str, Any]
    modules: dict[str, dict[str, np.ndarray]]

    @property
    def task_names(self) -> list[str]:
        return [task["name"] for task in self.manifest["tasks"]]


@dataclass
class LoadReport:
    """Which tensors a partial load replaced, for the run's record."""

    checkpoint: str
    backbone_tensors: int
    backbone_parameters: int
    perception: dict[str, str] = field(default_factory=dict)  # new task -> source task


def read_pretrained(path: str | Path) -> Pretrained:
    """Resolve and read a checkpoint (or run folder); corrupt files end in one sentence."""
    checkpoint = ckpt.resolve_checkpoint(path)
    manifest = ckpt.read_manifest(checkpoint)
    modules = ckpt.load_module_state(checkpoint)
    if BACKBONE_ID not in modules or not modules[BACKBONE_ID]:
        raise ckpt.CheckpointError(f"Checkpoint {checkpoint} holds no {BACKBONE_ID!r} weights.")
    return Pretrained(checkpoint=checkpoint, manifest=manifest, modules=modules)


def describe_shapes(params: dict[str, Any]) -> str:
    """``name [d0, d1]`` for every tensor, in a stable order, for error messages."""
    return ", ".join(f"{name} {list(np.shape(value))}" for name, value in sorted(params.items()))


def check_same_layout(
    saved: dict[str, np.ndarray], current: dict[str, Any], *, what: str, checkpoint: Path
) -> None:
    """Names and shapes must agree exactly; otherwise one sentence naming both layouts."""
    same_names = set(saved) == set(current)
    if same_names and all(
        tuple(np.shape(saved[k])) == tuple(np.shape(current[k])) for k in current
    ):
        return
    raise ckpt.CheckpointError(
        f"Checkpoint {checkpoint} has a {what} of shapes ({describe_shapes(saved)}), "
        f"the configured model needs ({describe_shapes(current)}); "
        "pick the model settings the checkpoint was trained with."
    )


def module_state(algo) -> dict[str, dict[str, np.ndarray]]:
    """The learner's module weights as numpy arrays."""
    state = algo.learner_group.get_state(components="learner/rl_module")["learner"]["rl_module"]
    return {
        mid: {name: np.asarray(value) for name, value in params.items()}
        for mid, params in state.items()
    }


def load_pretrained(
    algo, pretrained: Pretrained, reuse_perception: dict[str, str] | None = None
) -> LoadReport:
    """Copy the backbone (and optionally some perception layers) into the learner, then verify.

    ``reuse_perception`` maps a new task to a pre-trained task whose perception layers it
    starts from; their shapes must agree. Env runners receive the weights afterwards.
    """
    checkpoint = pretrained.checkpoint
    current = module_state(algo)
    saved_backbone = pretrained.modules[BACKBONE_ID]
    check_same_layout(
        saved_backbone, current[BACKBONE_ID], what="shared backbone", checkpoint=checkpoint
    )
    new_state: dict[str, dict[str, np.ndarray]] = {BACKBONE_ID: dict(saved_backbone)}

    report = LoadReport(
        checkpoint=str(checkpoint),
        backbone_tensors=len(saved_backbone),
        backbone_parameters=int(sum(np.size(v) for v in saved_backbone.values())),
    )
    for new_task, source_task in (reuse_perception or {}).items():
        new_id, source_id = task_module_id(new_task), task_module_id(source_task)
        if new_id not in current:
            raise ckpt.CheckpointError(
                f"reuse_perception names {new_task!r}, which is not a task of this transfer."
            )
        if source_id not in pretrained.modules:
            raise ckpt.CheckpointError(
                f"Checkpoint {checkpoint} has no task {source_task!r} to reuse perception "
                f"layers from; it holds {', '.join(pretrained.task_names)}."
            )
        saved = _perception(pretrained.modules[source_id])
        mine = _perception(current[new_id])
        check_same_layout(
            saved, mine, what=f"perception of {source_task} for {new_task}", checkpoint=checkpoint
        )
        new_state[new_id] = {**current[new_id], **saved}
        report.perception[new_task] = source_task

    algo.learner_group.set_state({"learner": {"rl_module": new_state}})

    # RLlib loads module state with strict=False; read back and compare every byte.
    loaded = module_state(algo)
    for module_id, params in new_state.items():
        for name, value in params.items():
            if not np.array_equal(loaded[module_id][name], value):
                raise ckpt.CheckpointError(
                    f"Loading {module_id}/{name} from {checkpoint} did not take effect."
                )
    algo.env_runner_group.sync_weights(
        from_worker_or_learner_group=algo.learner_group, inference_only=True
    )
    logger.info(
        "loaded the shared backbone (%d tensors, %d parameters) from %s",
        report.backbone_tensors,
        report.backbone_parameters,
        checkpoint,
    )
    return report


def _perception(params: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in params.items() if k.startswith(PERCEPTION_PREFIX)}


def backbone_freeze_state(algo) -> dict[str, Any]:
    """How the learner treats the backbone: requires_grad flags and optimizer learning rates."""
    from marl_shared.algorithms.mappo import OPTIMIZER_NAME

    def inspect(learner) -> dict[str, Any]:
        backbone = learner.module[BACKBONE_ID]
        params = list(backbone.parameters())
        ids = {id(p) for p in params}
        named = learner._named_optimizers  # RLlib keys them "<module id>_<name>"
        optimizer = next(opt for key, opt in named.items() if key.endswith(OPTIMIZER_NAME))
        groups = []
        for group in optimizer.param_groups:
            in_group = sum(id(p) in ids for p in group["params"])
            groups.append({"lr": float(group["lr"]), "backbone_params": in_group})
        return {
            "requires_grad": [bool(p.requires_grad) for p in params],
            "optimizer_groups": groups,
            "backbone_in_optimizer": sum(g["backbone_params"] for g in groups),
        }

    group = algo.learner_group
    if group.is_local:
        return inspect(group._learner)
    first = group.foreach_learner(inspect)[0]
    return first.get() if hasattr(first, "get") else first


def backbone_bytes(algo) -> dict[str, bytes]:
    """The learner's backbone tensors as raw bytes (for the byte-for-byte freeze checks)."""
    return {
        name: np.ascontiguousarray(value).tobytes()
        for name, value in module_state(algo)[BACKBONE_ID].items()
    }
