"""``python -m jobs.render``: procedural face dataset through Ray Data, plus PNG grids per style."""

from __future__ import annotations

import functools
import json
import sys

import numpy as np
from pydantic import Field

from facesynth import shards, storage
from facesynth.config import StrictModel, parse_job_args
from facesynth.runtime import RayConfig, init_ray
from synthgen.procedural import render_faces, save_grid
from synthgen.procedural.generator import ProceduralConfig, make_procedural
from synthgen.stage import StageConfig, UnitPlan, generate_dataset


class GridConfig(StrictModel):
    identities: int = Field(8, ge=1)
    samples: int = Field(8, ge=1)
    styles: list[str] = Field(default_factory=lambda: ["render", "photo"])


class RenderJob(StrictModel):
    output: str
    seed: int = Field(0, ge=0)
    identities: UnitPlan
    renderer: ProceduralConfig = ProceduralConfig()
    stage: StageConfig = StageConfig(batch_size=64)
    ray: RayConfig = RayConfig()
    grid: GridConfig = GridConfig()
    use_ray: bool = True


def write_grids(cfg: RenderJob) -> list[str]:
    """One PNG per style: the job's first identities x samples, rendered with the dataset's own seeds."""
    n_id, n_s = (
        min(cfg.grid.identities, cfg.identities.count),
        min(cfg.grid.samples, cfg.identities.samples_per_identity),
    )
    ids = np.repeat(np.arange(cfg.identities.offset, cfg.identities.offset + n_id), n_s)
    samples = np.tile(np.arange(n_s), n_id)
    seeds = shards.row_seeds(cfg.seed, ids, samples)
    out = []
    for style in cfg.grid.styles:
        batch = render_faces(
            ids,
            seeds,
            style=style,
            size=cfg.renderer.size,
            nuisance=cfg.renderer.nuisance,
            overrides=cfg.renderer.overrides or None,
        )
        uri = storage.join(cfg.output, f"grid_{style}.png")
        save_grid(batch.images, n_id, n_s, uri)
        out.append(uri)
    return out


def render(cfg: RenderJob) -> dict:
    """Render the dataset (resumable) and its grids; returns the summary."""
    if cfg.use_ray:
        init_ray(cfg.ray)
    result = generate_dataset(
        cfg.identities.units(),
        functools.partial(make_procedural, cfg.renderer),
        cfg.output,
        base_seed=cfg.seed,
        stage=cfg.stage,
        resolved_config=cfg,
        title=f"procedural faces ({cfg.renderer.style})",
        use_ray=cfg.use_ray,
    )
    summary = {
        **shards.summary(cfg.output),
        "grids": write_grids(cfg),
        "generated_now": result.images,
        "images_per_s": round(result.images_per_s, 1),
    }
    return summary


def main(argv: list[str] | None = None) -> None:
    cfg = parse_job_args(RenderJob, argv, __doc__, default="render-quickstart")
    summary = render(cfg)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
