"""The generator-agnostic Ray Data generation stage.

work units -> generator actor pool (``map_batches``, ``num_gpus``, an autoscaling ``ActorPoolStrategy``)
-> PNG encode + shard write on CPU tasks -> manifest commits on the driver.

One row is one work unit at every step, so a shard is always written from exactly its unit's
images. Per-row seeds make a unit's bytes independent of which actor ran it, so a rerun after a
kill skips committed units and rewrites the rest identically. :func:`run_plain` runs the very same
per-unit functions in one process (the baseline for ``bench/generate_throughput.py``).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import cv2
import numpy as np
from pydantic import Field

from facesynth import manifest, shards, telemetry
from facesynth.config import StrictModel

log = logging.getLogger(__name__)


class StageConfig(StrictModel):
    """How the generation stage runs on Ray."""

    batch_size: int = Field(32, ge=1, description="images per generator call")
    units_per_call: int = Field(1, ge=1, description="work units handed to an actor at once")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per generator actor (0: CPU)")
    num_cpus: float = Field(1.0, gt=0, description="CPUs per generator actor")
    min_actors: int = Field(1, ge=1)
    max_actors: int = Field(1, ge=1, description="upper bound for autoscaling the actor pool")
    encoders_cpus: float = Field(0.5, gt=0, description="CPUs per encode+write task")
    image_format: str = Field("png", pattern="^(png|jpeg)$")
    png_compression: int = Field(
        1, ge=0, le=9, description="zlib level; 1 encodes faces ~2.8x faster than 6 for ~8% more bytes"
    )
    jpeg_quality: int = Field(95, ge=1, le=100)
    commit_every_s: float = Field(2.0, ge=0, description="batch manifest commits at most this often")


@dataclass
class Generated:
    """A generator's output for N rows (images uint8 NHWC RGB plus per-row metadata)."""

    images: np.ndarray
    identity_names: list[str]
    prompts: list[str]
    params: list[dict]
    t0: np.ndarray | None = None
    embeddings: np.ndarray | None = None
    extra: dict = field(default_factory=dict)


class Generator:
    """Interface every generator implements; built once per actor by a picklable factory."""

    name: str = "generator"
    domain: str = "diffusion"

    def generate(self, identities: np.ndarray, samples: np.ndarray, seeds: np.ndarray) -> Generated:
        raise NotImplementedError


def generate_unit_rows(
    gen: Generator, units: list[shards.WorkUnit], base_seed: int, batch_size: int
) -> list[dict]:
    """Run ``gen`` over the rows of ``units`` in micro-batches; one result dict per unit."""
    rows = [u.rows(base_seed) for u in units]
    ids, samples, seeds = (np.concatenate(c) for c in zip(*rows))
    parts = [
        gen.generate(ids[i : i + batch_size], samples[i : i + batch_size], seeds[i : i + batch_size])
        for i in range(0, len(ids), batch_size)
    ]
    images = np.concatenate([p.images for p in parts])
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[0] != len(ids):
        raise ValueError(
            f"generator {gen.name}: expected uint8 images [N,H,W,3] with N={len(ids)}, "
            f"got {images.dtype} {images.shape}"
        )
    meta = {
        "identity_name": [n for p in parts for n in p.identity_names],
        "prompt": [s for p in parts for s in p.prompts],
        "params": [shards.params_json(x) for p in parts for x in p.params],
        "t0": np.concatenate(
            [p.t0 if p.t0 is not None else np.full(len(p.images), -1) for p in parts]
        ).tolist(),
    }
    if parts[0].embeddings is not None:
        meta["embedding"] = np.concatenate([p.embeddings for p in parts]).astype(np.float32).tolist()
    telemetry.inc("facesynth_images_generated", len(ids), "images produced by generator actors")
    out, start = [], 0
    for u, (uid, usample, useed) in zip(units, rows):
        stop = start + len(uid)
        out.append(
            {
                "unit": u.index,
                "images": images[start:stop],
                "meta": json.dumps(
                    {
                        "identity": uid.tolist(),
                        "sample": usample.tolist(),
                        "seed": useed.tolist(),
                        "domain": gen.domain,
                        "generator": gen.name,
                        **{k: v[start:stop] for k, v in meta.items()},
                    }
                ),
            }
        )
        start = stop
    return out


