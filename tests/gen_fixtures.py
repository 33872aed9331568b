"""A tiny deterministic generator and job entry point for shard-writer tests (seeded noise images)."""

from __future__ import annotations

import sys
import time

import numpy as np

from synthgen.stage import Generated, Generator, StageConfig, run_plain, run_ray


class NoiseGenerator(Generator):
    """Image of row i = uniform noise from its seed; ``delay`` seconds per call to allow a mid-run kill."""

    name = "noise"
    domain = "render"

    def __init__(self, size: int = 16, delay: float = 0.0):
        self.size, self.delay = size, delay

    def generate(self, identities, samples, seeds):
        time.sleep(self.delay)
        images = np.stack(
            [
                np.random.default_rng(int(s)).integers(0, 256, (self.size, self.size, 3), np.uint8)
                for s in seeds
            ]
        )
        return Generated(
            images=images,
            identity_names=[f"id{i:05d}" for i in identities],
            prompts=[""] * len(seeds),
            params=[{"size": self.size}] * len(seeds),
        )


SETTINGS = {"noise": 16}  # the settings tests pin for make_noise(16) datasets


def make_noise(size: int = 16, delay: float = 0.0):
    return NoiseGenerator(size, delay)


def main(argv: list[str]) -> None:
    """``python -m tests.gen_fixtures URI MODE DELAY``: write 12 units of 2 ids x 3 samples."""
    import functools

    from facesynth import shards

    uri, mode, delay = argv[0], argv[1], float(argv[2])
    units = shards.plan_units(24, 3, 2)
    cfg = StageConfig(batch_size=4, commit_every_s=0)
    factory = functools.partial(make_noise, 16, delay)
    if mode == "ray":
        import ray

        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        run_ray(units, factory, uri, base_seed=7, cfg=cfg, settings=SETTINGS)
    else:
        run_plain(units, factory, uri, base_seed=7, cfg=cfg, settings=SETTINGS)
    shards.remove_uncommitted(uri)


if __name__ == "__main__":
    main(sys.argv[1:])
