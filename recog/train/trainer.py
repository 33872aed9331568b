"""The driver side of face-recognition training: check inputs, run Ray Train, export, report.

``run(cfg)`` is a plain function (a Ray Tune trial can call it). Before any worker starts it
inspects every data source (readable shards, image size, at least two identities) and builds the
model and head once on the driver, so bad input fails fast with the config key in the message.
Checkpoints go to ``<storage>/<run_name>``; starting a run again with the same ``run_name`` (after
a crash or after it finished) resumes from its latest checkpoint and ends at the same step.
At the end the backbone (its EMA when ``optim.ema_decay`` is set) is exported to
``<output>/model/`` (embedding task: ``recog.export`` contract; closed set: a TorchScript
classifier + ``classifier.json``), with ``labels.json``, ``config.yaml`` and ``report.md``.
"""

from __future__ import annotations

import io
import json
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from facesynth import storage
from facesynth.config import save_resolved
from facesynth.plots import save_line_plot
from facesynth.preflight import check_output_writable
from facesynth.report import Report
from facesynth.runtime import init_ray, torch_trainer
from recog.export import export_embedder
from recog.train.config import TrainFRJob
from recog.train.data import LabelMap, Source, TrainingData, inspect_data, steps_per_epoch
from recog.train.loop import STATE_FILE, backbone_weights, build_margin_head, build_model, train_worker


@dataclass(frozen=True)
class TrainResult:
    """What a training run produced; ``history`` holds one entry per logged step (loss, lr, img/s)."""

    output: str
    model_uri: str
    checkpoint_uri: str
    steps: int
    num_classes: int
    final_loss: float
    images_per_s: float
    seconds: float
    history: list[dict]

    def headline(self) -> str:
        return f"final loss {self.final_loss:.3f}, {self.images_per_s:.0f} images/s, model {self.model_uri}"

    def summary(self) -> dict:
        """The one-screen summary: everything but the history."""
        return {k: v for k, v in asdict(self).items() if k != "history"}


def check_model(cfg: TrainFRJob, num_classes: int) -> None:
    """Build the backbone and a small head on the driver so option errors surface before training."""
    m = cfg.model
    try:
        model = build_model(cfg, num_classes)
        out = model.eval()(torch.zeros(1, 3, m.input_size, m.input_size))
        if m.task == "embedding":
            build_margin_head(cfg, min(num_classes, 2))
    except (ValueError, TypeError) as exc:
        raise ValueError(f"model ({m.backbone!r}, head {m.head!r}): {exc}") from exc
    expected = num_classes if m.task == "closed_set" else m.embedding_dim
    if out.shape != (1, expected):
        raise ValueError(
            f"model.backbone={m.backbone!r} gives outputs of shape {tuple(out.shape[1:])}, "
            f"expected ({expected},) for task={m.task!r}"
        )
    if m.task == "embedding" and num_classes < cfg.scaling.num_workers:
        raise ValueError(
            f"scaling.num_workers={cfg.scaling.num_workers}: the head's {num_classes} classes are "
            "sharded across workers; expected at least one class per worker"
        )


def _trainer(cfg: TrainFRJob, sources: list[Source], labels: LabelMap, epochs: int, callbacks: Sequence):
    data = TrainingData.plan(
        sources, labels, cfg.data, input_size=cfg.model.input_size, seed=cfg.train.seed, epochs=epochs
    )
    return torch_trainer(
        train_worker,
        {
            "cfg": cfg.model_dump(mode="json"),
            "num_classes": labels.num_classes,
            "labels": json.dumps(labels.to_json([s.spec.uri for s in sources])),
            "data": data,  # each worker streams its own part from its step on (no replay on resume)
        },
        name=cfg.run_name,
        checkpoint_uri=cfg.checkpoint_uri,
        num_workers=cfg.scaling.num_workers,
        use_gpu=cfg.scaling.use_gpu,
        cpus_per_worker=cfg.scaling.cpus_per_worker,
        max_failures=cfg.train.max_failures,
        keep_checkpoints=cfg.train.checkpoints_to_keep,
        datasets={},
        callbacks=callbacks,
    )


def load_state(checkpoint) -> dict:
    """``state.pt`` of a Ray Train checkpoint (step, backbone, EMA, history, label map)."""
    with checkpoint.filesystem.open_input_file(f"{checkpoint.path}/{STATE_FILE}") as f:
        return torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)


