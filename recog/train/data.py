"""Training data as one Ray Data stream: sources, labels, epoch mixing, decode + augment on CPU.

Sources (``DatasetSpec.kind``): facesynth shard datasets (committed shards only), image folders
(one sub-folder per identity) and insightface RecordIO ``.rec/.idx``. Each is inspected once on
the driver before training (row count, identities, readable shards, first image size); ``key``
names a row stably across epochs (a hash of identity and sample for shards, the file/record index
otherwise).

Labels: ``label_space: per_dataset`` gives every source its own classes (source 0's identities in
sorted order first, then source 1's, ...); ``shared`` maps equal identity values of all sources
to one class. The map is saved with every checkpoint and export.

Mixing: an epoch has ``E = data.epoch_rows`` rows (default: the sum of all source sizes). Source
``i`` contributes exactly ``k_i`` rows, its weight's share of ``E`` (largest-remainder rounding),
drawn anew each epoch: every row ``k_i // n_i`` times plus ``k_i % n_i`` rows chosen without
replacement by a generator seeded with (seed, epoch, i). With one source and no ``epoch_rows`` an
epoch is a plain pass over the data. With ``W`` workers and batch ``B`` an epoch gives
``(E // W) // B`` steps per worker.

The stream is planned on the driver as a list of read chunks (a shard file, or ``ROWS_PER_CHUNK``
rows of a folder / RecordIO source), epoch after epoch; ``shuffle: local`` permutes the chunks of
each epoch and the rows inside each chunk (and the trainer adds a local shuffle buffer). One
fused Ray Data task per chunk reads, repeats, labels, decodes and augments its rows, so the whole
run is a single streaming operator whose output order is the plan's.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np
import pyarrow.parquet as pq
import torch

from facesynth import manifest, shards, storage
from facesynth.binsets import decode_rgb
from recog.data_sources import RecordIOReader, list_image_folder
from recog.train.augment import augment_image, row_rng
from recog.train.config import DataConfig, DatasetSpec

ROWS_PER_CHUNK = 1024  # rows per read task of image-folder / RecordIO sources


@dataclass
class Source:
    """A training source inspected on the driver: size, sorted identities and how to read it."""

    spec: DatasetSpec
    rows: int
    identities: np.ndarray
    image_size: tuple[int, int]
    files: list[str] = field(default_factory=list)  # shards: committed shard URIs
    items: list[str] = field(default_factory=list)  # folder: image URIs, row-aligned with labels
    labels: np.ndarray | None = None  # folder / recordio: identity of every row

    @functools.cached_property
    def keys(self) -> np.ndarray:
        """The ``key`` of every row, in read order (a column scan for shards, done once)."""
        if self.spec.kind != "shards":
            return np.arange(self.rows, dtype=np.int64)
        tables = list(shards.iter_tables(self.spec.uri, columns=["identity", "sample"]))
        return np.concatenate([_row_keys(t["identity"].to_numpy(), t["sample"].to_numpy()) for t in tables])

    @property
    def num_chunks(self) -> int:
        """Read chunks of one pass: shard files, or blocks of ``ROWS_PER_CHUNK`` rows."""
        return len(self.files) if self.spec.kind == "shards" else math.ceil(self.rows / ROWS_PER_CHUNK)


def _row_keys(identity: np.ndarray, sample: np.ndarray) -> np.ndarray:
    return shards.row_seeds(0, identity, sample)


def _recordio_reader(spec: DatasetSpec) -> RecordIOReader:
    idx = spec.idx or (spec.uri[: -len(".rec")] if spec.uri.endswith(".rec") else spec.uri) + ".idx"
    return _open_recordio(spec.uri, idx)


@functools.lru_cache(maxsize=4)
def _open_recordio(rec: str, idx: str) -> RecordIOReader:
    """One reader per .rec per process: its index is parsed once, not once per chunk."""
    return RecordIOReader(rec, idx)


def _image_size(data: bytes, what: str) -> tuple[int, int]:
    return tuple(decode_rgb(data, what).shape[:2])


def _inspect_shards(spec: DatasetSpec, verify: str) -> Source:
    m = manifest.load(spec.uri)
    if not m.shards:
        raise ValueError(
            f"data.datasets uri={spec.uri!r}: no committed shards (no manifest.json or it is empty)"
        )
    if verify == "sha256":
        problems = shards.verify(spec.uri)
        problems = [p for p in problems if not p.startswith("incomplete")]
        if problems:
            raise ValueError(f"data.datasets uri={spec.uri!r}: unreadable shards: {'; '.join(problems[:5])}")
    files = shards.committed_files(spec.uri)
    first = None
    for uri, unit in zip(files, sorted(m.shards), strict=True):
        try:
            with storage.open_input(uri) as f:
                parquet = pq.ParquetFile(f)
                rows = parquet.metadata.num_rows
                if first is None and rows:
                    first = parquet.read_row_group(0, columns=["image"]).column(0)[0].as_py()
        except (OSError, ValueError) as exc:
            raise ValueError(
                f"data.datasets uri={spec.uri!r}: shard {uri} is not readable parquet ({exc})"
            ) from exc
        if rows != m.shards[unit]["rows"]:
            raise ValueError(
                f"data.datasets uri={spec.uri!r}: shard {uri} has {rows} rows, "
                f"the manifest says {m.shards[unit]['rows']}"
            )
    identities = sorted({int(k) for rec in m.shards.values() for k in rec["counts"]["per_identity"]})
    return Source(
        spec,
        sum(rec["rows"] for rec in m.shards.values()),
        np.array(identities, np.int64),
        _image_size(first, f"{files[0]} row 0"),
        files=files,
    )


def _inspect_folder(spec: DatasetSpec) -> Source:
    listing = list_image_folder(spec.uri)
    labels = np.array([label for _, label in listing], np.int64)
    first = listing[0][0]
    return Source(
        spec,
        len(listing),
        np.unique(labels),
        _image_size(storage.read_bytes(first), first),
        items=[uri for uri, _ in listing],
        labels=labels,
    )


def _inspect_recordio(spec: DatasetSpec) -> Source:
    reader = _recordio_reader(spec)
    if not len(reader):
        raise ValueError(f"data.datasets uri={spec.uri!r}: RecordIO file has no images")
    labels = reader.labels()
    size = _image_size(reader[0][0], f"{spec.uri} record 1")
    return Source(spec, len(labels), np.unique(labels), size, labels=labels)


def inspect_source(spec: DatasetSpec, input_size: int, verify: str = "footer") -> Source:
    """Check one source before training: readable, non-empty, images of ``input_size`` pixels."""
    if spec.kind == "shards":
        source = _inspect_shards(spec, verify)
    elif spec.kind == "folder":
        source = _inspect_folder(spec)
    else:
        source = _inspect_recordio(spec)
    if source.image_size != (input_size, input_size):
        h, w = source.image_size
        raise ValueError(
            f"data.datasets uri={spec.uri!r}: images are {h}x{w} pixels, expected "
            f"model.input_size={input_size} ({input_size}x{input_size}); resize the dataset "
            "or change model.input_size"
        )
    return source


@dataclass(frozen=True)
class LabelMap:
    """Contiguous class indices for (source, identity) pairs; see the module doc for the two label spaces."""

    shared: bool
    identities: tuple[np.ndarray, ...]  # per source (one array when shared), sorted
    offsets: tuple[int, ...]

    @classmethod
    def build(cls, sources: list[Source], label_space: str) -> LabelMap:
        if label_space == "shared":
            return cls(True, (np.unique(np.concatenate([s.identities for s in sources])),), (0,))
        offsets = np.cumsum([0] + [len(s.identities) for s in sources[:-1]])
        return cls(False, tuple(s.identities for s in sources), tuple(int(o) for o in offsets))

    @property
    def num_classes(self) -> int:
        return self.offsets[-1] + len(self.identities[-1])

    def classes(self, source: int, identity: np.ndarray) -> np.ndarray:
        """Class index of every ``identity`` value of rows from ``source``."""
        i = 0 if self.shared else source
        ids = self.identities[i]
        pos = np.searchsorted(ids, identity).clip(0, len(ids) - 1)
        unknown = ids[pos] != identity
        if unknown.any():
            raise ValueError(f"source {source}: identity {int(identity[unknown][0])} is not in the label map")
        return pos + self.offsets[i]

    def to_json(self, uris: list[str]) -> dict:
        """``class_identity[c]``: ``[source uri, identity]`` of class ``c``."""
        names = [None] if self.shared else uris
        return {
            "label_space": "shared" if self.shared else "per_dataset",
            "class_identity": [
                [n, int(x)] for n, ids in zip(names, self.identities, strict=True) for x in ids
            ],
        }

    @classmethod
    def from_json(cls, data: dict) -> LabelMap:
        shared = data["label_space"] == "shared"
        groups: dict = {}
        for name, identity in data["class_identity"]:
            groups.setdefault(name, []).append(identity)
        ids = tuple(np.array(v, np.int64) for v in groups.values())
        return cls(shared, ids, tuple(int(o) for o in np.cumsum([0] + [len(v) for v in ids[:-1]])))


def inspect_data(cfg: DataConfig, input_size: int) -> tuple[list[Source], LabelMap]:
    """Inspect every source and build the label map; at least two classes are required."""
    sources = [inspect_source(spec, input_size, cfg.verify) for spec in cfg.datasets]
    labels = LabelMap.build(sources, cfg.label_space)
    if labels.num_classes < 2:
        uris = [s.spec.uri for s in sources]
        raise ValueError(
            f"data.datasets {uris}: {labels.num_classes} identity in all; training a face "
            "classifier needs at least 2 identities"
        )
    return sources, labels


def epoch_quotas(rows: list[int], weights: list[float], epoch_rows: int | None) -> list[int]:
    """Rows each source contributes to an epoch: its weight's share of ``epoch_rows`` (largest remainder)."""
    total = epoch_rows or sum(rows)
    share = np.asarray(weights, np.float64) / np.sum(weights) * total
    quotas = np.floor(share).astype(np.int64)
    order = np.argsort(-(share - quotas), kind="stable")
    quotas[order[: total - int(quotas.sum())]] += 1
    return quotas.tolist()


