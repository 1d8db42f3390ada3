"""Task adapters: one batched protocol over SMAX, the football engine and StarCraft II.

``make_task("smax/3m", num_envs=64)`` returns a :class:`BatchedTask`. Backends are
imported lazily so that a machine without one simulator can still use the others.
"""

from __future__ import annotations

import importlib
from typing import Any

from marl_shared.envs.spec import (
    BatchedTask,
    SimulatorMissingError,
    StepBatch,
    TaskError,
    TaskSpec,
    UnknownTaskError,
)

# backend -> module defining ``scenario_names()`` and ``make(scenario, num_envs, **options)``
BACKENDS = {
    "smax": "marl_shared.envs.smax",
    "grf": "marl_shared.envs.grf",
    "sc2": "marl_shared.envs.sc2",
}


def split_task_name(name: str) -> tuple[str, str]:
    """Split ``backend/scenario`` and check the backend exists."""
    backend, sep, scenario = str(name).partition("/")
    if not sep or not scenario:
        raise UnknownTaskError(
            f"Task name {name!r} is not of the form <backend>/<scenario>; "
            f"backends are {', '.join(BACKENDS)}."
        )
    if backend not in BACKENDS:
        raise UnknownTaskError(
            f"Unknown backend {backend!r} in task {name!r}; backends are {', '.join(BACKENDS)}."
        )
    return backend, scenario


def _backend_module(backend: str):
    return importlib.import_module(BACKENDS[backend])


def scenario_names(backend: str) -> list[str]:
    """Every scenario name the backend knows, whether or not its simulator is installed."""
    return list(_backend_module(backend).scenario_names())


def check_task_name(name: str) -> str:
    """Return the name if it is a known task, else raise one sentence listing the valid ones."""
    backend, scenario = split_task_name(name)
    names = scenario_names(backend)
    if scenario not in names:
        raise UnknownTaskError(
            f"Unknown {backend} scenario {scenario!r}; valid {backend} tasks are: "
            + ", ".join(f"{backend}/{n}" for n in names)
            + "."
        )
    return name


def make_task(name: str, num_envs: int, **options: Any) -> BatchedTask:
    """Build a batch of ``num_envs`` environments of the named task."""
    check_task_name(name)
    backend, scenario = split_task_name(name)
    return _backend_module(backend).make(scenario, num_envs=num_envs, **options)


def task_spec(name: str, **options: Any) -> TaskSpec:
    """The static shapes of a task, without keeping a simulator alive longer than needed."""
    check_task_name(name)
    backend, scenario = split_task_name(name)
    module = _backend_module(backend)
    if hasattr(module, "spec"):
        return module.spec(scenario, **options)
    task = module.make(scenario, num_envs=1, **options)
    try:
        return task.spec
    finally:
        task.close()


__all__ = [
    "BACKENDS",
    "BatchedTask",
    "SimulatorMissingError",
    "StepBatch",
    "TaskError",
    "TaskSpec",
    "UnknownTaskError",
    "check_task_name",
    "make_task",
    "scenario_names",
    "split_task_name",
    "task_spec",
]