def export_classifier(model: torch.nn.Module, out_uri: str, cfg: TrainFRJob, labels: dict) -> None:
    """Closed-set model: TorchScript ``model.pt`` (normalised NCHW -> logits) + ``classifier.json``."""
    size = cfg.model.input_size
    traced = torch.jit.trace(model.eval(), torch.zeros(2, 3, size, size))
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    storage.write_bytes(storage.join(out_uri, "model.pt"), buffer.getvalue())
    spec = {
        "format": "torchscript",
        "file": "model.pt",
        "input_size": [size, size],
        "mean": list(cfg.model.mean),
        "std": list(cfg.model.std),
        "channel_order": "RGB",
        "num_classes": len(labels["class_identity"]),
        **labels,
    }
    storage.write_bytes(storage.join(out_uri, "classifier.json"), json.dumps(spec, indent=1).encode())


def export_model(state: dict, cfg: TrainFRJob, num_classes: int, labels: dict) -> str:
    """Export the trained backbone under ``<output>/model``; returns that URI."""
    model = build_model(cfg, num_classes)
    model.load_state_dict(backbone_weights(state))
    out = storage.join(cfg.output, "model")
    if cfg.model.task == "closed_set":
        export_classifier(model, out, cfg, labels)
    else:
        export_embedder(
            model,
            out,
            input_size=cfg.model.input_size,
            embedding_dim=cfg.model.embedding_dim,
            flip_fusion=cfg.model.flip_fusion,
            mean=cfg.model.mean,
            std=cfg.model.std,
        )
    return out


def write_report(result: TrainResult, cfg: TrainFRJob, sources: list[Source]) -> str:
    """``report.md`` (+ ``loss.png``) at the output URI; returns the report URI."""
    history = result.history
    save_line_plot(
        [h["step"] for h in history],
        [h["loss"] for h in history],
        storage.join(cfg.output, "loss.png"),
        xlabel="step",
        ylabel="training loss",
    )
    m, t = cfg.model, cfg.train
    head = m.head if m.task == "embedding" else "softmax CE (closed set)"
    return (
        Report(f"Face-recognition training: {cfg.run_name}")
        .bullets(
            [
                f"model: {m.backbone} (width {m.width:g}, {m.input_size}px) + {head}, {result.num_classes} classes",
                f"{t.steps} steps x {t.batch_size} images x {cfg.scaling.num_workers} workers "
                f"({t.strategy}, {t.precision})",
                f"final loss {result.final_loss:.4f}, {result.images_per_s:.1f} images/s, {result.seconds:.0f} s",
                f"exported model: `{result.model_uri}`; checkpoints: `{result.checkpoint_uri}`",
            ]
        )
        .table(
            ["dataset", "kind", "weight", "images", "identities"],
            [[s.spec.uri, s.spec.kind, f"{s.spec.weight:g}", s.rows, len(s.identities)] for s in sources],
        )
        .figure("loss.png", "training loss")
        .write(cfg.output)
    )


def run(cfg: TrainFRJob, callbacks: Sequence = ()) -> TrainResult:
    """Train (or resume) the run ``cfg.run_name``, export its model and write the report.

    ``callbacks``: extra ``ray.train.UserCallback`` objects for the Ray Train controller.
    """
    start = time.perf_counter()
    sources, labels = inspect_data(cfg.data, cfg.model.input_size)
    check_model(cfg, labels.num_classes)
    spe = steps_per_epoch(sources, cfg.data, cfg.scaling.num_workers, cfg.train.batch_size)
    for uri in {cfg.output, cfg.checkpoint_uri}:
        check_output_writable(uri)
    init_ray(cfg.ray)
    result = _trainer(cfg, sources, labels, math.ceil(cfg.train.steps / spe), callbacks).fit()
    state = load_state(result.checkpoint)
    label_json = labels.to_json([s.spec.uri for s in sources])
    model_uri = export_model(state, cfg, labels.num_classes, label_json)
    storage.write_bytes(storage.join(cfg.output, "labels.json"), json.dumps(label_json).encode())
    save_resolved(cfg, cfg.output)
    history = state["history"]
    rates = [h["images_per_s"] for h in history[1:]] or [h["images_per_s"] for h in history]
    out = TrainResult(
        output=cfg.output,
        model_uri=model_uri,
        checkpoint_uri=storage.join(cfg.checkpoint_uri, cfg.run_name),
        steps=state["step"],
        num_classes=labels.num_classes,
        final_loss=history[-1]["loss"],
        images_per_s=statistics.median(rates),
        seconds=time.perf_counter() - start,
        history=history,
    )
    write_report(out, cfg, sources)
    return out
