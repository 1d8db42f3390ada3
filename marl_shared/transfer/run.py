"""``marl-shared transfer``: new tasks on a pre-trained shared backbone, frozen or fine-tuned.

The new tasks get fresh perception layers, heads and critics; the backbone comes from a
multi-task checkpoint of ours and is either frozen (out of the optimizer,
``requires_grad=False``), fine-tuned at ``backbone_lr_scale`` times the learning rate
(0.1 in the seed paper), trained at the full rate, or, for a baseline, not loaded at all
(``scratch``). Everything else is an ordinary training run with its own run directory.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from marl_shared.algorithms.mappo import BACKBONE_FINETUNE, BACKBONE_FROZEN, BACKBONE_TRAIN
from marl_shared.envs import TaskSpec
from marl_shared.training.config import ConfigError, TrainConfig, validate_config
from marl_shared.training.run import Trainer, build_algorithm_config, init_ray
from marl_shared.transfer.backbone import LoadReport, Pretrained, load_pretrained, read_pretrained

logger = logging.getLogger(__name__)

SCRATCH = "scratch"
MODES = (BACKBONE_FROZEN, BACKBONE_FINETUNE, BACKBONE_TRAIN, SCRATCH)
TRANSFER_FILE = "transfer.json"
# Keys of conf/transfer.yaml that are not part of the training config.
TRANSFER_KEYS = ("from", "backbone", "backbone_lr_scale", "reuse_perception", "comparison")


@dataclass
class TransferSettings:
    """Where the backbone comes from and how it is treated."""

    source: str | None = None  # ``from=``: a run folder or checkpoint of ours
    backbone: str = BACKBONE_FROZEN
    backbone_lr_scale: float = 0.1
    reuse_perception: dict[str, str] = field(default_factory=dict)
    comparison: dict[str, Any] | None = None  # set by experiment=transfer_vs_scratch

    @property
    def backbone_mode(self) -> str:
        """The learner's mode; a scratch baseline trains its fresh backbone at the full rate."""
        return BACKBONE_TRAIN if self.backbone == SCRATCH else self.backbone


def validate_transfer_config(cfg: DictConfig | dict) -> tuple[TrainConfig, TransferSettings]:
    """Split the composed config into the training config and the transfer settings."""
    raw = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)
    container = OmegaConf.to_container(
        OmegaConf.masked_copy(raw, [k for k in raw.keys() if k in TRANSFER_KEYS]), resolve=True
    )
    rest = OmegaConf.masked_copy(raw, [k for k in raw.keys() if k not in TRANSFER_KEYS])
    settings = TransferSettings(
        source=container.get("from"),
        backbone=str(container.get("backbone", BACKBONE_FROZEN)),
        backbone_lr_scale=float(container.get("backbone_lr_scale", 0.1)),
        reuse_perception=dict(container.get("reuse_perception") or {}),
        comparison=container.get("comparison"),
    )
    if settings.backbone not in MODES:
        raise ConfigError(f"backbone must be one of {', '.join(MODES)}, not {settings.backbone!r}.")
    if not 0.0 < settings.backbone_lr_scale:
        raise ConfigError(
            f"backbone_lr_scale must be positive, got {settings.backbone_lr_scale}; "
            "use backbone=frozen to stop the backbone from learning."
        )
    config = validate_config(rest)
    if config.resume:
        # Limitation: a transfer run cannot be resumed yet; start it again instead.
        raise ConfigError("resume= is not supported by transfer; start the transfer again.")
    return config, settings


class TransferTrainer(Trainer):
    """A Trainer whose algorithm starts from a pre-trained backbone in a chosen mode."""

    def __init__(
        self,
        config: TrainConfig,
        specs: list[TaskSpec],
        run_dir: Path,
        settings: TransferSettings,
        pretrained: Pretrained | None,
    ) -> None:
        super().__init__(config, specs, run_dir)
        if settings.backbone != SCRATCH and pretrained is None:
            raise ConfigError(
                f"backbone={settings.backbone} needs from=<run directory or checkpoint>."
            )
        self.settings = settings
        self.pretrained = pretrained if settings.backbone != SCRATCH else None
        self.load_report: LoadReport | None = None

    def build(self):
        init_ray(self.config)
        rllib_config = build_algorithm_config(self.config, self.specs)
        rllib_config.marl_settings(
            backbone_mode=self.settings.backbone_mode,
            backbone_lr_scale=self.settings.backbone_lr_scale,
        )
        self.algo = rllib_config.build_algo()
        if self.pretrained is not None:
            self.load_report = load_pretrained(
                self.algo, self.pretrained, self.settings.reuse_perception
            )
        return self.algo

    def transfer_record(self) -> dict[str, Any]:
        return {
            "backbone": self.settings.backbone,
            "backbone_lr_scale": self.settings.backbone_lr_scale,
            "source": None if self.pretrained is None else str(self.pretrained.checkpoint),
            "source_tasks": None if self.pretrained is None else self.pretrained.task_names,
            "loaded": None if self.load_report is None else asdict(self.load_report),
        }

    def write_config(self) -> None:
        super().write_config()
        (self.run_dir / TRANSFER_FILE).write_text(json.dumps(self.transfer_record(), indent=1))

    def manifest(self) -> dict[str, Any]:
        return {**super().manifest(), "transfer": self.transfer_record()}


def default_transfer_dir(config: TrainConfig, name: str = "transfer") -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{name}"


def transfer_command(cfg) -> None:
    """Validate, read the checkpoint, build, train; or run the transfer-vs-scratch protocol."""
    from marl_shared.cli import run_and_clean_up
    from marl_shared.training.run import prepare_run_dir, resolve_tasks

    config, settings = validate_transfer_config(cfg)
    if settings.comparison:
        from rich.console import Console

        from marl_shared.transfer.experiment import run_comparison

        out = run_comparison(config, settings)
        Console().print((out / "comparison.md").read_text())
        Console().print(f"table, curves and runs: {out}")
        return
    pretrained = None
    if settings.backbone != SCRATCH:
        if not settings.source:
            raise ConfigError("transfer needs from=<run directory or checkpoint of a run>.")
        pretrained = read_pretrained(settings.source)
    specs = resolve_tasks(config)  # raises before anything is written
    run_dir = Path(config.run_dir) if config.run_dir else default_transfer_dir(config)
    created = not run_dir.exists()
    prepare_run_dir(run_dir, overwrite=config.overwrite, resuming=False)
    trainer = TransferTrainer(config, specs, run_dir, settings, pretrained)
    run_and_clean_up(trainer, created=created)
