"""Pair verification exactly as insightface's ``eval/verification.py`` reports it.

Protocol (same numbers as insightface on the same embeddings):

- an image's embedding is the flip-fused embedding of ``facesynth.face_model.embed_images``: model
  outputs of the image and of its horizontal mirror are summed and L2-normalised
  (``flip_fusion="sum"``), or fused with AdaFace's norm weighting (``"norm_weighted"``);
- the distance of a pair is the squared L2 distance of the normalised embeddings (0..4);
- pairs are cut into ``nrof_folds`` contiguous folds with the boundaries of
  ``sklearn.model_selection.KFold(nrof_folds, shuffle=False)``; with one fold train = test = all;
- accuracy: per fold, the threshold of ``np.arange(0, 4, 0.01)`` with the best accuracy on the
  other folds (first maximum) is applied to the held-out fold; mean and ``np.std`` over folds;
- VAL@FAR=1e-3: per fold, the threshold on ``np.arange(0, 4, 0.001)`` at which the training folds'
  FAR reaches the target, read off the FAR curve by linear interpolation exactly as scipy<=1.8
  ``interp1d(far, thresholds, kind="slinear")`` did (insightface's call fails on newer scipy,
  whose splines refuse the repeated FAR values); threshold 0 when the FAR never reaches the target.

Counting is vectorised (sorted distances + ``searchsorted``) but every ratio is the same integer
division insightface performs, so accuracies agree bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ACC_THRESHOLDS = np.arange(0, 4, 0.01)
VAL_THRESHOLDS = np.arange(0, 4, 0.001)


@dataclass(frozen=True)
class VerificationResult:
    """Fold statistics of one verification set (fractions, not percent)."""

    accuracy: float
    std: float
    val: float
    val_std: float
    far: float
    best_thresholds: np.ndarray  # per fold, chosen on the training folds
    fold_accuracies: np.ndarray
    tpr: np.ndarray  # ROC over ACC_THRESHOLDS, mean of the held-out folds
    fpr: np.ndarray
    xnorm: float  # mean norm of the raw model outputs (nan when not measured)
    n_pairs: int


def fold_bounds(n: int, nrof_folds: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) folds with sklearn ``KFold(shuffle=False)`` sizes (first n % k get +1)."""
    if nrof_folds < 1 or nrof_folds > n:
        raise ValueError(f"nrof_folds={nrof_folds}: expected 1..{n} for {n} pairs")
    sizes = np.full(nrof_folds, n // nrof_folds)
    sizes[: n % nrof_folds] += 1
    stops = np.cumsum(sizes)
    return [(int(stop - size), int(stop)) for stop, size in zip(stops, sizes, strict=True)]


def _below_counts(dist: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Number of ``dist`` values strictly below each threshold."""
    return np.searchsorted(np.sort(dist), thresholds, side="left")


def _fold_counts(dist, issame, folds, thresholds):
    """Per fold: same / different pair counts and how many of each fall below every threshold."""
    same = np.stack([_below_counts(dist[a:b][issame[a:b]], thresholds) for a, b in folds])
    diff = np.stack([_below_counts(dist[a:b][~issame[a:b]], thresholds) for a, b in folds])
    n_same = np.array([issame[a:b].sum() for a, b in folds])
    n_diff = np.array([b - a for a, b in folds]) - n_same
    return same, diff, n_same, n_diff


def _train(per_fold: np.ndarray) -> np.ndarray:
    """Totals over the other folds (all folds when there is only one, as insightface's LFold)."""
    return per_fold if len(per_fold) == 1 else per_fold.sum(axis=0) - per_fold


def _far_threshold(far: np.ndarray, thresholds: np.ndarray, target: float) -> float:
    """Threshold where the non-decreasing ``far`` curve reaches ``target`` (0 if it never does).

    Same value as scipy<=1.8 ``interp1d(far, thresholds, kind='slinear')(target)``: that linear
    B-spline interpolates between the last FAR <= target and the next point, and gives 0 where
    that interval has zero width (possible only at the top end).
    """
    if far.max() < target:
        return 0.0
    hi = min(int(np.searchsorted(far, target, side="right")), len(far) - 1)
    lo = hi - 1
    if far[hi] == far[lo]:
        return 0.0
    w = 1.0 / (far[hi] - far[lo])
    return float(thresholds[lo] * (w * (far[hi] - target)) + thresholds[hi] * (w * (target - far[lo])))


def _check_pairs(emb1: np.ndarray, emb2: np.ndarray, issame: np.ndarray) -> None:
    if emb1.ndim != 2 or emb1.shape != emb2.shape or len(issame) != len(emb1):
        raise ValueError(
            f"emb1 {emb1.shape}, emb2 {emb2.shape}, issame ({len(issame)},): expected two (N, D) arrays and N flags"
        )
    norms = np.linalg.norm(emb1.astype(np.float64), axis=1), np.linalg.norm(emb2.astype(np.float64), axis=1)
    for name, norm in zip(("emb1", "emb2"), norms, strict=True):
        bad = (np.abs(norm - 1.0) > 1e-3) & (norm != 0.0)
        if bad.any():
            raise ValueError(
                f"{name}: row {int(np.argmax(bad))} has norm {norm[bad][0]:.4f}; expected L2-normalised "
                "embeddings (use fuse_flip or l2_normalize)"
            )


def verify_embeddings(
    emb1: np.ndarray,
    emb2: np.ndarray,
    issame: np.ndarray,
    nrof_folds: int = 10,
    *,
    far_target: float = 1e-3,
    xnorm: float = float("nan"),
) -> VerificationResult:
    """insightface's 10-fold accuracy and VAL@FAR for L2-normalised pair embeddings.

    The embeddings' dtype is kept (insightface works in the model's float32), so the result is the
    one insightface reports for the same arrays.
    """
    emb1, emb2 = np.asarray(emb1), np.asarray(emb2)
    issame = np.asarray(issame).astype(bool)
    _check_pairs(emb1, emb2, issame)
    if not 0.0 < far_target <= 1.0:
        raise ValueError(f"far_target={far_target}: expected a FAR in (0, 1]")
    # computed in the embeddings' dtype like insightface; widened (exactly) because its comparisons
    # with the float64 thresholds happen in float64
    dist = np.sum(np.square(np.subtract(emb1, emb2)), 1).astype(np.float64)
    folds = fold_bounds(len(dist), nrof_folds)
    sizes = np.array([b - a for a, b in folds])

    same, diff, n_same, n_diff = _fold_counts(dist, issame, folds, ACC_THRESHOLDS)
    for k, (a, b) in enumerate(folds):
        if n_same[k] == 0 or n_diff[k] == 0 or _train(n_same)[k] == 0 or _train(n_diff)[k] == 0:
            raise ValueError(
                f"issame: fold {k} (pairs {a}..{b - 1}) or its training folds lack same or different pairs; "
                "VAL@FAR needs both in every fold (use fewer folds or interleave the pairs)"
            )
    train_size = _train(sizes)[:, None]
    train_acc = (_train(same) + (_train(n_diff)[:, None] - _train(diff))) / train_size
    best = np.argmax(train_acc, axis=1)
    rows = np.arange(len(folds))
    fold_acc = (same[rows, best] + n_diff - diff[rows, best]) / sizes
    _, diff_val, _, _ = _fold_counts(dist, issame, folds, VAL_THRESHOLDS)
    far_train = _train(diff_val) / _train(n_diff)[:, None]
    vals, fars = np.zeros(len(folds)), np.zeros(len(folds))
    for k, (a, b) in enumerate(folds):
        accept = dist[a:b] < _far_threshold(far_train[k], VAL_THRESHOLDS, far_target)
        vals[k] = np.sum(accept & issame[a:b]) / n_same[k]
        fars[k] = np.sum(accept & ~issame[a:b]) / n_diff[k]

    return VerificationResult(
        accuracy=float(np.mean(fold_acc)),
        std=float(np.std(fold_acc)),
        val=float(np.mean(vals)),
        val_std=float(np.std(vals)),
        far=float(np.mean(fars)),
        best_thresholds=ACC_THRESHOLDS[best],
        fold_accuracies=fold_acc,
        tpr=np.mean(same / n_same[:, None], 0),
        fpr=np.mean(diff / n_diff[:, None], 0),
        xnorm=float(xnorm),
        n_pairs=len(dist),
    )