def epoch_extra_keys(keys: np.ndarray, extra: int, seed: int, epoch: int, source: int) -> np.ndarray:
    """Sorted keys of the ``extra`` rows drawn (without replacement) on top of the whole passes."""
    rng = np.random.default_rng([seed, epoch, source])
    return np.sort(keys[rng.permutation(len(keys))[:extra]])


def chunk_plan(sources: list[Source], cfg: DataConfig, *, seed: int, epochs: int) -> list[dict]:
    """The run's read chunks in stream order: ``{"epoch", "source", "part"}`` per chunk."""
    plan = []
    quotas = epoch_quotas([s.rows for s in sources], [s.spec.weight for s in sources], cfg.epoch_rows)
    for epoch in range(epochs):
        chunks = [
            (i, part)
            for i, (s, q) in enumerate(zip(sources, quotas, strict=True))
            if q
            for part in range(s.num_chunks)
        ]
        if cfg.shuffle == "local":
            chunks = [chunks[k] for k in np.random.default_rng([seed, epoch]).permutation(len(chunks))]
        plan.extend({"epoch": epoch, "source": i, "part": part} for i, part in chunks)
    return plan


def _chunk_rows(source: Source, part: int, order: np.ndarray | None) -> dict:
    """Encoded images, identities and keys of one chunk (``order``: the epoch's row permutation)."""
    if source.spec.kind == "shards":
        with storage.open_input(source.files[part]) as f:
            table = pq.read_table(f, columns=["image", "identity", "sample"])
        identity = table["identity"].to_numpy().astype(np.int64)
        return {
            "image": table["image"].to_pylist(),
            "identity": identity,
            "key": _row_keys(identity, table["sample"].to_numpy()),
        }
    rows = np.arange(source.rows) if order is None else order
    index = rows[part * ROWS_PER_CHUNK : (part + 1) * ROWS_PER_CHUNK]
    if source.spec.kind == "folder":
        images = [storage.read_bytes(source.items[i]) for i in index]
    else:
        reader = _recordio_reader(source.spec)
        images = [reader[int(i)][0] for i in index]
    return {"image": images, "identity": source.labels[index], "key": index.astype(np.int64)}


