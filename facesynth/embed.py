"""Embed images with an exported face model (``model.json``): shard datasets or image arrays, on Ray or in-process.

Shard datasets:
:func:`plan_embedding` checks everything cheaply before any model runs (the judge's ``model.json``
and weights file, committed rows, the image size against the judge's ``input_size``) and picks a
deterministic subset of rows from the ``identity`` and ``sample`` columns alone. :func:`run_embedding`
streams the committed shards of one or more planned datasets through :class:`ShardEmbedder` actors
(the judge loaded once per actor; rows outside the subset dropped before their PNGs are decoded)
and returns each dataset's embeddings in its row order (committed shards in unit order, rows in
file order); :func:`embedding_dataset` is the same pipeline as a lazy Ray Dataset (with the encoded
image kept, for trainers that need pixels and embeddings together).

Image arrays: :class:`EmbedPool` (Ray actors that each hold the model, reused across sets) and
:func:`embed_with_ray`; in-process, :func:`facesynth.face_model.load_face_model` directly.

Used by the UIFace trainer, the quality job, evaluation and cross-domain alike."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from facesynth import images, shards, storage
from facesynth.face_model import EmbeddedImages, ModelSpec, check_images, load_face_model, read_spec

KEY_COLUMNS = ("identity", "sample")


@dataclass(frozen=True)
class Subset:
    """Rows kept: identity in ``identities`` (sorted) with sample <= that identity's ``last_sample``."""

    identities: np.ndarray
    last_sample: np.ndarray

    def mask(self, identities: np.ndarray, samples: np.ndarray) -> np.ndarray:
        """Boolean mask of the rows ``(identities[i], samples[i])`` that belong to the subset."""
        identities, samples = np.asarray(identities, np.int64), np.asarray(samples, np.int64)
        pos = np.minimum(np.searchsorted(self.identities, identities), len(self.identities) - 1)
        return (self.identities[pos] == identities) & (samples <= self.last_sample[pos])


def choose_subset(
    identities: np.ndarray,
    samples: np.ndarray,
    max_identities: int | None = None,
    max_images_per_identity: int | None = None,
) -> Subset:
    """Deterministic subset: ``max_identities`` ids evenly spaced over the sorted ids, and of each
    the rows with the ``max_images_per_identity`` smallest sample numbers (``None``: all)."""
    identities, samples = np.asarray(identities, np.int64), np.asarray(samples, np.int64)
    if len(identities) == 0 or len(identities) != len(samples):
        raise ValueError(
            f"identities ({len(identities)},) and samples ({len(samples)},): expected equal, non-zero lengths"
        )
    for name, value in (
        ("max_identities", max_identities),
        ("max_images_per_identity", max_images_per_identity),
    ):
        if value is not None and value < 1:
            raise ValueError(f"{name}={value}: expected >= 1 or None (no limit)")
    ids = np.unique(identities)
    if max_identities is not None and max_identities < len(ids):
        ids = ids[np.linspace(0, len(ids) - 1, max_identities).astype(np.int64)]
    order = np.lexsort((samples, identities))
    sorted_ids, sorted_samples = identities[order], samples[order]
    first = np.searchsorted(sorted_ids, ids)
    count = np.searchsorted(sorted_ids, ids, side="right") - first
    keep = count if max_images_per_identity is None else np.minimum(count, max_images_per_identity)
    return Subset(identities=ids, last_sample=sorted_samples[first + keep - 1])


@dataclass(frozen=True)
class EmbedPlan:
    """A checked embedding job: dataset, judge and its spec, the row subset and its size."""

    dataset: str
    judge: str
    spec: ModelSpec
    subset: Subset
    rows: int
    resize: bool


@dataclass(frozen=True)
class EmbeddedDataset:
    """Row i: ``embeddings[i]`` (float32, unit length) of an image of ``identities[i]``;
    ``columns`` holds ``sample`` and the requested extra columns (e.g. ``t0``, ``prompt``) per row."""

    embeddings: np.ndarray
    identities: np.ndarray
    columns: dict[str, np.ndarray]


def _missing_judge_file(judge_uri: str, name: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"judge={judge_uri!r}: {name} not found; expected an exported face-model folder "
        "(model.json + the weights file it names, as written by recog.export.export_embedder)"
    )


def judge_spec(judge_uri: str) -> ModelSpec:
    """The judge's validated ``model.json``; FileNotFoundError naming the judge if it or its weights are missing."""
    if not storage.exists(storage.join(judge_uri, "model.json")):
        raise _missing_judge_file(judge_uri, "model.json")
    spec = read_spec(judge_uri)
    if not storage.exists(storage.join(judge_uri, spec.file)):
        raise _missing_judge_file(judge_uri, spec.file)
    return spec


