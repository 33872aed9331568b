"""The generator-agnostic Ray Data generation stage.

work units -> generator actor pool (``map_batches``, ``num_gpus``, an autoscaling ``ActorPoolStrategy``)
-> PNG encode + shard write on CPU tasks -> commits to the dataset's log on the driver.

One row is one work unit at every step, so a shard is always written from exactly its unit's
images. Per-row seeds make a unit's bytes independent of which actor ran it, so a rerun after a
kill skips committed units and rewrites the rest identically. :func:`run_plain` runs the very same
per-unit functions in one process (the baseline for ``bench/generate_throughput.py``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
from pydantic import Field

from facesynth import images, manifest, shards, telemetry
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
    commit_every_s: float = Field(
        2.0, ge=0, description="batch commits (one log record each) at most this often"
    )
    verify_committed: bool = Field(
        False,
        description="on a rerun, re-hash every committed shard and rewrite damaged ones "
        "(default: only missing or resized shards are found, from one listing)",
    )


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


# One row per work unit between the generator actors and the writers: native Arrow columns (the images as
# raw uint8 bytes with their shape), so nothing is JSON-encoded or pickled on the way.
UNIT_SCHEMA = pa.schema(
    [
        ("unit", pa.int64()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("pixels", pa.large_binary()),
        ("identity", pa.list_(pa.int64())),
        ("sample", pa.list_(pa.int64())),
        ("seed", pa.list_(pa.int64())),
        ("t0", pa.list_(pa.int32())),
        ("identity_name", pa.list_(pa.string())),
        ("prompt", pa.list_(pa.string())),
        ("params", pa.list_(pa.string())),
        ("domain", pa.string()),
        ("generator", pa.string()),
        ("embedding", pa.list_(pa.list_(pa.float32()))),
    ]
)


def generate_unit_rows(
    gen: Generator, units: list[shards.WorkUnit], base_seed: int, batch_size: int
) -> pa.Table:
    """Run ``gen`` over the rows of ``units`` in micro-batches; one :data:`UNIT_SCHEMA` row per unit."""
    rows = [u.rows(base_seed) for u in units]
    ids, samples, seeds = (np.concatenate(c) for c in zip(*rows))
    parts = [
        gen.generate(ids[i : i + batch_size], samples[i : i + batch_size], seeds[i : i + batch_size])
        for i in range(0, len(ids), batch_size)
    ]
    pixels = np.concatenate([p.images for p in parts])
    if pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[0] != len(ids) or pixels.shape[3] != 3:
        raise ValueError(
            f"generator {gen.name}: expected uint8 images [N,H,W,3] with N={len(ids)}, "
            f"got {pixels.dtype} {pixels.shape}"
        )
    names = [n for p in parts for n in p.identity_names]
    prompts = [s for p in parts for s in p.prompts]
    params = [shards.params_json(x) for p in parts for x in p.params]
    t0 = np.concatenate([p.t0 if p.t0 is not None else np.full(len(p.images), -1) for p in parts])
    embedding = (
        np.concatenate([p.embeddings for p in parts]).astype(np.float32)
        if parts[0].embeddings is not None
        else None
    )
    telemetry.inc("facesynth_images_generated", len(ids), "images produced by generator actors")
    bounds = np.cumsum([0, *(len(r[0]) for r in rows)])
    cols: dict[str, list] = {name: [] for name in UNIT_SCHEMA.names}
    for u, (uid, usample, useed), a, b in zip(units, rows, bounds[:-1], bounds[1:]):
        for name, value in (
            ("unit", u.index),
            ("height", pixels.shape[1]),
            ("width", pixels.shape[2]),
            ("pixels", np.ascontiguousarray(pixels[a:b]).tobytes()),
            ("identity", uid),
            ("sample", usample),
            ("seed", useed),
            ("t0", t0[a:b]),
            ("identity_name", names[a:b]),
            ("prompt", prompts[a:b]),
            ("params", params[a:b]),
            ("domain", gen.domain),
            ("generator", gen.name),
            ("embedding", None if embedding is None else list(embedding[a:b])),
        ):
            cols[name].append(value)
    return pa.table(cols, schema=UNIT_SCHEMA)


def write_unit(dataset_uri: str, unit: dict, cfg: StageConfig) -> dict:
    """Encode one unit's images (a :data:`UNIT_SCHEMA` row as a dict) and write its shard; returns its
    (uncommitted) shard record."""
    n = len(unit["identity"])
    pixels = np.frombuffer(unit["pixels"], np.uint8).reshape(n, unit["height"], unit["width"], 3)
    rows = {
        "image": images.encode(
            pixels, cfg.image_format, png_compression=cfg.png_compression, jpeg_quality=cfg.jpeg_quality
        ),
        **{k: unit[k] for k in ("identity", "identity_name", "sample", "prompt", "seed", "t0", "params")},
        "domain": [unit["domain"]] * n,
        "generator": [unit["generator"]] * n,
    }
    if unit["embedding"] is not None:
        rows["embedding"] = unit["embedding"]
    return shards.write_shard(dataset_uri, int(unit["unit"]), shards.to_table(rows))


class _GeneratorActor:
    """Ray Data callable class: builds the generator once, then maps work-unit rows to generated units."""

    def __init__(self, factory: Callable[[], Generator], base_seed: int, batch_size: int):
        self.gen = factory()
        self.base_seed = base_seed
        self.batch_size = batch_size

    def __call__(self, batch: pa.Table) -> pa.Table:
        units = [shards.WorkUnit(**row) for row in batch.to_pylist()]
        return generate_unit_rows(self.gen, units, self.base_seed, self.batch_size)


def _write_batch(batch: pa.Table, dataset_uri: str, cfg: StageConfig) -> pa.Table:
    records = [write_unit(dataset_uri, unit, cfg) for unit in batch.to_pylist()]
    return pa.table({"record": [json.dumps(r) for r in records]})


StageResult = shards.WriteResult


def dataset_plan(
    units: list[shards.WorkUnit], base_seed: int, cfg: StageConfig, settings: dict
) -> manifest.Plan:
    """The plan a generation run pins in its dataset: what decides the shards' bytes, nothing else.

    ``settings`` are the generator's own (JSON values); batch sizes, actors and output are not part of
    it, because per-row seeds make the bytes independent of them.
    """
    layout = json.dumps([u.to_dict() for u in units], separators=(",", ":")).encode()
    return manifest.Plan(
        len(units),
        {
            "seed": base_seed,
            "units_sha256": hashlib.sha256(layout).hexdigest(),
            "encoding": cfg.model_dump(include={"image_format", "png_compression", "jpeg_quality"}),
            "generator": settings,
        },
    )


def _run(
    units: Iterable[shards.WorkUnit],
    dataset_uri: str,
    cfg: StageConfig,
    base_seed: int,
    settings: dict,
    records: Callable[[list[shards.WorkUnit]], Iterable[dict]],
) -> StageResult:
    """Write the uncommitted ``units`` through ``records(pending)`` with the shared skip/commit loop."""
    units = list(units)
    by_index = {u.index: u for u in units}
    return shards.write_units(
        dataset_uri,
        dataset_plan(units, base_seed, cfg, settings),
        list(by_index),
        lambda pending: records([by_index[k] for k in pending]),
        commit_every_s=cfg.commit_every_s,
        rehash_committed=cfg.verify_committed,
        desc="generate",
    )


def run_ray(
    units: list[shards.WorkUnit],
    factory: Callable[[], Generator],
    dataset_uri: str,
    *,
    base_seed: int,
    cfg: StageConfig,
    settings: dict,
) -> StageResult:
    """Generate the uncommitted ``units`` through Ray Data and commit their shards (``settings``: the
    generator's, pinned in the dataset's plan)."""

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
            batch_format="pyarrow",
        )
        ds = ds.map_batches(
            _write_batch,
            fn_kwargs={"dataset_uri": dataset_uri, "cfg": cfg},
            batch_size=1,
            num_cpus=cfg.encoders_cpus,
            batch_format="pyarrow",
        )
        return (json.loads(row["record"]) for row in ds.iter_rows())

    return _run(units, dataset_uri, cfg, base_seed, settings, records)


def run_plain(
    units: Iterable[shards.WorkUnit],
    factory: Callable[[], Generator],
    dataset_uri: str,
    *,
    base_seed: int,
    cfg: StageConfig,
    settings: dict,
) -> StageResult:
    """The same per-unit work in one process, no Ray (baseline and debugging path)."""

    def records(pending: list[shards.WorkUnit]) -> Iterable[dict]:
        gen = factory()
        for i in range(0, len(pending), cfg.units_per_call):
            batch = pending[i : i + cfg.units_per_call]
            for unit in generate_unit_rows(gen, batch, base_seed, cfg.batch_size).to_pylist():
                yield write_unit(dataset_uri, unit, cfg)

    return _run(units, dataset_uri, cfg, base_seed, settings, records)


class UnitPlan(StrictModel):
    """Which identities x samples a job generates, cut into deterministic work units."""

    count: int = Field(ge=1, description="number of identities")
    samples_per_identity: int = Field(ge=1)
    per_unit: int = Field(8, ge=1, description="identities per work unit (one shard each)")
    offset: int = Field(0, ge=0, description="first identity id (keep train and benchmark ids disjoint)")

    def units(self) -> list[shards.WorkUnit]:
        return shards.plan_units(self.count, self.samples_per_identity, self.per_unit, self.offset)


def claim_output(
    units: list[shards.WorkUnit], output: str, *, base_seed: int, stage: StageConfig, settings: dict
) -> manifest.Plan:
    """Make ``output`` this run's dataset before anything is written there (see :func:`manifest.claim`)."""
    plan = dataset_plan(units, base_seed, stage, settings)
    manifest.claim(output, plan)
    return plan


def generate_dataset(
    units: list[shards.WorkUnit],
    factory: Callable[[], Generator],
    output: str,
    *,
    base_seed: int,
    stage: StageConfig,
    settings: dict,
    resolved_config,
    title: str,
    use_ray: bool = True,
) -> StageResult:
    """Run a generation job end to end: claim the output, resolved config, generation (resumable), ``card.md``.

    ``settings`` are the generator's settings that decide the images; a rerun with other ones is refused.
    """
    from facesynth.config import save_resolved

    claim_output(units, output, base_seed=base_seed, stage=stage, settings=settings)
    save_resolved(resolved_config, output)
    run = run_ray if use_ray else run_plain
    result = run(units, factory, output, base_seed=base_seed, cfg=stage, settings=settings)
    shards.write_card(output, resolved_config.model_dump(mode="json"), title=title)
    return result
