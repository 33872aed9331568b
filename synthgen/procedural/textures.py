"""Fixed noise banks and per-sample crops of them: texture without per-sample noise generation."""

from __future__ import annotations

import functools

import cv2
import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

BANK_SEED = 0x7E57
BANKS = ("pores", "smooth", "streaks", "spots")


@functools.lru_cache(maxsize=8)
def noise_banks(size: int) -> dict[str, np.ndarray]:
    """Zero-mean, unit-std float32 noise fields of side ``2 * size`` (fixed seed, so identical everywhere).

    ``white_rgb`` is per-channel white noise, planar (3, 2S, 2S); the others are single-channel blurred noise.
    """
    rng = np.random.default_rng(BANK_SEED)
    side = 2 * size
    sigmas = {  # (sigma_x, sigma_y) of the blur, pixels
        "pores": (0.6, 0.6),
        "smooth": (size / 12, size / 12),
        "streaks": (0.5, size / 8),
        "spots": (0.9, 0.9),
    }
    white = rng.standard_normal((side, side, 3)).astype(np.float32)
    banks = {"white_rgb": np.ascontiguousarray(white.transpose(2, 0, 1))}
    for name in BANKS:
        field = rng.standard_normal((side, side)).astype(np.float32)
        field = cv2.GaussianBlur(field, (0, 0), sigmaX=sigmas[name][0], sigmaY=sigmas[name][1])
        banks[name] = (field - field.mean()) / field.std()
    return banks


def crop(bank: np.ndarray, offsets: np.ndarray, size: int) -> np.ndarray:
    """``size``-square crops of ``bank`` at per-sample offsets given as uniforms in [0, 1), shape (N, 2).

    Returns (N, size, size) for a single-channel bank (2S, 2S), (N, C, size, size) for a planar bank (C, 2S, 2S).
    """
    starts = crop_starts(offsets, size)
    windows = sliding_window_view(bank, (*bank.shape[:-2], size, size))[(0,) * (bank.ndim - 2)]
    return windows[starts[:, 0], starts[:, 1]]


def crop_starts(offsets: np.ndarray, size: int) -> np.ndarray:
    """The (row, column) corners (N, 2) of the crops that :func:`crop` takes at ``offsets``."""
    return np.minimum((np.asarray(offsets) * size).astype(np.int64), size)
