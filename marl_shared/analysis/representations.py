"""What the shared backbone computes on each task: activations, linear CKA, a 2D embedding.

Linear CKA (Kornblith et al., "Similarity of Neural Network Representations Revisited",
2019) compares two representations of the same examples and is invariant to orthogonal
transforms and isotropic scaling. Between layers the examples are paired (one input, two
layers). Between tasks they are not, but the backbone's units are the same neurons on
every task, so the comparison pairs units instead: the same formula on the transposed,
per-unit centred activations, i.e. the cosine similarity of the unit covariance matrices.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from marl_shared.models import columns as C
from marl_shared.models.rl_modules import TaskModule

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- CKA


def linear_cka(x: np.ndarray, y: np.ndarray, *, center: bool = True) -> float:
    """Linear CKA of ``x`` [n, p] and ``y`` [n, q] (rows are the same n examples)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"CKA needs [n, p] and [n, q] arrays, got {x.shape} and {y.shape}")
    if center:
        x = x - x.mean(axis=0, keepdims=True)
        y = y - y.mean(axis=0, keepdims=True)
    # ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F): the feature-space form, cheap for n >> p.
    cross = np.linalg.norm(y.T @ x) ** 2
    norm = np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)
    return float(cross / norm) if norm > 0 else float("nan")


