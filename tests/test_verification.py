"""Verification protocol: our vectorised code against a plain re-implementation of insightface's path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.interpolate import BSpline
from sklearn.model_selection import KFold
from sklearn.preprocessing import normalize

from facesynth.face_model import embed_images, fuse_flip, l2_normalize
from recog.verification import _far_threshold, fold_bounds, verify_embeddings

torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------
# Reference: the protocol written out the slow, obvious way (sklearn KFold, one threshold at a time).
# ---------------------------------------------------------------------------------------------
def _accuracy(threshold, dist, same):
    pred = np.less(dist, threshold)
    tp = np.sum(np.logical_and(pred, same))
    tn = np.sum(np.logical_and(np.logical_not(pred), np.logical_not(same)))
    return float(tp + tn) / dist.size


def _val_far(threshold, dist, same):
    pred = np.less(dist, threshold)
    accepted_same = np.sum(np.logical_and(pred, same))
    accepted_diff = np.sum(np.logical_and(pred, np.logical_not(same)))
    return float(accepted_same) / float(np.sum(same)), float(accepted_diff) / float(
        np.sum(np.logical_not(same))
    )


def _old_scipy_slinear(x, y, at):
    """What scipy<=1.8 ``interp1d(x, y, kind='slinear')`` evaluated: the degree-1 B-spline with knots [x0, x, x_end]."""
    order = np.argsort(x, kind="mergesort")
    x, y = x[order], y[order]
    return BSpline.construct_fast(np.r_[x[0], x, x[-1]], y, 1)(at)


def reference_verification(emb1, emb2, issame, nrof_folds=10, far_target=1e-3):
    issame = np.asarray(issame, dtype=bool)
    dist = np.sum(np.square(np.subtract(emb1, emb2)), 1)
    kfold = KFold(n_splits=nrof_folds, shuffle=False)
    indices = np.arange(len(dist))

    thresholds = np.arange(0, 4, 0.01)
    accuracies, best = [], []
    for train, test in kfold.split(indices):
        train_acc = np.zeros(len(thresholds))
        for i, threshold in enumerate(thresholds):
            train_acc[i] = _accuracy(threshold, dist[train], issame[train])
        best_index = int(np.argmax(train_acc))
        best.append(thresholds[best_index])
        accuracies.append(_accuracy(thresholds[best_index], dist[test], issame[test]))

    thresholds = np.arange(0, 4, 0.001)
    vals, fars = [], []
    for train, test in kfold.split(indices):
        far_train = np.zeros(len(thresholds))
        for i, threshold in enumerate(thresholds):
            far_train[i] = _val_far(threshold, dist[train], issame[train])[1]
        threshold = (
            _old_scipy_slinear(far_train, thresholds, far_target) if np.max(far_train) >= far_target else 0.0
        )
        val, far = _val_far(threshold, dist[test], issame[test])
        vals.append(val)
        fars.append(far)
    accuracies, vals = np.array(accuracies), np.array(vals)
    return {
        "accuracy": np.mean(accuracies),
        "std": np.std(accuracies),
        "val": np.mean(vals),
        "val_std": np.std(vals),
        "far": np.mean(fars),
        "best": np.array(best),
    }


def _random_pairs(seed, n_pairs, dim=16, dtype=np.float64):
    rng = np.random.default_rng(seed)
    emb = normalize(rng.normal(size=(2 * n_pairs, dim))).astype(dtype)
    return emb[0::2], emb[1::2], rng.random(n_pairs) < 0.5


def _identity_pairs(seed, n_pairs, n_ids=60, dim=64, noise=0.08, dtype=np.float64):
    """Real-like: samples are noisy copies of identity centres; same pairs share the identity."""
    rng = np.random.default_rng(seed)
    centres = normalize(rng.normal(size=(n_ids, dim)))
    issame = rng.random(n_pairs) < 0.5
    id1 = rng.integers(0, n_ids, n_pairs)
    id2 = np.where(issame, id1, (id1 + rng.integers(1, n_ids, n_pairs)) % n_ids)

    def sample(ids):
        return normalize(centres[ids] + noise * rng.normal(size=(n_pairs, dim))).astype(dtype)

    return sample(id1), sample(id2), issame


def _alternating_pairs(n_pairs=2222, dim=24):
    """Alternating diff/same pairs: 1000 training diff pairs in most folds, so FAR hits 1e-3 exactly."""
    rng = np.random.default_rng(7)
    emb = normalize(rng.normal(size=(2 * n_pairs, dim)))
    issame = np.arange(n_pairs) % 2 == 1
    return emb[0::2], emb[1::2], issame


def _quantised_pairs(n_pairs=1000, dim=8):
    """One-hot embeddings: distances are exactly 0, 2 or 4, which lie on both threshold grids."""
    rng = np.random.default_rng(9)
    axes, signs = rng.integers(0, dim, (2, n_pairs)), rng.choice([-1.0, 1.0], (2, n_pairs))
    emb = np.zeros((2, n_pairs, dim))
    for k in range(2):
        emb[k, np.arange(n_pairs), axes[k]] = signs[k]
    dist = np.sum((emb[0] - emb[1]) ** 2, 1)
    issame = np.where(dist == 2.0, rng.random(n_pairs) < 0.3, dist == 0.0)
    return emb[0], emb[1], issame


CASES = {
    "random-1003": lambda: _random_pairs(0, 1003),
    "random-997-f32": lambda: _random_pairs(1, 997, dtype=np.float32),
    "random-2000": lambda: _random_pairs(2, 2000, dim=8),
    "identities-1501": lambda: _identity_pairs(3, 1501),
    "identities-6000-f32": lambda: _identity_pairs(4, 6000, noise=0.12, dtype=np.float32),
    "identities-easy-999": lambda: _identity_pairs(5, 999, noise=0.02),
    "alternating-2222": _alternating_pairs,
    "quantised-1000": _quantised_pairs,
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_reference_protocol(case):
    emb1, emb2, issame = CASES[case]()
    ours = verify_embeddings(emb1, emb2, issame)
    ref = reference_verification(emb1, emb2, issame)
    assert ours.accuracy == pytest.approx(ref["accuracy"], abs=1e-9, rel=0)
    assert ours.std == pytest.approx(ref["std"], abs=1e-9, rel=0)
    assert ours.val == pytest.approx(ref["val"], abs=1e-9, rel=0)
    assert ours.val_std == pytest.approx(ref["val_std"], abs=1e-9, rel=0)
    assert ours.far == pytest.approx(ref["far"], abs=1e-9, rel=0)
    np.testing.assert_array_equal(ours.best_thresholds, ref["best"])
    assert ours.n_pairs == len(issame)


def test_alternating_case_hits_the_far_target_exactly():
    """Guard that the exact-hit branch of the interpolation is exercised by the case above."""
    emb1, emb2, issame = _alternating_pairs()
    folds = fold_bounds(len(issame), 10)
    train_diff = [np.sum(~issame) - np.sum(~issame[a:b]) for a, b in folds]
    assert 1000 in train_diff


def test_real_like_accuracy_is_high_and_random_is_chance():
    easy = verify_embeddings(*_identity_pairs(5, 999, noise=0.02))
    assert easy.accuracy == 1.0 and easy.std == 0.0 and easy.val == 1.0
    chance = verify_embeddings(*_random_pairs(0, 1003, dim=512))
    assert 0.4 < chance.accuracy < 0.6


def test_far_never_reached_gives_threshold_zero():
    """Different pairs at distance 4 (opposite vectors): FAR stays 0 on the grid, so VAL = FAR = 0."""
    rng = np.random.default_rng(11)
    emb1 = normalize(rng.normal(size=(400, 8)))
    issame = np.arange(400) % 2 == 0
    emb2 = np.where(issame[:, None], normalize(emb1 + 0.01 * rng.normal(size=emb1.shape)), -emb1)
    ours = verify_embeddings(emb1, emb2, issame)
    ref = reference_verification(emb1, emb2, issame)
    assert ours.val == ref["val"] == 0.0 and ours.far == ref["far"] == 0.0
    assert ours.accuracy == ref["accuracy"] == 1.0


def test_roc_arrays_are_fold_means():
    emb1, emb2, issame = _random_pairs(3, 500, dim=8)
    result = verify_embeddings(emb1, emb2, issame, nrof_folds=5)
    dist = np.sum((emb1 - emb2) ** 2, 1)
    tprs, fprs = [], []
    for _, test in KFold(5).split(dist):
        d, s = dist[test], issame[test]
        tprs.append([np.mean(d[s] < t) for t in np.arange(0, 4, 0.01)])
        fprs.append([np.mean(d[~s] < t) for t in np.arange(0, 4, 0.01)])
    np.testing.assert_allclose(result.tpr, np.mean(tprs, 0), atol=1e-12)
    np.testing.assert_allclose(result.fpr, np.mean(fprs, 0), atol=1e-12)


def test_single_fold_trains_and_tests_on_everything():
    emb1, emb2, issame = _identity_pairs(8, 300)
    dist = np.sum((emb1 - emb2) ** 2, 1)
    thresholds = np.arange(0, 4, 0.01)
    accs = [np.mean((dist < t) == issame) for t in thresholds]
    result = verify_embeddings(emb1, emb2, issame, nrof_folds=1)
    assert result.accuracy == pytest.approx(max(accs), abs=1e-12)
    assert result.best_thresholds[0] == thresholds[int(np.argmax(accs))]
    assert result.std == 0.0


@pytest.mark.parametrize(("n", "k"), [(6000, 10), (1003, 10), (17, 10), (10, 10), (5, 1), (999, 7)])
def test_fold_bounds_match_sklearn_kfold(n, k):
    expected = (
        [(int(test[0]), int(test[-1]) + 1) for _, test in KFold(k).split(np.arange(n))] if k > 1 else [(0, n)]
    )
    assert fold_bounds(n, k) == expected


def test_far_threshold_matches_old_scipy_slinear_with_repeats():
    thresholds = np.arange(0, 4, 0.001)
    rng = np.random.default_rng(5)
    for _ in range(50):
        steps = rng.integers(0, 3, len(thresholds)) * (rng.random(len(thresholds)) < 0.05)
        counts = np.cumsum(np.r_[0, steps[1:]])  # FAR at threshold 0 is 0: nothing is below 0
        far = counts / max(counts[-1], 1)
        for target in (1e-3, far[len(far) // 3], 0.5):
            if far.max() >= target:
                assert _far_threshold(far, thresholds, target) == _old_scipy_slinear(far, thresholds, target)
    far = np.array([0, 0, 0.0005, 0.001, 0.001, 0.002, 1.0])
    grid = np.arange(len(far)) * 0.5
    assert _far_threshold(far, grid, 0.001) == pytest.approx(2.0)  # last grid point where FAR == target
    assert _far_threshold(far, grid, 0.00075) == pytest.approx(1.25)  # halfway from 0.0005 to 0.001
    assert _far_threshold(np.zeros(5), grid[:5], 1e-3) == 0.0


def test_fuse_flip_modes():
    rng = np.random.default_rng(0)
    emb, flipped = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
    summed = emb + flipped
    np.testing.assert_allclose(
        fuse_flip(emb, flipped, "sum"), summed / np.linalg.norm(summed, axis=1)[:, None]
    )
    # AdaFace: unit features weighted by their norms; same direction as the raw sum.
    n1, n2 = np.linalg.norm(emb, axis=1)[:, None], np.linalg.norm(flipped, axis=1)[:, None]
    weighted = n1 * (emb / n1) + n2 * (flipped / n2)
    np.testing.assert_allclose(
        fuse_flip(emb, flipped, "norm_weighted"),
        weighted / np.linalg.norm(weighted, axis=1)[:, None],
        atol=1e-12,
    )
    with pytest.raises(ValueError, match="mode='max'"):
        fuse_flip(emb, flipped, "max")


def test_l2_normalize_matches_sklearn_bitwise():
    x = np.random.default_rng(1).normal(size=(50, 512)).astype(np.float32)
    x[3] = 0
    np.testing.assert_array_equal(l2_normalize(x), normalize(x))


class _Recorder:
    """A linear 'model' that records its inputs."""

    def __init__(self, dim=4, seed=0):
        self.weight = torch.from_numpy(
            np.random.default_rng(seed).normal(size=(3 * 6 * 5, dim)).astype(np.float32)
        )
        self.inputs = []

    def __call__(self, x):
        self.inputs.append(x.clone())
        return x.reshape(len(x), -1) @ self.weight


def test_embed_images_preprocessing_flip_and_batches():
    images = np.random.default_rng(2).integers(0, 256, size=(7, 6, 5, 3), dtype=np.uint8)
    model = _Recorder()
    out = embed_images(model, images, batch_size=3)
    x = (images.astype(np.float32) / 255 - 0.5) / 0.5
    nchw, nchw_flip = x.transpose(0, 3, 1, 2), x[:, :, ::-1].transpose(0, 3, 1, 2)
    w = model.weight.numpy().astype(np.float64)
    raw, raw_flip = nchw.reshape(7, -1) @ w, nchw_flip.reshape(7, -1) @ w
    expected = (raw + raw_flip) / np.linalg.norm(raw + raw_flip, axis=1)[:, None]
    np.testing.assert_allclose(out.embeddings, expected, atol=1e-5)
    assert out.xnorm == pytest.approx(
        np.mean(np.linalg.norm(np.concatenate([raw, raw_flip]), axis=1)), rel=1e-5
    )
    assert [len(b) for b in model.inputs] == [3, 3, 1, 3, 3, 1]
    assert (
        model.inputs[0].dtype == torch.float32 and model.inputs[0].min() >= -1 and model.inputs[0].max() <= 1
    )
    np.testing.assert_array_equal(embed_images(model, images, batch_size=100).embeddings, out.embeddings)

    no_flip = embed_images(model, images, flip=False)
    np.testing.assert_allclose(no_flip.embeddings, raw / np.linalg.norm(raw, axis=1)[:, None], atol=1e-5)


def test_embed_images_bgr_and_custom_normalisation():
    images = np.random.default_rng(3).integers(0, 256, size=(2, 6, 5, 3), dtype=np.uint8)
    model = _Recorder()
    embed_images(model, images, flip=False, mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 2.0), channel_order="BGR")
    bgr = images[..., ::-1].astype(np.float32) / 255
    expected = (bgr - np.array([0.1, 0.2, 0.3], np.float32)) / np.array([0.5, 0.25, 2.0], np.float32)
    np.testing.assert_allclose(model.inputs[0].numpy(), expected.transpose(0, 3, 1, 2), atol=1e-6)


def test_bad_inputs_raise_clear_errors():
    emb1, emb2, issame = _random_pairs(0, 100)
    with pytest.raises(ValueError, match="L2-normalised"):
        verify_embeddings(emb1 * 3, emb2, issame)
    with pytest.raises(ValueError, match="expected two"):
        verify_embeddings(emb1, emb2[:50], issame)
    with pytest.raises(ValueError, match="nrof_folds=200"):
        verify_embeddings(emb1, emb2, issame, nrof_folds=200)
    lopsided = np.zeros(100, bool)
    lopsided[50:] = True
    with pytest.raises(ValueError, match="fold 0"):
        verify_embeddings(emb1, emb2, lopsided)
    with pytest.raises(ValueError, match="uint8"):
        embed_images(_Recorder(), np.zeros((2, 6, 5, 3), np.float32))
    with pytest.raises(ValueError, match="channel_order='RBG'"):
        embed_images(_Recorder(), np.zeros((2, 6, 5, 3), np.uint8), channel_order="RBG")


def test_matches_reference_on_model_embeddings_of_rendered_pairs():
    """Embeddings from a real network (tiny IResNet) on rendered face pairs, through the flip-fused path."""
    import torch

    from facesynth.face_model import embed_images
    from recog.backbones import build_backbone
    from synthgen.procedural import render_faces

    torch.manual_seed(0)
    net = build_backbone("iresnet18", width=0.125, input_size=32, embedding_dim=64).eval()
    n_pairs = 400
    ids = np.repeat(np.arange(n_pairs), 2)
    ids[1::2][n_pairs // 2 :] += 10_000  # second half: different identities
    images = render_faces(ids, np.arange(2 * n_pairs), size=32).images
    with torch.no_grad():
        emb = embed_images(net, images, batch_size=128).embeddings
    issame = np.arange(n_pairs) < n_pairs // 2
    order = np.random.default_rng(0).permutation(n_pairs)  # mix same/different across folds
    emb1, emb2, issame = emb[0::2][order], emb[1::2][order], issame[order]
    ours = verify_embeddings(emb1, emb2, issame)
    ref = reference_verification(emb1, emb2, issame)
    assert abs(ours.accuracy - ref["accuracy"]) < 1e-9 and abs(ours.std - ref["std"]) < 1e-9
    assert abs(ours.val - ref["val"]) < 1e-9 and abs(ours.far - ref["far"]) < 1e-9
    assert 0.5 < ours.accuracy < 1.0
