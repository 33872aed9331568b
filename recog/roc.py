"""TAR@FMR read like insightface ``eval_ijbc.py``, IJB-C template pooling, and ROC plots.

TAR@FMR: ``sklearn.metrics.roc_curve`` on similarity scores; for every target FMR the reported
TAR is the TPR at the ROC point whose FPR is closest to the target. insightface searches the
flipped curve and keeps the first minimum, i.e. the point with the highest TPR among equally
close ones; we do the same.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import numpy as np

from facesynth import storage
from facesynth.face_model import l2_normalize

FMR_TARGETS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def roc_points(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) of ``sklearn.metrics.roc_curve``; higher score = more likely the same identity."""
    from sklearn.metrics import roc_curve

    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    if scores.ndim != 1 or scores.shape != labels.shape:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape}: expected two equal 1-D arrays")
    if labels.all() or not labels.any():
        raise ValueError("labels: expected both genuine (True) and impostor (False) pairs")
    fpr, tpr, _ = roc_curve(labels, scores)
    return fpr, tpr


def tar_at_fmr(
    scores: np.ndarray, labels: np.ndarray, targets: Sequence[float] = FMR_TARGETS
) -> dict[float, float]:
    """TAR at each target FMR (fractions), read off the ROC as insightface's IJB-C evaluation does."""
    fpr, tpr = roc_points(scores, labels)
    fpr, tpr = fpr[::-1], tpr[::-1]
    return {float(t): float(tpr[np.argmin(np.abs(fpr - t))]) for t in targets}


def pool_templates(
    embeddings: np.ndarray, media_ids: np.ndarray, template_ids: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """IJB-C template features: mean over images of one media, sum over a template's media, L2-normalise.

    Returns the sorted unique template ids and their (T, D) unit features.
    """
    embeddings = np.asarray(embeddings, dtype=np.float64)
    media_ids, template_ids = np.asarray(media_ids), np.asarray(template_ids)
    if embeddings.ndim != 2 or not len(embeddings) == len(media_ids) == len(template_ids):
        raise ValueError(
            f"embeddings {embeddings.shape}, media_ids ({len(media_ids)},), template_ids ({len(template_ids)},): "
            "expected (N, D) and N ids each"
        )
    templates, template_index = np.unique(template_ids, return_inverse=True)
    media_index = np.unique(media_ids, return_inverse=True)[1]
    groups, group_index = np.unique(np.stack([template_index, media_index]), axis=1, return_inverse=True)
    media_sum = np.zeros((groups.shape[1], embeddings.shape[1]))
    np.add.at(media_sum, group_index, embeddings)
    media_mean = media_sum / np.bincount(group_index)[:, None]
    template_sum = np.zeros((len(templates), embeddings.shape[1]))
    np.add.at(template_sum, groups[0], media_mean)
    return templates, l2_normalize(template_sum)


def template_pair_scores(
    templates: np.ndarray, features: np.ndarray, first: np.ndarray, second: np.ndarray
) -> np.ndarray:
    """Cosine score of each template pair (``first[i]``, ``second[i]``) from :func:`pool_templates` output."""
    first, second = np.asarray(first), np.asarray(second)
    index1, index2 = np.searchsorted(templates, first), np.searchsorted(templates, second)
    for name, ids, index in (("first", first, index1), ("second", second, index2)):
        found = (index < len(templates)) & (templates[np.minimum(index, len(templates) - 1)] == ids)
        if not found.all():
            raise ValueError(
                f"{name}: template id {ids[~found][0].item()!r} is not among the pooled templates"
            )
    return np.sum(features[index1] * features[index2], axis=1)


def plot_roc(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], uri: str, title: str = "ROC") -> None:
    """Write a PNG of ROC curves (label -> (fpr, tpr)) with a log FPR axis to ``uri``."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4.5), dpi=100)
    ax = fig.add_subplot()
    for label, (fpr, tpr) in curves.items():
        keep = np.asarray(fpr) > 0
        ax.plot(np.asarray(fpr)[keep], np.asarray(tpr)[keep], label=label)
    ax.set_xscale("log")
    ax.set_xlim(1e-6, 1.0)
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel("False match rate")
    ax.set_ylabel("True accept rate")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    if curves:
        ax.legend(loc="lower right")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    storage.write_bytes(uri, buffer.getvalue())
