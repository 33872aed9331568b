"""Dataset quality on face embeddings: identity consistency, diversity, separation, P/R, FID, leakage.

Identity statistics work on L2-normalised embeddings and cosine similarity. Precision/recall
(Kynkäänniemi et al. 2019) and FID work on the feature vectors exactly as given.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator

import numpy as np

from facesynth.face_model import l2_normalize

LPIPS_BACKBONES = {"alex": "AlexNet_Weights", "vgg": "VGG16_Weights", "squeeze": "SqueezeNet1_1_Weights"}


def _check_labelled(embeddings: np.ndarray, identities: np.ndarray, name: str = "embeddings") -> None:
    if np.ndim(embeddings) != 2 or len(embeddings) != len(identities) or len(embeddings) == 0:
        raise ValueError(
            f"{name} {np.shape(embeddings)} and identities ({len(identities)},): expected (N, D) and N labels, N > 0"
        )


def identity_centres(embeddings: np.ndarray, identities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted identity ids and their centres: the normalised mean of each identity's unit embeddings."""
    _check_labelled(embeddings, identities)
    ids, index = np.unique(identities, return_inverse=True)
    sums = np.zeros((len(ids), np.shape(embeddings)[1]))
    np.add.at(sums, index, l2_normalize(np.asarray(embeddings, dtype=np.float64)))
    return ids, l2_normalize(sums)


def identity_consistency(embeddings: np.ndarray, identities: np.ndarray) -> dict:
    """Cosine of every image to its identity centre: overall mean and mean per identity."""
    ids, centres = identity_centres(embeddings, identities)
    index = np.searchsorted(ids, identities)
    cos = np.sum(l2_normalize(np.asarray(embeddings, dtype=np.float64)) * centres[index], axis=1)
    per_identity = np.bincount(index, weights=cos) / np.bincount(index)
    return {
        "mean": float(cos.mean()),
        "per_identity": dict(zip(ids.tolist(), per_identity.tolist(), strict=True)),
    }


def consistency_chance(embeddings: np.ndarray, identities: np.ndarray, seed: int = 0) -> float:
    """Identity consistency with the identity labels randomly permuted: the chance level.

    An image pulls its own identity centre towards itself, so even random groups score above 0
    (about ``1/sqrt(n)`` for ``n`` images an identity); compare ``identity_consistency`` to this.
    """
    shuffled = np.random.default_rng(seed).permutation(np.asarray(identities))
    return identity_consistency(embeddings, shuffled)["mean"]


def intra_class_diversity(embeddings: np.ndarray, identities: np.ndarray) -> dict:
    """Mean pairwise cosine distance (1 - cos) between images of the same identity.

    ``mean`` averages the identities that have at least two images.
    """
    _check_labelled(embeddings, identities)
    unit = l2_normalize(np.asarray(embeddings, dtype=np.float64))
    per_identity = {}
    for identity in np.unique(identities).tolist():
        members = unit[np.asarray(identities) == identity]
        if len(members) < 2:
            continue
        cos = members @ members.T
        n = len(members)
        per_identity[identity] = float(1.0 - (cos.sum() - np.trace(cos)) / (n * (n - 1)))
    values = list(per_identity.values())
    return {"mean": float(np.mean(values)) if values else float("nan"), "per_identity": per_identity}


def inter_class_separation(embeddings: np.ndarray, identities: np.ndarray) -> dict:
    """Cosine between identity centres: mean over distinct pairs, and each centre's nearest other centre."""
    ids, centres = identity_centres(embeddings, identities)
    if len(ids) < 2:
        raise ValueError(f"identities: found {len(ids)} identity, separation needs at least 2")
    cos = centres @ centres.T
    off_diagonal = cos[~np.eye(len(ids), dtype=bool)]
    np.fill_diagonal(cos, -np.inf)
    nearest = cos.max(axis=1)
    return {
        "mean_centre_cosine": float(off_diagonal.mean()),
        "nearest_centre_cosine_mean": float(nearest.mean()),
        "nearest_centre_cosine_max": float(nearest.max()),
    }