def encode_images(
    images: np.ndarray, fmt: str = "png", *, png_compression: int = 1, jpeg_quality: int = 95
) -> list[bytes]:
    """Encode uint8 RGB images (N, H, W, 3) as PNG or JPEG bytes with OpenCV (deterministic for fixed settings)."""
    if fmt == "png":
        ext, params = ".png", [cv2.IMWRITE_PNG_COMPRESSION, png_compression]
    else:
        ext, params = ".jpg", [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality]
    out = []
    for img in images:
        ok, data = cv2.imencode(ext, np.ascontiguousarray(img[..., ::-1]), params)  # OpenCV wants BGR
        if not ok:
            raise RuntimeError(f"{fmt} encoding failed for an image of shape {img.shape}")
        out.append(data.tobytes())
    return out


def write_unit(dataset_uri: str, unit_row: dict, cfg: StageConfig) -> dict:
    """Encode one unit's images and write its shard; returns the (uncommitted) manifest record."""
    meta = json.loads(unit_row["meta"])
    n = len(meta["identity"])
    rows = {
        "image": encode_images(
            np.asarray(unit_row["images"]),
            cfg.image_format,
            png_compression=cfg.png_compression,
            jpeg_quality=cfg.jpeg_quality,
        ),
        "identity": meta["identity"],
        "identity_name": meta["identity_name"],
        "sample": meta["sample"],
        "domain": [meta["domain"]] * n,
        "generator": [meta["generator"]] * n,
        "prompt": meta["prompt"],
        "seed": meta["seed"],
        "t0": meta["t0"],
        "params": meta["params"],
    }
    if "embedding" in meta:
        rows["embedding"] = meta["embedding"]
    return shards.write_shard(dataset_uri, int(unit_row["unit"]), shards.to_table(rows))


class _GeneratorActor:
    """Ray Data callable class: builds the generator once, then maps unit rows to image rows."""

    def __init__(self, factory: Callable[[], Generator], base_seed: int, batch_size: int):
        self.gen = factory()
        self.base_seed = base_seed
        self.batch_size = batch_size

    def __call__(self, batch: dict) -> dict:
        units = [
            shards.WorkUnit(
                *(
                    int(batch[k][i])
                    for k in ("index", "identity_start", "identity_stop", "sample_start", "sample_stop")
                )
            )
            for i in range(len(batch["index"]))
        ]
        out = generate_unit_rows(self.gen, units, self.base_seed, self.batch_size)
        return {
            "unit": np.array([o["unit"] for o in out]),
            "images": _ragged([o["images"] for o in out]),
            "meta": np.array([o["meta"] for o in out], dtype=object),
        }


def _ragged(arrays: list[np.ndarray]) -> np.ndarray:
    if len({a.shape for a in arrays}) == 1:
        return np.stack(arrays)
    out = np.empty(len(arrays), dtype=object)
    out[:] = arrays
    return out


def _write_batch(batch: dict, dataset_uri: str, cfg: StageConfig) -> dict:
    records = [
        write_unit(dataset_uri, {k: batch[k][i] for k in batch}, cfg) for i in range(len(batch["unit"]))
    ]
    return {"record": np.array([json.dumps(r) for r in records], dtype=object)}


@dataclass
class StageResult:
    """What a generation run did."""

    committed_before: int
    committed_now: int
    units_total: int
    images: int
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.images / max(self.seconds, 1e-9)


class _Committer:
    """Driver-side manifest commits, batched in time (a kill loses at most the last few units' commits)."""

    def __init__(self, dataset_uri: str, units_total: int, every_s: float, total_pending: int):
        from tqdm import tqdm

        self.uri, self.units_total, self.every_s = dataset_uri, units_total, every_s
        self.pending: list[dict] = []
        self.last = time.monotonic()
        self.done = 0
        self.images = 0
        self.bar = tqdm(total=total_pending, unit="shard", desc=f"generate -> {dataset_uri}", mininterval=2)

    def add(self, record: dict) -> None:
        self.pending.append(record)
        self.images += record["rows"]
        self.bar.update(1)
        if time.monotonic() - self.last >= self.every_s:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            manifest.commit(self.uri, self.pending, units_total=self.units_total)
            telemetry.inc("facesynth_shards_committed", len(self.pending), "shards committed to manifests")
            self.done += len(self.pending)
            self.pending = []
        self.last = time.monotonic()

    def close(self) -> None:
        self.flush()
        self.bar.close()


