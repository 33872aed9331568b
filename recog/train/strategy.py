"""How the backbone is replicated and stepped: PyTorch DDP or DeepSpeed ZeRO-1/2.

Both strategies own the optimiser and the learning-rate schedule and expose the same four
operations to the training loop: ``forward``, ``step(loss)``, ``save(folder)`` and ``load(folder)``.
The margin head is never wrapped: its class centres are sharded across ranks (Partial FC), so its
parameters get their own plain optimiser step on every rank and are saved per rank. Gradient
clipping applies to the backbone only (as in insightface's ``arcface_torch``).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

from recog.train.config import OptimConfig
from recog.train.optim import build_optimizer, build_scheduler

DEEPSPEED_TAG = "zero"


def _load(path: str) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


class DDPStrategy:
    """One optimiser over backbone + head; the backbone is DDP-wrapped when a process group of 2+ ranks exists."""

    def __init__(self, backbone: nn.Module, head: nn.Module | None, cfg: OptimConfig, total_steps: int):
        self.backbone, self.head, self.grad_clip = backbone, head, cfg.grad_clip
        self.model = backbone
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            from ray.train.torch import prepare_model

            self.model = prepare_model(backbone, parallel_strategy="ddp")
        params = [{"params": [p for p in backbone.parameters() if p.requires_grad]}]
        if head is not None:
            params.append({"params": list(head.parameters())})
        self.optimizer = build_optimizer(params, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg, total_steps)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def step(self, loss: torch.Tensor) -> None:
        loss.backward()
        if self.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.backbone.parameters(), self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

    def save(self, folder: str, rank: int) -> None:
        torch.save(
            {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
            os.path.join(folder, f"optimizer-rank{rank}.pt"),
        )

    def load(self, folder: str, rank: int) -> None:
        state = _load(os.path.join(folder, f"optimizer-rank{rank}.pt"))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


class DeepSpeedStrategy:
    """The backbone in a DeepSpeed engine (ZeRO stage 1 or 2 partitions its optimiser state / gradients)."""

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module | None,
        cfg: OptimConfig,
        total_steps: int,
        *,
        zero_stage: int,
        batch_size: int,
    ):
        import deepspeed  # optional dependency: pip install -e .[deepspeed]

        self.backbone, self.head = backbone, head
        config = {
            "train_micro_batch_size_per_gpu": batch_size,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": cfg.grad_clip or 0.0,
            "zero_optimization": {"stage": zero_stage},
            "zero_allow_untested_optimizer": True,  # our torch optimiser, not a DeepSpeed-built one
        }
        self.model, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=backbone,
            optimizer=build_optimizer([p for p in backbone.parameters() if p.requires_grad], cfg),
            lr_scheduler=lambda optimizer: build_scheduler(optimizer, cfg, total_steps),
            config=config,
            dist_init_required=False,
        )
        self.head_optimizer = self.head_scheduler = None
        if head is not None:
            self.head_optimizer = build_optimizer(head.parameters(), cfg)
            self.head_scheduler = build_scheduler(self.head_optimizer, cfg, total_steps)

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def step(self, loss: torch.Tensor) -> None:
        self.model.backward(loss)
        self.model.step()  # clips, steps the ZeRO optimiser and the schedule, zeroes the gradients
        if self.head_optimizer is not None:
            self.head_optimizer.step()
            self.head_optimizer.zero_grad(set_to_none=True)
            self.head_scheduler.step()

    def save(self, folder: str, rank: int) -> None:
        self.model.save_checkpoint(os.path.join(folder, "deepspeed"), tag=DEEPSPEED_TAG)
        if self.head_optimizer is not None:
            torch.save(
                {
                    "optimizer": self.head_optimizer.state_dict(),
                    "scheduler": self.head_scheduler.state_dict(),
                },
                os.path.join(folder, f"optimizer-rank{rank}.pt"),
            )

    def load(self, folder: str, rank: int) -> None:
        self.model.load_checkpoint(os.path.join(folder, "deepspeed"), tag=DEEPSPEED_TAG)
        if self.head_optimizer is not None:
            state = _load(os.path.join(folder, f"optimizer-rank{rank}.pt"))
            self.head_optimizer.load_state_dict(state["optimizer"])
            self.head_scheduler.load_state_dict(state["scheduler"])


def make_strategy(
    name: str,
    backbone: nn.Module,
    head: nn.Module | None,
    cfg: OptimConfig,
    total_steps: int,
    *,
    zero_stage: int,
    batch_size: int,
) -> DDPStrategy | DeepSpeedStrategy:
    """The ``train.strategy`` called ``name`` (``ddp`` or ``deepspeed``)."""
    if name == "deepspeed":
        return DeepSpeedStrategy(
            backbone, head, cfg, total_steps, zero_stage=zero_stage, batch_size=batch_size
        )
    return DDPStrategy(backbone, head, cfg, total_steps)
