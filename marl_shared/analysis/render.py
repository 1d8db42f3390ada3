"""``marl-shared render``: one episode of a trained policy drawn frame by frame into a GIF.

SMAX frames show every unit (allies blue, enemies red) as a disc sized by its attack
range, a health bar, and a line from each attacker to its target; football frames show
the engine's raw positions on a 2D pitch (no OpenGL). Frames are drawn with matplotlib's
Agg canvas and written as a GIF with pillow.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from marl_shared.envs import make_task
from marl_shared.policy import Policy
from marl_shared.training.config import ConfigError

logger = logging.getLogger(__name__)

ALLY, ENEMY = "tab:blue", "tab:red"


def _canvas(size: tuple[float, float] = (4.0, 4.0)) -> tuple[Figure, Any]:
    figure = Figure(figsize=size, dpi=80)
    FigureCanvasAgg(figure)
    return figure, figure.add_subplot(1, 1, 1)


def _to_image(figure: Figure) -> Image.Image:
    figure.canvas.draw()
    rgba = np.asarray(figure.canvas.buffer_rgba())
    return Image.fromarray(rgba[..., :3].copy())


def draw_smax(state: dict[str, Any], title: str) -> Image.Image:
    """One SMAX frame: units, health bars and attack lines."""
    figure, axes = _canvas()
    width, height = state["map_size"]
    axes.set_xlim(0, width)
    axes.set_ylim(0, height)
    axes.set_aspect("equal")
    axes.set_title(title, fontsize=8)
    axes.tick_params(labelsize=6)
    positions, alive = state["unit_positions"], state["unit_alive"].astype(bool)
    num_allies, moves = state["num_allies"], state["num_movement_actions"]
    for unit, (x, y) in enumerate(positions):
        if not alive[unit]:
            axes.plot(x, y, marker="x", color="grey", markersize=4)
            continue
        color = ALLY if unit < num_allies else ENEMY
        axes.add_patch(_circle((x, y), 0.6, color))
        share = float(np.clip(state["unit_health"][unit] / state["max_health"][unit], 0, 1))
        axes.plot([x - 0.8, x - 0.8 + 1.6 * share], [y + 1.0, y + 1.0], color="green", lw=2)
        action = int(state["prev_attack_actions"][unit])
        if action >= moves:
            if unit < num_allies:
                target = action + num_allies - moves
            else:
                target = num_allies - 1 - (action - moves)
            if 0 <= target < len(positions):
                tx, ty = positions[target]
                axes.plot([x, tx], [y, ty], color=color, lw=0.8, alpha=0.8)
    return _to_image(figure)


def _circle(centre, radius, color):
    from matplotlib.patches import Circle

    return Circle(centre, radius, color=color, alpha=0.9)


def draw_football(state: dict[str, Any], title: str) -> Image.Image:
    """One football frame: the pitch (x in [-1, 1], y in [-0.42, 0.42]), players and ball."""
    figure, axes = _canvas((5.0, 2.6))
    axes.set_xlim(-1.05, 1.05)
    axes.set_ylim(0.47, -0.47)  # the engine's y grows downwards
    axes.set_facecolor("#3a7d44")
    axes.set_xticks([])
    axes.set_yticks([])
    axes.plot([-1, 1, 1, -1, -1], [-0.42, -0.42, 0.42, 0.42, -0.42], color="white", lw=1)
    axes.plot([0, 0], [-0.42, 0.42], color="white", lw=0.8)
    for goal_x in (-1, 1):
        axes.plot([goal_x, goal_x], [-0.044, 0.044], color="yellow", lw=3)
    left, right = state["left_team"], state["right_team"]
    axes.scatter(left[:, 0], left[:, 1], color=ALLY, s=25, zorder=3)
    controlled = [i for i in state["controlled"] if 0 <= i < len(left)]
    if controlled:
        axes.scatter(
            left[controlled, 0],
            left[controlled, 1],
            facecolor="none",
            edgecolor="white",
            s=70,
            zorder=4,
        )
    axes.scatter(right[:, 0], right[:, 1], color=ENEMY, s=25, zorder=3)
    axes.scatter([state["ball"][0]], [state["ball"][1]], color="white", s=12, zorder=5)
    goals_for, goals_against = state["score"]
    axes.set_title(f"{title}  score {goals_for}-{goals_against}", fontsize=8)
    return _to_image(figure)


def record_episode(
    policy: Policy,
    task_name: str,
    *,
    greedy: bool = True,
    seed: int = 0,
    max_steps: int | None = None,
    options: dict[str, Any] | None = None,
) -> tuple[list[Image.Image], dict[str, Any]]:
    """Play one episode in one environment and draw every step; returns frames and a summary."""
    spec = policy.spec(task_name)
    if spec.backend not in ("smax", "grf"):
        raise ConfigError(f"render draws smax and grf tasks, not {spec.backend}.")
    draw = draw_smax if spec.backend == "smax" else draw_football
    task = make_task(task_name, num_envs=1, **(options or {}))
    generator = torch.Generator().manual_seed(int(seed))
    frames: list[Image.Image] = []
    total, outcome, steps = 0.0, 0.0, 0
    if max_steps is not None and int(max_steps) < 1:
        raise ConfigError(
            f"render needs max_steps >= 1 (or null for the episode limit), got {max_steps}."
        )
    limit = int(spec.episode_limit if max_steps is None else max_steps)
    try:
        current = task.reset(seed=int(seed))
        frames.append(draw(task.render_state(0), f"{task_name} t=0"))
        prev = np.full((1, spec.num_agents), -1, dtype=np.int64)
        hidden = policy.initial_hidden(task_name, 1)
        while steps < limit:
            out = policy.act(
                task_name,
                current.obs,
                current.avail_actions,
                prev,
                hidden=hidden,
                greedy=greedy,
                generator=generator,
            )
            current = task.step(out.actions)
            steps += 1
            total += float(current.reward[0])
            if current.terminated[0] or current.truncated[0]:
                outcome = float(current.outcome[0])
                break  # the environment already reset itself: that frame is the next episode
            frames.append(draw(task.render_state(0), f"{task_name} t={steps} R={total:.2f}"))
            prev, hidden = out.actions, out.hidden
    finally:
        task.close()
    return frames, {"steps": steps, "return": total, "outcome": outcome}


def save_gif(frames: list[Image.Image], path: Path, fps: float = 8.0) -> Path:
    """Write frames as an animated GIF atomically (temporary file, then rename)."""
    if not frames:
        raise ConfigError("No frames to write.")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.gif")
    frames[0].save(
        tmp,
        save_all=True,
        append_images=frames[1:],
        duration=int(1000 / fps),
        loop=0,
    )
    os.replace(tmp, path)
    return path


def render_command(cfg) -> None:
    """Render one episode of one task to a GIF and print where it went."""
    from rich.console import Console

    from marl_shared.analysis.evaluate import task_options

    if not cfg.get("checkpoint"):
        raise ConfigError("render needs checkpoint=<run folder, checkpoint or policy export>.")
    policy = Policy.load(cfg.checkpoint)
    task_name = cfg.get("task_name") or next(iter(policy.specs))
    policy.spec(task_name)
    out = Path(cfg.out) if cfg.get("out") else Path(f"render_{task_name.replace('/', '__')}.gif")
    if out.suffix.lower() != ".gif":
        raise ConfigError(f"render writes GIF files: out={out} must end in .gif.")
    frames, summary = record_episode(
        policy,
        task_name,
        greedy=bool(cfg.greedy),
        seed=int(cfg.seed),
        max_steps=cfg.get("max_steps"),
        options=task_options(cfg.checkpoint, task_name),
    )
    save_gif(frames, out, fps=float(cfg.fps))
    Console().print(
        f"{task_name}: {summary['steps']} steps, return {summary['return']:.2f}, "
        f"outcome {summary['outcome']:g} -> {out} ({len(frames)} frames)"
    )
