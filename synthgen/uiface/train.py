"""UIFace training on Ray Train (DDP, bf16 on GPU, EMA, checkpoints and resume) and the saved-model format.

Data: a shard dataset of face images whose identity embeddings come from a judge FR model (an exported
``model.json`` folder, embedded once in a Ray Data step before training) or from the shards' ``embedding``
column. Each worker reads its split of the stream, flips images with p=0.5 and minimises
:meth:`UIFaceModel.training_loss` with Adam + ``CosineAnnealingWarmRestarts(T_0, T_mult=2)`` and a diffusers
``EMAModel`` (warm-up ``1 - (1 + step / inv_gamma) ** -power``, capped), as the reference trains.

Rank 0 reports a checkpoint (weights, EMA, optimizer, scheduler, step, loss log) every ``checkpoint_every``
steps to ``<output>/checkpoints/<run_name>``; rerunning with the same output and run name resumes from the
latest one (the run's first start pins its architecture in ``architecture.json`` there, and a rerun that
changed it is refused). At the end rank 0 saves the EMA weights as a model folder (:func:`save_uiface`):
``unet/`` (diffusers ``save_pretrained``), ``context.pt``, ``autoencoder/`` (latent models) and
``uiface.json`` (written last, so a folder with it is complete), loaded back by :func:`load_uiface`; the driver
adds ``identities.npy``, the training identities' mean embeddings, for ``identities.training`` in generation.
"""

from __future__ import annotations

import io
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, model_validator
from torch import nn

from facesynth import shards, storage, telemetry
from facesynth.config import OutputUri, StrictModel, save_resolved
from facesynth.plots import save_line_plot
from facesynth.preflight import check_output_writable
from facesynth.report import Report
from facesynth.runtime import RayConfig, init_ray, torch_trainer
from synthgen.train_state import (
    STATE_FILE,  # noqa: F401 (checkpoint file name, re-exported for readers of UIFace checkpoints)
    TrainResult,
    download_folder,
    fit,
    pack_loss_log,
    pin_settings,
    report_state,
    restore_state,
    step_seed,
    unpack_loss_log,
)
from synthgen.uiface.model import UIFaceModel, UIFaceModelConfig, build_context, build_uiface, preset

log = logging.getLogger(__name__)

MODEL_JSON = "uiface.json"
TRAIN_LOG = "train_log.json"
ARCHITECTURE_FILE = "architecture.json"  # per run, beside its checkpoints
IDENTITIES_FILE = "identities.npy"  # per training identity: mean judge embedding (for new-identity rejection)


class UIFaceModelSource(StrictModel):
    """Which UIFace model: a saved model folder (``uri``), else random weights of ``preset`` + ``overrides``."""

    uri: str | None = Field(None, description="model folder written by save_uiface (local path or s3://)")
    preset: str = Field("tiny", description="architecture preset when uri is null: tiny | uiface-casia")
    overrides: dict[str, Any] = Field(
        default_factory=dict, description="UIFaceModelConfig fields over the preset"
    )
    init_seed: int = Field(0, ge=0, description="seed of the random weights when uri is null")

    @model_validator(mode="after")
    def _check_preset(self) -> UIFaceModelSource:
        if self.uri is None:
            try:
                preset(self.preset, **self.overrides)
            except ValueError as exc:  # pydantic's ValidationError is a ValueError too
                raise ValueError(f"preset/overrides: {exc}") from None
        return self

    def architecture(self) -> UIFaceModelConfig:
        """The model config, read from ``uri``'s ``uiface.json`` or built from the preset."""
        if self.uri is not None:
            return read_model_config(self.uri)
        return preset(self.preset, **self.overrides)

    def build(self, device: str | torch.device = "cpu") -> UIFaceModel:
        """Load the saved model, or build the same random weights in every process (seeded, RNG untouched)."""
        if self.uri is not None:
            return load_uiface(self.uri, device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.init_seed)
            model = build_uiface(self.architecture())
        return model.to(device)

    def describe(self) -> str:
        return self.uri if self.uri is not None else f"preset:{self.preset}"


