"""The ``marl-shared`` command line: one Hydra app per sub-command over ``marl_shared/conf``.

``marl-shared train [overrides...]`` trains; ``marl-shared doctor`` reports which
simulators work here. User errors end with one line on stderr and exit code 2; nothing
half-written is left behind.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

CONF_DIR = str(Path(__file__).parent / "conf")
USER_ERROR_EXIT = 2
# Sub-commands: name -> (Hydra config name in conf/ or None for a plain command,
# "module:function" run with the composed config). A new command adds one line here.
COMMANDS: dict[str, tuple[str | None, str]] = {
    "train": ("train", "marl_shared.cli:train_command"),
    "doctor": (None, "marl_shared.cli:doctor_command"),
    "analyze": ("analyze", "marl_shared.analysis.representations:analyze_command"),
    "merge": ("merge", "marl_shared.merging.command:merge_command"),
    "continual": ("continual", "marl_shared.continual.stream:continual_command"),
    "transfer": ("transfer", "marl_shared.transfer.run:transfer_command"),
    "evaluate": ("evaluate", "marl_shared.analysis.evaluate:evaluate_command"),
    "render": ("render", "marl_shared.analysis.render:render_command"),
    "export": ("export", "marl_shared.export:export_command"),
}

logger = logging.getLogger("marl_shared")


def _user_errors() -> tuple[type[BaseException], ...]:
    from marl_shared.envs.spec import TaskError
    from marl_shared.policy import PolicyError
    from marl_shared.training.checkpoint import CheckpointError
    from marl_shared.training.config import ConfigError
    from marl_shared.training.run import RunDirError

    return (TaskError, ConfigError, CheckpointError, RunDirError, PolicyError)


def fail(message: str) -> None:
    """One clear line and a non-zero exit."""
    sys.stderr.write(f"marl-shared: error: {message}\n")
    sys.stderr.flush()
    raise SystemExit(USER_ERROR_EXIT)


def _setup_logging() -> None:
    from rich.logging import RichHandler

    level = os.environ.get("MARL_SHARED_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(
        level=logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(show_path=False, rich_tracebacks=False)],
        force=True,
    )
    logging.getLogger("marl_shared").setLevel(level)
    quiet_third_party_loggers()


def quiet_third_party_loggers() -> None:
    """Ray and RLlib set their loggers' levels when imported; call again after importing them."""
    import ray.rllib  # noqa: F401 - imported for its logger set-up, which is then overridden

    for noisy in ("ray", "ray.rllib", "ray.tune", "ray.train", "jax", "absl"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    # Ray re-enables its own deprecation warnings at import; filter them after it.
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def _quiet_environment() -> None:
    """Keep third-party start-up chatter out of the console."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    # Ray's and RLlib's deprecation notices are about their internals, not user code.
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    # Ray starts its helper processes after JAX is imported; those children never run JAX.
    warnings.filterwarnings("ignore", message="os.fork\\(\\) was called", category=RuntimeWarning)


# ----------------------------------------------------------------------------- train


def train_command(cfg) -> None:
    """Validate, create the run directory, train, print the summary table."""
    from marl_shared.training.config import validate_config
    from marl_shared.training.run import (
        Trainer,
        default_run_dir,
        load_run_config,
        prepare_run_dir,
        resolve_tasks,
    )

    config = validate_config(cfg)
    resume_from = None
    if config.resume:
        resume_from = Path(config.resume).expanduser()
        run_dir = _run_dir_of(resume_from)
        started = load_run_config(run_dir)
        _apply_resume_overrides(started, config)
        config = started
    else:
        run_dir = Path(config.run_dir) if config.run_dir else default_run_dir(config)

    specs = resolve_tasks(config)  # raises before anything is written
    created = not run_dir.exists()
    prepare_run_dir(run_dir, overwrite=config.overwrite, resuming=resume_from is not None)
    run_and_clean_up(Trainer(config, specs, run_dir), created=created, resume_from=resume_from)


def run_and_clean_up(trainer, *, created: bool, resume_from: Path | None = None) -> None:
    """Train with the progress bar; a run that failed before recording anything leaves no folder."""
    from marl_shared.training.run import removed_on_failure

    run_dir = trainer.run_dir
    try:
        with removed_on_failure(
            run_dir,
            created=created,
            kept=lambda: bool(trainer.history) or any(run_dir.glob("checkpoints/iter_*")),
        ):
            _run_with_progress(trainer, resume_from)
    finally:
        trainer.stop()


def _run_dir_of(path: Path) -> Path:
    """The run directory holding ``path`` (a run, its checkpoints folder or one checkpoint)."""
    from marl_shared.training.checkpoint import CheckpointError

    if not path.exists():
        raise CheckpointError(f"Cannot resume from {path}: the path does not exist.")
    for candidate in (path, *path.resolve().parents[:2]):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise CheckpointError(f"Cannot resume from {path}: no run directory (config.yaml) holds it.")


def _apply_resume_overrides(started, composed) -> None:
    """A resumed run keeps its config; only ``train.*`` keys named on its command line change."""
    for arg in sys.argv[1:]:
        key = arg.lstrip("+~").split("=", 1)[0]
        if key.startswith("train."):
            field = key.split(".", 1)[1]
            setattr(started.train, field, getattr(composed.train, field))
        elif key not in ("resume", "overwrite"):
            logger.warning("resume keeps the run's own config: %s is ignored", key)


def _run_with_progress(trainer, resume_from: Path | None) -> None:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=False)
    config = trainer.config
    console.print(
        f"[bold]marl-shared train[/bold] {config.experiment_name}: "
        f"{', '.join(config.tasks)} -> {trainer.run_dir}"
    )
    with Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed:,.0f}/{task.total:,.0f} env steps"),
        TimeElapsedColumn(),
        console=console,
        disable=not config.train.progress,
    ) as progress:
        bar = progress.add_task("building", total=float(config.train.env_steps))
        trainer.build()
        progress.update(bar, description="training")

        def on_iteration(_trainer, record) -> None:
            progress.update(
                bar,
                completed=record["env_steps_total"],
                description=_progress_line(record),
            )

        result = trainer.run(resume_from=resume_from, on_iteration=on_iteration)
    console.print(_summary_table(trainer, result))
    console.print(f"run directory: {result.run_dir}")


def _progress_line(record) -> str:
    parts = [f"it {record['iteration']}"]
    for name, values in record["tasks"].items():
        rate = values.get("win_rate", values.get("score_rate"))
        ret = values.get("episode_return_mean")
        if ret is not None:
            short = name.split("/", 1)[1][:14]
            parts.append(f"{short} R={ret:.2f}" + (f" {rate:.0%}" if rate is not None else ""))
    return " | ".join(parts)


def _summary_table(trainer, result):
    from rich.table import Table

    table = Table(
        title=f"Final greedy evaluation ({trainer.config.train.eval_episodes} episodes/task)"
    )
    table.add_column("task", overflow="fold")
    for column in ("env steps", "return", "length", "win / score rate", "95% CI"):
        table.add_column(column, justify="right")
    for spec in trainer.specs:
        values = result.final_eval.get(spec.name, {})
        key = "score_rate" if spec.outcome == "goal" else "win_rate"
        rate = values.get(f"eval_{key}")
        low, high = values.get(f"eval_{key}_ci95", [None, None])
        table.add_row(
            spec.name,
            f"{result.env_steps.get(spec.name, 0):,}",
            _fmt(values.get("eval_episode_return_mean")),
            _fmt(values.get("eval_episode_len_mean"), 1),
            "-" if rate is None else f"{rate:.1%}",
            "-" if low is None else f"{low:.0%}-{high:.0%}",
        )
    return table


def _fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


# ----------------------------------------------------------------------------- doctor


def doctor_command() -> None:
    from marl_shared.doctor import diagnose, library_versions, render_report

    reports = diagnose()
    print(render_report(reports, library_versions()))


# ----------------------------------------------------------------------------- dispatch


def _hydra_app(config_name: str, task: Callable) -> Callable[[], None]:
    import hydra

    @hydra.main(config_path=CONF_DIR, config_name=config_name, version_base="1.3")
    def app(cfg) -> None:
        _setup_logging()
        try:
            task(cfg)
        except _user_errors() as error:
            fail(str(error))
        except KeyboardInterrupt:
            sys.stderr.write("marl-shared: interrupted; the last checkpoint is kept.\n")
            raise SystemExit(130) from None

    return app


def _resolve(target: str) -> Callable:
    import importlib

    module_name, _, function = target.partition(":")
    return getattr(importlib.import_module(module_name), function)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: marl-shared {" + ",".join(COMMANDS) + "} [hydra overrides ...]")
        print("       marl-shared <command> --help   shows that command's config and options")
        raise SystemExit(0 if argv else USER_ERROR_EXIT)
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        fail(f"unknown command {command!r}; commands are: {', '.join(COMMANDS)}.")
    _quiet_environment()
    config_name, target = COMMANDS[command]
    if config_name is None:
        _setup_logging()
        try:
            _resolve(target)()
        except _user_errors() as error:
            fail(str(error))
        return
    sys.argv = [f"marl-shared {command}", *rest]
    _hydra_app(config_name, _resolve(target))()


if __name__ == "__main__":
    main()
