"""Offline verification benchmarks built from procedural identities that training never uses.

Identity ``k`` of a benchmark is identity seed ``identity_offset + k`` of the procedural renderer, the same
identity-to-seed mapping as procedural training data, so a training set with identity ids below
``identity_offset`` shares no identity with the benchmark.

Written at ``out_uri``:

- ``lfw-like.bin``, ``cfp-fp-like.bin``, ``agedb-like.bin``: insightface ``.bin`` pair sets (PNG images,
  pairs consecutive) in 10 contiguous folds of equal size, each half positive then half negative, with
  the identities of different folds disjoint (as in LFW's pairs.txt). ``cfp-fp-like`` pairs a near-frontal
  image with a profile; in ``agedb-like`` every pair holds one young and one aged image. Each set has a
  ``{name}.pairs.parquet`` with per-pair fold, identities, seeds, yaw and age.
- ``ijbc-like/``: IJB-C-style templates for TAR@FMR (read back by ``facesynth.binsets.read_template_set``): ``templates.parquet`` (one row per image: ``image``
  PNG bytes, ``template_id``, ``media_id``, ``identity``, ``sample_seed``) and ``pairs.parquet``
  (``template_1``, ``template_2``, ``issame``). Every identity has two templates; a template holds one or
  two media (capture sessions: one of 91 pose-neighbourhood x light-direction settings) of one to three
  frames each. One pair in ten is genuine. :func:`read_template_set` reads the folder back.
- ``benchmark.json``: the summary returned by :func:`build_benchmark`, written last.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field, field_validator

from facesynth import binsets, images, storage
from facesynth.config import OutputUri, StrictModel, save_resolved
from facesynth.preflight import check_output_writable
from synthgen.procedural import render_faces
from synthgen.procedural.render import check_size
from synthgen.procedural.styles import get_style

FOLDS = 10
PAIR_SETS = {"lfw-like": 6000, "cfp-fp-like": 7000, "agedb-like": 6000}  # the standard pair counts
TEMPLATE_SET = "ijbc-like"
DEFAULT_TEMPLATE_PAIRS = 20_000
IMPOSTORS_PER_GENUINE = 9
RENDER_BATCH = 1024
FRONTAL = {"yaw_range": (-5.0, 5.0)}
PROFILES = ({"yaw_range": (-85.0, -65.0)}, {"yaw_range": (65.0, 85.0)})
YOUNG, OLD = {"age_range": (0.0, 0.15)}, {"age_range": (0.7, 1.0)}
# Capture sessions of the template set: frames of one media share a pose neighbourhood and the light direction.
SESSIONS = tuple(
    {"yaw_range": (yaw - 5.0, yaw + 5.0), "light_azimuth_range": (azimuth - 5.0, azimuth + 5.0)}
    for yaw in range(-60, 61, 10)
    for azimuth in range(-60, 61, 20)
)
# Per pair set: the view each image is rendered under; chosen by _assign_views.
VIEWS: dict[str, tuple[dict | None, ...]] = {
    "lfw-like": (None,),
    "cfp-fp-like": (FRONTAL, *PROFILES),
    "agedb-like": (YOUNG, OLD),
}


def build_benchmark(
    out_uri: str,
    *,
    style: str,
    size: int = 112,
    identity_offset: int = 1_000_000,
    num_identities: int = 3000,
    seed: int = 0,
    pair_counts: Mapping[str, int] | None = None,
) -> dict:
    """Render the benchmark sets at ``out_uri``; returns (and writes as ``benchmark.json``) a summary.

    ``pair_counts`` overrides the number of pairs per set (``lfw-like``, ``cfp-fp-like``, ``agedb-like``:
    multiples of 20 so that every fold holds as many positive as negative pairs; ``ijbc-like``: template
    pairs, a multiple of 10 and at least 100); 0 leaves a set out. All inputs are checked before anything
    is rendered or written.
    """
    get_style(style)
    size = check_size(size)
    counts = resolve_pair_counts(pair_counts)
    if identity_offset < 0 or seed < 0:
        raise ValueError(f"identity_offset={identity_offset}, seed={seed}: expected non-negative integers")
    genuine = counts.get(TEMPLATE_SET, 0) // (IMPOSTORS_PER_GENUINE + 1)
    needed = max(2 * FOLDS if any(counts.get(name) for name in PAIR_SETS) else 0, genuine)
    if num_identities < needed:
        raise ValueError(
            f"num_identities={num_identities}: these pair counts need at least {needed} identities "
            f"(2 per fold for the pair sets, 1 per genuine template pair for {TEMPLATE_SET})"
        )
    pool = identity_offset + np.arange(num_identities, dtype=np.int64)
    summary = {
        "out_uri": out_uri,
        "style": style,
        "size": size,
        "seed": seed,
        "identity_offset": identity_offset,
        "num_identities": num_identities,
        "identity_range": [int(pool[0]), int(pool[-1]) + 1],
        "sets": {},
    }
    for index, name in enumerate((*PAIR_SETS, TEMPLATE_SET)):
        if counts.get(name):
            rng = np.random.default_rng([seed, index])
            build = _build_template_set if name == TEMPLATE_SET else _build_pair_set
            summary["sets"][name] = build(out_uri, name, counts[name], pool, rng, style, size)
    storage.write_bytes(storage.join(out_uri, "benchmark.json"), json.dumps(summary, indent=2).encode())
    return summary


def resolve_pair_counts(pair_counts: Mapping[str, int] | None = None) -> dict[str, int]:
    """Every set's pair count: ``pair_counts`` over the standard ones; ValueError for unknown sets or counts
    that cannot be split into balanced folds."""
    counts = {**PAIR_SETS, TEMPLATE_SET: DEFAULT_TEMPLATE_PAIRS, **(pair_counts or {})}
    known = [*PAIR_SETS, TEMPLATE_SET]
    for name, count in counts.items():
        if name not in known:
            raise ValueError(f"pair_counts: unknown set {name!r}; expected some of {known}")
        if isinstance(count, bool) or not isinstance(count, int | np.integer) or count < 0:
            raise ValueError(f"pair_counts[{name!r}]={count!r}: expected a non-negative integer")
        if name in PAIR_SETS and count % (2 * FOLDS):
            raise ValueError(
                f"pair_counts[{name!r}]={count}: expected a multiple of {2 * FOLDS} so that each of the "
                f"{FOLDS} folds holds as many positive as negative pairs"
            )
        if name == TEMPLATE_SET and count and (count % (IMPOSTORS_PER_GENUINE + 1) or count < 100):
            raise ValueError(
                f"pair_counts[{name!r}]={count}: expected 0 or a multiple of {IMPOSTORS_PER_GENUINE + 1} of at "
                "least 100 (one genuine pair in ten, each impostor pair distinct)"
            )
    return {name: int(count) for name, count in counts.items()}


class BenchmarkJob(StrictModel):
    """The build_benchmark job: which procedural identities, rendered how, into which sets."""

    output: OutputUri = Field(description="folder URI for the .bin sets, template sets and benchmark.json")
    style: str = Field("render", pattern="^(render|photo)$")
    size: int = Field(112, ge=32, le=128)
    identity_offset: int = Field(
        1_000_000, ge=0, description="first benchmark identity; keep training ids below"
    )
    num_identities: int = Field(3000, ge=1)
    seed: int = Field(0, ge=0)
    pair_counts: dict[str, int] = Field(
        default_factory=resolve_pair_counts,
        description="pairs per set (lfw-like, cfp-fp-like, agedb-like: multiples of 20; ijbc-like: template "
        "pairs); 0 leaves a set out; a set not named keeps its standard count (6000/7000/6000/20000), "
        "which the resolved config.yaml then records",
    )

    @field_validator("pair_counts")
    @classmethod
    def _every_set(cls, counts: dict[str, int]) -> dict[str, int]:
        return resolve_pair_counts(counts)


@dataclass(frozen=True)
class BenchmarkResult:
    """The sets written at ``uri`` (``benchmark.json``'s content)."""

    uri: str
    info: dict

    def summary(self) -> dict:
        return self.info

    def headline(self) -> str:
        return ", ".join(f"{name}: {s['pairs']} pairs" for name, s in self.info["sets"].items())


def run(job: BenchmarkJob) -> BenchmarkResult:
    """Write the benchmark sets and the resolved config."""
    check_output_writable(job.output)
    info = build_benchmark(
        job.output,
        style=job.style,
        size=job.size,
        identity_offset=job.identity_offset,
        num_identities=job.num_identities,
        seed=job.seed,
        pair_counts=job.pair_counts,
    )
    save_resolved(job, job.output)
    return BenchmarkResult(job.output, info)


def _pair_identities(
    rng: np.random.Generator, pool: np.ndarray, n_pairs: int
) -> tuple[np.ndarray, np.ndarray]:
    """Identities of both sides of each pair: fold f draws from the f-th tenth of the pool only."""
    per_fold, group = n_pairs // FOLDS, len(pool) // FOLDS
    half = per_fold // 2
    first, second = [], []
    for fold in range(FOLDS):
        members = pool[fold * group : (fold + 1) * group]
        positive = rng.integers(group, size=half)
        negative = rng.integers(group, size=half)
        other = (negative + 1 + rng.integers(group - 1, size=half)) % group  # always another identity
        first.append(members[np.concatenate([positive, negative])])
        second.append(members[np.concatenate([positive, other])])
    return np.concatenate(first), np.concatenate(second)


def _assign_views(name: str, rng: np.random.Generator, n_pairs: int) -> np.ndarray:
    """Index into ``VIEWS[name]`` for each image (pairs consecutive)."""
    views = np.zeros((n_pairs, 2), np.int64)
    if name == "cfp-fp-like":
        views[:, 1] = 1 + rng.integers(2, size=n_pairs)  # frontal first, then a profile facing either way
    elif name == "agedb-like":
        views[np.arange(n_pairs), rng.integers(2, size=n_pairs)] = 1  # which side of the pair is aged
    return views.reshape(-1)


@dataclass(frozen=True)
class _Rendered:
    images: list[bytes]
    yaw: np.ndarray
    age: np.ndarray


def _render(
    ids: np.ndarray, seeds: np.ndarray, views: np.ndarray, overrides, style: str, size: int
) -> _Rendered:
    """Render each image under ``overrides[views[i]]``; PNG bytes plus the yaw and age drawn."""
    encoded: list[bytes] = [b""] * len(ids)
    yaw, age = np.zeros(len(ids)), np.zeros(len(ids))
    for view, override in enumerate(overrides):
        group = np.flatnonzero(views == view)
        for start in range(0, len(group), RENDER_BATCH):  # bounded memory: only PNG bytes are kept
            rows = group[start : start + RENDER_BATCH]
            batch = render_faces(ids[rows], seeds[rows], style=style, size=size, overrides=override)
            yaw[rows], age[rows] = batch.nuisance["yaw"], batch.nuisance["age"]
            for row, data in zip(rows, images.encode(batch.images)):
                encoded[row] = data
    return _Rendered(encoded, yaw, age)


def _build_pair_set(out_uri, name, n_pairs, pool, rng, style, size) -> dict:
    first, second = _pair_identities(rng, pool, n_pairs)
    ids = np.stack([first, second], 1).reshape(-1)
    seeds = 2 * rng.integers(0, 2**61, size=n_pairs).repeat(2) + np.tile([0, 1], n_pairs)
    rendered = _render(ids, seeds, _assign_views(name, rng, n_pairs), VIEWS[name], style, size)
    issame = first == second
    uri, meta_uri = storage.join(out_uri, f"{name}.bin"), storage.join(out_uri, f"{name}.pairs.parquet")
    binsets.write_bin(uri, rendered.images, issame.tolist())
    meta = {
        "fold": np.arange(n_pairs) // (n_pairs // FOLDS),
        "issame": issame,
        "identity_1": first,
        "identity_2": second,
        "seed_1": seeds[0::2],
        "seed_2": seeds[1::2],
        "yaw_1": rendered.yaw[0::2],
        "yaw_2": rendered.yaw[1::2],
        "age_1": rendered.age[0::2],
        "age_2": rendered.age[1::2],
    }
    _write_parquet(meta_uri, meta)
    return {
        "path": uri,
        "pairs_meta": meta_uri,
        "pairs": n_pairs,
        "positives": int(issame.sum()),
        "images": 2 * n_pairs,
    }


def _build_template_set(out_uri, name, n_pairs, pool, rng, style, size) -> dict:
    genuine = n_pairs // (IMPOSTORS_PER_GENUINE + 1)
    identities = rng.choice(pool, size=genuine, replace=False)
    # Each template holds 1-2 media of 1-3 frames; the frames of one media share a capture session.
    media_per_template = rng.integers(1, 3, size=2 * genuine)
    media_template = np.repeat(np.arange(2 * genuine), media_per_template)
    frames = rng.integers(1, 4, size=len(media_template))
    media = np.repeat(np.arange(len(media_template)), frames)
    template = media_template[media]
    ids = identities[template // 2]
    seeds = rng.integers(0, 2**62, size=len(media))
    session = rng.integers(len(SESSIONS), size=len(media_template))[media]
    rendered = _render(ids, seeds, session, SESSIONS, style, size)
    # Genuine pairs: the two templates of each identity. Impostor k pairs identity i = k mod G with identity
    # (i + 1 + k div G) mod G, so all impostor pairs are distinct; either template of each side.
    k = np.arange(IMPOSTORS_PER_GENUINE * genuine)
    first_identity, second_identity = k % genuine, (k % genuine + 1 + k // genuine) % genuine
    template_1 = np.concatenate([2 * np.arange(genuine), 2 * first_identity + rng.integers(2, size=len(k))])
    template_2 = np.concatenate(
        [2 * np.arange(genuine) + 1, 2 * second_identity + rng.integers(2, size=len(k))]
    )
    folder = storage.join(out_uri, name)
    columns = {
        "image": rendered.images,
        "template_id": template,
        "media_id": media,
        "identity": ids,
        "sample_seed": seeds,
    }
    _write_parquet(storage.join(folder, "templates.parquet"), columns)
    pairs = {"template_1": template_1, "template_2": template_2, "issame": np.arange(n_pairs) < genuine}
    _write_parquet(storage.join(folder, "pairs.parquet"), pairs)
    return {
        "path": folder,
        "pairs": n_pairs,
        "positives": genuine,
        "templates": 2 * genuine,
        "media": len(media_template),
        "images": len(media),
    }


def _write_parquet(uri: str, columns: Mapping[str, object]) -> None:
    buffer = io.BytesIO()
    pq.write_table(pa.table(dict(columns)), buffer)
    storage.write_bytes(uri, buffer.getvalue())
