"""Contact sheets: a PNG grid of rendered faces (rows = identities, columns = samples)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from facesynth import storage


def save_grid(images: np.ndarray, rows: int, cols: int, path_or_uri: str) -> None:
    """Write ``rows * cols`` uint8 RGB images (N, H, W, 3), row-major, as one PNG at ``path_or_uri``."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"images: expected uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    if rows < 1 or cols < 1 or len(images) != rows * cols:
        raise ValueError(
            f"rows={rows} x cols={cols}: expected positive and equal to the {len(images)} images"
        )
    h, w = images.shape[1:3]
    sheet = images.reshape(rows, cols, h, w, 3).transpose(0, 2, 1, 3, 4).reshape(rows * h, cols * w, 3)
    buffer = io.BytesIO()
    Image.fromarray(sheet).save(buffer, format="PNG")
    storage.write_bytes(path_or_uri, buffer.getvalue())
