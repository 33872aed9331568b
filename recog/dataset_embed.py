"""Embed shard datasets with an exported face model: Ray Data actors or the same code in-process.

:func:`plan_embedding` checks everything cheaply before any model runs (the judge's ``model.json``
and weights file, committed rows, the image size against the judge's ``input_size``) and picks a
deterministic subset of rows from the ``identity`` and ``sample`` columns alone. :func:`run_embedding`
streams the committed shards of one or more planned datasets through :class:`ShardEmbedder` actors
(the judge loaded once per actor; rows outside the subset dropped before their PNGs are decoded)
and returns each dataset's embeddings in its row order (committed shards in unit order, rows in
file order)."""

from __future__ import annotations

import functools
import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from PIL import Image

from facesynth import shards, storage
from facesynth.binsets import decode_rgb
from facesynth.face_model import ModelSpec, load_face_model, read_spec

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
    """A checked embedding job: dataset, judge and its spec, the row subset, its size and the shard count."""

    dataset: str
    judge: str
    spec: ModelSpec
    subset: Subset
    rows: int
    shards: int
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


def _image_size(data: bytes, what: str) -> tuple[int, int]:
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.height, img.width
    except (OSError, ValueError) as exc:
        raise ValueError(f"{what}: not a decodable image ({exc})") from exc


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
                size = _image_size(table.column("image")[int(hit[0])].as_py(), f"dataset={dataset_uri!r}")
                if size != tuple(spec.input_size):
                    raise _size_error(f"dataset={dataset_uri!r}", size, tuple(spec.input_size))
                break
    rows = int(subset.mask(identities, samples).sum())
    return EmbedPlan(dataset_uri, judge_uri, spec, subset, rows, len(tables), resize)


def decode_faces(images: Sequence[bytes], size: tuple[int, int], resize: bool, what: str) -> np.ndarray:
    """Decode encoded images to uint8 RGB ``(N, H, W, 3)`` of ``size`` (H, W); resize with PIL bilinear
    when ``resize``, else a different size is a ValueError naming both sizes."""
    out = np.empty((len(images), *size, 3), dtype=np.uint8)
    for i, data in enumerate(images):
        image = decode_rgb(data, f"{what} row {i}")
        if image.shape[:2] != tuple(size):
            if not resize:
                raise _size_error(f"{what} row {i}", image.shape[:2], size)
            image = np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.Resampling.BILINEAR))
        out[i] = image
    return out


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
        images = decode_faces([batch["image"][i] for i in keep], size, plan.resize, what)
        out["embedding"] = self.embedder.embed(images, self.batch_size, self.flip).astype(np.float32)
        return out


def read_faces(plan: EmbedPlan, subset: Subset) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decoded images (as the judge sees them), identities and samples of the rows in ``subset``,
    in dataset order, read in this process (for sample grids and LPIPS on a few images)."""
    images, identities, samples = [], [], []
    for table in shards.iter_tables(plan.dataset, columns=["image", *KEY_COLUMNS]):
        ids, smp = table.column("identity").to_numpy(), table.column("sample").to_numpy()
        hit = np.flatnonzero(subset.mask(ids, smp))
        if len(hit):
            encoded = table.column("image").take(hit).to_pylist()
            what = f"dataset={plan.dataset!r}"
            images.append(decode_faces(encoded, tuple(plan.spec.input_size), plan.resize, what))
            identities.append(ids[hit].astype(np.int64))
            samples.append(smp[hit].astype(np.int64))
    if not images:
        raise ValueError(f"dataset={plan.dataset!r}: no rows in the requested subset")
    return np.concatenate(images), np.concatenate(identities), np.concatenate(samples)


def _source_column(source: int, table: pa.Table) -> pa.Array:
    return pa.array(np.full(table.num_rows, source, np.int64))


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

    With ``use_ray`` the datasets stream as one Ray Data pipeline through ``num_workers``
    :class:`ShardEmbedder` actors (CUDA when given GPUs), so each actor loads the judge once;
    otherwise the same class runs in this process.
    """
    if batch_size < 1 or num_workers < 1 or not plans:
        raise ValueError(
            f"batch_size={batch_size}, num_workers={num_workers}, {len(plans)} plans: expected >= 1 of each"
        )
    judges = sorted({plan.judge for plan in plans})
    if len(judges) != 1:
        raise ValueError(f"plans judged by {judges}: expected one shared judge")
    read = ["image", *KEY_COLUMNS, *columns]
    device = "cuda" if num_gpus_per_worker > 0 else "cpu"
    args = {
        "plans": tuple(plans),
        "device": device,
        "batch_size": batch_size,
        "flip": flip,
        "columns": tuple(columns),
    }
    if use_ray:
        import ray.data

        sources = [
            shards.read_dataset(plan.dataset, columns=read, override_num_blocks=plan.shards).add_column(
                "source", functools.partial(_source_column, i), batch_format="pyarrow"
            )
            for i, plan in enumerate(plans)
        ]
        ds = sources[0].union(*sources[1:]) if len(sources) > 1 else sources[0]
        ds.context.execution_options.preserve_order = True
        ds = ds.map_batches(
            ShardEmbedder,
            fn_constructor_kwargs=args,
            batch_size=batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=num_workers),
            num_gpus=num_gpus_per_worker,
            num_cpus=num_cpus_per_worker,
        )
        parts = list(ds.iter_batches(batch_size=None, batch_format="numpy"))
    else:
        embedder = ShardEmbedder(**args)
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