def _chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = np.sum(a * a, 1)[:, None] + np.sum(b * b, 1)[None, :] - 2.0 * (a @ b.T)
    return np.maximum(d, 0.0)


def _knn_radii_sq(features: np.ndarray, k: int, chunk: int) -> np.ndarray:
    """Squared distance of every point to its k-th nearest other point."""
    radii = np.empty(len(features))
    for rows in _chunks(len(features), chunk):
        d = _sq_dists(features[rows], features)
        radii[rows] = np.partition(d, k, axis=1)[:, k]  # index 0 is the point itself
    return radii


def _coverage(manifold: np.ndarray, radii_sq: np.ndarray, probes: np.ndarray, chunk: int) -> float:
    """Fraction of ``probes`` inside at least one ball of the manifold."""
    inside = np.zeros(len(probes), dtype=bool)
    for rows in _chunks(len(probes), chunk):
        inside[rows] = (_sq_dists(probes[rows], manifold) <= radii_sq[None, :]).any(axis=1)
    return float(inside.mean())


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3, chunk: int = 1024) -> dict:
    """Improved precision and recall (Kynkäänniemi et al. 2019) with k-NN ball manifolds.

    Precision: share of ``fake`` inside the real manifold; recall: share of ``real`` inside the fake one.
    """
    real, fake = np.asarray(real, dtype=np.float64), np.asarray(fake, dtype=np.float64)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"real {real.shape} and fake {fake.shape}: expected (N, D) and (M, D) features")
    if not 1 <= k < min(len(real), len(fake)):
        raise ValueError(f"k={k}: expected 1 <= k < min(len(real), len(fake)) = {min(len(real), len(fake))}")
    return {
        "precision": _coverage(real, _knn_radii_sq(real, k, chunk), fake, chunk),
        "recall": _coverage(fake, _knn_radii_sq(fake, k, chunk), real, chunk),
        "k": k,
    }


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """Fréchet distance of two Gaussians: |mu1 - mu2|² + Tr(C1 + C2 - 2 (C1 C2)^½)."""
    from scipy.linalg import sqrtm

    covmean = sqrtm(cov1 @ cov2)
    if not np.isfinite(covmean).all():  # singular product: nudge both diagonals, as pytorch-fid does
        offset = np.eye(len(cov1)) * 1e-6
        covmean = sqrtm((cov1 + offset) @ (cov2 + offset))
    diff = np.asarray(mu1) - np.asarray(mu2)
    return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * np.trace(np.real(covmean)))


