"""One checkpoint format for every command: safetensors for tensors, JSON for the rest.

A checkpoint is a folder ``checkpoints/iter_NNNNNN`` holding

- ``manifest.json``: format version, task specs, model config, tensor shapes, versions;
- ``modules.safetensors``: every module's weights, keyed ``<module_id>/<parameter>``;
- ``learner.safetensors`` + ``learner.json``: the learner state (optimizer moments and
  the like): arrays in the first, everything else in the second, linked by key;
- ``trainer.json``: counters and anything else the training loop needs to continue.

Nothing is pickled, so loading a checkpoint never runs code. A checkpoint is written
into a temporary folder and renamed into place, and ``checkpoints/latest`` names the
newest complete one, so a kill during a write never leaves a broken "latest". The
manifest records a sha256 digest of every other file; loading checks them, and a run
folder whose newest checkpoint fails the check falls back to the previous good one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

logger = logging.getLogger(__name__)

FORMAT = "marl-shared-checkpoint"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MODULES = "modules.safetensors"
LEARNER_TENSORS = "learner.safetensors"
LEARNER_TREE = "learner.json"
TRAINER = "trainer.json"
LATEST = "latest"
TENSOR_REF = "__tensor__"
# JSON keys are strings; a dict keyed by ints (torch optimizer state: parameter index ->
# moments) is stored under this marker so that loading gives int keys back.
INT_KEYS = "__int_keys__"


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt or does not fit the configured model; one sentence."""


def _to_numpy(value: Any) -> np.ndarray | None:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().contiguous().numpy()
    if isinstance(value, np.ndarray):
        return np.ascontiguousarray(value)
    return None


def split_tree(tree: Any, prefix: str = "") -> tuple[Any, dict[str, np.ndarray]]:
    """Replace every array in a nested dict/list by a reference; return (skeleton, arrays)."""
    arrays: dict[str, np.ndarray] = {}

    def walk(node: Any, path: str) -> Any:
        array = _to_numpy(node)
        if array is not None:
            arrays[path] = array
            return {TENSOR_REF: path}
        if isinstance(node, dict):
            tree = {str(k): walk(v, f"{path}/{k}" if path else str(k)) for k, v in node.items()}
            if node and all(isinstance(k, int) and not isinstance(k, bool) for k in node):
                return {INT_KEYS: tree}
            return tree
        if isinstance(node, list | tuple):
            return [walk(v, f"{path}/{i}") for i, v in enumerate(node)]
        if isinstance(node, np.generic):
            return node.item()
        return node

    return walk(tree, prefix), arrays


def join_tree(skeleton: Any, arrays: dict[str, np.ndarray]) -> Any:
    """Inverse of :func:`split_tree`."""
    if isinstance(skeleton, dict):
        if set(skeleton) == {TENSOR_REF}:
            return arrays[skeleton[TENSOR_REF]]
        if set(skeleton) == {INT_KEYS}:
            return {int(k): join_tree(v, arrays) for k, v in skeleton[INT_KEYS].items()}
        return {k: join_tree(v, arrays) for k, v in skeleton.items()}
    if isinstance(skeleton, list):
        return [join_tree(v, arrays) for v in skeleton]
    return skeleton


def _write_json(path: Path, data: Any) -> None:
    with open(path, "w") as handle:
        json.dump(data, handle, indent=1, sort_keys=True, default=_json_default)
        handle.flush()
        os.fsync(handle.fileno())


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def flatten_module_state(module_state: dict[str, dict[str, Any]]) -> dict[str, np.ndarray]:
    """{module_id: {param: tensor}} -> {"module_id/param": array}."""
    flat = {}
    for module_id, params in module_state.items():
        for name, value in params.items():
            array = _to_numpy(value)
            if array is not None:
                flat[f"{module_id}/{name}"] = array
    return flat


def unflatten_module_state(flat: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    nested: dict[str, dict[str, np.ndarray]] = {}
    for key, value in flat.items():
        module_id, _, name = key.partition("/")
        nested.setdefault(module_id, {})[name] = value
    return nested


def write_checkpoint(
    checkpoint_dir: Path,
    *,
    name: str,
    manifest: dict[str, Any],
    module_state: dict[str, dict[str, Any]],
    learner_state: dict[str, Any] | None,
    trainer_state: dict[str, Any],
    keep: int | None = None,
) -> Path:
    """Write one checkpoint atomically and point ``latest`` at it."""
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    final = checkpoint_dir / name
    tmp = checkpoint_dir / f".tmp-{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()

    modules = flatten_module_state(module_state)
    save_file(modules, str(tmp / MODULES))
    _fsync(tmp / MODULES)
    full_manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created_unix": time.time(),
        "shapes": {key: list(value.shape) for key, value in modules.items()},
        **manifest,
    }
    if learner_state is not None:
        skeleton, arrays = split_tree(learner_state)
        save_file(arrays, str(tmp / LEARNER_TENSORS))
        _fsync(tmp / LEARNER_TENSORS)
        _write_json(tmp / LEARNER_TREE, skeleton)
    _write_json(tmp / TRAINER, trainer_state)
    full_manifest["sha256"] = {
        entry.name: file_sha256(entry) for entry in sorted(tmp.iterdir()) if entry.is_file()
    }
    _write_json(tmp / MANIFEST, full_manifest)  # written last: its presence marks completeness

    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    latest_tmp = checkpoint_dir / f".{LATEST}.tmp"
    latest_tmp.write_text(name + "\n")
    os.replace(latest_tmp, checkpoint_dir / LATEST)
    if keep:
        _prune(checkpoint_dir, keep)
    logger.debug("checkpoint written: %s", final)
    return final