class UIFaceTrainConfig(StrictModel):
    """Optimisation, EMA, checkpointing and Ray Train scaling of a UIFace run."""

    steps: int = Field(1000, ge=1, description="total optimizer steps (a resumed run continues to this)")
    batch_size: int = Field(64, ge=1, description="images per worker and step")
    lr: float = Field(1e-4, gt=0, description="Adam learning rate")
    restart_period: int = Field(10000, ge=1, description="CosineAnnealingWarmRestarts T_0 (T_mult=2)")
    ema_max_decay: float = Field(0.9999, ge=0, le=1)
    ema_power: float = Field(0.75, gt=0)
    ema_inv_gamma: float = Field(1.0, gt=0)
    checkpoint_every: int = Field(1000, ge=1, description="report a resumable checkpoint every N steps")
    keep_checkpoints: int = Field(2, ge=1)
    log_every: int = Field(50, ge=1, description="report the mean loss every N steps")
    num_workers: int = Field(1, ge=1, description="Ray Train workers (DDP processes)")
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    bf16: bool = Field(True, description="bf16 autocast (GPU workers only)")
    max_failures: int = Field(2, ge=0, description="worker-group restarts from the last checkpoint")
    seed: int = Field(0, ge=0, description="seed of flips, timesteps, noise and dropout (per rank and step)")
    shuffle_buffer: int = Field(1024, ge=0, description="local shuffle buffer in rows (0: stream order)")
    judge_batch_size: int = Field(256, ge=1, description="images per judge embedding call")
    judge_num_gpus: float = Field(0.0, ge=0, description="GPUs per judge embedding actor")


def read_model_config(uri: str) -> UIFaceModelConfig:
    """The ``uiface.json`` of a saved model folder (FileNotFoundError naming it if missing)."""
    return UIFaceModelConfig.model_validate_json(storage.read_bytes(storage.join(uri, MODEL_JSON)))


def save_uiface(model: UIFaceModel, uri: str) -> None:
    """Write ``model`` as a folder at ``uri`` (any storage URI); ``uiface.json`` is written last."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model.unet.save_pretrained(root / "unet")
        if model.autoencoder is not None:
            model.autoencoder.save_pretrained(root / "autoencoder")
        torch.save(model.context.state_dict(), root / "context.pt")
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            storage.write_bytes(storage.join(uri, path.relative_to(root).as_posix()), path.read_bytes())
    storage.write_bytes(storage.join(uri, MODEL_JSON), model.config.model_dump_json(indent=1).encode())


def load_uiface(uri: str, device: str | torch.device = "cpu") -> UIFaceModel:
    """Rebuild a model saved by :func:`save_uiface` (tensors loaded with ``weights_only=True``), in eval mode."""
    from diffusers import AutoencoderKL, UNet2DConditionModel, VQModel

    config = read_model_config(uri)
    state = torch.load(io.BytesIO(storage.read_bytes(storage.join(uri, "context.pt"))), weights_only=True)
    context = build_context(config)
    context.load_state_dict(state)
    with tempfile.TemporaryDirectory() as tmp:
        unet = UNet2DConditionModel.from_pretrained(
            download_folder(storage.join(uri, "unet"), Path(tmp, "unet"))
        )
        autoencoder = None
        if config.space != "pixel":
            cls = VQModel if config.space == "vq" else AutoencoderKL
            autoencoder = cls.from_pretrained(
                download_folder(storage.join(uri, "autoencoder"), Path(tmp, "ae"))
            )
    return UIFaceModel(config, unet, context, autoencoder).to(device).eval()


class _LossModule(nn.Module):
    """DDP needs the loss inside ``forward``."""

    def __init__(self, model: UIFaceModel) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, images: torch.Tensor, condition: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        return self.model.training_loss(images, condition, generator)


def prepare_batch(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [-1, 1], each image flipped left-right with p=0.5 (drawn from ``generator``)."""
    images = pixels.permute(0, 3, 1, 2).float() / 127.5 - 1
    flip = torch.rand(len(images), generator=generator).to(images.device) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def _trainable(model: UIFaceModel) -> list[nn.Parameter]:
    return [*model.unet.parameters(), *model.context.parameters()]


