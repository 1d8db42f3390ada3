"""Merging shared layers fine-tuned from one starting point: task vectors, TIES, DARE, averaging."""

from marl_shared.merging.methods import (
    average,
    dare,
    task_arithmetic,
    task_vector,
    ties_merge,
    trim_top_k,
)

__all__ = ["average", "dare", "task_arithmetic", "task_vector", "ties_merge", "trim_top_k"]