def read_chunks(
    batch: dict,
    sources: list[Source],
    labels: LabelMap,
    extra_keys: dict,
    cfg: DataConfig,
    input_size: int,
    seed: int,
):
    """Ray Data UDF: read each planned chunk, repeat its rows, shuffle them, decode and augment them.

    Yields batches of at most ``cfg.decode_batch`` rows: ``image`` uint8 ``(N, 3, S, S)``, ``label`` int64.
    """
    quotas = epoch_quotas([s.rows for s in sources], [s.spec.weight for s in sources], cfg.epoch_rows)
    for epoch, i, part in zip(batch["epoch"], batch["source"], batch["part"], strict=True):
        source, epoch, i = sources[i], int(epoch), int(i)
        shuffle = cfg.shuffle == "local"
        order = np.random.default_rng([seed, epoch, i]).permutation(source.rows) if shuffle else None
        rows = _chunk_rows(source, int(part), order if source.spec.kind != "shards" else None)
        counts = np.full(len(rows["key"]), quotas[i] // source.rows, np.int64)
        if (epoch, i) in extra_keys:
            counts += np.isin(rows["key"], extra_keys[epoch, i])
        index = np.repeat(np.arange(len(counts)), counts)
        copy = np.arange(len(index)) - np.repeat(np.cumsum(counts) - counts, counts)
        if shuffle:
            perm = np.random.default_rng([seed, epoch, i, int(part)]).permutation(len(index))
            index, copy = index[perm], copy[perm]
        classes = labels.classes(i, rows["identity"])
        for start in range(0, len(index), cfg.decode_batch):
            sub = slice(start, start + cfg.decode_batch)
            yield {
                "image": decode_augment(
                    [rows["image"][k] for k in index[sub]],
                    rows["key"][index[sub]],
                    copy[sub],
                    cfg.augment,
                    input_size,
                    seed,
                    epoch,
                ),
                "label": classes[index[sub]],
            }


def decode_augment(
    images: list[bytes],
    keys: np.ndarray,
    copies: np.ndarray,
    augments: list,
    input_size: int,
    seed: int,
    epoch: int,
) -> np.ndarray:
    """Decode each image, check its size and augment it: uint8 ``(N, 3, S, S)``."""
    out = np.empty((len(images), 3, input_size, input_size), np.uint8)
    for n, (data, key, copy) in enumerate(zip(images, keys, copies, strict=True)):
        what = f"training image (row key {int(key)})"
        rgb = decode_rgb(data, what)
        if rgb.shape[:2] != (input_size, input_size):
            raise ValueError(f"{what} is {rgb.shape[0]}x{rgb.shape[1]}, expected {input_size}x{input_size}")
        image = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))
        out[n] = augment_image(image, augments, row_rng(seed, epoch, int(key), int(copy))).numpy()
    return out


