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

from facesynth import shards, storage


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


def identity_means(embedded) -> tuple[np.ndarray, np.ndarray]:
    """Per-identity mean embeddings, L2-normalised, of a dataset with ``identity`` and ``embedding`` columns:
    ``(identities int64 (n,), means float32 (n, D))`` sorted by identity."""
    sums: dict[int, np.ndarray] = {}
    for batch in embedded.select_columns(["identity", "embedding"]).iter_batches(batch_format="numpy"):
        for identity, emb in zip(batch["identity"], batch["embedding"]):
            emb = np.asarray(emb, dtype=np.float64)
            sums[int(identity)] = sums.get(int(identity), 0) + emb / np.linalg.norm(emb)
    ids = np.array(sorted(sums), dtype=np.int64)
    means = np.stack([sums[i] for i in ids])
    return ids, (means / np.linalg.norm(means, axis=1, keepdims=True)).astype(np.float32)


def save_npy(array: np.ndarray, uri: str) -> None:
    """Write an array as ``.npy`` to any storage URI (no pickles)."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    storage.write_bytes(uri, buffer.getvalue())


def load_npy(uri: str) -> np.ndarray:
    """Read a ``.npy`` array from any storage URI (pickled objects are refused)."""
    return np.load(io.BytesIO(storage.read_bytes(uri)), allow_pickle=False)


def embedded_dataset(
    data_uri: str, *, judge_uri: str | None = None, judge_batch_size: int = 256, judge_num_gpus: float = 0.0
):
    """A Ray Dataset of ``image`` + ``identity`` + ``embedding`` rows from the committed shards of ``data_uri``
    (map it with :func:`to_training_rows` to train).

    With ``judge_uri`` the embeddings are computed by the judge (one actor, materialised before training);
    without it the shards' ``embedding`` column is used.
    """
    from ray.data import ActorPoolStrategy

    columns = ["image", "identity"] if judge_uri is not None else ["image", "identity", "embedding"]
    ds = shards.read_dataset(data_uri, columns=columns)
    if judge_uri is not None:
        ds = ds.map_batches(
            JudgeEmbedder,
            fn_constructor_kwargs={"judge_uri": judge_uri, "batch_size": judge_batch_size},
            batch_size=judge_batch_size,
            num_gpus=judge_num_gpus,
            compute=ActorPoolStrategy(size=1),
            batch_format="numpy",
        ).materialize()
    return ds