def fid(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """FID between two feature sets (here face embeddings) from their means and sample covariances."""
    a, b = np.asarray(features_a, dtype=np.float64), np.asarray(features_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"features {a.shape} and {b.shape}: expected two (N>=2, D) arrays of equal D")
    return frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


def nearest_identity_threshold(real: np.ndarray, real_ids: np.ndarray, fpr: float = 0.01) -> float:
    """The centre cosine above which a synthetic identity counts as a copy of its nearest reference identity.

    Each reference identity's centre has a nearest *other* reference identity; this is the ``1 - fpr``
    quantile of those cosines. A new identity drawn like the reference ones is then flagged with
    probability ~``fpr`` (its nearest reference identity is as close as for the closest ``fpr`` of real
    people), and the threshold follows the judge: a small judge packs all faces into a narrow cone.
    """
    if not 0.0 < fpr < 1.0:
        raise ValueError(f"fpr={fpr}: expected a rate in (0, 1)")
    _check_labelled(real, real_ids, "real")
    _, centres = identity_centres(real, real_ids)
    if len(centres) < 2:
        raise ValueError(f"the reference has {len(centres)} identity: a leakage threshold needs at least 2")
    centres = centres.astype(np.float32)
    nearest = np.empty(len(centres))
    for start in range(0, len(centres), 2048):  # blocks of rows: memory stays O(2048 N)
        cos = centres[start : start + 2048] @ centres.T
        cos[np.arange(len(cos)), np.arange(start, start + len(cos))] = -np.inf  # not itself
        nearest[start : start + len(cos)] = cos.max(1)
    return float(np.quantile(nearest, 1.0 - fpr))


def identity_leakage(
    synthetic: np.ndarray,
    synthetic_ids: np.ndarray,
    real: np.ndarray,
    real_ids: np.ndarray,
    threshold: float,
) -> list[dict]:
    """For each synthetic identity centre: its nearest real identity centre, their cosine, and
    ``leaked`` when the cosine exceeds ``threshold`` (the face model's same-identity cosine)."""
    _check_labelled(real, real_ids, "real")
    syn_ids, syn_centres = identity_centres(synthetic, synthetic_ids)
    ref_ids, ref_centres = identity_centres(real, real_ids)
    cos = syn_centres @ ref_centres.T
    nearest = cos.argmax(axis=1)
    return [
        {
            "synthetic_identity": sid,
            "nearest_real_identity": ref_ids[j].item(),
            "cosine": float(cos[i, j]),
            "leaked": bool(cos[i, j] > threshold),
        }
        for i, (sid, j) in enumerate(zip(syn_ids.tolist(), nearest.tolist(), strict=True))
    ]


def lpips_unavailable_reason(net: str = "alex") -> str | None:
    """Why LPIPS cannot run offline (package or backbone weights missing), or None if it can."""
    if net not in LPIPS_BACKBONES:
        raise ValueError(f"net={net!r}: expected one of {sorted(LPIPS_BACKBONES)}")
    if importlib.util.find_spec("lpips") is None:
        return "the lpips package is not installed"
    import torch
    import torchvision.models

    url = getattr(torchvision.models, LPIPS_BACKBONES[net]).IMAGENET1K_V1.url
    weights = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
    if not os.path.exists(weights):
        return f"the {net} backbone weights are not cached at {weights} (nothing is downloaded)"
    return None


def lpips_diversity(
    images: np.ndarray, identities: np.ndarray, net: str = "alex", max_pairs: int = 64
) -> dict:
    """Mean LPIPS between consecutive images of each identity (up to ``max_pairs`` per identity).

    Returns ``{"status": "skipped", "reason": ...}`` when LPIPS or its weights are not available locally.
    """
    reason = lpips_unavailable_reason(net)
    if reason is not None:
        return {"status": "skipped", "reason": reason}
    import lpips
    import torch

    model = lpips.LPIPS(net=net, verbose=False).eval()
    distances = []
    for identity in np.unique(identities).tolist():
        members = images[np.asarray(identities) == identity][: max_pairs + 1]
        if len(members) < 2:
            continue
        x = torch.from_numpy(members).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        with torch.no_grad():
            distances.append(model(x[:-1], x[1:]).flatten().numpy())
    if not distances:
        return {"status": "skipped", "reason": "no identity has two images"}
    return {"status": "ok", "net": net, "mean": float(np.concatenate(distances).mean())}


def dataset_quality(
    embeddings: np.ndarray,
    identities: np.ndarray,
    real_embeddings: np.ndarray | None = None,
    real_identities: np.ndarray | None = None,
    *,
    k: int = 3,
    leakage_threshold: float | None = None,
) -> dict:
    """All embedding-based statistics of one dataset; P/R, FID and leakage when a real set is given.

    ``leakage_threshold`` None: :func:`nearest_identity_threshold` of the real set.
    """
    out = {
        "identity_consistency": identity_consistency(embeddings, identities)["mean"],
        "intra_class_diversity": intra_class_diversity(embeddings, identities)["mean"],
        **inter_class_separation(embeddings, identities),
    }
    if real_embeddings is not None:
        out.update(precision_recall(real_embeddings, embeddings, k=k))
        out["fid"] = fid(real_embeddings, embeddings)
        if real_identities is not None:
            if leakage_threshold is None:
                leakage_threshold = nearest_identity_threshold(real_embeddings, real_identities)
            leaks = identity_leakage(
                embeddings, identities, real_embeddings, real_identities, leakage_threshold
            )
            out["leaked_identities"] = sum(row["leaked"] for row in leaks)
            out["max_leakage_cosine"] = max(row["cosine"] for row in leaks)
    return out