def _prune(checkpoint_dir: Path, keep: int) -> None:
    names = sorted(p.name for p in checkpoint_dir.glob("iter_*") if p.is_dir())
    for stale in names[:-keep]:
        shutil.rmtree(checkpoint_dir / stale, ignore_errors=True)


def file_sha256(path: Path) -> str:
    """Hex sha256 digest of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_checkpoint(checkpoint: Path) -> dict[str, Any]:
    """Read the manifest and check every file against its recorded sha256; return the manifest.

    Checkpoints written before digests were recorded carry none and are only read.
    """
    manifest = read_manifest(checkpoint)
    for name, expected in manifest.get("sha256", {}).items():
        path = checkpoint / name
        if not path.is_file():
            raise CheckpointError(f"Checkpoint {checkpoint} is corrupt: {name} is missing.")
        if file_sha256(path) != expected:
            raise CheckpointError(
                f"Checkpoint {checkpoint} is corrupt: {name} does not match its sha256."
            )
    return manifest


def _first_good(candidates: list[Path]) -> Path | None:
    """The first checkpoint in the list that verifies; corrupt ones are logged and skipped."""
    for candidate in candidates:
        try:
            verify_checkpoint(candidate)
        except CheckpointError as error:
            logger.warning("%s Falling back to an older checkpoint.", error)
            continue
        return candidate
    return None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """Accept a checkpoint, a ``checkpoints`` folder or a run folder; return a verified checkpoint.

    A checkpoint named directly must verify. Under a run or ``checkpoints`` folder the one
    ``latest`` names is tried first, then the others newest first, so an incomplete or
    corrupt newest checkpoint falls back to the previous good one.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"No checkpoint at {path}: the path does not exist.")
    if (path / MANIFEST).is_file():
        verify_checkpoint(path)
        return path
    for candidate in (path, path / "checkpoints"):
        if not candidate.is_dir():
            continue
        complete = sorted(
            (p for p in candidate.glob("iter_*") if p.is_dir() and (p / MANIFEST).is_file()),
            reverse=True,
        )
        latest = candidate / LATEST
        if latest.is_file():
            target = candidate / latest.read_text().strip()
            if target in complete:
                complete.remove(target)
                complete.insert(0, target)
            else:
                logger.warning("latest checkpoint %s is incomplete; using an older one", target)
        good = _first_good(complete)
        if good is not None:
            return good
        if complete:
            raise CheckpointError(f"Every checkpoint under {path} is corrupt.")
    raise CheckpointError(f"No complete checkpoint found under {path}.")


def read_manifest(checkpoint: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((checkpoint / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(
            f"Checkpoint {checkpoint} has an unreadable manifest ({error})."
        ) from None
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{checkpoint} is not a marl-shared checkpoint.")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"Checkpoint {checkpoint} has format version {manifest.get('format_version')}, "
            f"this version reads {FORMAT_VERSION}."
        )
    return manifest


def _check_digest(checkpoint: Path, name: str, manifest: dict[str, Any]) -> None:
    expected = manifest.get("sha256", {}).get(name)
    if expected is None:
        return
    if not (checkpoint / name).is_file():
        raise CheckpointError(f"Checkpoint {checkpoint} is corrupt: {name} is missing.")
    if file_sha256(checkpoint / name) != expected:
        raise CheckpointError(
            f"Checkpoint {checkpoint} is corrupt: {name} does not match its sha256."
        )


def load_module_state(checkpoint: Path) -> dict[str, dict[str, np.ndarray]]:
    """Module weights, checked against the shapes the manifest promises."""
    manifest = read_manifest(checkpoint)
    _check_digest(checkpoint, MODULES, manifest)
    try:
        flat = load_file(str(checkpoint / MODULES))
    except Exception as error:  # noqa: BLE001 - any decoding failure means a corrupt file
        raise CheckpointError(f"Checkpoint {checkpoint} has corrupt weights ({error}).") from None
    expected = manifest["shapes"]
    if set(flat) != set(expected):
        raise CheckpointError(f"Checkpoint {checkpoint} weights do not match its manifest.")
    for key, value in flat.items():
        if list(value.shape) != expected[key]:
            raise CheckpointError(
                f"Checkpoint {checkpoint} tensor {key} has shape {list(value.shape)}, "
                f"the manifest says {expected[key]}."
            )
    return unflatten_module_state(flat)


def load_learner_state(checkpoint: Path) -> dict[str, Any] | None:
    if not (checkpoint / LEARNER_TREE).is_file():
        return None
    manifest = read_manifest(checkpoint)
    _check_digest(checkpoint, LEARNER_TREE, manifest)
    _check_digest(checkpoint, LEARNER_TENSORS, manifest)
    try:
        skeleton = json.loads((checkpoint / LEARNER_TREE).read_text())
        arrays = load_file(str(checkpoint / LEARNER_TENSORS))
    except Exception as error:  # noqa: BLE001
        raise CheckpointError(
            f"Checkpoint {checkpoint} has a corrupt learner state ({error})."
        ) from None
    return join_tree(skeleton, arrays)


def load_trainer_state(checkpoint: Path) -> dict[str, Any]:
    _check_digest(checkpoint, TRAINER, read_manifest(checkpoint))
    try:
        return json.loads((checkpoint / TRAINER).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(
            f"Checkpoint {checkpoint} has an unreadable trainer state ({error})."
        ) from None
