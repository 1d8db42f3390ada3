"""FPF: fine-tune only the most sensitive layers for a few steps on a small replay buffer.

Zhao et al., "Does Continual Learning Equally Forget All Parameters?" (ICML 2023): after a
stream, only a few layers have moved a lot between tasks, and forgetting lives mostly in
them, so a short fine-tuning of those layers alone on stored data recovers old tasks.
k-FPF drops replay during training and runs FPF k times at regular intervals instead.

For an on-policy agent the buffer stores the policy's action distributions at the time
(masked logits) and the fine-tuning distils to them (KL from the stored distribution), or
optionally maximises the log-probability of the actions taken then.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from marl_shared.continual.replay import ReplayBuffer
from marl_shared.models import columns as C
from marl_shared.models.rl_modules import task_module_id

logger = logging.getLogger(__name__)

DISTILL = "distill"
CROSS_ENTROPY = "cross_entropy"
# Critics do not shape the policy, so the distillation loss cannot move them.
POLICY_PARTS = ("perception", "backbone", "head")


@dataclass
class FPFSettings:
    modules: list[str] | None = None  # layer names or module-id prefixes; None: by sensitivity
    num_modules: int = 2
    steps: int = 50
    batch_size: int = 256
    lr: float = 1e-3
    loss: str = DISTILL


def is_policy_layer(layer: str) -> bool:
    return layer.partition("/")[2].split(".", 1)[0] in POLICY_PARTS


def select_layers(sensitivity: dict[str, float], settings: FPFSettings) -> list[str]:
    """The named layers (a name may be a prefix such as ``shared_backbone``), else the top k."""
    candidates = [name for name in sensitivity if is_policy_layer(name)]
    if settings.modules:
        chosen = []
        for wanted in settings.modules:
            matches = [n for n in candidates if n == wanted or n.startswith(wanted.rstrip("/."))]
            if not matches:
                raise ValueError(
                    f"FPF module {wanted!r} matches no policy layer; layers are {candidates}"
                )
            chosen += [m for m in matches if m not in chosen]
        return chosen
    if not candidates:
        raise ValueError("FPF has no measured layer sensitivity to choose from")
    ranked = sorted(candidates, key=lambda n: -sensitivity[n])
    return ranked[: max(1, settings.num_modules)]


def _distribution_loss(logits, rows: dict[str, torch.Tensor], loss: str) -> torch.Tensor:
    new_logp = torch.log_softmax(logits, dim=-1)
    active = rows[C.ACTIVE].float()
    if loss == CROSS_ENTROPY:
        per_agent = -new_logp.gather(-1, rows[C.ACTIONS].long().unsqueeze(-1)).squeeze(-1)
    else:
        old_logp = torch.log_softmax(rows[C.LOGITS], dim=-1)
        # KL(old || new); unavailable actions have zero old probability and add nothing.
        per_agent = (old_logp.exp() * (old_logp - new_logp)).sum(-1)
    return (per_agent * active).sum() / active.sum().clamp(min=1.0)


def finetune_layers(
    multi_module, layers: list[str], buffer_data: dict[str, dict[str, np.ndarray]], settings, seed
) -> dict[str, Any]:
    """Adam on the chosen layers only, summing the replay loss of every buffered task."""
    chosen, seen = [], set()
    for module_id, module in multi_module._rl_modules.items():
        for name, param in module.named_parameters():
            if id(param) in seen:
                continue
            seen.add(id(param))
            if any(f"{module_id}/{name}".startswith(layer + ".") for layer in layers) or (
                f"{module_id}/{name}" in layers
            ):
                chosen.append(param)
    if not chosen:
        raise ValueError(f"FPF layers {layers} match no parameter of the model")
    optimizer = torch.optim.Adam(chosen, lr=settings.lr)
    rng = np.random.default_rng(seed)
    tensors = {
        task: {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in data.items()}
        for task, data in buffer_data.items()
    }

    def batch_loss(batch_size: int | None) -> torch.Tensor:
        total = torch.zeros(())
        for task, data in tensors.items():
            count = len(data[C.OBS])
            rows = rng.integers(0, count, size=batch_size) if batch_size else np.arange(count)
            picked = {k: v[rows] for k, v in data.items()}
            module = multi_module[task_module_id(task)]
            features = module.perception.step(picked[C.OBS], picked[C.PREV_ACTIONS], None)
            logits = module.decide(features, picked[C.AVAIL])
            total = total + _distribution_loss(logits, picked, settings.loss)
        return total / max(1, len(tensors))

    with torch.no_grad():
        before = float(batch_loss(None))
    for _ in range(settings.steps):
        optimizer.zero_grad(set_to_none=True)
        loss = batch_loss(settings.batch_size)
        loss.backward()
        optimizer.step()
    for module in multi_module._rl_modules.values():
        module.zero_grad(set_to_none=True)
    with torch.no_grad():
        after = float(batch_loss(None))
    return {
        "loss_before": before,
        "loss_after": after,
        "num_parameters": sum(p.numel() for p in chosen),
    }


def run_fpf(algo, buffer: ReplayBuffer, layers: list[str], settings: FPFSettings, seed: int = 0):
    """FPF on the learner's own modules, then the new weights go to the env runners."""
    if settings.loss not in (DISTILL, CROSS_ENTROPY):
        raise ValueError(
            f"FPF loss must be {DISTILL!r} or {CROSS_ENTROPY!r}, not {settings.loss!r}"
        )
    data = {task: buffer.data[task] for task in buffer.tasks()}
    if not data:
        raise ValueError("FPF has an empty replay buffer")

    def on_learner(learner):
        return finetune_layers(learner.module, layers, data, settings, seed)

    # Limitation: one learner only; several remote learners would each fine-tune alone.
    if algo.config.num_learners > 1:
        raise ValueError("FPF runs on a single learner; set cluster.num_learners to 0 or 1")
    results = list(algo.learner_group.foreach_learner(on_learner))
    result = results[0].get() if hasattr(results[0], "get") else results[0]
    algo.env_runner_group.sync_weights(
        from_worker_or_learner_group=algo.learner_group, inference_only=True
    )
    logger.info(
        "FPF on %s: replay loss %.4f -> %.4f", layers, result["loss_before"], result["loss_after"]
    )
    return {**result, "layers": layers, "buffer_rows": {t: len(d[C.OBS]) for t, d in data.items()}}
