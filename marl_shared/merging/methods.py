"""Merging methods over parameter dicts ``{name: tensor}`` that share names and shapes.

A task vector is ``tau_t = theta_t - theta_0`` (Ilharco et al., "Editing Models with Task
Arithmetic", 2023). Task arithmetic adds ``lambda * sum_t c_t tau_t`` to ``theta_0`` (a
negative ``c_t`` forgets task ``t``). TIES (Yadav et al., "TIES-Merging", 2023) trims each
task vector to its largest entries, elects one sign per entry from the summed trimmed
vectors and averages only the entries that agree with it. DARE (Yu et al., "Language
Models are Super Mario", 2024) drops delta entries at random and rescales the survivors,
before any of the other methods. Averaging is the plain mean of the fine-tuned weights.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

Params = Mapping[str, torch.Tensor]


def _check_same_keys(reference: Params, others: Sequence[Params], what: str) -> None:
    for index, other in enumerate(others):
        if set(other) != set(reference):
            missing = sorted(set(reference) ^ set(other))[:3]
            raise ValueError(f"{what} {index} has different parameters from the base: {missing}")
        for name, value in other.items():
            if tuple(value.shape) != tuple(reference[name].shape):
                raise ValueError(
                    f"{what} {index}: parameter {name} has shape {tuple(value.shape)}, "
                    f"the base has {tuple(reference[name].shape)}"
                )


def task_vector(base: Params, finetuned: Params) -> dict[str, torch.Tensor]:
    """``finetuned - base`` per parameter."""
    _check_same_keys(base, [finetuned], "model")
    return {name: finetuned[name].double() - base[name].double() for name in base}


def task_arithmetic(
    base: Params, vectors: Sequence[Params], scaling: float = 1.0, coefficients=None
) -> dict[str, torch.Tensor]:
    """``base + scaling * sum_t c_t tau_t``; ``c_t = -1`` negates (forgets) task ``t``."""
    if not vectors:
        raise ValueError("task arithmetic needs at least one task vector")
    _check_same_keys(base, vectors, "task vector")
    coefficients = [1.0] * len(vectors) if coefficients is None else list(coefficients)
    if len(coefficients) != len(vectors):
        raise ValueError(f"{len(coefficients)} coefficients for {len(vectors)} task vectors")
    merged = {}
    for name, value in base.items():
        total = sum(c * tau[name].double() for c, tau in zip(coefficients, vectors, strict=True))
        merged[name] = (value.double() + scaling * total).to(value.dtype)
    return merged


def average(models: Sequence[Params]) -> dict[str, torch.Tensor]:
    """The element-wise mean of the models' weights (the baseline every method must beat)."""
    if not models:
        raise ValueError("averaging needs at least one model")
    _check_same_keys(models[0], models[1:], "model")
    return {
        name: torch.stack([m[name].double() for m in models]).mean(0).to(value.dtype)
        for name, value in models[0].items()
    }


def trim_top_k(vector: Params, density: float, *, per_tensor: bool = False) -> dict:
    """Keep the ``density`` fraction of entries with the largest magnitude, zero the rest.

    By default the fraction is taken over the whole task vector (all its tensors together),
    as TIES does; ``per_tensor`` keeps that fraction of every tensor instead. Ties at the
    threshold are all kept.
    """
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    if density == 1.0:
        return {name: value.clone() for name, value in vector.items()}

    def threshold(values: torch.Tensor) -> torch.Tensor:
        flat = values.abs().flatten()
        keep = max(1, int(round(density * flat.numel())))
        return torch.topk(flat, keep, sorted=True).values[-1]

    if per_tensor:
        return {
            name: torch.where(value.abs() >= threshold(value), value, torch.zeros_like(value))
            for name, value in vector.items()
        }
    cut = threshold(torch.cat([value.flatten() for value in vector.values()]))
    return {
        name: torch.where(value.abs() >= cut, value, torch.zeros_like(value))
        for name, value in vector.items()
    }


def ties_merge(
    base: Params,
    vectors: Sequence[Params],
    *,
    density: float = 0.2,
    scaling: float = 1.0,
    per_tensor: bool = False,
) -> dict[str, torch.Tensor]:
    """TIES: trim, elect a sign per entry, average the agreeing entries, add with ``scaling``."""
    if not vectors:
        raise ValueError("TIES needs at least one task vector")
    _check_same_keys(base, vectors, "task vector")
    trimmed = [trim_top_k(v, density, per_tensor=per_tensor) for v in vectors]
    merged = {}
    for name, value in base.items():
        stack = torch.stack([t[name].double() for t in trimmed])  # [T, ...]
        # The elected sign is the sign of the total mass; an entry with zero mass gets 0.
        sign = torch.sign(stack.sum(0))
        agree = (torch.sign(stack) == sign) & (stack != 0)
        count = agree.sum(0)
        disjoint_mean = torch.where(
            count > 0, (stack * agree).sum(0) / count.clamp(min=1), torch.zeros_like(sign)
        )
        merged[name] = (value.double() + scaling * disjoint_mean).to(value.dtype)
    return merged


def dare(vector: Params, drop_rate: float, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Drop each entry with probability ``drop_rate``, rescale survivors by ``1 / (1 - p)``."""
    if not 0.0 <= drop_rate < 1.0:
        raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}")
    out = {}
    for name in sorted(vector):
        value = vector[name].double()
        keep = torch.rand(value.shape, generator=generator, dtype=torch.float64) >= drop_rate
        out[name] = torch.where(keep, value / (1.0 - drop_rate), torch.zeros_like(value))
    return out
