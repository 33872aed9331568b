"""The per-worker training loop run by Ray Train (one process per rank).

Every rank builds the same backbone (same seed; DDP broadcasts it anyway) and its own shard of the
head's class centres, restores the latest checkpoint if Ray Train hands one over and steps until
``train.steps``. Its data stream starts at its step (:meth:`TrainingData.stream`), so a resume at
step k decodes nothing it trained on before; the result is bit-identical to an uninterrupted run. Every ``checkpoint_every`` steps and at the end all ranks
write their part of a checkpoint folder (rank 0: ``state.pt`` with the step, backbone, EMA and
loss history; every rank: ``rank{r}.pt`` with its head shard and RNG state, plus the strategy's
optimiser files) and report it; Ray Train merges the ranks' files into one folder.
"""

from __future__ import annotations

import os
import tempfile
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from facesynth import telemetry
from recog.backbones import build_backbone
from recog.heads import build_head
from recog.train.config import TrainFRJob
from recog.train.strategy import make_strategy

STATE_FILE = "state.pt"


def build_model(cfg: TrainFRJob, num_classes: int) -> nn.Module:
    """The backbone; with ``task: closed_set`` its last layer gives ``num_classes`` logits."""
    m = cfg.model
    extra = {"num_classes": num_classes} if m.task == "closed_set" else {}
    return build_backbone(
        m.backbone,
        embedding_dim=m.embedding_dim,
        width=m.width,
        input_size=m.input_size,
        dropout=m.dropout,
        **extra,
    )


def build_margin_head(cfg: TrainFRJob, num_classes: int) -> nn.Module:
    """This rank's margin head (its shard of ``num_classes`` centres when a process group exists)."""
    m = cfg.model
    return build_head(
        m.head,
        embedding_dim=m.embedding_dim,
        num_classes=num_classes,
        s=m.s,
        m1=m.m1,
        m2=m.m2,
        m3=m.m3,
        sample_rate=m.sample_rate,
        **m.head_options,
    )


def backbone_weights(state: dict) -> dict:
    """Backbone weights of a ``state.pt``: the EMA copy when training kept one."""
    if state["ema"] is None:
        return state["backbone"]
    return {k[len("module.") :]: v for k, v in state["ema"].items() if k.startswith("module.")}


class Normalise(nn.Module):
    """uint8 NCHW -> float ``((x / 255) - mean) / std``, optionally channels_last."""

    def __init__(self, mean, std, channels_last: bool):
        super().__init__()
        std_t = torch.tensor(std).view(1, 3, 1, 1)
        self.register_buffer("scale", 1.0 / (255.0 * std_t))
        self.register_buffer("shift", -torch.tensor(mean).view(1, 3, 1, 1) / std_t)
        self.channels_last = channels_last

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = torch.addcmul(self.shift, images.float(), self.scale)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


