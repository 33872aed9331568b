"""Optimisers by name and the learning-rate schedule: linear warmup, then constant, step or cosine."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from recog.train.config import OptimConfig


def build_optimizer(params: Iterable, cfg: OptimConfig) -> torch.optim.Optimizer:
    """``sgd`` (momentum, L2 weight decay), ``adam`` (L2 weight decay) or ``adamw`` (decoupled decay)."""
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    optimizer = torch.optim.Adam if cfg.name == "adam" else torch.optim.AdamW
    return optimizer(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


def lr_factor(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Multiplier of ``cfg.lr`` for optimiser step ``step`` (0-based) of ``total_steps``.

    Warmup: ``(step + 1) / warmup_steps`` for the first ``warmup_steps`` steps. Afterwards, with
    ``t = (step - warmup) / (total - warmup)``: constant 1; step ``gamma ** (milestones passed)``;
    cosine ``r + (1 - r) * (1 + cos(pi * t)) / 2`` with ``r = min_lr_ratio``.
    """
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "step":
        return cfg.gamma ** sum(step >= m for m in cfg.milestones)
    if cfg.schedule == "cosine":
        t = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * (1 + math.cos(math.pi * t)) / 2
    return 1.0


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    """A ``LambdaLR`` following :func:`lr_factor`; call ``step()`` after every optimiser step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg, total_steps))
