"""The ``finetune_lora`` job: LoRA fine-tuning of a Stable Diffusion checkpoint on labelled identities, on Ray Train.

Per step and worker (diffusers' ``train_text_to_image_lora.py``): captions ``data.caption`` with the image's
identity name -> CLIP tokens -> text states; images -> frozen VAE latents ``z0 = scaling_factor * sample(q(z|x))``;
``t ~ U{0..T-1}``, ``eps ~ N(0, I)``, ``z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps`` (the checkpoint's own
DDPM schedule); loss ``|| unet(z_t, t, text) - target ||^2`` with target ``eps`` or, for a v_prediction
checkpoint, ``v = sqrt(abar_t) eps - sqrt(1 - abar_t) z0`` (``get_velocity``). Only the LoRA parameters train
(AdamW, constant LR, gradient clipping); on GPUs the frozen weights are cast to bf16/fp16 under autocast with
fp32 LoRA parameters (``cast_training_params``), fp16 with a gradient scaler; gradient checkpointing on demand.

Every random draw of a step (flips, VAE sample, noise, t, LoRA dropout) comes from ``step_seed(seed, rank,
step)`` and the batch rows from :func:`synthgen.sd_lora.train_data.batch_rows`, so a rerun with the same output
and ``run_name`` resumes from the latest checkpoint (LoRA weights, optimizer, scaler, step, loss log) to the
same weights as an uninterrupted run. The run's first start pins the settings its checkpoints depend on.

Output: ``lora/`` (``pytorch_lora_weights.safetensors`` in the diffusers format + ``lora.json``), ``checkpoints/``,
``train_images.parquet`` (the prepared images), ``train_log.json``, ``loss.png``, ``report.md``, ``config.yaml``.

    python -m jobs.finetune_lora --config sd21-lora data.image_folder=s3://bucket/people output=s3://bucket/lora1
"""

from __future__ import annotations

import json
import time
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from facesynth import storage, telemetry
from facesynth.config import OutputUri, StrictModel, save_resolved
from facesynth.plots import save_line_plot
from facesynth.preflight import check_output_writable
from facesynth.report import Report
from facesynth.runtime import RayConfig, init_ray, torch_trainer
from synthgen.sd_lora.checkpoint import PipelineSource
from synthgen.sd_lora.lora import LORA_JSON, LoraSettings, add_adapters, lora_parameters, save_lora
from synthgen.sd_lora.train_data import (
    LoraData,
    batch_rows,
    image_counts,
    load_batch,
    prepare_images,
    read_images,
)
from synthgen.train_state import (
    TrainResult,
    fit,
    pack_loss_log,
    pin_settings,
    report_state,
    restore_state,
    step_seed,
    unpack_loss_log,
)

TRAIN_LOG = "train_log.json"
IMAGES_FILE = "train_images.parquet"
SETTINGS_FILE = "settings.json"  # per run, beside its checkpoints
UNPINNED = {"steps", "checkpoint_every", "keep_checkpoints", "log_every", "max_failures", "cpus_per_worker"}


