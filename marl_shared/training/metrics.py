"""Per-iteration training metrics: JSONL (the record), CSV (for spreadsheets), TensorBoard.

One record per training iteration, produced by the trainer::

    {"iteration": 3, "time_s": 41.2, "env_steps_total": 96000,
     "tasks": {"smax/3m": {"env_steps": 48000, "episodes": 310,
                           "episode_return_mean": 17.9, "episode_len_mean": 24.1,
                           "win_rate": 0.81, "score_rate": None, "goal_diff_mean": None,
                           "eval_win_rate": None, "eval_return_mean": None,
                           "loss_weight": 0.5}, ...},
     "learner": {"policy_loss": -0.01, "value_loss": 0.4, ...}}

``tasks[name]["env_steps"]`` counts that task's environment steps since the run started
(it is the x axis of the learning curves). A value is None or NaN when nothing was
measured this iteration (no episode finished, no evaluation ran).

Files under the run directory:

- ``metrics.jsonl``: the source of truth, one JSON object a line, flushed and fsync'd per
  line, so a killed run loses at most the line being written. Values that are not finite
  numbers (NaN, inf) are stored as ``null``, keeping the file strict JSON; they read back
  as None. A torn last line is skipped on reading and cut off when a writer reopens the
  file to resume.
- ``metrics.csv``: the records flattened to columns named by key path
  (``tasks/smax/3m/win_rate``), None as an empty cell. Rows are appended while the set of
  keys stays the same; when a record brings a new key, the whole CSV is rebuilt from the
  JSONL into a temporary file that then replaces it, so the header always covers every
  column and a reader never sees a half-written file.
- ``tb/``: TensorBoard scalars at step = iteration, tagged ``<metric>/<task>`` for task
  metrics (each metric's card compares the tasks), ``learner/<key>`` and ``run/<key>``.
  None and NaN are not logged.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

JSONL_NAME = "metrics.jsonl"
CSV_NAME = "metrics.csv"
TB_DIR_NAME = "tb"
LEADING_COLUMNS = ("iteration", "time_s", "env_steps_total")


def _plain(value: Any) -> Any:
    """The value with numpy scalars and arrays made JSON-native and non-finite floats None."""
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def flatten(record: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts to one level, keys joined with '/': tasks -> smax/3m -> win_rate."""
    flat: dict[str, Any] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}/"))
        else:
            flat[name] = value
    return flat


def _ordered_columns(flat_records: list[dict[str, Any]]) -> list[str]:
    """The leading columns first, then every other key in order of first appearance."""
    seen = {name: None for name in LEADING_COLUMNS}
    for flat in flat_records:
        for name in flat:
            seen.setdefault(name, None)
    present = {name for flat in flat_records for name in flat}
    return [name for name in seen if name in present]


def _csv_cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, list):
        return json.dumps(value)
    return value


