"""Generate a UIFace synthetic dataset through the Ray Data generation stage.

    python -m jobs.generate --config configs/uiface-tiny.yaml output=/tmp/uiface-set identities.count=100

Plans identity x sample work units, streams them through UIFace generator actors into committed shards
(a rerun skips committed units), then writes ``card.md``, ``config.yaml``, a contact sheet ``grid.png``
(identities x samples), ``report.md`` and prints a summary with images/s and the t0 histogram.
"""

from __future__ import annotations

import io
import json
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from pydantic import Field

from facesynth import shards, storage
from facesynth.config import ConfigError, StrictModel, parse_job_args
from facesynth.runtime import RayConfig, init_ray
from synthgen.identity_embeddings import decode_images, save_npy
from synthgen.procedural import save_grid
from synthgen.stage import StageConfig, StageResult, generate_dataset
from synthgen.uiface.generator import (
    IDENTITIES_FILE,
    IdentitiesConfig,
    UIFaceFactory,
    identity_embeddings,
)
from synthgen.uiface.sampler import SamplerConfig
from synthgen.uiface.train import UIFaceModelSource

GRID_MAX = 8


class GenerateConfig(StrictModel):
    """The ``jobs.generate`` config: where to run, which model, how to sample, which identities, where to write."""

    ray: RayConfig = Field(default_factory=RayConfig)
    stage: StageConfig = Field(default_factory=StageConfig)
    model: UIFaceModelSource = Field(default_factory=UIFaceModelSource)
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    identities: IdentitiesConfig
    output: str = Field(min_length=1, description="dataset URI (s3://bucket/prefix, file:///path or a path)")
    seed: int = Field(0, ge=0, description="base seed of the per-row noise seeds")
    device: str = Field("auto", pattern="^(auto|cpu|cuda(:[0-9]+)?)$")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    threads: int | None = Field(
        None, ge=1, description="torch threads per generator (fix for bit-identical CPU)"
    )


@dataclass
class Plan:
    """Everything a run needs: the work units, the generator factory and the base seed."""

    units: list[shards.WorkUnit]
    factory: UIFaceFactory
    base_seed: int


@dataclass
class GenerateResult:
    """Summary of a generation run."""

    uri: str
    stage: StageResult
    rows: int
    t0_histogram: dict[int, int] = field(default_factory=dict)

    @property
    def images_per_s(self) -> float:
        return self.stage.images_per_s


def check(cfg: GenerateConfig) -> None:
    """Validate the sampler against the model's schedule before any work (ConfigError naming the key)."""
    last = cfg.model.architecture().train_timesteps - 1
    for key in ("t0", "step_th"):
        value = getattr(cfg.sampler, key)
        if value > last:
            raise ConfigError(f"sampler.{key}: {value} is outside the model's schedule [-1, {last}]")
    if cfg.sampler.steps > last + 1:
        raise ConfigError(f"sampler.steps: {cfg.sampler.steps} exceeds the model's {last + 1} timesteps")


def prepare(cfg: GenerateConfig) -> Plan:
    """Check the config, draw the identities into ``<output>/identities.npy`` and plan the units."""
    check(cfg)
    units = shards.plan_units(
        cfg.identities.count, cfg.identities.samples_per_identity, cfg.identities.identities_per_unit
    )
    embeddings = identity_embeddings(cfg.identities, cfg.model.architecture().embedding_dim)
    embeddings_uri = storage.join(cfg.output, IDENTITIES_FILE)
    save_npy(embeddings, embeddings_uri)
    factory = UIFaceFactory(cfg.model, cfg.sampler, embeddings_uri, cfg.device, cfg.dtype, cfg.threads)
    return Plan(units, factory, cfg.seed)


def t0_histogram(dataset_uri: str) -> dict[int, int]:
    """Images per recorded t0 (-1: never switched or single-stage)."""
    counts = Counter()
    for table in shards.iter_tables(dataset_uri, columns=["t0"]):
        counts.update(table.column("t0").to_pylist())
    return dict(sorted(counts.items()))


def write_grid(dataset_uri: str, rows: int, cols: int) -> str:
    """Contact sheet of the first ``rows`` identities x ``cols`` samples at ``<dataset>/grid.png``."""
    images = {}
    for table in shards.iter_tables(dataset_uri, columns=["image", "identity", "sample"]):
        for rec in table.to_pylist():
            if rec["identity"] < rows and rec["sample"] < cols:
                images[(rec["identity"], rec["sample"])] = rec["image"]
        if len(images) == rows * cols:
            break
    decoded = decode_images(
        [images[(i, s)] for i in range(rows) for s in range(cols)], _image_size(images[(0, 0)])
    )
    uri = storage.join(dataset_uri, "grid.png")
    save_grid(decoded, rows, cols, uri)
    return uri


def _image_size(png: bytes) -> tuple[int, int]:
    from PIL import Image

    width, height = Image.open(io.BytesIO(png)).size
    return height, width


def write_report(cfg: GenerateConfig, result: GenerateResult) -> str:
    lines = [
        "# UIFace generation",
        "",
        f"- dataset: `{result.uri}` ({result.rows} images, {cfg.identities.count} identities x "
        f"{cfg.identities.samples_per_identity} samples)",
        f"- model: `{cfg.model.describe()}`; sampler: {cfg.sampler.mode}, {cfg.sampler.scheduler} "
        f"{cfg.sampler.steps} steps, guidance {cfg.sampler.guidance}",
        f"- this run: {result.stage.committed_now} of {result.stage.units_total} units "
        f"({result.stage.committed_before} already committed), {result.stage.images} images in "
        f"{result.stage.seconds:.1f} s = {result.images_per_s:.2f} images/s",
        "",
        "| t0 | images |",
        "|---|---|",
        *[f"| {t} | {n} |" for t, n in result.t0_histogram.items()],
        "",
        "![identities x samples](grid.png)",
        "",
    ]
    uri = storage.join(result.uri, "report.md")
    storage.write_bytes(uri, "\n".join(lines).encode())
    return uri


def generate(cfg: GenerateConfig) -> GenerateResult:
    """Run the generation job (resumable); callable from a Ray Tune trial."""
    plan = prepare(cfg)
    init_ray(cfg.ray)
    stage = generate_dataset(
        plan.units,
        plan.factory,
        cfg.output,
        base_seed=plan.base_seed,
        stage=cfg.stage,
        resolved_config=cfg,
        title="UIFace synthetic dataset",
    )
    write_grid(
        cfg.output, min(cfg.identities.count, GRID_MAX), min(cfg.identities.samples_per_identity, GRID_MAX)
    )
    result = GenerateResult(cfg.output, stage, shards.summary(cfg.output)["rows"], t0_histogram(cfg.output))
    write_report(cfg, result)
    return result


def main(argv: list[str] | None = None) -> int:
    cfg = parse_job_args(
        GenerateConfig, argv, "Generate a UIFace synthetic face dataset on Ray.", default="uiface-tiny"
    )
    try:
        result = generate(cfg)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    t0 = result.t0_histogram
    switched = {k: v for k, v in t0.items() if k >= 0}
    print(
        json.dumps(
            {
                "dataset": result.uri,
                "images": result.rows,
                "generated_now": result.stage.images,
                "seconds": round(result.stage.seconds, 2),
                "images_per_s": round(result.images_per_s, 3),
                "t0_histogram": {str(k): v for k, v in t0.items()},
                "t0_mean": float(np.average(list(switched), weights=list(switched.values())))
                if switched
                else None,
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
