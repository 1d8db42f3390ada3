"""Continual-learning metrics over an accuracy matrix ``R[j, i]``: task ``i`` after stage ``j``.

Average final performance is the mean of the last row. Forgetting of task ``i`` is the
best value it had before the last stage minus its final value (Chaudhry et al., "Riemannian
Walk for Incremental Learning", 2018), averaged over all but the last task. Backward
transfer is the mean change of each task from just after it was learnt to the end, and
forward transfer the mean gain on a task just before it is learnt over an untrained
model (Lopez-Paz and Ranzato, "Gradient Episodic Memory", 2017).
"""

from __future__ import annotations

import numpy as np


def _matrix(accuracy) -> np.ndarray:
    matrix = np.asarray(accuracy, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] == 0:
        raise ValueError(f"the accuracy matrix must be square [stages, tasks], got {matrix.shape}")
    return matrix


def average_final(accuracy) -> float:
    return float(_matrix(accuracy)[-1].mean())


def average_forgetting(accuracy) -> float:
    """Mean over tasks 0..T-2 of max_{l < T-1} R[l, i] - R[T-1, i] (0 for one task)."""
    matrix = _matrix(accuracy)
    last = matrix.shape[0] - 1
    if last == 0:
        return 0.0
    drops = [matrix[:last, i].max() - matrix[last, i] for i in range(last)]
    return float(np.mean(drops))


def backward_transfer(accuracy) -> float:
    """Mean over tasks 0..T-2 of R[T-1, i] - R[i, i] (negative: forgetting)."""
    matrix = _matrix(accuracy)
    last = matrix.shape[0] - 1
    if last == 0:
        return 0.0
    return float(np.mean([matrix[last, i] - matrix[i, i] for i in range(last)]))


def forward_transfer(accuracy, untrained) -> float:
    """Mean over tasks 1..T-1 of R[i-1, i] - b_i, ``b`` measured before any training."""
    matrix = _matrix(accuracy)
    baseline = np.asarray(untrained, dtype=np.float64)
    if matrix.shape[0] == 1:
        return 0.0
    return float(np.mean([matrix[i - 1, i] - baseline[i] for i in range(1, matrix.shape[0])]))


def summarise(accuracy, untrained=None) -> dict[str, float]:
    summary = {
        "average_final": average_final(accuracy),
        "average_forgetting": average_forgetting(accuracy),
        "backward_transfer": backward_transfer(accuracy),
    }
    if untrained is not None:
        summary["forward_transfer"] = forward_transfer(accuracy, untrained)
    return summary