class LoraTrainConfig(StrictModel):
    """Optimisation, precision, checkpointing and Ray Train scaling of a LoRA run."""

    steps: int = Field(1000, ge=1, description="total optimizer steps (a resumed run continues to this)")
    batch_size: int = Field(4, ge=1, description="images per worker and step")
    lr: float = Field(1e-4, gt=0, description="AdamW learning rate (constant)")
    weight_decay: float = Field(1e-2, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    max_grad_norm: float | None = Field(
        1.0, gt=0, description="clip the LoRA gradients' norm (null: no clip)"
    )
    mixed_precision: Literal["no", "bf16", "fp16"] = Field(
        "bf16", description="GPU workers: frozen weights in this dtype under autocast (CPU: always fp32)"
    )
    gradient_checkpointing: bool = Field(False, description="recompute UNet activations in backward")
    checkpoint_every: int = Field(500, ge=1, description="report a resumable checkpoint every N steps")
    keep_checkpoints: int = Field(2, ge=1)
    log_every: int = Field(50, ge=1, description="report the mean loss every N steps")
    num_workers: int = Field(1, ge=1, description="Ray Train workers (DDP processes)")
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    max_failures: int = Field(2, ge=0, description="worker-group restarts from the last checkpoint")
    seed: int = Field(0, ge=0, description="seed of the LoRA init, batch order and every per-step draw")


class FinetuneLoraJob(StrictModel):
    """The finetune_lora job: LoRA adapters for ``base`` trained on ``data``'s identities, at ``output``."""

    output: OutputUri = Field(description="run folder URI: lora/, checkpoints/, report.md")
    run_name: str = Field(
        "lora", pattern=r"^[A-Za-z0-9_.-]+$", description="rerun with the same name resumes"
    )
    base: PipelineSource = Field(description="the text-to-image checkpoint to adapt")
    data: LoraData
    lora: LoraSettings = Field(default_factory=LoraSettings)
    train: LoraTrainConfig = Field(default_factory=LoraTrainConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    def pinned(self) -> dict:
        """What this run's checkpoints depend on (a resume that changed any of it is refused)."""
        return {
            "base": self.base.model_dump(mode="json"),
            "data": self.data.model_dump(mode="json"),
            "lora": self.lora.model_dump(mode="json"),
            "train": self.train.model_dump(mode="json", exclude=UNPINNED),
        }


class LoraLoss(nn.Module):
    """The training loss of the module doc as ``forward`` (DDP syncs what ``forward`` used)."""

    def __init__(self, pipe) -> None:
        super().__init__()
        from diffusers import DDPMScheduler

        self.unet, self.vae, self.text_encoder = pipe.unet, pipe.vae, pipe.text_encoder
        self.noise_schedule = DDPMScheduler.from_config(pipe.scheduler.config)
        self.scaling = pipe.vae.config.scaling_factor

    def forward(
        self, pixels: torch.Tensor, input_ids: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        from diffusers.utils.torch_utils import randn_tensor

        with torch.no_grad():
            latents = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist.sample(generator) * self.scaling
        noise = randn_tensor(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        steps = self.noise_schedule.config.num_train_timesteps
        t = torch.randint(0, steps, (len(latents),), generator=generator).to(latents.device)
        noisy = self.noise_schedule.add_noise(latents, noise, t)
        text = self.text_encoder(input_ids)[0]
        prediction = self.unet(noisy, t, text).sample
        if self.noise_schedule.config.prediction_type == "v_prediction":
            target = self.noise_schedule.get_velocity(latents, noise, t)
        else:
            target = noise
        return F.mse_loss(prediction.float(), target.float())


class LoraTraining:
    """One worker's training state: the pipeline with adapters, its loss module, AdamW, the grad scaler.

    Usable without Ray (``module`` is then :attr:`loss`): ``step(loss, pixels, captions, generator)``.
    """

    def __init__(self, pipe, lora: LoraSettings, cfg: LoraTrainConfig, device: torch.device | str = "cpu"):
        from diffusers.training_utils import cast_training_params

        device = torch.device(device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)  # the same adapters on every rank
            add_adapters(pipe, lora)
        precision = cfg.mixed_precision if device.type == "cuda" else "no"
        dtype = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        pipe.to(device)
        if precision != "no":
            pipe.to(dtype=dtype)
            cast_training_params([pipe.unet, pipe.text_encoder], dtype=torch.float32)
        if cfg.gradient_checkpointing:
            pipe.unet.enable_gradient_checkpointing()
        pipe.unet.train()
        pipe.text_encoder.train(lora.text_encoder)
        self.pipe, self.cfg, self.device = pipe, cfg, device
        self.params = lora_parameters(pipe)
        self.loss = LoraLoss(pipe)
        self.optimizer = torch.optim.AdamW(
            list(self.params.values()), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, eps=cfg.eps
        )
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        self.autocast = torch.autocast(device.type, dtype=dtype, enabled=precision != "no")

    def tokens(self, captions: list[str]) -> torch.Tensor:
        tok = self.pipe.tokenizer
        ids = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True)
        return torch.tensor(ids.input_ids, device=self.device)

    def step(self, module: nn.Module, pixels: torch.Tensor, captions: list[str], generator) -> torch.Tensor:
        """One optimizer step on a batch; returns the (detached) loss."""
        with self.autocast:
            loss = module(pixels.to(self.device), self.tokens(captions), generator)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.cfg.max_grad_norm is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(list(self.params.values()), self.cfg.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.detach()

    def state(self) -> dict:
        """The resumable state: LoRA weights by name, optimizer and scaler."""
        return {
            "lora": {k: p.detach().cpu().clone() for k, p in self.params.items()},
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
        }

    def load(self, state: dict) -> None:
        if sorted(state["lora"]) != sorted(self.params):
            raise ValueError("checkpoint: its LoRA parameters differ from this run's adapters")
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(state["lora"][k])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])


def _train_loop(loop_config: dict) -> None:
    """Ray Train worker loop (one DDP process)."""
    import ray.train
    import ray.train.torch

    job = FinetuneLoraJob.model_validate(loop_config["job"])
    cfg = job.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    training = LoraTraining(job.base.load(), job.lora, cfg, ray.train.torch.get_device())
    module = ray.train.torch.prepare_model(training.loss)
    state = restore_state(ray.train.get_checkpoint())
    step, loss_log = 0, []
    if state is not None:
        training.load(state)
        step, loss_log = state["step"], unpack_loss_log(state["loss_log"])
    start_step = step
    table = read_images(loop_config["images_uri"])
    generator = torch.Generator()
    window_loss, window_steps, meter = torch.zeros((), device=training.device), 0, telemetry.Meter()
    while step < cfg.steps:
        seed = step_seed(cfg.seed, rank, step)
        generator.manual_seed(seed)
        torch.manual_seed(seed)  # LoRA dropout
        rows = batch_rows(step, rank, world, cfg.batch_size, len(table), cfg.seed)
        pixels, names = load_batch(table, rows, generator, job.data.flip)
        window_loss += training.step(module, pixels, job.data.captions(names), generator).float()
        step += 1
        window_steps += 1
        meter.add(len(rows) * world)
        if step % cfg.log_every and step % cfg.checkpoint_every and step != cfg.steps:
            continue
        if world > 1:
            torch.distributed.all_reduce(window_loss)
        mean_loss = window_loss.item() / window_steps / world
        loss_log.append({"step": step, "loss": mean_loss})
        window_loss.zero_()
        window_steps = 0
        telemetry.set_gauge("facesynth_lora_train_images_per_s", meter.rate, "LoRA training images/s")
        metrics = {"step": step, "start_step": start_step, "loss": mean_loss, "images_per_s": meter.rate}
        save = rank == 0 and (step % cfg.checkpoint_every == 0 or step == cfg.steps)
        report_state(
            metrics, {**training.state(), "step": step, "loss_log": pack_loss_log(loss_log)} if save else None
        )
    if rank == 0:
        meta = {
            "base": job.base.model_dump(mode="json"),
            "lora": job.lora.model_dump(mode="json"),
            "caption": job.data.caption,
            "steps": step,
            "prediction_type": training.loss.noise_schedule.config.prediction_type,
        }
        save_lora(training.pipe, loop_config["lora_uri"], meta)
        storage.write_bytes(
            loop_config["log_uri"],
            json.dumps({"start_step": start_step, "step": step, "loss": loss_log}).encode(),
        )


def check(job: FinetuneLoraJob) -> dict[str, int]:
    """Everything that can fail before training, nothing written: the base checkpoint, the data (images per
    identity), the output; returns the images per identity name."""
    job.base.check("base")
    counts = image_counts(job.data)
    check_output_writable(job.output)
    return counts


def run(job: FinetuneLoraJob) -> TrainResult:
    """Train (or resume) the LoRA; writes ``<output>/lora`` and the report. See the module doc."""
    counts = check(job)
    init_ray(job.ray)
    out = storage.absolute(job.output)  # Ray Train workers have another cwd
    pin_settings(storage.join(out, "checkpoints", job.run_name, SETTINGS_FILE), job.pinned())
    images_uri = storage.join(out, IMAGES_FILE)
    prepare_images(job.data, images_uri)
    loop_config = {
        "job": job.model_dump(mode="json"),
        "images_uri": images_uri,
        "lora_uri": storage.join(out, "lora"),
        "log_uri": storage.join(out, TRAIN_LOG),
    }
    trainer = torch_trainer(
        _train_loop,
        loop_config,
        name=job.run_name,
        checkpoint_uri=storage.join(out, "checkpoints"),
        num_workers=job.train.num_workers,
        use_gpu=job.train.use_gpu,
        cpus_per_worker=job.train.cpus_per_worker,
        max_failures=job.train.max_failures,
        keep_checkpoints=job.train.keep_checkpoints,
        datasets={},
    )
    start = time.perf_counter()
    checkpoint = fit(trainer, job.output)
    log = json.loads(storage.read_bytes(loop_config["log_uri"]))
    result = TrainResult(
        loop_config["lora_uri"],
        checkpoint,
        log["step"],
        log["start_step"],
        log["loss"],
        time.perf_counter() - start,
    )
    save_resolved(job, job.output)
    result.report = write_report(job, result, counts)
    return result


def write_report(job: FinetuneLoraJob, result: TrainResult, counts: dict[str, int]) -> str:
    """``report.md`` with the loss curve (``loss.png``) at the output URI."""
    log = result.loss_log
    save_line_plot(
        [r["step"] for r in log],
        [r["loss"] for r in log],
        storage.join(job.output, "loss.png"),
        xlabel="step",
        ylabel="MSE on the scheduler's target",
        title=f"LoRA {job.run_name}",
        logy=True,
    )
    meta = json.loads(storage.read_bytes(storage.join(result.model_uri, LORA_JSON)))
    first, last = log[0], log[-1]
    t, lora = job.train, job.lora
    report = Report(f"LoRA fine-tuning: {job.run_name}").bullets(
        [
            f"base: `{job.base.describe()}` ({meta['prediction_type']} target); LoRA rank {lora.rank}, alpha "
            f"{lora.alpha:g} on {', '.join(lora.targets)}" + (" + text encoder" if lora.text_encoder else ""),
            f"data: `{job.data.source}` at {job.data.resolution} px, caption `{job.data.caption}`",
            f"LoRA weights: `{result.model_uri}` (diffusers format: `pipe.load_lora_weights(path)`)",
            f"steps {result.start_step} -> {result.steps} in {result.seconds:.1f} s, {t.num_workers} worker(s) "
            f"x batch {t.batch_size}, AdamW lr {t.lr:g} wd {t.weight_decay:g}",
            f"loss {first['loss']:.4f} (step {first['step']}) -> {last['loss']:.4f} (step {last['step']})",
        ]
    )
    report.section("Images per identity").table(["identity", "images"], sorted(counts.items()))
    return report.figure("loss.png", "loss").write(job.output)