def _iter_lines(path: Path) -> Iterator[tuple[int, str, bool]]:
    """(line number, text, is last line) for every non-empty line of a file."""
    with path.open("r", encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    # A file written line by line ends with "\n", so the final piece is "" unless torn.
    numbered = [(number, text) for number, text in enumerate(lines, 1) if text.strip()]
    for index, (number, text) in enumerate(numbered):
        yield number, text, index == len(numbered) - 1


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """Every record of ``run_dir/metrics.jsonl``, in order; a torn last line is skipped."""
    path = Path(run_dir) / JSONL_NAME
    if not path.is_file():
        raise FileNotFoundError(f"No metrics file at {path}.")
    records = []
    for number, text, last in _iter_lines(path):
        try:
            records.append(json.loads(text))
        except json.JSONDecodeError as exc:
            if last:
                logger.warning("Skipping the unfinished last line %d of %s.", number, path)
                break
            raise ValueError(f"Line {number} of {path} is not valid JSON.") from exc
    return records


def write_csv(run_dir: str | os.PathLike, records: list[dict] | None = None) -> Path:
    """Rebuild ``run_dir/metrics.csv`` from the records (default: the JSONL) atomically."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir) if records is None else records
    flat_records = [flatten(record) for record in records]
    columns = _ordered_columns(flat_records)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for flat in flat_records:
        writer.writerow([_csv_cell(flat.get(name)) for name in columns])
    path = run_dir / CSV_NAME
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(buffer.getvalue(), encoding="utf-8")
    os.replace(tmp, path)
    return path


def _cut_torn_tail(path: Path) -> None:
    """Drop an unfinished last line (a run killed mid-write) so appends start clean."""
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return
    keep = data.rfind(b"\n") + 1
    logger.warning("Removing the unfinished last line of %s before resuming.", path)
    with path.open("r+b") as handle:
        handle.truncate(keep)
        handle.flush()
        os.fsync(handle.fileno())


def _tensorboard_scalars(record: Mapping[str, Any]) -> Iterator[tuple[str, float]]:
    """(tag, value) pairs of a record's numeric, finite values."""

    def numeric(value: Any) -> float | None:
        if isinstance(value, bool):
            return float(value)
        if isinstance(value, (int, float)) and math.isfinite(value):
            return float(value)
        return None

    for key, value in record.items():
        if key in ("iteration", "tasks", "learner"):
            continue
        if (number := numeric(value)) is not None:
            yield f"run/{key}", number
    for task, metrics in (record.get("tasks") or {}).items():
        for name, value in flatten(metrics).items():
            if (number := numeric(value)) is not None:
                yield f"{name}/{task}", number
    for name, value in flatten(record.get("learner") or {}).items():
        if (number := numeric(value)) is not None:
            yield f"learner/{name}", number


class MetricsWriter:
    """Appends one record per training iteration to the run's JSONL, CSV and TensorBoard."""

    def __init__(self, run_dir: str | os.PathLike, tensorboard: bool = True):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = self.run_dir / JSONL_NAME
        self.csv_path = self.run_dir / CSV_NAME
        self._columns: list[str] = []
        self._csv_file = None
        purge_step = None
        if self.jsonl_path.exists():
            _cut_torn_tail(self.jsonl_path)
            existing = read_metrics(self.run_dir)
            if existing:
                # Resuming: the CSV may be stale if the run died between the two writes,
                # and TensorBoard may hold iterations past the checkpoint; drop them.
                write_csv(self.run_dir, existing)
                self._columns = _ordered_columns([flatten(r) for r in existing])
                purge_step = max(int(r.get("iteration", 0)) for r in existing) + 1
        self._jsonl = self.jsonl_path.open("a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.run_dir / TB_DIR_NAME), purge_step=purge_step)

    def write(self, record: Mapping[str, Any]) -> None:
        """Record one iteration: a durable JSONL line, a CSV row and TensorBoard scalars."""
        if self._jsonl is None:
            raise RuntimeError("This MetricsWriter is closed.")
        iteration = record.get("iteration")
        if isinstance(iteration, bool) or not isinstance(iteration, (int, np.integer)):
            raise ValueError(f"A metrics record needs an integer 'iteration', got {iteration!r}.")
        plain = _plain(record)

        self._jsonl.write(json.dumps(plain, allow_nan=False) + "\n")
        self._jsonl.flush()
        os.fsync(self._jsonl.fileno())

        self._write_csv_row(plain)

        if self._tb is not None:
            for tag, value in _tensorboard_scalars(plain):
                self._tb.add_scalar(tag, value, global_step=int(iteration))
            self._tb.flush()

    def _write_csv_row(self, plain: dict) -> None:
        flat = flatten(plain)
        if any(name not in self._columns for name in flat) or not self.csv_path.exists():
            if self._csv_file is not None:
                self._csv_file.close()
                self._csv_file = None
            records = read_metrics(self.run_dir)
            write_csv(self.run_dir, records)
            self._columns = _ordered_columns([flatten(r) for r in records])
            return
        if self._csv_file is None:
            self._csv_file = self.csv_path.open("a", encoding="utf-8", newline="")
        csv.writer(self._csv_file, lineterminator="\n").writerow(
            [_csv_cell(flat.get(name)) for name in self._columns]
        )
        self._csv_file.flush()

    def close(self) -> None:
        """Flush and close every file; closing twice is harmless."""
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._csv_file is not None:
            self._csv_file.close()
            self._csv_file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
