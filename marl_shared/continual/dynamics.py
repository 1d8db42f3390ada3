"""Which modules move: size-normalised L1 change of every layer's parameters over a run.

The sensitivity of a module ``m`` between two snapshots is ``|theta_m(t) - theta_m(s)|_1``
divided by the number of its parameters, as in the FPF paper (Zhao et al., "Does
Continual Learning Equally Forget All Parameters?", ICML 2023). A module here is one
layer: a parameter name without its trailing ``weight``/``bias`` part, prefixed by the
RLlib module id, e.g. ``shared_backbone/backbone.layers.0`` or ``smax__3m/critic.net.0.0``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

ModuleState = dict[str, dict[str, Any]]  # module id -> {parameter name: array}


def layer_name(module_id: str, parameter: str) -> str:
    """``smax__3m`` + ``perception.input_layer.weight`` -> ``smax__3m/perception.input_layer``."""
    head, _, last = parameter.rpartition(".")
    if head and (last.startswith("weight") or last.startswith("bias")):
        return f"{module_id}/{head}"
    return f"{module_id}/{parameter}"


def flatten_layers(state: ModuleState) -> dict[str, np.ndarray]:
    """One flat float64 vector per layer."""
    parts: dict[str, list[np.ndarray]] = {}
    for module_id in sorted(state):
        for parameter in sorted(state[module_id]):
            value = np.asarray(state[module_id][parameter], dtype=np.float64)
            parts.setdefault(layer_name(module_id, parameter), []).append(value.ravel())
    return {name: np.concatenate(values) for name, values in parts.items()}


def normalised_l1_change(before: dict[str, np.ndarray], after: dict[str, np.ndarray]) -> dict:
    """Per layer: sum |after - before| / number of parameters."""
    return {
        name: float(np.abs(after[name] - before[name]).sum() / max(1, before[name].size))
        for name in before
    }


@dataclass
class DynamicsTracker:
    """Snapshots at intervals and at task switches; keeps only what the report needs."""

    start: dict[str, np.ndarray] | None = None
    previous: dict[str, np.ndarray] | None = None
    stage_start: dict[str, np.ndarray] | None = None
    intervals: list[dict[str, Any]] = field(default_factory=list)
    stages: list[dict[str, Any]] = field(default_factory=list)

    def begin(self, state: ModuleState) -> None:
        self.start = self.previous = flatten_layers(state)

    def begin_stage(self, state: ModuleState) -> None:
        self.stage_start = flatten_layers(state)

    def snapshot(self, state: ModuleState, iteration: int, stage: int) -> None:
        current = flatten_layers(state)
        change = normalised_l1_change(self.previous, current)
        self.intervals.append({"iteration": iteration, "stage": stage, "change": change})
        self.previous = current

    def end_stage(self, state: ModuleState, stage: int, task: str) -> dict[str, float]:
        current = flatten_layers(state)
        change = normalised_l1_change(self.stage_start, current)
        self.stages.append({"stage": stage, "task": task, "change": change})
        self.previous = current
        return change

    def total(self, state: ModuleState) -> dict[str, float]:
        return normalised_l1_change(self.start, flatten_layers(state))

    def sensitivity(self) -> dict[str, float]:
        """Mean per-stage change of each layer (intervals if no stage ended yet)."""
        rows = [s["change"] for s in self.stages] or [i["change"] for i in self.intervals]
        if not rows:
            return {}
        return {name: float(np.mean([row[name] for row in rows])) for name in rows[0]}

    def report(self, state: ModuleState) -> dict[str, Any]:
        return {
            "total": self.total(state),
            "stages": self.stages,
            "intervals": self.intervals,
            "sensitivity": self.sensitivity(),
        }


def ranking_table(report: dict[str, Any], top: int | None = None) -> str:
    """Markdown table: layers by total change, with the change in each stage."""
    total = report["total"]
    stages = report["stages"]
    names = sorted(total, key=lambda n: -total[n])[: top or None]
    header = ["layer", "total", *[f"stage {s['stage']} ({s['task']})" for s in stages]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in names:
        cells = [name, f"{total[name]:.2e}", *[f"{s['change'][name]:.2e}" for s in stages]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_dynamics(report: dict[str, Any], path, top: int = 20) -> None:
    """Bar chart of total change per layer next to a layer x stage heatmap."""
    from matplotlib.figure import Figure

    from marl_shared.analysis.representations import save_figure

    total = report["total"]
    names = sorted(total, key=lambda n: -total[n])[:top]
    stages = report["stages"]
    figure = Figure(figsize=(12, 0.35 * len(names) + 1.5))
    ax = figure.add_subplot(1, 2, 1)
    ax.barh(range(len(names)), [total[n] for n in names], color="tab:blue")
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("size-normalised L1 change, whole run")
    if stages:
        ax2 = figure.add_subplot(1, 2, 2)
        values = np.array([[s["change"][n] for s in stages] for n in names])
        image = ax2.imshow(values, aspect="auto", cmap="magma")
        ax2.set_xticks(range(len(stages)), [s["task"].split("/", 1)[-1] for s in stages])
        ax2.set_yticks(range(len(names)), [""] * len(names))
        ax2.set_title("change per stage (task switch)", fontsize=9)
        figure.colorbar(image, ax=ax2)
    save_figure(figure, path)
