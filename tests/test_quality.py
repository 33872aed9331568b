"""Dataset-quality statistics on embeddings: hand-made cases and independent formulas."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from recog import quality
from recog.quality import (
    dataset_quality,
    fid,
    frechet_distance,
    identity_centres,
    identity_consistency,
    identity_leakage,
    inter_class_separation,
    intra_class_diversity,
    lpips_diversity,
    nearest_identity_threshold,
    precision_recall,
)

S = 1 / np.sqrt(2)


def test_identity_consistency_hand_case():
    emb = np.array([[2.0, 0.0], [0.0, 3.0], [1.0, 0.0], [0.0, -1.0]])
    ids = np.array([5, 5, 9, 9])
    out = identity_consistency(emb[:3], ids[:3])
    # identity 5: centre (1, 1)/sqrt2 -> both images at cos 1/sqrt2; identity 9: one image, cos 1
    assert out["per_identity"] == {5: pytest.approx(S), 9: pytest.approx(1.0)}
    assert out["mean"] == pytest.approx((2 * S + 1) / 3)
    assert identity_consistency(emb, ids)["per_identity"][9] == pytest.approx(S)


def test_intra_class_diversity_against_loops():
    rng = np.random.default_rng(0)
    emb, ids = rng.normal(size=(30, 6)), rng.integers(0, 4, 30)
    ids[0] = 7  # a singleton identity is left out
    out = intra_class_diversity(emb, ids)
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    expected = {}
    for identity in set(ids.tolist()) - {7}:
        m = unit[ids == identity]
        d = [1 - m[i] @ m[j] for i in range(len(m)) for j in range(len(m)) if i != j]
        expected[identity] = np.mean(d)
    assert set(out["per_identity"]) == set(expected)
    for identity, value in expected.items():
        assert out["per_identity"][identity] == pytest.approx(value)
    assert out["mean"] == pytest.approx(np.mean(list(expected.values())))
    orthogonal = intra_class_diversity(np.eye(3), np.zeros(3, int))
    assert orthogonal["mean"] == pytest.approx(1.0)


def test_inter_class_separation_hand_case():
    centres = np.array([[1.0, 0.0], [S, S], [0.0, -1.0]])
    out = inter_class_separation(np.repeat(centres, 2, axis=0), np.repeat([0, 1, 2], 2))
    # pairwise cosines: (0,1) S, (0,2) 0, (1,2) -S
    assert out["mean_centre_cosine"] == pytest.approx(0.0, abs=1e-12)
    assert out["nearest_centre_cosine_mean"] == pytest.approx((S + S + 0.0) / 3)
    assert out["nearest_centre_cosine_max"] == pytest.approx(S)
    with pytest.raises(ValueError, match="at least 2"):
        inter_class_separation(centres, np.zeros(3, int))


def _brute_precision_recall(real, fake, k):
    def radii(x):
        return np.array([np.sort(np.linalg.norm(x - p, axis=1))[k] for p in x])

    def covered(manifold, r, probes):
        return np.mean(
            [any(np.linalg.norm(m - p) <= rr for m, rr in zip(manifold, r, strict=True)) for p in probes]
        )

    return covered(real, radii(real), fake), covered(fake, radii(fake), real)


def test_precision_recall_hand_case_and_identical_sets():
    real = np.array([[0.0], [1.0], [2.0], [3.0]])
    fake = np.array([[0.5], [10.0]])
    out = precision_recall(real, fake, k=1)
    # real balls have radius 1: 0.5 is inside, 10 is not; fake balls have radius 9.5: every real point inside
    assert (out["precision"], out["recall"]) == (0.5, 1.0)
    x = np.random.default_rng(1).normal(size=(50, 8))
    same = precision_recall(x, x.copy())
    assert (same["precision"], same["recall"], same["k"]) == (1.0, 1.0, 3)


def test_precision_recall_matches_brute_force_with_chunking():
    rng = np.random.default_rng(2)
    real, fake = rng.normal(size=(60, 5)), rng.normal(0.7, 1.3, size=(45, 5))
    out = precision_recall(real, fake, k=3, chunk=7)
    expected = _brute_precision_recall(real, fake, 3)
    assert (out["precision"], out["recall"]) == pytest.approx(expected)
    assert 0 < out["precision"] < 1 and 0 < out["recall"] < 1
    with pytest.raises(ValueError, match="k=50"):
        precision_recall(real, fake, k=50)


def test_fid_identical_shifted_and_analytic():
    x = np.random.default_rng(3).normal(size=(400, 6)) @ np.diag([1, 2, 0.5, 1, 3, 1])
    assert abs(fid(x, x)) < 1e-6
    shift = np.array([1.0, -2.0, 0.5, 0.0, 0.0, 3.0])
    assert fid(x, x + shift) == pytest.approx(shift @ shift, rel=1e-6)
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    analytic = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)  # 5 + 1 + 1 + 0
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(analytic) == pytest.approx(7.0)
    rotation = np.linalg.qr(np.random.default_rng(4).normal(size=(3, 3)))[0]
    assert frechet_distance(
        mu1, rotation @ np.diag(a) @ rotation.T, mu2, rotation @ np.diag(b) @ rotation.T
    ) == (pytest.approx(analytic))
    with pytest.raises(ValueError, match="features"):
        fid(x, x[:, :3])


def _clustered(centres: np.ndarray, per_identity: int, spread: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    points = np.repeat(centres, per_identity, 0) + spread * rng.normal(
        size=(len(centres) * per_identity, centres.shape[1])
    )
    return points / np.linalg.norm(points, axis=1, keepdims=True)


def test_nearest_identity_threshold_flags_copies_and_few_new_identities():
    rng = np.random.default_rng(3)
    real_centres = rng.normal(size=(400, 16))
    real, real_ids = _clustered(real_centres, 4, 0.3, 1), np.repeat(np.arange(400), 4)
    _, centres = identity_centres(real, real_ids)
    cos = centres @ centres.T
    np.fill_diagonal(cos, -np.inf)
    threshold = nearest_identity_threshold(real, real_ids, fpr=0.05)
    assert threshold == pytest.approx(np.quantile(cos.max(1), 0.95), abs=1e-6)

    copies = _clustered(real_centres[:10], 4, 0.3, 2)  # new images of ten real people
    strangers = _clustered(rng.normal(size=(400, 16)), 4, 0.3, 3)  # new people, drawn like the real ones
    synthetic, synthetic_ids = np.concatenate([copies, strangers]), np.repeat(np.arange(410), 4)
    rows = identity_leakage(synthetic, synthetic_ids, real, real_ids, threshold)
    assert all(r["leaked"] and r["nearest_real_identity"] == r["synthetic_identity"] for r in rows[:10])
    flagged_strangers = sum(r["leaked"] for r in rows[10:]) / 400
    assert 0.02 < flagged_strangers < 0.09  # ~fpr; a fixed-count max over 400 would flag nearly all
    default = dataset_quality(
        synthetic, synthetic_ids, real, real_ids
    )  # threshold from the real set, fpr 0.01
    assert 10 <= default["leaked_identities"] <= 10 + 12

    # a narrow judge (every face in one cone) gets a higher threshold than a fixed cosine would assume
    cone = _clustered(real_centres * 0.25 + 3.0, 4, 0.3 * 0.25, 1)
    assert nearest_identity_threshold(cone, real_ids) > 0.9 > nearest_identity_threshold(real, real_ids)
    with pytest.raises(ValueError, match="at least 2"):
        nearest_identity_threshold(real[:4], real_ids[:4])
    with pytest.raises(ValueError, match="fpr"):
        nearest_identity_threshold(real, real_ids, fpr=0.0)


def test_identity_leakage_flags_near_copies():
    real = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    synthetic = np.array([[0.9, 0.1, 0.0], [0.0, 0.6, 0.8], [0.0, 0.62, 0.78]])
    rows = identity_leakage(synthetic, np.array([0, 1, 1]), real, np.array([10, 11, 12]), threshold=0.9)
    assert [(r["synthetic_identity"], r["nearest_real_identity"], r["leaked"]) for r in rows] == [
        (0, 10, True),
        (1, 12, False),
    ]
    assert rows[0]["cosine"] == pytest.approx(0.9 / np.hypot(0.9, 0.1))
    centre = synthetic[1] / np.linalg.norm(synthetic[1]) + synthetic[2] / np.linalg.norm(synthetic[2])
    assert rows[1]["cosine"] == pytest.approx(centre[2] / np.linalg.norm(centre))


def test_lpips_skipped_with_reason(monkeypatch, tmp_path):
    images = np.zeros((4, 8, 8, 3), np.uint8)
    ids = np.array([0, 0, 1, 1])
    real_find_spec = importlib.util.find_spec

    def find_spec(present):
        return lambda name, *args: (
            (object() if present else None) if name == "lpips" else real_find_spec(name, *args)
        )

    monkeypatch.setattr(quality.importlib.util, "find_spec", find_spec(present=False))
    assert lpips_diversity(images, ids) == {
        "status": "skipped",
        "reason": "the lpips package is not installed",
    }
    # package present but the torchvision backbone weights are not cached: skipped, nothing downloaded
    monkeypatch.setattr(quality.importlib.util, "find_spec", find_spec(present=True))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    out = lpips_diversity(images, ids, net="vgg")
    assert (
        out["status"] == "skipped"
        and str(tmp_path / "checkpoints") in out["reason"]
        and "vgg" in out["reason"]
    )
    with pytest.raises(ValueError, match="net='resnet'"):
        lpips_diversity(images, ids, net="resnet")


def test_dataset_quality_combines_the_parts():
    rng = np.random.default_rng(5)
    centres = rng.normal(size=(4, 16))
    ids = np.repeat(np.arange(4), 10)
    syn = centres[ids] + 0.3 * rng.normal(size=(40, 16))
    real = centres[ids] + 0.3 * rng.normal(size=(40, 16))
    out = dataset_quality(syn, ids, real, ids + 100, leakage_threshold=0.8)
    assert out["identity_consistency"] == identity_consistency(syn, ids)["mean"]
    assert out["intra_class_diversity"] == intra_class_diversity(syn, ids)["mean"]
    assert out["fid"] == fid(real, syn)
    assert (out["precision"], out["recall"]) == tuple(precision_recall(real, syn).values())[:2]
    assert out["leaked_identities"] == 4  # same centres: every synthetic identity copies a real one
    assert set(dataset_quality(syn, ids)) == {
        "identity_consistency",
        "intra_class_diversity",
        "mean_centre_cosine",
        "nearest_centre_cosine_mean",
        "nearest_centre_cosine_max",
    }


def test_consistency_chance_separates_clustered_from_random_identities():
    from recog.quality import consistency_chance, identity_consistency

    rng = np.random.default_rng(0)
    ids = np.repeat(np.arange(20), 5)
    centres = rng.normal(size=(20, 64))
    clustered = centres[ids] + 0.3 * rng.normal(size=(100, 64))
    random = rng.normal(size=(100, 64))
    chance = consistency_chance(clustered, ids)
    assert identity_consistency(clustered, ids)["mean"] > 0.9 > 0.6 > chance
    # random embeddings: consistency is at chance level (about 1/sqrt(5) from the self term)
    assert abs(identity_consistency(random, ids)["mean"] - consistency_chance(random, ids)) < 0.02
    assert 0.35 < consistency_chance(random, ids) < 0.55
