"""Training rows for identity-conditioned generators: decoded faces plus an identity embedding per image.

The embedding is the shards' ``embedding`` column, or comes from a judge FR model (an exported ``model.json``
folder, loaded with :func:`facesynth.face_model.load_face_model`) in a Ray Data actor step that runs once,
before training, and is materialised so epochs do not re-embed.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from PIL import Image

from facesynth import shards


def decode_images(encoded: Sequence[bytes], size: tuple[int, int]) -> np.ndarray:
    """Encoded images -> uint8 RGB ``(N, height, width, 3)``, bilinear-resized to ``size = (height, width)``."""
    height, width = size
    out = np.empty((len(encoded), height, width, 3), dtype=np.uint8)
    for i, data in enumerate(encoded):
        img = Image.open(io.BytesIO(data)).convert("RGB")
        if img.size != (width, height):
            img = img.resize((width, height), Image.Resampling.BILINEAR)
        out[i] = np.asarray(img)
    return out


class JudgeEmbedder:
    """Ray Data callable class: adds the judge model's flip-fused, L2-normalised ``embedding`` per image."""

    def __init__(self, judge_uri: str, batch_size: int) -> None:
        import torch

        from facesynth.face_model import load_face_model

        self.model = load_face_model(judge_uri, "cuda" if torch.cuda.is_available() else "cpu")
        self.batch_size = batch_size

    def __call__(self, batch: dict) -> dict:
        images = decode_images(batch["image"], tuple(self.model.spec.input_size))
        return {**batch, "embedding": self.model.embed(images, batch_size=self.batch_size).astype(np.float32)}


def to_training_rows(batch: dict, image_size: int) -> dict:
    """``image`` bytes + ``embedding`` -> ``pixels`` uint8 ``(N, S, S, 3)`` + ``embedding`` float32 ``(N, D)``."""
    return {
        "pixels": decode_images(batch["image"], (image_size, image_size)),
        "embedding": np.stack([np.asarray(e, dtype=np.float32) for e in batch["embedding"]]),
    }


def training_dataset(data_uri: str, image_size: int, *, judge_uri: str | None = None, judge_batch_size: int = 256,
                     judge_num_gpus: float = 0.0):
    """A Ray Dataset of ``pixels`` + ``embedding`` rows from the committed shards of ``data_uri``.

    With ``judge_uri`` the embeddings are computed by the judge (one actor, materialised before training);
    without it the shards' ``embedding`` column is used.
    """
    columns = ["image"] if judge_uri is not None else ["image", "embedding"]
    ds = shards.read_dataset(data_uri, columns=columns)
    if judge_uri is not None:
        ds = ds.map_batches(JudgeEmbedder, fn_constructor_kwargs={"judge_uri": judge_uri,
                                                                  "batch_size": judge_batch_size},
                            batch_size=judge_batch_size, num_gpus=judge_num_gpus, concurrency=1,
                            batch_format="numpy").materialize()
    return ds.map_batches(to_training_rows, fn_kwargs={"image_size": image_size}, batch_format="numpy")
