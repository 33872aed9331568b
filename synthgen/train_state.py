"""What the synthgen trainers on Ray Train (UIFace, SD LoRA) share: step seeds, pinned run settings, checkpoints.

- :func:`step_seed`: the seed of one worker's randomness at one step, ``row_seeds(seed, rank, step)``; a run
  resumed at step k draws exactly what the uninterrupted run drew from step k on.
- :func:`pin_settings`: a run's first start records the settings its checkpoints depend on (``<run>/*.json``);
  a rerun that changed any of them is refused instead of resuming from incompatible checkpoints.
- :func:`report_state` / :func:`restore_state`: a checkpoint is a folder with one ``state.pt`` (a dict of
  tensors, state dicts and ints), reported by rank 0 through ``ray.train.report`` and loaded back with
  ``weights_only=True``; :func:`pack_loss_log` keeps the loss log inside it as one float64 tensor.
- :func:`fit`: ``trainer.fit()`` that raises the run's error, and the URI of its last checkpoint;
  :class:`TrainResult` is what a trainer job returns.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from facesynth import shards, storage

STATE_FILE = "state.pt"


@dataclass
class TrainResult:
    """What a training run produced: the final model and last checkpoint URIs, the steps and the loss log."""

    model_uri: str
    checkpoint_uri: str | None
    steps: int
    start_step: int
    loss_log: list[dict]
    seconds: float
    report: str = ""

    def headline(self) -> str:
        first, last = self.loss_log[0], self.loss_log[-1]
        return f"loss {first['loss']:.3f} -> {last['loss']:.3f} over steps {self.start_step}-{self.steps}"

    def summary(self) -> dict:
        """The one-screen summary: the model URI, steps, resume point, time and first/last loss."""
        return {
            "model": self.model_uri,
            "steps": self.steps,
            "resumed_from": self.start_step,
            "seconds": round(self.seconds, 1),
            "first_loss": self.loss_log[0]["loss"],
            "last_loss": self.loss_log[-1]["loss"],
            "report": self.report,
        }


def step_seed(seed: int, rank: int, step: int) -> int:
    """Seed of one worker's randomness at one step: a resumed run draws exactly what it would have drawn."""
    return int(shards.row_seeds(seed, np.array([rank]), np.array([step]))[0])


def pin_settings(uri: str, settings: dict, what: str = "settings") -> None:
    """Record ``settings`` (JSON values) at ``uri`` at a run's first start; refuse a rerun that changed them."""
    if not storage.exists(uri):
        storage.write_bytes(uri, json.dumps(settings, indent=1).encode())
        return
    saved = json.loads(storage.read_bytes(uri))
    changed = [f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in settings.items() if saved.get(k) != v]
    changed += [f"{k}: {saved[k]!r} -> (absent)" for k in saved if k not in settings]
    if changed:
        raise ValueError(
            f"{uri}: the run was started with other {what} ({'; '.join(changed)}); "
            "its checkpoints cannot resume it: use a new run_name or output"
        )


def pack_loss_log(loss_log: list[dict]):
    """``[{"step", "loss"}]`` -> a float64 tensor ``(n, 2)`` (checkpoints hold tensors only)."""
    import torch

    return torch.tensor([[r["step"], r["loss"]] for r in loss_log], dtype=torch.float64).reshape(-1, 2)


def unpack_loss_log(packed) -> list[dict]:
    """Inverse of :func:`pack_loss_log`."""
    return [{"step": int(s), "loss": loss} for s, loss in packed.tolist()]


def report_state(metrics: dict, state: dict | None) -> None:
    """Report ``metrics``; with ``state`` (rank 0 at a checkpoint step) also a checkpoint holding ``state.pt``."""
    import ray.train
    import torch

    if state is None:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(state, os.path.join(tmp, STATE_FILE))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def restore_state(checkpoint) -> dict | None:
    """The ``state.pt`` of a Ray Train checkpoint (``weights_only``, on CPU), or None without a checkpoint."""
    import torch

    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        return torch.load(Path(folder, STATE_FILE), map_location="cpu", weights_only=True)


def fit(trainer, output_uri: str) -> str | None:
    """Run ``trainer`` to the end (raising its error); returns the URI of its last checkpoint, if any."""
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    if result.checkpoint is None:
        return None
    path = result.checkpoint.path
    return f"s3://{path}" if output_uri.startswith("s3://") else path


def download_folder(uri: str, target: Path) -> Path:
    """Copy the files directly under the storage folder ``uri`` into the new local folder ``target``."""
    files = storage.list_files(uri)
    if not files:
        raise FileNotFoundError(f"{uri}: empty or missing folder")
    target.mkdir(parents=True)
    for f in files:
        (target / f.rsplit("/", 1)[1]).write_bytes(storage.read_bytes(f))
    return target
