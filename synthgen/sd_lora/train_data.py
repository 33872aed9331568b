"""LoRA training images: a shard dataset (``identity_name`` names the person) or an image folder per person.

Preparation runs once on the driver, through Ray Data: decode, resize the short side to ``resolution`` (area
filter), centre-crop the square, PNG-encode; the rows (``image``, ``name``, ``key``) are sorted by ``key``
(shards: identity and sample; folders: the file path), so the table is the same however Ray Data scheduled
it, and written as one parquet file that every worker reads.

Batch order: worker ``rank`` of ``world`` takes, at step ``t``, the positions ``g = (t * world + rank) * B + j``
(``j < B``) of an endless stream of epochs; position ``g`` is row ``perm_e[g mod n]`` with ``e = g // n`` and
``perm_e`` the permutation of the ``n`` rows drawn from ``(seed, e)``. It depends only on (seed, step, rank,
world, B, n), so a run resumed at step k reads exactly the batches the uninterrupted run read from step k on.
"""

from __future__ import annotations

import io
from collections import Counter

import numpy as np
import pyarrow as pa
from pydantic import Field, field_validator, model_validator

from facesynth import images, shards, storage
from facesynth.config import StrictModel
from facesynth.image_folder import identity_name, list_image_folder
from synthgen.sd_lora.prompts import fill


class LoraData(StrictModel):
    """Where the training images come from and how they become (image, caption) pairs."""

    dataset: str | None = Field(None, description="shard dataset URI (its identity_name column names people)")
    image_folder: str | None = Field(None, description="folder URI: <image_folder>/<name>/<image>")
    identities: list[str] | None = Field(
        None, description="names to train on (default: all); each needs at least one image"
    )
    caption: str = Field("a photo of {name}", description="caption template; {name}: the identity's name")
    resolution: int = Field(512, ge=8, multiple_of=8, description="square training size in pixels")
    flip: bool = Field(True, description="random horizontal flips (p=0.5, from the step seed)")

    @model_validator(mode="after")
    def _one_source(self) -> LoraData:
        if (self.dataset is None) == (self.image_folder is None):
            raise ValueError("expected exactly one of dataset (shards) or image_folder")
        return self

    @field_validator("caption")
    @classmethod
    def _known_placeholders(cls, caption: str) -> str:
        fill(caption, {"name": "x"}, "caption")
        return caption

    @property
    def source(self) -> str:
        return self.dataset if self.dataset is not None else self.image_folder

    def captions(self, names) -> list[str]:
        return [self.caption.format(name=n) for n in names]


def _shard_name(name: str | None, identity: int) -> str:
    return name or f"identity-{identity}"


def image_counts(data: LoraData) -> dict[str, int]:
    """Images per identity name that training will use; ValueError naming the key for unusable data."""
    if data.dataset is not None:
        try:
            shards.committed_shards(data.dataset)
        except FileNotFoundError as exc:
            raise ValueError(f"data.dataset: {exc}") from None
        counts: Counter = Counter()
        for table in shards.iter_tables(data.dataset, columns=["identity", "identity_name"]):
            names, ids = table["identity_name"].to_pylist(), table["identity"].to_pylist()
            counts.update(_shard_name(n, i) for n, i in zip(names, ids))
    else:
        try:
            listing = list_image_folder(data.image_folder)
        except ValueError as exc:
            raise ValueError(f"data.image_folder: {exc}") from None
        counts = Counter(identity_name(data.image_folder, uri) for uri, _ in listing)
    if data.identities is None:
        return dict(sorted(counts.items()))
    missing = [n for n in data.identities if not counts.get(n)]
    if missing:
        raise ValueError(
            f"data.identities: {missing} have no images in {data.source} (found: {sorted(counts)[:10]})"
        )
    return {n: counts[n] for n in sorted(set(data.identities))}


def square(image: np.ndarray, size: int) -> np.ndarray:
    """Short side resized to ``size`` (area filter), then the centred ``size`` x ``size`` crop."""
    image = images.resize_short(image, size) if min(image.shape[:2]) != size else image
    top, left = (image.shape[0] - size) // 2, (image.shape[1] - size) // 2
    return np.ascontiguousarray(image[top : top + size, left : left + size])


