"""Face detection and square cropping of real photos with OpenCV Haar cascades.

Detection runs on a grayscale, histogram-equalised copy downscaled to at most ``detect_max_side``
pixels; boxes are mapped back to the original photo, grown by ``margin`` on every side into a
square (zero padding outside the photo) and resized to ``size``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import cv2
import numpy as np
from pydantic import Field

from facesynth import images
from facesynth.config import StrictModel


class FaceCropConfig(StrictModel):
    """Detection and cropping settings."""

    size: int = Field(112, ge=16, le=1024, description="side of the square output crops, pixels")
    margin: float = Field(
        0.2, ge=0.0, le=1.0, description="border added on each side, fraction of the box side"
    )
    min_face: int = Field(40, ge=8, description="smallest face side to detect, pixels of the original photo")
    detect_max_side: int = Field(
        640, ge=64, description="photos are downscaled to this longer side to detect"
    )
    scale_factor: float = Field(1.1, gt=1.0, le=2.0, description="Haar cascade pyramid step")
    min_neighbors: int = Field(5, ge=0, le=50, description="Haar cascade overlapping detections needed")
    max_faces: int | None = Field(None, ge=1, description="keep at most this many faces, largest first")
    strict: bool = Field(False, description="raise when a photo has no face instead of returning none")


@dataclass(frozen=True)
class FaceCrop:
    """One face: the RGB crop (``size x size x 3`` uint8) and its detected box ``(x, y, w, h)`` in the photo."""

    image: np.ndarray
    box: tuple[int, int, int, int]


@functools.cache
def _cascade() -> cv2.CascadeClassifier:
    path = cv2.data.haarcascades + "haarcascade_frontalface_default.xml"
    cascade = cv2.CascadeClassifier(path)
    if cascade.empty():
        raise RuntimeError(f"could not load the OpenCV Haar cascade {path}")
    return cascade


def detect_faces(image: np.ndarray, cfg: FaceCropConfig) -> list[tuple[int, int, int, int]]:
    """Face boxes ``(x, y, w, h)`` in ``image`` (uint8 RGB) coordinates, largest first."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(
            f"detect_faces: expected a uint8 RGB image [H, W, 3], got {image.dtype} {image.shape}"
        )
    scale = min(1.0, cfg.detect_max_side / max(image.shape[:2]))
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    if scale < 1.0:
        gray = cv2.resize(gray, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    min_side = max(1, round(cfg.min_face * scale))
    found = _cascade().detectMultiScale(
        cv2.equalizeHist(gray),
        scaleFactor=cfg.scale_factor,
        minNeighbors=cfg.min_neighbors,
        minSize=(min_side, min_side),
    )
    boxes = [tuple(round(v / scale) for v in box) for box in np.asarray(found).reshape(-1, 4)]
    return sorted(boxes, key=lambda b: b[2] * b[3], reverse=True)


def crop_face(image: np.ndarray, box: tuple[int, int, int, int], size: int, margin: float) -> np.ndarray:
    """Square crop around ``box`` grown by ``margin`` per side, zero-padded outside ``image``, resized to ``size``."""
    x, y, w, h = box
    side = max(1, round(max(w, h) * (1 + 2 * margin)))
    x0, y0 = round(x + w / 2 - side / 2), round(y + h / 2 - side / 2)
    crop = np.zeros((side, side, 3), dtype=np.uint8)
    sx0, sy0 = max(x0, 0), max(y0, 0)
    sx1, sy1 = min(x0 + side, image.shape[1]), min(y0 + side, image.shape[0])
    if sx1 > sx0 and sy1 > sy0:
        crop[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = image[sy0:sy1, sx0:sx1]
    interpolation = cv2.INTER_AREA if side > size else cv2.INTER_LINEAR
    return cv2.resize(crop, (size, size), interpolation=interpolation)


def extract_faces(data: bytes, cfg: FaceCropConfig, source: str = "photo") -> list[FaceCrop]:
    """Decode an encoded photo and return its face crops, largest first.

    ``source`` names the photo in errors (undecodable bytes; no face when ``cfg.strict``).
    """
    image = images.decode(data, source)
    boxes = detect_faces(image, cfg)[: cfg.max_faces]
    if not boxes and cfg.strict:
        raise ValueError(
            f"{source}: no face found (Haar cascade, min_face={cfg.min_face}px, min_neighbors={cfg.min_neighbors})"
        )
    return [FaceCrop(crop_face(image, box, cfg.size, cfg.margin), box) for box in boxes]