class Learner:
    """Everything one rank trains: backbone, head shard, strategy (optimiser + schedule), EMA, one step.

    The same object serves the Ray Train worker and the single-process baseline of
    ``bench/train_throughput.py``: DDP wrapping happens only when a process group exists.
    """

    def __init__(self, cfg: TrainFRJob, num_classes: int, device: torch.device, rank: int = 0):
        t = cfg.train
        torch.manual_seed(t.seed)
        backbone = build_model(cfg, num_classes)
        if t.channels_last:
            backbone = backbone.to(memory_format=torch.channels_last)
        self.backbone = backbone.to(device)
        self.head = None
        if cfg.model.task == "embedding":
            torch.manual_seed(t.seed + 1 + rank)  # each rank draws its own centres
            self.head = build_margin_head(cfg, num_classes).to(device)
        self.strategy = make_strategy(
            t.strategy,
            self.backbone,
            self.head,
            cfg.optim,
            t.steps,
            zero_stage=t.zero_stage,
            batch_size=t.batch_size,
        )
        self.ema = None
        if cfg.optim.ema_decay is not None:
            self.ema = AveragedModel(
                self.backbone, multi_avg_fn=get_ema_multi_avg_fn(cfg.optim.ema_decay), use_buffers=True
            )
        self.normalise = Normalise(cfg.model.mean, cfg.model.std, t.channels_last).to(device)
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=t.precision == "bf16")
        self.strategy.model.train()
        torch.manual_seed(t.seed + 1000 + rank)

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One optimiser step on uint8 NCHW ``images``; returns the (detached) loss."""
        with self.autocast:
            out = self.strategy.model(self.normalise(images))
        if self.head is not None:
            loss = self.head(out.float(), labels).loss
        else:
            loss = F.cross_entropy(out.float(), labels)
        self.strategy.step(loss)
        if self.ema is not None:
            self.ema.update_parameters(self.backbone)
        return loss.detach()


def train_worker(config: dict) -> None:
    """Ray Train entry point; ``config``: the resolved ``cfg`` dict, ``num_classes``, ``labels`` JSON and
    the planned :class:`~recog.train.data.TrainingData`."""
    import ray.train
    import ray.train.torch

    cfg = TrainFRJob.model_validate(config["cfg"])
    num_classes, labels_json = config["num_classes"], config["labels"]
    t = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    learner = Learner(cfg, num_classes, device, rank)
    backbone, head, ema, strategy = learner.backbone, learner.head, learner.ema, learner.strategy

    step, history = 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = torch.load(os.path.join(folder, STATE_FILE), map_location="cpu", weights_only=True)
            if state["world_size"] != world or state["labels"] != labels_json:
                what = "world size" if state["world_size"] != world else "label map (training data)"
                raise ValueError(
                    f"checkpoint in {folder}: its {what} differs from this run's; use a new "
                    "run_name to train from scratch"
                )
            backbone.load_state_dict(state["backbone"])
            if ema is not None:
                ema.load_state_dict(state["ema"])
            mine = torch.load(os.path.join(folder, f"rank{rank}.pt"), map_location="cpu", weights_only=True)
            if head is not None:
                head.load_state_dict(mine["head"])
            torch.set_rng_state(mine["rng"])
            strategy.load(folder, rank)
            step, history = state["step"], state["history"]

    def report(metrics: dict, save: bool) -> None:
        metrics = {**metrics, "step": step, "pid": os.getpid()}
        if not save:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as folder:
            if rank == 0:
                torch.save(
                    {
                        "step": step,
                        "backbone": backbone.state_dict(),
                        "ema": ema.state_dict() if ema is not None else None,
                        "history": history,
                        "world_size": world,
                        "labels": labels_json,
                    },
                    os.path.join(folder, STATE_FILE),
                )
            torch.save(
                {"head": head.state_dict() if head is not None else None, "rng": torch.get_rng_state()},
                os.path.join(folder, f"rank{rank}.pt"),
            )
            strategy.save(folder, rank)
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(folder),
                checkpoint_dir_name=f"checkpoint-{step:08d}",
            )

    if step >= t.steps:  # a finished run started again: nothing to train, report where it ended
        report({"loss": history[-1]["loss"] if history else float("nan"), "history": history}, save=False)
        return

    stream = config["data"].stream(
        rank=rank, world=world, batch_size=t.batch_size, start_step=step, stop_step=t.steps
    )
    batches = stream.iter_torch_batches(
        batch_size=t.batch_size,
        drop_last=True,
        prefetch_batches=cfg.data.prefetch_batches,
        dtypes={"image": torch.uint8, "label": torch.int64},
        device=device,
    )
    bar = _progress(rank, step, t.steps)
    window_steps, window_loss, window_start = 0, 0.0, time.perf_counter()
    for batch in batches:
        lr = strategy.lr
        loss = learner.step(batch["image"], batch["label"])
        step += 1
        window_steps += 1
        window_loss = window_loss + loss  # stays on the device: no synchronisation per step
        if bar is not None:
            bar.update(1)
        last = step == t.steps
        save = step % t.checkpoint_every == 0 or last
        if save or step % t.log_every == 0:
            images_seen = window_steps * t.batch_size * world
            rate = images_seen / max(time.perf_counter() - window_start, 1e-9)
            entry = {"step": step, "loss": float(window_loss) / window_steps, "lr": lr, "images_per_s": rate}
            history.append(entry)
            telemetry.set_gauge("facesynth_train_images_per_s", rate, "training images/s (all workers)")
            telemetry.inc("facesynth_train_images", images_seen / world, "training images seen (per worker)")
            if bar is not None:
                bar.set_postfix(loss=f"{entry['loss']:.3f}", lr=f"{lr:.3g}")
                print(
                    f"step {step}/{t.steps} loss {entry['loss']:.4f} lr {lr:.4g} img/s {rate:.1f}", flush=True
                )
            report({**entry, "history": history if last else []}, save=save)
            window_steps, window_loss, window_start = 0, 0.0, time.perf_counter()
        if last:
            break
    if bar is not None:
        bar.close()
    if step < t.steps:
        raise RuntimeError(f"the data stream ended at step {step} of train.steps={t.steps}")


def _progress(rank: int, start: int, total: int):
    if rank != 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, unit="step", desc="train", mininterval=5)