def _size_error(what: str, size: tuple[int, int], expected: tuple[int, int]) -> ValueError:
    return ValueError(
        f"{what}: image is {size[0]}x{size[1]} pixels but the judge expects {expected[0]}x{expected[1]} "
        "(model.json input_size); set resize=true to resize bilinearly, or align the faces first"
    )


def plan_embedding(
    dataset_uri: str,
    judge_uri: str,
    *,
    max_identities: int | None = None,
    max_images_per_identity: int | None = None,
    resize: bool = False,
) -> EmbedPlan:
    """Check the judge and the dataset without running the model and choose the rows to embed.

    Raises FileNotFoundError for a missing judge or a dataset without committed shards, and
    ValueError for a dataset without rows or (unless ``resize``) a first image whose size is not
    the judge's ``input_size``.
    """
    spec = judge_spec(judge_uri)
    tables = list(shards.iter_tables(dataset_uri, columns=list(KEY_COLUMNS)))
    identities = np.concatenate([t.column("identity").to_numpy() for t in tables])
    if len(identities) == 0:
        raise ValueError(
            f"dataset={dataset_uri!r}: its committed shards hold no rows; expected images to judge"
        )
    samples = np.concatenate([t.column("sample").to_numpy() for t in tables])
    subset = choose_subset(identities, samples, max_identities, max_images_per_identity)
    if not resize:
        for table in shards.iter_tables(dataset_uri, columns=["image", *KEY_COLUMNS]):
            hit = np.flatnonzero(
                subset.mask(table.column("identity").to_numpy(), table.column("sample").to_numpy())
            )
            if len(hit):
                size = images.probe_size(
                    table.column("image")[int(hit[0])].as_py(), f"dataset={dataset_uri!r}"
                )
                if size != tuple(spec.input_size):
                    raise _size_error(f"dataset={dataset_uri!r}", size, tuple(spec.input_size))
                break
    rows = int(subset.mask(identities, samples).sum())
    return EmbedPlan(dataset_uri, judge_uri, spec, subset, rows, resize)


def decode_faces(encoded: Sequence[bytes], size: tuple[int, int], resize: bool, what: str) -> np.ndarray:
    """Decode encoded images to uint8 RGB ``(N, H, W, 3)`` of ``size`` (H, W); resize with PIL bilinear
    when ``resize``, else a different size is a ValueError naming both sizes."""
    hint = "; set resize=true to resize bilinearly, or align the faces first"
    return images.decode_to_size(
        encoded, size, resize="bilinear" if resize else "exact", what=f"{what} row", hint=hint
    )


class ShardEmbedder:
    """Ray Data callable class: loads the judge once, then maps shard batches to embedding batches.

    A batch row's ``source`` column is the index of its dataset's plan in ``plans`` (all plans
    share one judge), so one actor pool embeds several datasets in one pass.
    """

    def __init__(
        self, plans: Sequence[EmbedPlan], device: str, batch_size: int, flip: bool, columns: Sequence[str]
    ):
        self.plans = list(plans)
        self.embedder = load_face_model(plans[0].judge, device=device)
        self.batch_size = batch_size
        self.flip = flip
        self.columns = ["source", "identity", "sample", *columns]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        sources = np.unique(batch["source"]).tolist() or [0]  # an empty batch gives empty columns
        parts = [self._embed(self.plans[source], batch, batch["source"] == source) for source in sources]
        return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}

    def _embed(
        self, plan: EmbedPlan, batch: dict[str, np.ndarray], rows: np.ndarray
    ) -> dict[str, np.ndarray]:
        keep = np.flatnonzero(rows)
        keep = keep[plan.subset.mask(batch["identity"][keep], batch["sample"][keep])]
        out = {name: np.asarray(batch[name])[keep] for name in self.columns}
        if len(keep) == 0:
            out["embedding"] = np.zeros((0, plan.spec.embedding_dim), np.float32)
            return out
        size, what = tuple(plan.spec.input_size), f"dataset={plan.dataset!r}"
        faces = decode_faces([batch["image"][i] for i in keep], size, plan.resize, what)
        out["embedding"] = self.embedder.embed(faces, self.batch_size, self.flip).astype(np.float32)
        return out