def _run(
    units: Iterable[shards.WorkUnit],
    dataset_uri: str,
    cfg: StageConfig,
    records: Callable[[list[shards.WorkUnit]], Iterable[dict]],
) -> StageResult:
    """Skip committed units, commit the shard records ``records(pending)`` yields, and time it."""
    units = list(units)
    committed = manifest.load(dataset_uri).shards
    pending = [u for u in units if u.index not in committed]
    log.info("%s: %d units committed, %d to generate", dataset_uri, len(committed), len(pending))
    committer = _Committer(dataset_uri, len(units), cfg.commit_every_s, len(pending))
    start = time.perf_counter()
    if pending:
        for record in records(pending):
            committer.add(record)
    committer.close()
    return StageResult(
        len(committed), committer.done, len(units), committer.images, time.perf_counter() - start
    )


def run_ray(
    units: list[shards.WorkUnit],
    factory: Callable[[], Generator],
    dataset_uri: str,
    *,
    base_seed: int,
    cfg: StageConfig,
) -> StageResult:
    """Generate the uncommitted ``units`` through Ray Data and commit their shards."""

    def records(pending: list[shards.WorkUnit]) -> Iterable[dict]:
        import ray.data

        ds = ray.data.from_items([u.to_dict() for u in pending], override_num_blocks=len(pending))
        ds = ds.map_batches(
            _GeneratorActor,
            fn_constructor_kwargs={"factory": factory, "base_seed": base_seed, "batch_size": cfg.batch_size},
            batch_size=cfg.units_per_call,
            num_gpus=cfg.num_gpus,
            num_cpus=cfg.num_cpus,
            compute=ray.data.ActorPoolStrategy(
                min_size=cfg.min_actors, max_size=max(cfg.min_actors, cfg.max_actors)
            ),
            batch_format="numpy",
        )
        ds = ds.map_batches(
            _write_batch,
            fn_kwargs={"dataset_uri": dataset_uri, "cfg": cfg},
            batch_size=1,
            num_cpus=cfg.encoders_cpus,
            batch_format="numpy",
        )
        return (json.loads(row["record"]) for row in ds.iter_rows())

    return _run(units, dataset_uri, cfg, records)


def run_plain(
    units: Iterable[shards.WorkUnit],
    factory: Callable[[], Generator],
    dataset_uri: str,
    *,
    base_seed: int,
    cfg: StageConfig,
) -> StageResult:
    """The same per-unit work in one process, no Ray (baseline and debugging path)."""

    def records(pending: list[shards.WorkUnit]) -> Iterable[dict]:
        gen = factory()
        for i in range(0, len(pending), cfg.units_per_call):
            batch = pending[i : i + cfg.units_per_call]
            for unit_row in generate_unit_rows(gen, batch, base_seed, cfg.batch_size):
                yield write_unit(dataset_uri, unit_row, cfg)

    return _run(units, dataset_uri, cfg, records)


class UnitPlan(StrictModel):
    """Which identities x samples a job generates, cut into deterministic work units."""

    count: int = Field(ge=1, description="number of identities")
    samples_per_identity: int = Field(ge=1)
    per_unit: int = Field(8, ge=1, description="identities per work unit (one shard each)")
    offset: int = Field(0, ge=0, description="first identity id (keep train and benchmark ids disjoint)")

    def units(self) -> list[shards.WorkUnit]:
        return shards.plan_units(self.count, self.samples_per_identity, self.per_unit, self.offset)


def generate_dataset(
    units: list[shards.WorkUnit],
    factory: Callable[[], Generator],
    output: str,
    *,
    base_seed: int,
    stage: StageConfig,
    resolved_config,
    title: str,
    use_ray: bool = True,
) -> StageResult:
    """Run a generation job end to end: resolved config, generation (resumable), cleanup, ``card.md``."""
    from facesynth.config import save_resolved

    save_resolved(resolved_config, output)
    run = run_ray if use_ray else run_plain
    result = run(units, factory, output, base_seed=base_seed, cfg=stage)
    stray = shards.remove_uncommitted(output)
    if stray:
        log.info("removed %d uncommitted leftovers of earlier runs", len(stray))
    shards.write_card(output, resolved_config.model_dump(mode="json"), title=title)
    return result
