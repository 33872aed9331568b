"""The face-recognition training config: model, data, optimiser, schedule, strategy and scaling.

Names that refer to registries (backbone, head, optimiser, augmentation) are checked here, so a
typo fails while loading the config with the dotted key in the message.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from facesynth.config import OutputUri, StrictModel
from facesynth.face_model import FlipFusion, Std
from facesynth.runtime import RayConfig
from recog.backbones import BACKBONES
from recog.heads import MARGIN_PRESETS
from recog.train.augment import AugmentList, default_augment

OPTIMIZERS = ("sgd", "adam", "adamw")


class ModelConfig(StrictModel):
    """Backbone + margin head. ``task: closed_set`` trains ``backbone`` as a plain classifier with CE."""

    task: Literal["embedding", "closed_set"] = "embedding"
    backbone: str = "iresnet50"
    width: float = Field(1.0, gt=0)
    embedding_dim: int = Field(512, ge=1)
    input_size: int = Field(112, ge=16, description="square input side in pixels; images must have this size")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    head: str = "arcface"
    s: float = Field(64.0, gt=0)
    m1: float | None = None
    m2: float | None = None
    m3: float | None = None
    sample_rate: float = Field(
        1.0, gt=0.0, le=1.0, description="Partial FC: fraction of class centres scored"
    )
    head_options: dict = Field(
        default_factory=dict, description="extra margin options, e.g. {easy_margin: true}"
    )
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: Std = (0.5, 0.5, 0.5)
    flip_fusion: FlipFusion = "sum"

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, name: str) -> str:
        if name not in BACKBONES:
            raise ValueError(f"backbone {name!r} is unknown: expected one of {sorted(BACKBONES)}")
        return name

    @field_validator("head")
    @classmethod
    def _known_head(cls, name: str) -> str:
        if name not in MARGIN_PRESETS:
            raise ValueError(f"head {name!r} is unknown: expected one of {sorted(MARGIN_PRESETS)}")
        return name


class DatasetSpec(StrictModel):
    """One training source. ``weight``: its share of every epoch when several are mixed (see data.py)."""

    uri: str
    kind: Literal["shards", "folder", "recordio"] = "shards"
    weight: float = Field(1.0, gt=0)
    idx: str | None = Field(None, description="recordio only: the .idx URI (default: the .rec URI with .idx)")


class DataConfig(StrictModel):
    """Training data: sources, label space, epoch size, augmentation and the Ray Data pipeline."""

    datasets: list[DatasetSpec] = Field(min_length=1)
    label_space: Literal["per_dataset", "shared"] = Field(
        "per_dataset",
        description="per_dataset: each source's identities are distinct classes; shared: equal identity "
        "values are the same class in every source (real and synthetic images of the same people)",
    )
    epoch_rows: int | None = Field(None, ge=1, description="rows per epoch (default: all sources' rows)")
    augment: AugmentList = Field(default_factory=default_augment)
    shuffle: Literal["local", "none"] = Field(
        "local", description="local: permute each epoch's read chunks, and the rows of every window of them"
    )
    shuffle_buffer: int = Field(
        2048,
        ge=1,
        description="rows permuted together: consecutive read chunks are grouped into windows of at least this many",
    )
    decode_batch: int = Field(64, ge=1, description="rows per decode+augment task batch")
    decode_cpus: float = Field(1.0, gt=0, description="CPUs per decode+augment task")
    prefetch_batches: int = Field(2, ge=0)
    verify: Literal["footer", "sha256"] = Field(
        "footer", description="shard check before training: parquet footers + row counts, or full sha256"
    )


class OptimConfig(StrictModel):
    """Optimiser, learning-rate schedule (linear warmup, then constant/step/cosine) and clipping."""

    name: str = "sgd"
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: Literal["constant", "step", "cosine"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    milestones: list[int] = Field(default_factory=list, description="step schedule: steps where lr *= gamma")
    gamma: float = Field(0.1, gt=0, le=1)
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="cosine: final lr as a fraction of lr")
    grad_clip: float | None = Field(
        5.0, gt=0, description="max L2 norm of the backbone gradients (None: off)"
    )
    ema_decay: float | None = Field(None, gt=0, lt=1, description="EMA of the backbone weights (None: off)")

    @field_validator("name")
    @classmethod
    def _known_optimizer(cls, name: str) -> str:
        if name not in OPTIMIZERS:
            raise ValueError(f"optimizer {name!r} is unknown: expected one of {list(OPTIMIZERS)}")
        return name


class ScalingConfig(StrictModel):
    """Ray Train workers. GPUs use NCCL, CPUs gloo."""

    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)


class TrainSection(StrictModel):
    """The training run: length, batch, precision, strategy, checkpoints and logging."""

    steps: int = Field(ge=1, description="optimiser steps in the whole run")
    batch_size: int = Field(128, ge=1, description="images per worker per step")
    seed: int = Field(0, ge=0)
    precision: Literal["fp32", "bf16"] = "fp32"
    channels_last: bool = False
    strategy: Literal["ddp", "deepspeed"] = "ddp"
    zero_stage: int = Field(1, ge=1, le=2, description="DeepSpeed ZeRO stage")
    checkpoint_every: int = Field(1000, ge=1, description="steps between checkpoints (and at the end)")
    checkpoints_to_keep: int = Field(2, ge=1)
    max_failures: int = Field(3, ge=-1, description="worker failures to recover from (-1: no limit)")
    log_every: int = Field(10, ge=1)


class TrainFRJob(StrictModel):
    """``python -m jobs.train_fr`` / ``recog.train.train_fr``: everything one training run needs."""

    output: OutputUri = Field(description="URI for the exported model, report.md and the resolved config")
    run_name: str = Field("train", pattern=r"^[A-Za-z0-9._-]+$")
    storage: OutputUri | None = Field(None, description="checkpoint URI (default: <output>/checkpoints)")
    model: ModelConfig = ModelConfig()
    data: DataConfig
    optim: OptimConfig = OptimConfig()
    train: TrainSection
    scaling: ScalingConfig = ScalingConfig()
    ray: RayConfig = RayConfig()

    @model_validator(mode="after")
    def _consistent(self) -> TrainFRJob:
        bad = [m for m in self.optim.milestones if not 0 < m < self.train.steps]
        if bad:
            raise ValueError(f"optim.milestones={bad}: expected steps in (0, train.steps={self.train.steps})")
        if self.optim.warmup_steps >= self.train.steps:
            raise ValueError(
                f"optim.warmup_steps={self.optim.warmup_steps}: expected fewer than train.steps={self.train.steps}"
            )
        return self

    @property
    def checkpoint_uri(self) -> str:
        from facesynth import storage

        return self.storage or storage.join(self.output, "checkpoints")