def steps_per_epoch(sources: list[Source], cfg: DataConfig, num_workers: int, batch_size: int) -> int:
    """Optimiser steps one epoch gives every worker; error if an epoch cannot fill one batch per worker."""
    epoch_rows = sum(
        epoch_quotas([s.rows for s in sources], [s.spec.weight for s in sources], cfg.epoch_rows)
    )
    steps = epoch_rows // num_workers // batch_size
    if steps < 1:
        raise ValueError(
            f"train.batch_size={batch_size}: an epoch has {epoch_rows} rows, fewer than one batch "
            f"for each of scaling.num_workers={num_workers}; lower the batch size or add data"
        )
    return steps


def training_stream(
    sources: list[Source], labels: LabelMap, cfg: DataConfig, *, input_size: int, seed: int, epochs: int
):
    """The whole run's stream of decoded, augmented batches: ``epochs`` epochs one after another."""
    import ray.data

    quotas = epoch_quotas([s.rows for s in sources], [s.spec.weight for s in sources], cfg.epoch_rows)
    extra_keys = {
        (epoch, i): epoch_extra_keys(s.keys, q % s.rows, seed, epoch, i)
        for epoch in range(epochs)
        for i, (s, q) in enumerate(zip(sources, quotas, strict=True))
        if q % s.rows
    }
    plan = chunk_plan(sources, cfg, seed=seed, epochs=epochs)
    return ray.data.from_items(plan, override_num_blocks=len(plan)).map_batches(
        read_chunks,
        batch_size=1,
        num_cpus=cfg.decode_cpus,
        batch_format="numpy",
        fn_kwargs={
            "sources": sources,
            "labels": labels,
            "extra_keys": extra_keys,
            "cfg": cfg,
            "input_size": input_size,
            "seed": seed,
        },
    )
