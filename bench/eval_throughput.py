"""Verification throughput (pairs/s): Ray actors (``EmbedPool``) vs one process, same exported model.

A tiny IResNet is exported with ``recog.export.export_embedder``; a 6,000-pair set of random uint8
faces is embedded (with flip) and verified with the insightface protocol. The single-process loop
is timed from model load to accuracy; the Ray path once from actor start (``embed_with_ray``, cold)
and then on a running pool (warm: what every set after the first costs in ``jobs.evaluate``).
Prints one JSON object.

    .venv/bin/python -m bench.eval_throughput --workers 2 --size 48 --width 0.125
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np
import torch

from bench.host import host_info
from facesynth.embed import EmbedPool, embed_with_ray
from facesynth.face_model import EmbeddedImages, load_face_model
from recog.backbones import build_backbone
from recog.export import export_embedder
from recog.verification import verify_embeddings


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pairs", type=int, default=6000, help="pairs in the set (LFW: 6000)")
    parser.add_argument("--size", type=int, default=48, help="image side, a multiple of 16 up to 112")
    parser.add_argument("--width", type=float, default=0.125, help="IResNet channel multiplier")
    parser.add_argument("--backbone", default="iresnet18")
    parser.add_argument("--embedding-dim", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2, help="Ray actors (and torch threads for the loop)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per path; the best is reported")
    args = parser.parse_args(argv)
    if not 16 <= args.size <= 112 or args.size % 16:
        parser.error(f"--size {args.size}: expected a multiple of 16 from 16 to 112")
    if args.pairs < 20 or args.workers < 1 or args.repeats < 1:
        parser.error("--pairs >= 20, --workers >= 1 and --repeats >= 1 are required")
    return args


def accuracy(embedded: EmbeddedImages, issame: np.ndarray) -> float:
    return verify_embeddings(embedded.embeddings[0::2], embedded.embeddings[1::2], issame).accuracy


def timed(fn, repeats: int) -> tuple[list[float], float]:
    """Run ``fn`` ``repeats`` times; the wall times and the last result."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return times, result


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import ray

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(2 * args.pairs, args.size, args.size, 3), dtype=np.uint8)
    issame = rng.random(args.pairs) < 0.5
    backbone = build_backbone(
        args.backbone, embedding_dim=args.embedding_dim, width=args.width, input_size=args.size
    )
    with tempfile.TemporaryDirectory() as model_dir:
        export_embedder(
            backbone,
            model_dir,
            input_size=args.size,
            embedding_dim=args.embedding_dim,
            mean=[0.5] * 3,
            std=[0.5] * 3,
        )
        torch.set_num_threads(args.workers)
        loop_times, loop_acc = timed(
            lambda: accuracy(load_face_model(model_dir).embed_set(images, args.batch_size), issame),
            args.repeats,
        )
        ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
        try:
            cold_times, _ = timed(
                lambda: accuracy(embed_with_ray(model_dir, images, args.workers, args.batch_size), issame), 1
            )
            with EmbedPool(model_dir, args.workers) as pool:
                ray_times, ray_acc = timed(
                    lambda: accuracy(pool.embed(images, args.batch_size), issame), args.repeats
                )
        finally:
            ray.shutdown()
    result = {
        "pairs": args.pairs,
        "images_embedded": 4 * args.pairs,  # each image and its mirror
        "size": args.size,
        "backbone": args.backbone,
        "width": args.width,
        "embedding_dim": args.embedding_dim,
        "workers": args.workers,
        "batch_size": args.batch_size,
        "ray_actors_pairs_per_s": round(args.pairs / min(ray_times), 1),
        "single_process_pairs_per_s": round(args.pairs / min(loop_times), 1),
        "speedup": round(min(loop_times) / min(ray_times), 3),
        "ray_actors_cold_pairs_per_s": round(args.pairs / cold_times[0], 1),
        "ray_actors_seconds": [round(t, 3) for t in ray_times],
        "ray_actors_cold_seconds": round(cold_times[0], 3),
        "single_process_seconds": [round(t, 3) for t in loop_times],
        "same_accuracy": loop_acc == ray_acc,
        **host_info("torch", "numpy"),
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
