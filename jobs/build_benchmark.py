"""``python -m jobs.build_benchmark``: offline verification sets (.bin pairs + IJB-C-style templates)."""

from __future__ import annotations

import json
import sys

from pydantic import Field

from facesynth.config import StrictModel, parse_job_args, save_resolved
from synthgen.benchmark_sets import PAIR_SETS, TEMPLATE_SET, build_benchmark


class BenchmarkJob(StrictModel):
    output: str
    style: str = Field("render", pattern="^(render|photo)$")
    size: int = Field(112, ge=32, le=128)
    identity_offset: int = Field(
        1_000_000, ge=0, description="first benchmark identity; keep training ids below"
    )
    num_identities: int = Field(3000, ge=1)
    seed: int = Field(0, ge=0)
    pair_counts: dict[str, int] = Field(
        default_factory=lambda: {**PAIR_SETS, TEMPLATE_SET: 20_000},
        description="pairs per set (lfw-like, cfp-fp-like, agedb-like, ijbc-like); 0 leaves a set out",
    )


def build(cfg: BenchmarkJob) -> dict:
    """Write the benchmark sets and the resolved config; returns the summary."""
    summary = build_benchmark(
        cfg.output,
        style=cfg.style,
        size=cfg.size,
        identity_offset=cfg.identity_offset,
        num_identities=cfg.num_identities,
        seed=cfg.seed,
        pair_counts=cfg.pair_counts,
    )
    save_resolved(cfg, cfg.output)
    return summary


def main(argv: list[str] | None = None) -> None:
    cfg = parse_job_args(BenchmarkJob, argv, __doc__, default="benchmark-quickstart")
    print(json.dumps(build(cfg), indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
