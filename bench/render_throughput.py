"""Procedural renderer throughput: images/s over all CPU cores, printed as one JSON object.

One worker process per core renders its own share of distinct (identity, sample) seeds in batches, as
generation tasks do; the clock starts once every worker has warmed up (noise banks built, code loaded).

    python -m bench.render_throughput --style render --size 112 --batch 256 --images 8192
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import time

import numpy as np

from bench.host import host_info
from synthgen.procedural import STYLES, render_faces


def _render_share(style: str, size: int, batch: int, first: int, count: int, barrier) -> tuple[float, float]:
    """Warm up, wait for the other workers, then render ``count`` images; returns (wall s, CPU s)."""
    render_faces(np.arange(8), np.arange(8), style=style, size=size)
    barrier.wait()
    wall, cpu = time.perf_counter(), time.process_time()
    for start in range(first, first + count, batch):
        seeds = np.arange(start, min(start + batch, first + count))
        render_faces(seeds // 20, seeds, style=style, size=size)
    return time.perf_counter() - wall, time.process_time() - cpu


def measure(style: str, size: int, batch: int, images: int, workers: int) -> dict:
    """Render ``images`` images split over ``workers`` processes and report the aggregate rate."""
    ctx = mp.get_context("spawn")
    barrier = ctx.Manager().Barrier(workers + 1)
    share = -(-images // workers)
    with ctx.Pool(workers) as pool:
        jobs = [
            pool.apply_async(_render_share, (style, size, batch, k * share, share, barrier))
            for k in range(workers)
        ]
        barrier.wait()
        start = time.perf_counter()
        results = [job.get() for job in jobs]
        elapsed = time.perf_counter() - start
    cpu = sum(c for _, c in results)
    return {
        "benchmark": "procedural_render_throughput",
        "images_per_s": round(share * workers / elapsed, 1),
        "images_per_cpu_s": round(share * workers / cpu, 1),
        "images": share * workers,
        "size": size,
        "style": style,
        "batch": batch,
        "workers": workers,
        **host_info("numpy", "numba", "opencv-python-headless"),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--style", choices=sorted(STYLES), default="render")
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--images", type=int, default=8192)
    parser.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="processes (default: all cores)"
    )
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.style, args.size, args.batch, args.images, args.workers)))


if __name__ == "__main__":
    main()