def _prepared(encoded, names, keys, size: int, keep: set[str] | None) -> dict:
    rows = [k for k, n in enumerate(names) if keep is None or n in keep]
    faces = [square(images.decode(encoded[k], f"training image {keys[k]}"), size) for k in rows]
    return {
        "image": np.array(images.encode(np.stack(faces)) if faces else [], dtype=object),
        "name": np.array([names[k] for k in rows], dtype=object),
        "key": np.array([keys[k] for k in rows], dtype=object),
    }


def _prepare_shard_rows(batch: dict, size: int, keep: list[str] | None) -> dict:
    names = [_shard_name(n, int(i)) for n, i in zip(batch["identity_name"], batch["identity"])]
    keys = [f"{int(i):020d}/{int(s):020d}" for i, s in zip(batch["identity"], batch["sample"])]
    return _prepared(list(batch["image"]), names, keys, size, None if keep is None else set(keep))


def _prepare_files(batch: dict, size: int) -> dict:
    encoded = [storage.read_bytes(uri) for uri in batch["uri"]]
    return _prepared(encoded, list(batch["name"]), list(batch["uri"]), size, None)


def prepare_images(data: LoraData, uri: str) -> int:
    """Write the prepared training table (``image`` PNG, ``name``, ``key``; sorted by key) to ``uri``."""
    import pyarrow.parquet as pq
    import ray.data

    if data.dataset is not None:
        ds = shards.read_dataset(data.dataset, columns=["image", "identity", "identity_name", "sample"])
        ds = ds.map_batches(
            _prepare_shard_rows,
            fn_kwargs={"size": data.resolution, "keep": data.identities},
            batch_format="numpy",
        )
    else:
        listing = list_image_folder(data.image_folder)
        keep = None if data.identities is None else set(data.identities)
        items = [
            {"uri": u, "name": identity_name(data.image_folder, u)}
            for u, _ in listing
            if keep is None or identity_name(data.image_folder, u) in keep
        ]
        ds = ray.data.from_items(items).map_batches(
            _prepare_files, fn_kwargs={"size": data.resolution}, batch_format="numpy"
        )
    columns: dict[str, list] = {"image": [], "name": [], "key": []}
    for batch in ds.iter_batches(batch_format="numpy"):
        for k, values in columns.items():
            values.extend(batch[k].tolist())
    table = pa.table(
        {
            "image": pa.array(columns["image"], pa.binary()),
            "name": pa.array(columns["name"], pa.string()),
            "key": pa.array(columns["key"], pa.string()),
        }
    ).sort_by("key")
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    storage.write_bytes(uri, buffer.getvalue())
    return len(table)


def read_images(uri: str) -> pa.Table:
    """The prepared training table written by :func:`prepare_images`."""
    import pyarrow.parquet as pq

    return pq.read_table(io.BytesIO(storage.read_bytes(uri)))


def batch_rows(step: int, rank: int, world: int, batch: int, n: int, seed: int) -> np.ndarray:
    """Row indices of worker ``rank``'s batch at ``step`` (see the module doc)."""
    positions = (step * world + rank) * batch + np.arange(batch)
    epochs = positions // n
    out = np.empty(batch, np.int64)
    for e in np.unique(epochs):
        perm = np.random.default_rng([seed, int(e)]).permutation(n)
        picked = epochs == e
        out[picked] = perm[positions[picked] % n]
    return out


def load_batch(table: pa.Table, rows: np.ndarray, generator, flip: bool):
    """Decoded rows as a float tensor in [-1, 1], NCHW, each flipped left-right with p=0.5 when ``flip``
    (drawn from ``generator``), and their identity names."""
    import torch

    encoded = table["image"].take(pa.array(rows)).to_pylist()
    pixels = np.stack([images.decode(e, "prepared training image") for e in encoded])
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1
    if flip:
        mask = torch.rand(len(x), generator=generator) < 0.5
        x = torch.where(mask[:, None, None, None], x.flip(-1), x)
    return x, table["name"].take(pa.array(rows)).to_pylist()
