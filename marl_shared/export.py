"""``marl-shared export``: the policy part of a checkpoint as safetensors plus a JSON manifest.

The export holds the shared backbone and every task's perception layers and head (the
critics only with ``include_critic=true``), keyed ``<module_id>/<parameter>`` as in our
checkpoints, and a manifest with the format, tensor shapes, task specs, model settings,
adapter options and library versions. :class:`marl_shared.policy.Policy` loads it
without Ray and without unpickling anything.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from marl_shared.policy import (
    BACKBONE_ID,
    POLICY_FORMAT,
    POLICY_FORMAT_VERSION,
    POLICY_MANIFEST,
    POLICY_WEIGHTS,
    Policy,
)
from marl_shared.training import checkpoint as ckpt
from marl_shared.training.config import ConfigError

logger = logging.getLogger(__name__)


def export_policy(
    source: str | os.PathLike, out: str | os.PathLike, *, include_critic: bool = False
) -> Path:
    """Write the export folder atomically (temporary folder, then rename); return its path."""
    from marl_shared import __version__
    from marl_shared.analysis.evaluate import task_options

    checkpoint = ckpt.resolve_checkpoint(source)
    manifest = ckpt.read_manifest(checkpoint)
    modules = ckpt.load_module_state(checkpoint)
    tasks = [task["name"] for task in manifest["tasks"]]
    flat: dict[str, np.ndarray] = {}
    for module_id, params in modules.items():
        for name, value in params.items():
            if module_id != BACKBONE_ID and name.startswith("critic.") and not include_critic:
                continue
            flat[f"{module_id}/{name}"] = np.ascontiguousarray(value)
    # Refuse to write what Policy could not load back.
    Policy(
        _specs(manifest),
        manifest["model"],
        ckpt.unflatten_module_state(flat),
        source=str(checkpoint),
    )

    out = Path(out).expanduser()
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"Export folder {out} already holds files; pick another out=.")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_file(flat, str(tmp / POLICY_WEIGHTS))
        export_manifest: dict[str, Any] = {
            "format": POLICY_FORMAT,
            "format_version": POLICY_FORMAT_VERSION,
            "shapes": {key: list(value.shape) for key, value in flat.items()},
            "sha256": {POLICY_WEIGHTS: ckpt.file_sha256(tmp / POLICY_WEIGHTS)},
            "tasks": manifest["tasks"],
            "model": manifest["model"],
            "module_ids": {name: name.replace("/", "__") for name in tasks},
            "task_options": {name: task_options(checkpoint, name) for name in tasks},
            "includes_critic": bool(include_critic),
            "source_checkpoint": str(checkpoint),
            "source_versions": manifest.get("versions", {}),
            "source_iteration": manifest.get("iteration"),
            "source_env_steps": manifest.get("env_steps"),
            "versions": {"marl_shared": __version__, **_library_versions()},
        }
        (tmp / POLICY_MANIFEST).write_text(json.dumps(export_manifest, indent=1, sort_keys=True))
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("exported %d tensors for %d tasks to %s", len(flat), len(tasks), out)
    return out


def _specs(manifest: dict[str, Any]):
    from marl_shared.envs.spec import TaskSpec

    return [TaskSpec.from_dict(d) for d in manifest["tasks"]]


def _library_versions() -> dict[str, str]:
    import safetensors
    import torch

    return {"torch": torch.__version__, "safetensors": safetensors.__version__}


def export_command(cfg) -> None:
    """Export a checkpoint's policy; prints where it went."""
    from rich.console import Console

    if not cfg.get("checkpoint"):
        raise ConfigError("export needs checkpoint=<run folder or checkpoint>.")
    out = cfg.get("out") or Path("exports") / Path(cfg.checkpoint).expanduser().resolve().name
    path = export_policy(cfg.checkpoint, out, include_critic=bool(cfg.include_critic))
    Console().print(f"policy exported to {path} (load it with marl_shared.policy.Policy.load)")
