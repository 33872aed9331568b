"""Offline benchmark sets: pair counts, balanced folds, identity disjointness, set structure, errors."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from facesynth import binsets
from facesynth.binsets import read_template_set
from synthgen.benchmark_sets import FOLDS, build_benchmark

OFFSET, IDENTITIES = 1_000_000, 30
COUNTS = {"lfw-like": 40, "cfp-fp-like": 60, "agedb-like": 40, "ijbc-like": 100}


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "sets"
    summary = build_benchmark(
        str(out),
        style="render",
        size=32,
        identity_offset=OFFSET,
        num_identities=IDENTITIES,
        pair_counts=COUNTS,
    )
    return out, summary


def _meta(out, name: str) -> dict[str, np.ndarray]:
    table = pq.read_table(out / f"{name}.pairs.parquet")
    return {column: table[column].to_numpy() for column in table.column_names}


@pytest.mark.parametrize("name", ["lfw-like", "cfp-fp-like", "agedb-like"])
def test_pair_sets_have_the_requested_pairs_in_balanced_contiguous_folds(bench, name):
    out, summary = bench
    bins, issame = binsets.read_bin(str(out / f"{name}.bin"))
    pairs = COUNTS[name]
    assert len(bins) == 2 * pairs and len(issame) == pairs
    assert binsets.decode_images(bins[:4], 32).shape == (4, 32, 32, 3)
    folds = issame.reshape(FOLDS, pairs // FOLDS)
    half = pairs // FOLDS // 2
    assert folds[:, :half].all() and not folds[:, half:].any()  # each fold: positives, then as many negatives
    assert summary["sets"][name] == {
        "path": str(out / f"{name}.bin"),
        "pairs_meta": str(out / f"{name}.pairs.parquet"),
        "pairs": pairs,
        "positives": pairs // 2,
        "images": 2 * pairs,
    }


@pytest.mark.parametrize("name", ["lfw-like", "cfp-fp-like", "agedb-like"])
def test_pairs_use_benchmark_identities_disjoint_across_folds(bench, name):
    out, _ = bench
    meta = _meta(out, name)
    _, issame = binsets.read_bin(str(out / f"{name}.bin"))
    assert np.array_equal(meta["issame"], issame)
    assert np.array_equal(meta["identity_1"] == meta["identity_2"], issame)
    identities = np.concatenate([meta["identity_1"], meta["identity_2"]])
    assert identities.min() >= OFFSET and identities.max() < OFFSET + IDENTITIES  # training uses ids < OFFSET
    assert np.array_equal(meta["fold"], np.arange(len(issame)) // (len(issame) // FOLDS))
    per_fold = [set(identities[np.tile(meta["fold"], 2) == f]) for f in range(FOLDS)]
    assert all(not (per_fold[f] & per_fold[g]) for f in range(FOLDS) for g in range(f + 1, FOLDS))
    assert not np.any(meta["seed_1"] == meta["seed_2"])


def test_cfp_fp_like_pairs_a_frontal_image_with_a_profile(bench):
    meta = _meta(bench[0], "cfp-fp-like")
    assert np.all(np.abs(meta["yaw_1"]) <= 5.0)
    assert np.all((np.abs(meta["yaw_2"]) >= 65.0) & (np.abs(meta["yaw_2"]) <= 85.0))
    assert (meta["yaw_2"] > 0).any() and (meta["yaw_2"] < 0).any()


def test_agedb_like_pairs_a_young_with_an_aged_image(bench):
    meta = _meta(bench[0], "agedb-like")
    young, old = np.minimum(meta["age_1"], meta["age_2"]), np.maximum(meta["age_1"], meta["age_2"])
    assert np.all(young <= 0.15) and np.all(old >= 0.7)
    assert (meta["age_1"] > meta["age_2"]).any() and (meta["age_1"] < meta["age_2"]).any()


def test_template_set_structure(bench):
    out, summary = bench
    ts = read_template_set(str(out / "ijbc-like"))
    genuine = COUNTS["ijbc-like"] // 10
    assert len(ts.issame) == COUNTS["ijbc-like"] and ts.issame.sum() == genuine
    identity_of = {}
    for template, identity in zip(ts.template_ids, ts.identities):
        assert identity_of.setdefault(template, identity) == identity  # one identity per template
    media_template = {}
    for media, template in zip(ts.media_ids, ts.template_ids):
        assert media_template.setdefault(media, template) == template  # media nest inside templates
    first = np.array([identity_of[t] for t in ts.template_1])
    second = np.array([identity_of[t] for t in ts.template_2])
    assert np.array_equal(first == second, ts.issame)
    assert len({(a, b) for a, b in zip(ts.template_1, ts.template_2)}) == len(ts.issame)
    assert ts.identities.min() >= OFFSET and ts.identities.max() < OFFSET + IDENTITIES
    assert summary["sets"]["ijbc-like"]["images"] == len(ts.images) and len(identity_of) == 2 * genuine
    assert binsets.decode_images(ts.images[:2], 32).shape == (2, 32, 32, 3)


def test_summary_is_written_last_as_benchmark_json(bench):
    out, summary = bench
    assert json.loads((out / "benchmark.json").read_text()) == summary
    assert summary["identity_range"] == [OFFSET, OFFSET + IDENTITIES]


def test_same_arguments_give_identical_files(tmp_path):
    counts = {"lfw-like": 20, "cfp-fp-like": 0, "agedb-like": 0, "ijbc-like": 0}
    for name in ("a", "b"):
        build_benchmark(str(tmp_path / name), style="photo", size=32, num_identities=20, pair_counts=counts)
    assert (tmp_path / "a" / "lfw-like.bin").read_bytes() == (tmp_path / "b" / "lfw-like.bin").read_bytes()
    assert not (tmp_path / "a" / "cfp-fp-like.bin").exists()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"pair_counts": {"lfw-like": 30}}, r"pair_counts\['lfw-like'\]=30: expected a multiple of 20"),
        ({"pair_counts": {"calfw-like": 20}}, r"pair_counts: unknown set 'calfw-like'"),
        (
            {"pair_counts": {"ijbc-like": 95}},
            r"pair_counts\['ijbc-like'\]=95: expected 0 or a multiple of 10",
        ),
        (
            {"pair_counts": {"lfw-like": -20}},
            r"pair_counts\['lfw-like'\]=-20: expected a non-negative integer",
        ),
        ({"num_identities": 19}, r"num_identities=19: these pair counts need at least 20 identities"),
        ({"identity_offset": -1}, r"identity_offset=-1, seed=0: expected non-negative integers"),
        ({"style": "sketch"}, r"unknown style 'sketch'"),
        ({"size": 256}, r"size=256: expected an integer from 32 to 128"),
    ],
)
def test_bad_arguments_fail_before_anything_is_written(tmp_path, kwargs, message):
    args = {"style": "render", "size": 32, "num_identities": 20, "pair_counts": {"ijbc-like": 0}}
    merged = {**args, **kwargs, "pair_counts": {**args["pair_counts"], **kwargs.get("pair_counts", {})}}
    with pytest.raises(ValueError, match=message):
        build_benchmark(str(tmp_path / "out"), **merged)
    assert not (tmp_path / "out").exists()
