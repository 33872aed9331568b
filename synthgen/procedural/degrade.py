"""Camera degradations applied after rendering: blur, sensor noise, quantisation and JPEG."""

from __future__ import annotations

import math

import cv2
import numpy as np

from synthgen.procedural import kernels, textures

REFERENCE_SIZE = 112  # blur sigmas are given in pixels at this size


def degrade(planar: np.ndarray, blur_sigma, noise_sigma, jpeg_quality, offsets: np.ndarray) -> np.ndarray:
    """Blur (sigma px at 112), add Gaussian noise (grey levels), quantise, then JPEG-compress where quality > 0.

    ``planar`` float32 RGB in [0, 1] (N, 3, S, S), overwritten; ``offsets`` (N, 2) uniforms choose the crop of
    the fixed noise bank. Returns uint8 RGB (N, S, S, 3).
    """
    size = planar.shape[-1]
    sigmas = np.asarray(blur_sigma) * (size / REFERENCE_SIZE)
    for i in np.flatnonzero(sigmas >= 0.25):
        k = 2 * math.ceil(3.0 * sigmas[i]) + 1
        for plane in planar[i]:
            plane[...] = cv2.GaussianBlur(plane, (k, k), float(sigmas[i]), borderType=cv2.BORDER_REFLECT)
    bank = textures.noise_banks(size)["white_rgb"]
    sigma = kernels.samples(np.asarray(noise_sigma) / 255.0, len(planar))
    out = np.empty((len(planar), size, size, 3), np.uint8)
    kernels.quantise(kernels.target(planar)[0], bank, textures.crop_starts(offsets, size), sigma, out)
    for image, quality in zip(out, np.asarray(jpeg_quality)):
        if quality > 0:
            image[...] = jpeg_roundtrip(image, int(quality))
    return out


def jpeg_roundtrip(image: np.ndarray, quality: int) -> np.ndarray:
    """Encode an RGB uint8 image as JPEG at ``quality`` (1..100) and decode it again."""
    bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    ok, data = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError(f"JPEG encoding failed at quality {quality}")
    return cv2.cvtColor(cv2.imdecode(data, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
