"""Training rows for identity-conditioned generators: decoded faces plus an identity embedding per image.

The embedding is the shards' ``embedding`` column, or comes from a judge FR model (an exported ``model.json``
folder) through :mod:`facesynth.embed` in a Ray Data actor step that runs once, before training, and is
materialised so epochs do not re-embed.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np

from facesynth import embed, images, shards, storage


def decode_bilinear(encoded: Sequence[bytes], size: tuple[int, int]) -> np.ndarray:
    """Encoded images -> uint8 RGB ``(N, height, width, 3)``, bilinear-resized to ``size``."""
    return images.decode_to_size(encoded, size, resize="bilinear", what="image")


def to_training_rows(batch: dict, image_size: int) -> dict:
    """``image`` bytes + ``embedding`` -> ``pixels`` uint8 ``(N, S, S, 3)`` + ``condition`` float32 ``(N, D)``."""
    return {
        "pixels": decode_bilinear(batch["image"], (image_size, image_size)),
        "condition": np.stack([np.asarray(e, dtype=np.float32) for e in batch["embedding"]]),
    }


def to_class_rows(batch: dict, image_size: int) -> dict:
    """``image`` bytes + ``identity`` -> ``pixels`` uint8 ``(N, S, S, 3)`` + ``condition`` int64 ``(N,)``, the
    class id of the class-conditional baseline (the identity value itself)."""
    return {
        "pixels": decode_bilinear(batch["image"], (image_size, image_size)),
        "condition": np.asarray(batch["identity"], dtype=np.int64),
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

    With ``judge_uri`` the embeddings are computed by the judge (:func:`facesynth.embed.embedding_dataset`:
    one actor, images resized bilinearly to its input size, materialised before training); without it the
    shards' ``embedding`` column is used.
    """
    if judge_uri is None:
        return shards.read_dataset(data_uri, columns=["image", "identity", "embedding"])
    plan = embed.plan_embedding(data_uri, judge_uri, resize=True)
    return embed.embedding_dataset(
        [plan], batch_size=judge_batch_size, num_gpus_per_worker=judge_num_gpus, keep_image=True
    ).materialize()