def read_faces(plan: EmbedPlan, subset: Subset) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decoded images (as the judge sees them), identities and samples of the rows in ``subset``,
    in dataset order, read in this process (for sample grids and LPIPS on a few images)."""
    faces, identities, samples = [], [], []
    for table in shards.iter_tables(plan.dataset, columns=["image", *KEY_COLUMNS]):
        ids, smp = table.column("identity").to_numpy(), table.column("sample").to_numpy()
        hit = np.flatnonzero(subset.mask(ids, smp))
        if len(hit):
            encoded = table.column("image").take(hit).to_pylist()
            what = f"dataset={plan.dataset!r}"
            faces.append(decode_faces(encoded, tuple(plan.spec.input_size), plan.resize, what))
            identities.append(ids[hit].astype(np.int64))
            samples.append(smp[hit].astype(np.int64))
    if not faces:
        raise ValueError(f"dataset={plan.dataset!r}: no rows in the requested subset")
    return np.concatenate(faces), np.concatenate(identities), np.concatenate(samples)


def _source_column(source: int, table: pa.Table) -> pa.Array:
    return pa.array(np.full(table.num_rows, source, np.int64))


def _check_plans(plans: Sequence[EmbedPlan], batch_size: int, num_workers: int) -> None:
    if batch_size < 1 or num_workers < 1 or not plans:
        raise ValueError(
            f"batch_size={batch_size}, num_workers={num_workers}, {len(plans)} plans: expected >= 1 of each"
        )
    judges = sorted({plan.judge for plan in plans})
    if len(judges) != 1:
        raise ValueError(f"plans judged by {judges}: expected one shared judge")


def embedding_dataset(
    plans: Sequence[EmbedPlan],
    *,
    batch_size: int = 64,
    num_workers: int = 1,
    num_gpus_per_worker: float = 0.0,
    num_cpus_per_worker: float = 1.0,
    flip: bool = True,
    columns: Sequence[str] = (),
    keep_image: bool = False,
):
    """The planned rows of every plan as one lazy Ray Dataset: ``source`` (plan index), ``identity``,
    ``sample``, ``columns``, ``embedding`` (and ``image`` with ``keep_image``), in plan and row order.

    The datasets stream through ``num_workers`` :class:`ShardEmbedder` actors (CUDA when given GPUs),
    so each actor loads the judge once.
    """
    import ray.data

    _check_plans(plans, batch_size, num_workers)
    read = ["image", *KEY_COLUMNS, *columns]
    sources = [
        shards.read_dataset(plan.dataset, columns=read).add_column(
            "source", functools.partial(_source_column, i), batch_format="pyarrow"
        )
        for i, plan in enumerate(plans)
    ]
    ds = sources[0].union(*sources[1:]) if len(sources) > 1 else sources[0]
    ds.context.execution_options.preserve_order = True
    return ds.map_batches(
        ShardEmbedder,
        fn_constructor_kwargs=_embedder_args(
            plans, num_gpus_per_worker, batch_size, flip, columns, keep_image
        ),
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=num_workers),
        num_gpus=num_gpus_per_worker,
        num_cpus=num_cpus_per_worker,
    )


def _embedder_args(plans, num_gpus_per_worker, batch_size, flip, columns, keep_image) -> dict:
    return {
        "plans": tuple(plans),
        "device": "cuda" if num_gpus_per_worker > 0 else "cpu",
        "batch_size": batch_size,
        "flip": flip,
        "columns": (*columns, "image") if keep_image else tuple(columns),
    }


def run_embedding(
    plans: Sequence[EmbedPlan],
    *,
    batch_size: int = 64,
    num_workers: int = 1,
    num_gpus_per_worker: float = 0.0,
    num_cpus_per_worker: float = 1.0,
    flip: bool = True,
    columns: Sequence[str] = ("t0", "prompt"),
    use_ray: bool = True,
) -> list[EmbeddedDataset]:
    """Embed the planned rows of every plan (one shared judge), each in its dataset's order.

    With ``use_ray`` through :func:`embedding_dataset`; otherwise the same :class:`ShardEmbedder` runs in
    this process.
    """
    _check_plans(plans, batch_size, num_workers)
    if use_ray:
        ds = embedding_dataset(
            plans,
            batch_size=batch_size,
            num_workers=num_workers,
            num_gpus_per_worker=num_gpus_per_worker,
            num_cpus_per_worker=num_cpus_per_worker,
            flip=flip,
            columns=columns,
        )
        parts = list(ds.iter_batches(batch_size=None, batch_format="numpy"))
    else:
        read = ["image", *KEY_COLUMNS, *columns]
        embedder = ShardEmbedder(
            **_embedder_args(plans, num_gpus_per_worker, batch_size, flip, columns, False)
        )
        parts = [
            embedder(
                {"source": np.full(batch.num_rows, i)}
                | {name: batch.column(name).to_numpy(zero_copy_only=False) for name in read}
            )
            for i, plan in enumerate(plans)
            for table in shards.iter_tables(plan.dataset, columns=read)
            for batch in table.to_batches(max_chunksize=batch_size)
        ]
    merged = {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}
    source = merged.pop("source")
    return [
        EmbeddedDataset(
            embeddings=merged["embedding"][source == i].astype(np.float32),
            identities=merged["identity"][source == i].astype(np.int64),
            columns={name: merged[name][source == i] for name in ("sample", *columns)},
        )
        for i in range(len(plans))
    ]


def embed_dataset(
    dataset_uri: str,
    judge_uri: str,
    *,
    max_identities: int | None = None,
    max_images_per_identity: int | None = None,
    resize: bool = False,
    **run_kwargs,
) -> EmbeddedDataset:
    """:func:`plan_embedding` then :func:`run_embedding` (``run_kwargs``: batch size, workers, columns...)."""
    plan = plan_embedding(
        dataset_uri,
        judge_uri,
        max_identities=max_identities,
        max_images_per_identity=max_images_per_identity,
        resize=resize,
    )
    return run_embedding([plan], **run_kwargs)[0]


class _EmbedWorker:
    """Ray actor body: loads the exported model once and embeds the chunks it is sent."""

    def __init__(self, model_uri: str, device: str, overrides: Mapping[str, Any] | None):
        self.embedder = load_face_model(model_uri, device=device, overrides=overrides)

    def ready(self) -> bool:
        return True

    def embed(self, images: np.ndarray, batch_size: int, flip: bool) -> EmbeddedImages:
        return self.embedder.embed_set(images, batch_size=batch_size, flip=flip)


class EmbedPool:
    """``num_workers`` Ray actors that each hold the exported model at ``model_dir``; reuse across sets.

    Actors run on CUDA when given GPUs, else on CPU; ``overrides`` replace ``model.json`` fields (see
    ``facesynth.face_model.read_spec``). The constructor returns once every actor has loaded the
    model. Use as a context manager (or call :meth:`close`) to free the actors.
    """

    def __init__(
        self,
        model_dir: str,
        num_workers: int,
        num_gpus_per_worker: float = 0,
        overrides: Mapping[str, Any] | None = None,
    ):
        import ray

        if num_workers < 1:
            raise ValueError(f"num_workers={num_workers}: expected >= 1")
        device = "cuda" if num_gpus_per_worker > 0 else "cpu"
        actor_cls = ray.remote(num_cpus=1, num_gpus=num_gpus_per_worker)(_EmbedWorker)
        self.actors = [actor_cls.remote(model_dir, device, overrides) for _ in range(num_workers)]
        try:
            ray.get([actor.ready.remote() for actor in self.actors])
        except BaseException:
            self.close()
            raise

    def embed(self, images: np.ndarray, batch_size: int = 256, flip: bool = True) -> EmbeddedImages:
        """Contiguous chunks, one per actor, concatenated back in order; XNorm weighted by chunk size."""
        import ray

        check_images(images)
        chunks = [c for c in np.array_split(images, len(self.actors)) if len(c)]
        parts = ray.get(
            [a.embed.remote(c, batch_size, flip) for a, c in zip(self.actors, chunks, strict=False)]
        )
        weights = np.array([len(c) for c in chunks], dtype=np.float64)
        xnorm = float(np.dot([p.xnorm for p in parts], weights) / weights.sum())
        return EmbeddedImages(embeddings=np.concatenate([p.embeddings for p in parts]), xnorm=xnorm)

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []

    def __enter__(self) -> EmbedPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def embed_with_ray(
    model_dir: str,
    images: np.ndarray,
    num_workers: int,
    batch_size: int = 256,
    num_gpus_per_worker: float = 0,
    flip: bool = True,
    overrides: Mapping[str, Any] | None = None,
) -> EmbeddedImages:
    """Embed ``images`` once on a fresh :class:`EmbedPool` of ``num_workers`` actors (at most one per image)."""
    check_images(images)
    with EmbedPool(model_dir, min(num_workers, len(images)), num_gpus_per_worker, overrides) as pool:
        return pool.embed(images, batch_size=batch_size, flip=flip)
