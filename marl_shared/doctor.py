"""Which simulators work on this machine, and how to fix the ones that do not.

``diagnose()`` builds one environment of each backend through the same ``make_task`` the
trainer uses and steps it once, so a backend reported usable really ran here. StarCraft II
is the exception: its check locates smacv2, the game and the maps but launches nothing,
because a launch takes tens of seconds and gigabytes of memory. ``render_report`` turns the
reports and the library versions into a plain-text table for the console.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)

SMAX_PROBE_TASK = "smax/3m"
GRF_PROBE_TASK = "grf/academy_empty_goal_close"
GRF_INSTALL_HINT = "bash envs/install_grf.sh"
SC2_INSTALL_HINT = "bash envs/install_sc2.sh"
LIBRARIES = ("torch", "ray", "jax", "jaxlib", "jaxmarl", "gymnasium", "numpy")


@dataclass(frozen=True)
class SimulatorReport:
    """What the doctor found about one backend; detail and fix are one sentence each."""

    backend: str  # "smax", "grf" or "sc2"
    usable: bool
    version: str | None  # the simulator package's version, None when it is not installed
    detail: str
    fix: str | None  # None when nothing needs fixing


def _package_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _first_line(text: str, limit: int = 160) -> str:
    """A one-line, period-free excerpt of an error message, to quote inside a sentence."""
    line = (text.strip().splitlines() or [""])[0].rstrip(".")
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" + ("" if number == 1 else "s")


def _step_once(task_name: str) -> str:
    """Build a one-environment batch of the task, step it once, and describe what ran."""
    from marl_shared.envs import make_task

    task = make_task(task_name, num_envs=1)
    try:
        spec = task.spec
        batch = task.reset(seed=0)
        actions = np.argmax(batch.avail_actions, axis=-1)  # the first available action
        batch = task.step(actions)
        expected = (1, spec.num_agents, spec.obs_dim)
        if batch.obs.shape != expected or not np.isfinite(batch.obs).all():
            raise RuntimeError(f"step returned observations of shape {batch.obs.shape}")
    finally:
        task.close()
    return (
        f"Built {task_name} and stepped it once ({_count(spec.num_agents, 'agent')}, "
        f"observation size {spec.obs_dim}, {_count(spec.num_actions, 'action')})."
    )


def _probe(
    backend: str,
    package: str,
    distribution: str,
    task_name: str,
    install_fix: str,
    step_once: Callable[[str], str] = _step_once,
) -> SimulatorReport:
    """Report on a backend whose check is: package importable, then one step of a task."""
    from marl_shared.envs import SimulatorMissingError

    version = _package_version(distribution)
    if importlib.util.find_spec(package) is None:
        return SimulatorReport(
            backend, False, None, f"The {package} package is not installed.", install_fix
        )
    try:
        detail = step_once(task_name)
    except SimulatorMissingError as exc:
        return SimulatorReport(backend, False, version, str(exc), install_fix)
    except ModuleNotFoundError as exc:
        if exc.name == f"marl_shared.envs.{backend}":
            return SimulatorReport(
                backend,
                False,
                version,
                f"This install of marl-shared has no {backend} adapter ({exc.name} is missing).",
                "Reinstall marl-shared from a complete checkout.",
            )
        logger.debug("probing %s failed", task_name, exc_info=True)
        return SimulatorReport(
            backend,
            False,
            version,
            f"Building {task_name} failed because module {exc.name} is missing.",
            install_fix,
        )
    except Exception as exc:  # the doctor reports every failure instead of raising it
        logger.debug("probing %s failed", task_name, exc_info=True)
        return SimulatorReport(
            backend,
            False,
            version,
            f"Building {task_name} failed with {type(exc).__name__}: {_first_line(str(exc))}.",
            install_fix,
        )
    return SimulatorReport(backend, True, version, detail, None)


def diagnose_smax() -> SimulatorReport:
    """Build a one-environment smax/3m batch and step it once."""
    return _probe(
        "smax",
        "jaxmarl",
        "jaxmarl",
        SMAX_PROBE_TASK,
        "Install the project's pinned dependencies with `pip install -e .`.",
    )


def diagnose_grf() -> SimulatorReport:
    """Build one football engine on academy_empty_goal_close and step it once."""
    return _probe(
        "grf",
        "gfootball",
        "gfootball",
        GRF_PROBE_TASK,
        f"Run `{GRF_INSTALL_HINT}` to build the football engine.",
    )


def diagnose_sc2() -> SimulatorReport:
    """Locate smacv2, the StarCraft II game and its maps, without launching the game."""
    from marl_shared.envs import sc2

    version = _package_version("SMACv2")
    problem = sc2.simulator_problem()
    if problem is not None:
        return SimulatorReport(
            "sc2",
            False,
            version,
            f"StarCraft II is not usable because {problem}.",
            f"Run `{SC2_INSTALL_HINT}` on a machine with internet access.",
        )
    builds = ", ".join(sc2.game_versions()) or "of unknown build"
    return SimulatorReport(
        "sc2",
        True,
        version,
        f"smacv2 and StarCraft II ({builds}) were found at {sc2.game_dir()}, "
        "but this check does not launch the game.",
        None,
    )


def diagnose() -> list[SimulatorReport]:
    """Check every backend: smax, grf and sc2, in that order."""
    return [diagnose_smax(), diagnose_grf(), diagnose_sc2()]


def library_versions() -> dict[str, str]:
    """Versions of the main libraries plus Python and the CPU count, as display strings."""
    info = {"python": platform.python_version()}
    for name in LIBRARIES:
        info[name] = _package_version(name) or "not installed"
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    total = os.cpu_count()
    info["cpus"] = f"{usable} usable of {total}" if usable and usable != total else str(total)
    return info


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True))

    rule = "  ".join("-" * width for width in widths)
    return [line(header).rstrip(), rule, *(line(row).rstrip() for row in rows)]


def render_report(reports: list[SimulatorReport], libraries: dict[str, str] | None = None) -> str:
    """The reports and library versions as a plain-text table (no markup, no colour).

    The text may contain square brackets from error messages, so a rich console should
    print it with ``markup=False``. ``libraries`` defaults to :func:`library_versions`.
    """
    libraries = library_versions() if libraries is None else libraries
    rows = [
        [report.backend, "yes" if report.usable else "no", report.version or "-", report.detail]
        for report in reports
    ]
    lines = ["Simulators", *_table(["backend", "usable", "version", "detail"], rows)]
    fixes = [f"  {report.backend}: {report.fix}" for report in reports if report.fix]
    if fixes:
        lines += ["", "Fixes", *fixes]
    lines += ["", "Libraries", *_table(["name", "version"], [[k, v] for k, v in libraries.items()])]
    return "\n".join(lines)