def _train_loop(loop_config: dict) -> None:
    """Ray Train worker loop (one DDP process)."""
    import ray.train
    import ray.train.torch
    from diffusers.training_utils import EMAModel

    cfg = UIFaceTrainConfig.model_validate(loop_config["train"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    model = UIFaceModelSource.model_validate(loop_config["model"]).build()
    if model.autoencoder is not None:
        model.autoencoder.requires_grad_(False).eval()
    model.train()
    loss_module = ray.train.torch.prepare_model(_LossModule(model))
    params = _trainable(model)
    optimizer = torch.optim.Adam(params, lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
        optimizer, T_0=cfg.restart_period, T_mult=2
    )
    ema = EMAModel(
        params, decay=cfg.ema_max_decay, use_ema_warmup=True, inv_gamma=cfg.ema_inv_gamma, power=cfg.ema_power
    )
    step, loss_log = _restore(ray.train.get_checkpoint(), model, optimizer, scheduler, ema)
    ema.to(device)
    start_step = step
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16 and device.type == "cuda")
    generator = torch.Generator()
    data = ray.train.get_dataset_shard("train")
    window_loss, window_steps, meter = torch.zeros((), device=device), 0, telemetry.Meter()
    while step < cfg.steps:
        for batch in data.iter_torch_batches(
            batch_size=cfg.batch_size,
            drop_last=True,
            device=device,
            local_shuffle_buffer_size=cfg.shuffle_buffer or None,
            local_shuffle_seed=step_seed(cfg.seed, rank, step),
        ):
            generator.manual_seed(step_seed(cfg.seed, rank, step))
            images = prepare_batch(batch["pixels"], generator)
            with autocast:
                loss = loss_module(images, batch["condition"], generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            ema.step(params)
            step += 1
            window_loss += loss.detach().float()
            window_steps += 1
            meter.add(len(images) * world)
            if step % cfg.log_every == 0 or step % cfg.checkpoint_every == 0 or step == cfg.steps:
                if world > 1:
                    torch.distributed.all_reduce(window_loss)
                mean_loss = window_loss.item() / window_steps / world
                loss_log.append({"step": step, "loss": mean_loss})
                window_loss.zero_()
                window_steps = 0
                telemetry.set_gauge(
                    "facesynth_uiface_train_images_per_s", meter.rate, "UIFace training images/s"
                )
                metrics = {
                    "step": step,
                    "start_step": start_step,
                    "loss": mean_loss,
                    "lr": scheduler.get_last_lr()[0],
                    "images_per_s": meter.rate,
                }
                save = rank == 0 and (step % cfg.checkpoint_every == 0 or step == cfg.steps)
                _report(metrics, model, optimizer, scheduler, ema, loss_log if save else None)
            if step >= cfg.steps:
                break
    if rank == 0:
        ema.store(params)
        ema.copy_to(params)
        save_uiface(model, loop_config["model_uri"])
        ema.restore(params)
        storage.write_bytes(
            storage.join(loop_config["model_uri"], TRAIN_LOG),
            json.dumps({"start_step": start_step, "step": step, "loss": loss_log}).encode(),
        )


def _restore(checkpoint, model: UIFaceModel, optimizer, scheduler, ema) -> tuple[int, list[dict]]:
    """Load a Ray Train checkpoint (``weights_only``) into the training state; returns (step, loss log)."""
    state = restore_state(checkpoint)
    if state is None:
        return 0, []
    model.unet.load_state_dict(state["unet"])
    model.context.load_state_dict(state["context"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    ema.load_state_dict(state["ema"])
    return state["step"], unpack_loss_log(state["loss_log"])


def _report(
    metrics: dict, model: UIFaceModel, optimizer, scheduler, ema, loss_log: list[dict] | None
) -> None:
    """Report metrics; with ``loss_log`` (rank 0 at a checkpoint step) also a resumable checkpoint."""
    state = None
    if loss_log is not None:
        state = {
            "unet": model.unet.state_dict(),
            "context": model.context.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "ema": ema.state_dict(),
            "step": metrics["step"],
            "loss_log": pack_loss_log(loss_log),
        }
    report_state(metrics, state)


def pin_architecture(uri: str, architecture: UIFaceModelConfig) -> None:
    """Record a run's architecture at its first start; refuse a rerun (a resume) that changed it."""
    pin_settings(uri, architecture.model_dump(mode="json"), "architecture")


def check_inputs(data_uri: str, judge_uri: str | None, architecture: UIFaceModelConfig) -> None:
    """Fail before any work if the data or the judge cannot feed a model of ``architecture``."""
    import pyarrow.parquet as pq

    from facesynth.face_model import read_spec

    if architecture.conditioning == "class":
        check_classes(data_uri, judge_uri, architecture.num_classes)
        return
    with storage.open_input(shards.committed_shards(data_uri)[0].uri) as f:
        schema = pq.read_schema(f)
    if judge_uri is not None:
        dim, source = read_spec(judge_uri).embedding_dim, f"judge {judge_uri}"
    elif "embedding" in schema.names:
        first = next(shards.iter_rows(data_uri, columns=["embedding"]))
        dim, source = len(first["embedding"]), f"data {data_uri} column 'embedding'"
    else:
        raise ValueError(
            f"judge: null, but data {data_uri} has no 'embedding' column; give a judge model URI"
        )
    if dim != architecture.embedding_dim:
        raise ValueError(
            f"{source}: embedding dim {dim}, but the model expects embedding_dim="
            f"{architecture.embedding_dim} (set model.overrides.embedding_dim)"
        )


def check_classes(data_uri: str, judge_uri: str | None, num_classes: int) -> None:
    """The class-conditional baseline: no judge, and every identity value of the data is a class id."""
    if judge_uri is not None:
        raise ValueError(
            f"judge: {judge_uri}, but a class-conditional model (conditioning=class) learns one embedding "
            "per class and uses no judge; set judge: null"
        )
    found = sorted({r["identity"] for r in shards.iter_rows(data_uri, columns=["identity"])})
    outside = [i for i in found if not 0 <= i < num_classes]
    if outside:
        raise ValueError(
            f"data {data_uri}: identities {outside[:5]} are not class ids in [0, {num_classes}); "
            f"set model.overrides.num_classes >= {max(found) + 1}"
        )


def train_uiface(
    data_uri: str,
    output_uri: str,
    model: UIFaceModelSource,
    cfg: UIFaceTrainConfig,
    *,
    judge_uri: str | None = None,
    run_name: str = "uiface",
) -> TrainResult:
    """Train (or resume) a UIFace model on Ray Train; the EMA model is saved at ``<output>/model``.

    A class-conditional model (``conditioning: class``) trains on the shards' identity values as class ids,
    with the same loop; its model folder has no ``identities.npy``.
    """
    from synthgen.identity_embeddings import (
        embedded_dataset,
        identity_means,
        save_npy,
        to_class_rows,
        to_training_rows,
    )

    architecture = model.architecture()
    check_inputs(data_uri, judge_uri, architecture)
    pin_architecture(storage.join(output_uri, "checkpoints", run_name, ARCHITECTURE_FILE), architecture)
    rows = {"image_size": architecture.image_size}
    if architecture.conditioning == "class":
        embedded = None
        source = shards.read_dataset(data_uri, columns=["image", "identity"])
        dataset = source.map_batches(to_class_rows, fn_kwargs=rows, batch_format="numpy")
    else:
        embedded = embedded_dataset(
            data_uri,
            judge_uri=judge_uri,
            judge_batch_size=cfg.judge_batch_size,
            judge_num_gpus=cfg.judge_num_gpus,
        )
        dataset = embedded.map_batches(to_training_rows, fn_kwargs=rows, batch_format="numpy")
    model_uri = storage.join(storage.absolute(output_uri), "model")  # Ray Train workers have another cwd
    trainer = torch_trainer(
        _train_loop,
        {"train": cfg.model_dump(), "model": model.model_dump(), "model_uri": model_uri},
        name=run_name,
        checkpoint_uri=storage.join(output_uri, "checkpoints"),
        num_workers=cfg.num_workers,
        use_gpu=cfg.use_gpu,
        cpus_per_worker=cfg.cpus_per_worker,
        max_failures=cfg.max_failures,
        keep_checkpoints=cfg.keep_checkpoints,
        datasets={"train": dataset},
    )
    start = time.perf_counter()
    checkpoint = fit(trainer, output_uri)
    if embedded is not None:
        save_npy(identity_means(embedded)[1], storage.join(model_uri, IDENTITIES_FILE))
    train_log = json.loads(storage.read_bytes(storage.join(model_uri, TRAIN_LOG)))
    return TrainResult(
        model_uri,
        checkpoint,
        train_log["step"],
        train_log["start_step"],
        train_log["loss"],
        time.perf_counter() - start,
    )


class UIFaceTrainJob(StrictModel):
    """The uiface_train job: train (or resume) a UIFace model on a shard dataset of faces.

    ``data`` is a shard dataset of face images; identity embeddings come from the ``judge`` model folder
    (``model.json`` + TorchScript) or, with ``judge: null``, from the shards' ``embedding`` column; the
    class-conditional baseline (``model.overrides: {conditioning: class, num_classes: N}``) needs neither. Rerunning
    with the same ``output`` and ``run_name`` resumes from the latest checkpoint. Writes ``<output>/model``
    (load with :func:`load_uiface`), ``config.yaml``, ``loss.png`` and ``report.md``.
    """

    ray: RayConfig = Field(default_factory=RayConfig)
    data: str = Field(min_length=1, description="shard dataset URI of training faces")
    judge: str | None = Field(
        None, description="exported FR model folder URI; null: use the 'embedding' column"
    )
    output: OutputUri = Field(description="run folder URI: checkpoints/, model/, report.md")
    run_name: str = Field(
        "uiface", pattern=r"^[A-Za-z0-9_.-]+$", description="rerun with the same name resumes"
    )
    model: UIFaceModelSource = Field(default_factory=UIFaceModelSource)
    train: UIFaceTrainConfig = Field(default_factory=UIFaceTrainConfig)


def run(job: UIFaceTrainJob) -> TrainResult:
    """Run (or resume) the training job, then its resolved config and report (inputs checked before Ray starts)."""
    check_output_writable(job.output)
    check_inputs(job.data, job.judge, job.model.architecture())
    init_ray(job.ray)
    result = train_uiface(
        job.data, job.output, job.model, job.train, judge_uri=job.judge, run_name=job.run_name
    )
    save_resolved(job, job.output)
    result.report = write_report(job, result)
    return result


def write_report(job: UIFaceTrainJob, result: TrainResult) -> str:
    """``report.md`` with the loss curve (``loss.png``) at the output URI."""
    log = result.loss_log
    save_line_plot(
        [r["step"] for r in log],
        [r["loss"] for r in log],
        storage.join(job.output, "loss.png"),
        xlabel="step",
        ylabel=f"{job.model.architecture().prediction_type} MSE",
        title=f"UIFace {job.run_name}",
        logy=True,
    )
    first, last = log[0], log[-1]
    embeddings = f"judge `{job.judge}`" if job.judge else "shard column"
    if job.model.architecture().conditioning == "class":
        embeddings = (
            f"none: class-conditional, {job.model.architecture().num_classes} learned class embeddings"
        )
    return (
        Report(f"UIFace training: {job.run_name}")
        .bullets(
            [
                f"data: `{job.data}`; identity embeddings: {embeddings}",
                f"model: `{result.model_uri}` (EMA weights), from `{job.model.describe()}`",
                f"steps {result.start_step} -> {result.steps} in {result.seconds:.1f} s, "
                f"{job.train.num_workers} worker(s) x batch {job.train.batch_size}",
                f"loss {first['loss']:.4f} (step {first['step']}) -> {last['loss']:.4f} (step {last['step']})",
            ]
        )
        .figure("loss.png", "loss")
        .write(job.output)
    )
