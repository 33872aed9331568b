"""Training data as Ray Data streams, one per worker: sources, labels, epoch mixing, decode + augment on CPU.

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

Order: an epoch is one sequence of rows, known without reading any image. Its read chunks (a shard
file, or ``ROWS_PER_CHUNK`` rows of a folder / RecordIO source) come in a per-epoch permuted order
(``shuffle: local``); consecutive chunks are grouped into windows of at least ``shuffle_buffer``
rows, and each window's rows (with their repeats) are permuted as one. Of the first ``S * W * B``
rows (``S`` steps per epoch) worker ``r`` takes the ``r``-th contiguous range of ``S * B``; its batch
at step ``k`` is rows ``k * B ...`` of that range. So a resumed run starts reading at the window that
holds its step and decodes no row it trained on before: the work before its first new step does
not depend on how far it had trained.

:class:`TrainingData` is planned on the driver and shipped to the workers; each builds its own
stream from its step on (:meth:`TrainingData.stream`): one fused Ray Data task per window reads,
repeats, permutes, labels, decodes and augments its rows, in the plan's order.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow.parquet as pq
import torch

from facesynth import images, manifest, shards, storage
from facesynth.image_folder import list_image_folder
from recog.data_sources import RecordIOReader
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
    files: list[shards.ShardRef] = field(default_factory=list)  # shards: the committed shards
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

    @functools.cached_property
    def _offsets(self) -> np.ndarray:
        sizes = (
            [f.rows for f in self.files] if self.spec.kind == "shards" else [ROWS_PER_CHUNK] * self.num_chunks
        )
        return np.minimum(np.concatenate([[0], np.cumsum(sizes)]), self.rows)

    def chunk_keys(self, part: int, order: np.ndarray | None) -> np.ndarray:
        """The keys of chunk ``part``'s rows in read order (``order``: the epoch's row permutation)."""
        lo, hi = self._offsets[part], self._offsets[part + 1]
        if self.spec.kind == "shards":
            return self.keys[lo:hi]
        return (np.arange(self.rows) if order is None else order)[lo:hi].astype(np.int64)

    def chunk_size(self, part: int) -> int:
        return int(self._offsets[part + 1] - self._offsets[part])


def _row_keys(identity: np.ndarray, sample: np.ndarray) -> np.ndarray:
    return shards.row_seeds(0, identity, sample)


def _recordio_reader(spec: DatasetSpec) -> RecordIOReader:
    idx = spec.idx or (spec.uri[: -len(".rec")] if spec.uri.endswith(".rec") else spec.uri) + ".idx"
    return _open_recordio(spec.uri, idx)


@functools.lru_cache(maxsize=4)
def _open_recordio(rec: str, idx: str) -> RecordIOReader:
    """One reader per .rec per process: its index is parsed once, not once per chunk."""
    return RecordIOReader(rec, idx)


def _inspect_shards(spec: DatasetSpec, verify: str) -> Source:
    if verify == "sha256":
        problems = shards.verify(spec.uri)
        problems = [p for p in problems if not p.startswith("incomplete")]
        if problems:
            raise ValueError(f"data.datasets uri={spec.uri!r}: unreadable shards: {'; '.join(problems[:5])}")
    files, identities, first = [], set(), None
    for unit, rec in manifest.iter_committed(spec.uri):
        files.append(shards.shard_ref(spec.uri, unit, rec))
        identities.update(int(k) for k in rec["counts"]["per_identity"])
        first = _check_footer(spec, files[-1], first)
    if not files:
        raise ValueError(
            f"data.datasets uri={spec.uri!r}: no committed shards (no commit log, or nothing committed)"
        )
    return Source(
        spec,
        sum(f.rows for f in files),
        np.array(sorted(identities), np.int64),
        images.probe_size(first, f"{files[0].uri} row 0"),
        files=files,
    )


def _check_footer(spec: DatasetSpec, ref: shards.ShardRef, first: bytes | None) -> bytes | None:
    """Check one shard's parquet footer and row count; returns the dataset's first image once found."""
    try:
        with storage.open_input(ref.uri) as f:
            parquet = pq.ParquetFile(f)
            rows = parquet.metadata.num_rows
            if first is None and rows:
                first = parquet.read_row_group(0, columns=["image"]).column(0)[0].as_py()
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"data.datasets uri={spec.uri!r}: shard {ref.uri} is not readable parquet ({exc})"
        ) from exc
    if rows != ref.rows:
        raise ValueError(
            f"data.datasets uri={spec.uri!r}: shard {ref.uri} has {rows} rows, its commit record says {ref.rows}"
        )
    return first


def _inspect_folder(spec: DatasetSpec) -> Source:
    listing = list_image_folder(spec.uri)
    labels = np.array([label for _, label in listing], np.int64)
    first = listing[0][0]
    return Source(
        spec,
        len(listing),
        np.unique(labels),
        images.probe_size(storage.read_bytes(first), first),
        items=[uri for uri, _ in listing],
        labels=labels,
    )


def _inspect_recordio(spec: DatasetSpec) -> Source:
    reader = _recordio_reader(spec)
    if not len(reader):
        raise ValueError(f"data.datasets uri={spec.uri!r}: RecordIO file has no images")
    labels = reader.labels()
    size = images.probe_size(reader[0][0], f"{spec.uri} record 1")
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


def _chunk_rows(source: Source, part: int, order: np.ndarray | None) -> dict:
    """Encoded images, identities and keys of one chunk (``order``: the epoch's row permutation)."""
    if source.spec.kind == "shards":
        table = source.files[part].read(columns=["image", "identity", "sample"])
        identity = table["identity"].to_numpy().astype(np.int64)
        return {
            "image": table["image"].to_pylist(),
            "identity": identity,
            "key": _row_keys(identity, table["sample"].to_numpy()),
        }
    index = source.chunk_keys(part, order)
    if source.spec.kind == "folder":
        encoded = [storage.read_bytes(source.items[i]) for i in index]
    else:
        reader = _recordio_reader(source.spec)
        encoded = [reader[int(i)][0] for i in index]
    return {"image": encoded, "identity": source.labels[index], "key": index}


@dataclass
class TrainingData:
    """A run's training data as planned on the driver (see the module doc); every worker streams its part.

    ``extra_keys[epoch, i]``: the keys of source ``i``'s rows drawn once more in ``epoch`` (of ``epochs``).
    """

    sources: list[Source]
    labels: LabelMap
    cfg: DataConfig
    input_size: int
    seed: int
    epochs: int
    extra_keys: dict[tuple[int, int], np.ndarray]

    @classmethod
    def plan(
        cls,
        sources: list[Source],
        labels: LabelMap,
        cfg: DataConfig,
        *,
        input_size: int,
        seed: int,
        epochs: int,
    ) -> TrainingData:
        quotas = epoch_quotas([s.rows for s in sources], [s.spec.weight for s in sources], cfg.epoch_rows)
        extra_keys = {
            (epoch, i): epoch_extra_keys(s.keys, q % s.rows, seed, epoch, i)
            for epoch in range(epochs)
            for i, (s, q) in enumerate(zip(sources, quotas, strict=True))
            if q % s.rows
        }
        return cls(sources, labels, cfg, input_size, seed, epochs, extra_keys)

    @functools.cached_property
    def quotas(self) -> list[int]:
        """Rows each source gives an epoch."""
        return epoch_quotas(
            [s.rows for s in self.sources], [s.spec.weight for s in self.sources], self.cfg.epoch_rows
        )

    @property
    def shuffle(self) -> bool:
        return self.cfg.shuffle == "local"

    def _order(self, epoch: int, i: int) -> np.ndarray | None:
        """The epoch's row permutation of a folder / RecordIO source (None: read order)."""
        source = self.sources[i]
        if not self.shuffle or source.spec.kind == "shards":
            return None
        return np.random.default_rng([self.seed, epoch, i]).permutation(source.rows)

    def _passes(self, i: int) -> int:
        """Whole passes over source ``i`` in every epoch."""
        return self.quotas[i] // self.sources[i].rows

    def _repeats(self, epoch: int, i: int, keys: np.ndarray) -> np.ndarray:
        """How often each row (by key) appears in ``epoch``: once per pass, the drawn ones once more."""
        counts = np.full(len(keys), self._passes(i), np.int64)
        if (epoch, i) in self.extra_keys:
            counts += np.isin(keys, self.extra_keys[epoch, i])
        return counts

    def _chunk_size(self, epoch: int, i: int, part: int) -> int:
        """Rows chunk ``part`` of source ``i`` gives ``epoch``, repeats included (nothing is read)."""
        if (epoch, i) not in self.extra_keys:
            return self.sources[i].chunk_size(part) * self._passes(i)
        return int(self._repeats(epoch, i, self.sources[i].chunk_keys(part, self._order(epoch, i))).sum())

    def windows(self, epoch: int) -> list[dict]:
        """The epoch's windows in order: ``{"epoch", "window", "start", "stop", "sources", "parts"}``.

        ``start``/``stop``: the window's rows as positions in the epoch; ``sources``/``parts``: its chunks.
        """
        chunks = [
            (i, part) for i, q in enumerate(self.quotas) if q for part in range(self.sources[i].num_chunks)
        ]
        if self.shuffle:
            chunks = [chunks[k] for k in np.random.default_rng([self.seed, epoch]).permutation(len(chunks))]
        out, group, start, rows = [], [], 0, 0
        for n, (i, part) in enumerate(chunks):
            group.append((i, part))
            rows += self._chunk_size(epoch, i, part)
            if rows - start >= self.cfg.shuffle_buffer or n == len(chunks) - 1:
                ids, parts = zip(*group, strict=True)
                out.append(
                    dict(epoch=epoch, window=len(out), start=start, stop=rows, sources=ids, parts=parts)
                )
                group, start = [], rows
        return out

    def rank_windows(
        self, *, rank: int, world: int, batch_size: int, start_step: int, stop_step: int
    ) -> list[dict]:
        """The windows worker ``rank`` reads for steps ``[start_step, stop_step)``, each with the slice
        ``[lo, hi)`` of its permuted rows that is this rank's (nothing before ``start_step``)."""
        spe = steps_per_epoch(self.sources, self.cfg, world, batch_size)
        if stop_step > spe * self.epochs:
            raise ValueError(f"step {stop_step} is past the {self.epochs} epochs of {spe} steps planned")
        span = spe * batch_size  # rows per rank per epoch
        out = []
        for epoch in range(start_step // spe, math.ceil(stop_step / spe)):
            first = max(start_step - epoch * spe, 0)
            last = min(stop_step - epoch * spe, spe)
            lo, hi = rank * span + first * batch_size, rank * span + last * batch_size
            out += [
                {**w, "lo": max(lo, w["start"]) - w["start"], "hi": min(hi, w["stop"]) - w["start"]}
                for w in self.windows(epoch)
                if w["start"] < hi and lo < w["stop"]
            ]
        return out

    def read_window(self, item: dict) -> Iterator[dict]:
        """Read a window's chunks, repeat and permute its rows, then decode and augment its ``[lo, hi)`` rows.

        Yields batches of at most ``decode_batch`` rows: ``image`` uint8 ``(N, 3, S, S)``, ``label`` int64.
        """
        epoch = int(item["epoch"])
        encoded, keys, copies, classes = self._window_rows(epoch, item["sources"], item["parts"])
        if len(encoded) != item["stop"] - item["start"]:
            raise RuntimeError(
                f"epoch {epoch} window {item['window']}: {len(encoded)} rows read, planned "
                f"{item['stop'] - item['start']} (the data changed during training?)"
            )
        order = np.arange(len(encoded))
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch, int(item["window"])]).permutation(len(encoded))
        take = order[int(item["lo"]) : int(item["hi"])]
        for start in range(0, len(take), self.cfg.decode_batch):
            sub = take[start : start + self.cfg.decode_batch]
            yield {
                "image": decode_augment(
                    [encoded[k] for k in sub],
                    keys[sub],
                    copies[sub],
                    self.cfg.augment,
                    self.input_size,
                    self.seed,
                    epoch,
                ),
                "label": classes[sub],
            }

    def _window_rows(
        self, epoch: int, sources, parts
    ) -> tuple[list[bytes], np.ndarray, np.ndarray, np.ndarray]:
        """A window's rows before its permutation: encoded images, keys, copy numbers and classes."""
        encoded, keys, copies, classes = [], [], [], []
        for i, part in zip(map(int, sources), map(int, parts), strict=True):
            rows = _chunk_rows(self.sources[i], part, self._order(epoch, i))
            counts = self._repeats(epoch, i, rows["key"])
            index = np.repeat(np.arange(len(counts)), counts)
            encoded += [rows["image"][k] for k in index]
            keys.append(rows["key"][index])
            copies.append(np.arange(len(index)) - np.repeat(np.cumsum(counts) - counts, counts))
            classes.append(self.labels.classes(i, rows["identity"])[index])
        return encoded, np.concatenate(keys), np.concatenate(copies), np.concatenate(classes)

    def stream(self, *, rank: int, world: int, batch_size: int, start_step: int, stop_step: int):
        """Worker ``rank``'s Ray Data stream of decoded batches for steps ``[start_step, stop_step)``, in plan order."""
        import ray.data

        items = self.rank_windows(
            rank=rank, world=world, batch_size=batch_size, start_step=start_step, stop_step=stop_step
        )
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        ds.context.execution_options.preserve_order = True  # same seed -> same batches
        ds.context.enable_progress_bars = False  # the training loop reports progress
        return ds.map_batches(
            _read_windows,
            batch_size=1,
            num_cpus=self.cfg.decode_cpus,
            batch_format="numpy",
            fn_kwargs={"data": self},
        )


def _read_windows(batch: dict, data: TrainingData) -> Iterator[dict]:
    """Ray Data UDF over a batch of one window item."""
    for n in range(len(batch["epoch"])):
        yield from data.read_window({k: v[n] for k, v in batch.items()})


def decode_augment(
    encoded: list[bytes],
    keys: np.ndarray,
    copies: np.ndarray,
    augments: list,
    input_size: int,
    seed: int,
    epoch: int,
) -> np.ndarray:
    """Decode each image, check its size and augment it: uint8 ``(N, 3, S, S)``."""
    out = np.empty((len(encoded), 3, input_size, input_size), np.uint8)
    for n, (data, key, copy) in enumerate(zip(encoded, keys, copies, strict=True)):
        what = f"training image (row key {int(key)})"
        rgb = images.decode(data, what)
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
