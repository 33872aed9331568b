"""Images as every job sees them: uint8 RGB arrays ``(H, W, 3)`` / ``(N, H, W, 3)`` <-> encoded bytes.

One helper per data shape: :func:`encode` (PNG/JPEG with OpenCV, deterministic bytes for fixed
settings), :func:`decode` (strict: bytes that are not an image raise a ValueError naming them; EXIF
orientation applied like OpenCV), :func:`probe_size` (header only), :func:`decode_to_size` (a batch
at one size: exact, bilinear resize, or insightface's short-side resize) and :func:`grid` /
:func:`save_grid` (contact sheets). PIL and OpenCV are imported inside the functions.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Literal

import numpy as np

from facesynth import storage

Resize = Literal["exact", "bilinear", "short_side"]


def encode(
    images: np.ndarray, fmt: str = "png", *, png_compression: int = 1, jpeg_quality: int = 95
) -> list[bytes]:
    """Encode uint8 RGB images ``(N, H, W, 3)`` as PNG (zlib level ``png_compression``) or JPEG bytes."""
    import cv2

    if fmt == "png":
        ext, params = ".png", [cv2.IMWRITE_PNG_COMPRESSION, png_compression]
    elif fmt == "jpeg":
        ext, params = ".jpg", [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality]
    else:
        raise ValueError(f"image format {fmt!r}: expected 'png' or 'jpeg'")
    out = []
    for img in images:
        ok, data = cv2.imencode(ext, np.ascontiguousarray(img[..., ::-1]), params)  # OpenCV wants BGR
        if not ok:
            raise RuntimeError(f"{fmt} encoding failed for an image of shape {img.shape}")
        out.append(data.tobytes())
    return out


def decode(data: bytes, what: str) -> np.ndarray:
    """Decode an encoded image to uint8 RGB ``(H, W, 3)``; ``what`` names it in the error for bad bytes."""
    from PIL import Image, ImageOps

    try:
        with Image.open(io.BytesIO(data)) as img:
            return np.asarray(ImageOps.exif_transpose(img).convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ValueError(f"{what}: not a decodable image ({exc})") from exc


def probe_size(data: bytes, what: str) -> tuple[int, int]:
    """``(height, width)`` from the image header, without decoding the pixels."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.height, img.width
    except (OSError, ValueError) as exc:
        raise ValueError(f"{what}: not a decodable image ({exc})") from exc


def resize_short(image: np.ndarray, size: int) -> np.ndarray:
    """Resize so the shorter side is ``size`` (longer ``size*long//short``): mxnet ``resize_short``, cv2 area."""
    import cv2

    h, w = image.shape[:2]
    new_h, new_w = (size * h // w, size) if h > w else (size, size * w // h)
    return cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_AREA)


def resize_bilinear(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """PIL bilinear resize of one uint8 RGB image to ``size = (height, width)``."""
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.Resampling.BILINEAR))


def decode_to_size(
    encoded: Sequence[bytes], size: tuple[int, int], *, resize: Resize, what: str, hint: str = ""
) -> np.ndarray:
    """Decode images to uint8 RGB ``(N, height, width, 3)``; image ``i`` is named ``f"{what} {i}"`` in errors.

    ``resize``: ``exact`` refuses another size (the error ends with ``hint``), ``bilinear`` resizes with
    PIL, ``short_side`` resizes as insightface does (short side to ``height`` when the width differs;
    still not ``size`` is an error).
    """
    height, width = size
    out = np.empty((len(encoded), height, width, 3), dtype=np.uint8)
    for i, data in enumerate(encoded):
        image = decode(data, f"{what} {i}")
        if image.shape[:2] != (height, width):
            if resize == "exact":
                h, w = image.shape[:2]
                raise ValueError(f"{what} {i}: image is {h}x{w} pixels, expected {height}x{width}{hint}")
            if resize == "bilinear":
                image = resize_bilinear(image, size)
            elif image.shape[1] != width:
                image = resize_short(image, height)
            if image.shape[:2] != (height, width):
                raise ValueError(
                    f"{what} {i}: shape {image.shape[:2]} after resizing, expected ({height}, {width})"
                )
        out[i] = image
    return out


def grid(images: np.ndarray, cols: int, rows: int | None = None) -> np.ndarray:
    """One sheet of uint8 ``(N, H, W, 3)`` images, row-major, ``cols`` per row (white where none is left).

    With ``rows`` the images must fill the sheet exactly (identities x samples contact sheets).
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8 or len(images) == 0:
        raise ValueError(
            f"images: expected a non-empty uint8 (N, H, W, 3) array, got {images.dtype} {images.shape}"
        )
    n, h, w, _ = images.shape
    if cols < 1 or (rows is not None and (rows < 1 or rows * cols != n)):
        raise ValueError(f"rows={rows} x cols={cols}: expected positive and equal to the {n} images")
    cols = min(cols, n)
    rows = -(-n // cols)
    padded = np.full((rows * cols, h, w, 3), 255, dtype=np.uint8)
    padded[:n] = images
    return padded.reshape(rows, cols, h, w, 3).transpose(0, 2, 1, 3, 4).reshape(rows * h, cols * w, 3)


def save_grid(images: np.ndarray, uri: str, cols: int, rows: int | None = None) -> str:
    """Write :func:`grid` of ``images`` as one PNG at ``uri``; returns ``uri``."""
    storage.write_bytes(uri, encode(grid(images, cols, rows)[None])[0])
    return uri
