"""Shared helpers of the training tests: small procedural-face shard datasets and tiny configs."""

from __future__ import annotations

import functools

import numpy as np

from facesynth import shards
from facesynth.config import load_config
from recog.train.config import TrainFRJob
from synthgen.procedural import render_faces
from synthgen.stage import Generated, Generator, StageConfig, run_plain


class FaceGenerator(Generator):
    """Procedural faces: the identity fixes the face, the row seed the pose/light/expression."""

    name = "procedural-test"
    domain = "render"

    def __init__(self, size: int):
        self.size = size

    def generate(self, identities, samples, seeds):
        batch = render_faces(identities, seeds, size=self.size)
        n = len(seeds)
        return Generated(
            images=batch.images,
            identity_names=[f"id{i}" for i in identities],
            prompts=[""] * n,
            params=[{}] * n,
        )


def _make(size: int) -> FaceGenerator:
    return FaceGenerator(size)


def write_faces(
    uri: str, identities: int, samples: int, size: int = 32, per_unit: int = 2, seed: int = 1
) -> str:
    """A committed shard dataset of ``identities`` x ``samples`` procedural faces; returns ``uri``."""
    run_plain(
        shards.plan_units(identities, samples, per_unit),
        functools.partial(_make, size),
        uri,
        base_seed=seed,
        cfg=StageConfig(batch_size=64, commit_every_s=0),
        settings={},
    )
    return uri


def tiny_config(output: str, datasets: list[str], *overrides: str) -> TrainFRJob:
    """An IResNet-18 of width 1/8 at 32 px with a CosFace head, 1 CPU worker, through the real loader."""
    items = ", ".join(f"{{uri: '{d}'}}" for d in datasets)
    base = [
        f"output={output}",
        f"data.datasets=[{items}]",
        "data.shuffle_buffer=64",
        "data.decode_batch=32",
        "data.decode_cpus=0.5",
        "model.backbone=iresnet18",
        "model.width=0.125",
        "model.input_size=32",
        "model.embedding_dim=32",
        "model.head=cosface",
        "model.s=16",
        "optim.lr=0.05",
        "optim.schedule=constant",
        "train.batch_size=16",
        "train.steps=8",
        "train.log_every=2",
        "train.checkpoint_every=4",
        "scaling.cpus_per_worker=0.5",
    ]
    return load_config(TrainFRJob, None, [*base, *overrides])


def test_write_faces_gives_identity_major_rows(tmp_path):
    uri = write_faces(str(tmp_path / "ds"), identities=3, samples=2)
    rows = list(shards.iter_rows(uri, columns=["identity", "sample"]))
    assert [(r["identity"], r["sample"]) for r in rows] == [(i, s) for i in range(3) for s in range(2)]
    assert np.unique([r["identity"] for r in rows]).tolist() == [0, 1, 2]
