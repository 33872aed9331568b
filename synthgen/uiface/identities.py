"""Synthetic identity embeddings for UIFace: random unit vectors kept apart from each other and from
the training identities by a cosine-similarity threshold (greedy rejection, deterministic from a seed)."""

from __future__ import annotations

from typing import Literal

import numpy as np


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def sample_identities(
    count: int,
    *,
    seed: int,
    dim: int = 512,
    max_cosine: float = 0.3,
    method: Literal["sphere", "gaussian"] = "sphere",
    training: np.ndarray | None = None,
    max_tries: int | None = None,
    chunk: int = 1024,
) -> np.ndarray:
    """Draw ``count`` L2-normalised ``float32`` embeddings of size ``dim``.

    ``sphere`` samples uniformly on the hypersphere; ``gaussian`` from a Gaussian fitted to the normalised
    ``training`` embeddings, then normalised. A candidate is accepted only if its cosine to every accepted
    one and to every ``training`` row is at most ``max_cosine``. Raises ``ValueError`` if ``max_tries``
    candidates (default ``100 * count``) do not yield ``count`` identities.
    """
    if count < 1:
        raise ValueError(f"count: expected >= 1, got {count}")
    if not -1.0 <= max_cosine <= 1.0:
        raise ValueError(f"max_cosine: expected a cosine in [-1, 1], got {max_cosine}")
    if method not in ("sphere", "gaussian"):
        raise ValueError(f"method: expected 'sphere' or 'gaussian', got {method!r}")
    known = np.empty((0, dim), dtype=np.float64)
    if training is not None:
        training = np.asarray(training, dtype=np.float64)
        if training.ndim != 2 or training.shape[1] != dim or len(training) == 0:
            raise ValueError(f"training: expected a non-empty (n, {dim}) array, got shape {training.shape}")
        known = _unit(training)
    if method == "gaussian" and len(known) < 2:
        raise ValueError("training: method 'gaussian' needs at least 2 training embeddings to fit")
    max_tries = 100 * count if max_tries is None else max_tries

    rng = np.random.default_rng(seed)
    mean, cov = (known.mean(axis=0), np.cov(known, rowvar=False)) if method == "gaussian" else (None, None)
    accepted = np.empty((count, dim), dtype=np.float64)
    found = tried = 0
    while found < count and tried < max_tries:
        size = min(chunk, max_tries - tried)
        tried += size
        if method == "gaussian":
            candidates = _unit(rng.multivariate_normal(mean, cov, size=size, method="eigh"))
        else:
            candidates = _unit(rng.standard_normal((size, dim)))
        if len(known):
            candidates = candidates[(candidates @ known.T).max(axis=1) <= max_cosine]
        for c in candidates:
            if found and (accepted[:found] @ c).max() > max_cosine:
                continue
            accepted[found] = c
            found += 1
            if found == count:
                break
    if found < count:
        raise ValueError(
            f"sample_identities: only {found} of {count} identities with max_cosine={max_cosine} after "
            f"{tried} candidates (max_tries={max_tries}); raise max_cosine or max_tries"
        )
    return accepted.astype(np.float32)