def shared_unit_similarity(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA with units as the paired axis: ``x`` [n1, H] and ``y`` [n2, H], same units."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"unit similarity needs the same units, got {x.shape} and {y.shape}")
    x = (x - x.mean(axis=0, keepdims=True)) / np.sqrt(len(x))
    y = (y - y.mean(axis=0, keepdims=True)) / np.sqrt(len(y))
    return linear_cka(x.T, y.T, center=False)


# ----------------------------------------------------------------------------- activations


@torch.no_grad()
def backbone_activations(module: TaskModule, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per layer, [M, H] activations of the alive agents' decision for the action taken.

    With the action-scoring head every candidate action has its own features; the one of
    the action the policy took is kept, as the seed paper carries that one forward.
    """
    obs = torch.from_numpy(rows[C.OBS])
    prev = torch.from_numpy(rows[C.PREV_ACTIONS])
    features = module.perception.step(obs, prev, None)  # [B, N, (A,) H]
    if features.dim() == obs.dim() + 1:
        index = torch.from_numpy(rows[C.ACTIONS]).long()[..., None, None]
        features = features.gather(-2, index.expand(*index.shape[:-1], features.shape[-1]))
        features = features.squeeze(-2)
    alive = torch.from_numpy(rows[C.ACTIVE]).bool()
    layers = {"perception": features[alive]}
    x = features
    linear_index = 0
    for layer in module.backbone.layers:
        x = layer(x)
        if isinstance(layer, torch.nn.ReLU):
            layers[f"backbone.{linear_index}"] = x[alive]
            linear_index += 1
    return {name: value.numpy().astype(np.float64) for name, value in layers.items()}


def pca_2d(x: np.ndarray) -> np.ndarray:
    """Projection on the two leading principal components."""
    centred = x - x.mean(axis=0, keepdims=True)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    components = vt[:2]
    if components.shape[0] < 2:
        components = np.vstack([components, np.zeros_like(components)])
    return centred @ components.T


# ----------------------------------------------------------------------------- report


@dataclass
class RepresentationReport:
    tasks: list[str]
    layers: list[str]
    layer_cka: dict[str, list[list[float]]]  # task -> [layer x layer]
    task_similarity: dict[str, list[list[float]]]  # layer -> [task x task]
    samples: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        return {
            "tasks": self.tasks,
            "layers": self.layers,
            "layer_cka": self.layer_cka,
            "task_similarity": self.task_similarity,
            "samples": self.samples,
        }


def compare_representations(
    activations: dict[str, dict[str, np.ndarray]], max_samples: int = 2000, seed: int = 0
) -> RepresentationReport:
    """Layer-by-layer CKA per task and task-by-task unit similarity per layer."""
    rng = np.random.default_rng(seed)
    tasks = list(activations)
    layers = list(next(iter(activations.values())))
    sub = {}
    for task, per_layer in activations.items():
        count = len(next(iter(per_layer.values())))
        if count == 0:
            raise ValueError(f"no activations were collected for {task}")
        keep = rng.choice(count, min(count, max_samples), replace=False)
        sub[task] = {layer: value[keep] for layer, value in per_layer.items()}
    layer_cka = {
        task: [[linear_cka(sub[task][a], sub[task][b]) for b in layers] for a in layers]
        for task in tasks
    }
    task_similarity = {}
    for layer in layers:
        task_similarity[layer] = [
            [shared_unit_similarity(sub[a][layer], sub[b][layer]) for b in tasks] for a in tasks
        ]
    samples = {task: len(next(iter(sub[task].values()))) for task in tasks}
    return RepresentationReport(tasks, layers, layer_cka, task_similarity, samples)


def draw_heatmap(ax, matrix, labels_x, labels_y, title: str, vmin=0.0, vmax=1.0) -> None:
    values = np.asarray(matrix, dtype=float)
    image = ax.imshow(values, vmin=vmin, vmax=vmax, cmap="viridis")
    ax.set_xticks(range(len(labels_x)), labels_x, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(labels_y)), labels_y, fontsize=7)
    ax.set_title(title, fontsize=9)
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=6, color="w")
    return image


def save_figure(figure: Figure, path: Path) -> None:
    """Draw with the Agg canvas and replace the file atomically."""
    FigureCanvasAgg(figure)
    tmp = path.with_name(f".{path.name}.tmp")
    figure.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    os.replace(tmp, path)


def write_report(
    report: RepresentationReport,
    activations: dict[str, dict[str, np.ndarray]],
    out_dir: Path,
    *,
    embed_layer: str | None = None,
    max_points: int = 600,
    seed: int = 0,
) -> dict[str, Path]:
    """JSON, CKA heatmaps and a PCA scatter of one layer coloured by task."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out_dir / "representations.json",
        "cka": out_dir / "cka.png",
        "pca": out_dir / "pca.png",
    }
    tmp = paths["json"].with_name(".representations.json.tmp")
    tmp.write_text(json.dumps(report.to_dict(), indent=1))
    os.replace(tmp, paths["json"])

    short = [name.split("/", 1)[-1] for name in report.tasks]
    panels = len(report.tasks) + len(report.layers)
    figure = Figure(figsize=(3.2 * panels, 3.2))
    for index, task in enumerate(report.tasks):
        ax = figure.add_subplot(1, panels, index + 1)
        draw_heatmap(ax, report.layer_cka[task], report.layers, report.layers, f"layer CKA: {task}")
    for index, layer in enumerate(report.layers):
        ax = figure.add_subplot(1, panels, len(report.tasks) + index + 1)
        draw_heatmap(ax, report.task_similarity[layer], short, short, f"task similarity: {layer}")
    save_figure(figure, paths["cka"])

    layer = embed_layer or report.layers[-1]
    rng = np.random.default_rng(seed)
    points, labels = [], []
    for task in report.tasks:
        values = activations[task][layer]
        keep = rng.choice(len(values), min(len(values), max_points), replace=False)
        points.append(values[keep])
        labels += [task] * len(keep)
    embedded = pca_2d(np.concatenate(points))
    figure = Figure(figsize=(5, 4.5))
    ax = figure.add_subplot(1, 1, 1)
    labels = np.asarray(labels)
    for task in report.tasks:
        mask = labels == task
        ax.scatter(embedded[mask, 0], embedded[mask, 1], s=5, alpha=0.6, label=task)
    ax.set_title(f"PCA of {layer} activations", fontsize=10)
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.legend(fontsize=7, markerscale=3)
    save_figure(figure, paths["pca"])
    return paths


# ----------------------------------------------------------------------------- command


def load_checkpoint_modules(checkpoint: Path, task_names: list[str] | None = None):
    """(multi-module with the checkpoint's weights, task specs, run config or None), no Ray."""
    from marl_shared.envs import TaskSpec
    from marl_shared.models.rl_modules import build_module_spec
    from marl_shared.training import checkpoint as ckpt
    from marl_shared.training.config import ConfigError

    manifest = ckpt.read_manifest(checkpoint)
    specs = [TaskSpec.from_dict(d) for d in manifest["tasks"]]
    known = [spec.name for spec in specs]
    if task_names:
        unknown = [name for name in task_names if name not in known]
        if unknown:
            raise ConfigError(f"Checkpoint {checkpoint} has no tasks {unknown}; it has {known}.")
        specs = [spec for spec in specs if spec.name in task_names]
    if manifest["model"].get("recurrent"):
        raise ConfigError("Representation analysis needs a feed-forward perception model.")
    modules = ckpt.load_module_state(checkpoint)
    multi = build_module_spec(specs, manifest["model"]).build()
    state = {mid: modules[mid] for mid in multi._rl_modules}
    multi.set_state(
        {mid: {k: torch.from_numpy(v) for k, v in p.items()} for mid, p in state.items()}
    )
    return multi, specs, run_config_of(checkpoint)


def run_config_of(checkpoint: Path):
    """The config of the run a checkpoint belongs to, if its run directory is still there."""
    from marl_shared.training.run import CONFIG_FILE, load_run_config

    for folder in (checkpoint, *checkpoint.parents[:2]):
        if (folder / CONFIG_FILE).is_file():
            return load_run_config(folder)
    return None


def task_options(run_config, task_name: str) -> dict[str, Any]:
    from marl_shared.training.config import sampling_settings

    if run_config is None:
        return {}
    return sampling_settings(run_config, task_name)[2]


def analyze_command(cfg) -> None:
    """``marl-shared analyze checkpoint=<run or checkpoint>``: CKA and PCA of the backbone."""
    from rich.console import Console
    from rich.table import Table

    from marl_shared.continual.replay import collect_policy_data
    from marl_shared.envs import make_task
    from marl_shared.models.rl_modules import task_module_id
    from marl_shared.training import checkpoint as ckpt
    from marl_shared.training.config import ConfigError

    if not cfg.checkpoint:
        raise ConfigError("Pass checkpoint=<run directory or checkpoint> to analyse.")
    if int(cfg.steps) <= 0 or int(cfg.num_envs) <= 0:
        raise ConfigError("steps and num_envs must be positive.")
    checkpoint = ckpt.resolve_checkpoint(cfg.checkpoint)
    tasks = list(cfg.tasks) if cfg.tasks else None
    multi, specs, run_config = load_checkpoint_modules(checkpoint, tasks)
    activations = {}
    for index, spec in enumerate(specs):
        task = make_task(
            spec.name, num_envs=int(cfg.num_envs), **task_options(run_config, spec.name)
        )
        try:
            module = multi[task_module_id(spec.name)]
            rows = collect_policy_data(
                module, task, int(cfg.steps), seed=int(cfg.seed) + index, greedy=bool(cfg.greedy)
            )
        finally:
            task.close()
        activations[spec.name] = backbone_activations(module, rows)
        logger.info(
            "%s: %d alive-agent samples", spec.name, len(activations[spec.name]["perception"])
        )
    report = compare_representations(activations, int(cfg.max_samples), int(cfg.seed))
    out_dir = (
        Path(cfg.out_dir) if cfg.out_dir else checkpoint.parents[1] / "analysis" / checkpoint.name
    )
    paths = write_report(report, activations, out_dir, seed=int(cfg.seed))

    console = Console()
    for layer in report.layers:
        table = Table(title=f"Task similarity of shared units, {layer} (linear CKA over units)")
        table.add_column("task")
        for name in report.tasks:
            table.add_column(name.split("/", 1)[-1], justify="right")
        for name, row in zip(report.tasks, report.task_similarity[layer], strict=True):
            table.add_row(name, *[f"{value:.3f}" for value in row])
        console.print(table)
    console.print(f"written: {', '.join(str(p) for p in paths.values())}")
