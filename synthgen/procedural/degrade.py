"""Camera degradations applied after rendering: blur, sensor noise, quantisation and JPEG."""

from __future__ import annotations

import math

import cv2
import numpy as np

from synthgen.procedural import textures
from synthgen.procedural.raster import per_sample

REFERENCE_SIZE = 112  # blur sigmas are given in pixels at this size


def degrade(planar: np.ndarray, blur_sigma, noise_sigma, jpeg_quality, offsets: np.ndarray) -> np.ndarray:
    """Blur (sigma px at 112), add Gaussian noise (grey levels), quantise, then JPEG-compress where quality > 0.

    ``planar`` float32 RGB in [0, 1] (N, 3, S, S); ``offsets`` (N, 2) uniforms choose the crop of the fixed
    noise bank. Returns uint8 RGB (N, S, S, 3).
    """
    n, _, size, _ = planar.shape
    images = np.empty((n, size, size, 3), np.float32)
    for channel in range(3):
        images[..., channel] = planar[:, channel]
    sigmas = np.asarray(blur_sigma) * (size / REFERENCE_SIZE)
    for i in np.flatnonzero(sigmas >= 0.25):
        k = 2 * math.ceil(3.0 * sigmas[i]) + 1
        images[i] = cv2.GaussianBlur(images[i], (k, k), float(sigmas[i]), borderType=cv2.BORDER_REFLECT)
    noise = textures.crop(textures.noise_banks(size)["white_rgb"], offsets, size)
    images += noise * per_sample(np.asarray(noise_sigma) / 255.0)[..., None]
    images *= 255.0
    images += 0.5
    out = np.clip(images, 0.0, 255.0, out=images).astype(np.uint8)
    for i in np.flatnonzero(np.asarray(jpeg_quality) > 0):
        out[i] = jpeg_roundtrip(out[i], int(jpeg_quality[i]))
    return out


def jpeg_roundtrip(image: np.ndarray, quality: int) -> np.ndarray:
    """Encode an RGB uint8 image as JPEG at ``quality`` (1..100) and decode it again."""
    ok, data = cv2.imencode(".jpg", image[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError(f"JPEG encoding failed at quality {quality}")
    return cv2.imdecode(data, cv2.IMREAD_COLOR)[..., ::-1]
