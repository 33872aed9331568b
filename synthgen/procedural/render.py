"""Public entry point: render a batch of procedural faces from identity and sample seeds."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from dataclasses import dataclass

import cv2
import numpy as np

from synthgen.procedural.degrade import degrade
from synthgen.procedural.face import layer_extents, render_chunk
from synthgen.procedural.nuisance import NuisanceConfig, apply_overrides
from synthgen.procedural.params import (
    BACKGROUNDS,
    BEARD_STYLES,
    HAIR_COLOURS,
    HAIR_STYLES,
    IRIS_COLOURS,
    Columns,
    identity_columns,
    sample_columns,
)
from synthgen.procedural.styles import get_style

MIN_SIZE, MAX_SIZE = 32, 128
CHUNK_PIXELS = 12 * 112 * 112  # pixels rendered together: few numpy calls per image, a small working set
CATEGORIES = {
    "hair_style": HAIR_STYLES,
    "hair_colour": tuple(HAIR_COLOURS),
    "iris_colour": tuple(IRIS_COLOURS),
    "beard_style": BEARD_STYLES,
    "background": BACKGROUNDS,
}


@dataclass(frozen=True)
class RenderBatch:
    """Rendered faces: ``images`` uint8 RGB (N, size, size, 3) and the parameter columns that made them."""

    images: np.ndarray
    identity_seeds: np.ndarray
    sample_seeds: np.ndarray
    style: str
    size: int
    identity: Columns
    nuisance: Columns

    @functools.cached_property
    def params(self) -> list[dict]:
        """One JSON-serialisable dict per image: seeds, style, size, identity and nuisance values.

        ``nuisance.jpeg_quality`` is 0 where no JPEG compression was applied.
        """
        groups = {
            name: _json_columns(cols)
            for name, cols in (("identity", self.identity), ("nuisance", self.nuisance))
        }
        return [
            {
                "renderer": "procedural",
                "style": self.style,
                "size": self.size,
                "identity_seed": int(i),
                "sample_seed": int(s),
                **{name: {k: v[row] for k, v in cols.items()} for name, cols in groups.items()},
            }
            for row, (i, s) in enumerate(zip(self.identity_seeds, self.sample_seeds))
        ]


def _json_columns(columns: Columns) -> dict[str, list]:
    return {k: [CATEGORIES[k][i] for i in v] if k in CATEGORIES else v.tolist() for k, v in columns.items()}


def render_faces(
    identity_seeds: np.ndarray,
    sample_seeds: np.ndarray,
    *,
    style: str = "render",
    size: int = 112,
    nuisance: NuisanceConfig | None = None,
    overrides: dict | None = None,
) -> RenderBatch:
    """Render one face per (identity seed, sample seed) pair.

    The identity seed fixes the face (geometry, colouring, hair, marks); the pair fixes the nuisance (pose,
    light, expression, occluders, background, age change, blur, noise, JPEG) within the ranges of
    ``nuisance``. ``overrides`` adjusts those ranges for the whole batch (see :func:`apply_overrides`:
    ``{"yaw": 0.0}``, ``{"yaw_range": (60, 80)}``, ``{"glasses": True}``). Same inputs give byte-identical
    images, whatever else is in the batch. ``style`` is ``"render"`` (flat, cel-shaded) or ``"photo"``
    (textured, soft light, sensor noise, vignetting); ``size`` is 32..128 pixels.
    """
    look = get_style(style)
    size = check_size(size)
    ids, samples = _seeds("identity_seeds", identity_seeds), _seeds("sample_seeds", sample_seeds)
    if len(ids) != len(samples):
        raise ValueError(
            f"identity_seeds has {len(ids)} entries but sample_seeds has {len(samples)}: expected equal"
        )
    config = apply_overrides(nuisance or NuisanceConfig(), overrides)
    keep_freed_memory()
    cv2.setNumThreads(1)  # per-image calls on small images: threads only add overhead (one process per core)
    unique, inverse = np.unique(ids, return_inverse=True)
    identity = {k: v[inverse] for k, v in identity_columns(unique).items()}
    nuis = sample_columns(ids, samples, config)
    extents = layer_extents(identity, nuis, look, size)
    images = np.empty((len(ids), size, size, 3), np.uint8)
    order, chunk = _layer_order(identity, nuis), max(1, CHUNK_PIXELS // (size * size))
    for start in range(0, len(ids), chunk):
        rows = order[start : start + chunk]
        ic, sc, ext = ({k: v[rows] for k, v in cols.items()} for cols in (identity, nuis, extents))
        rgb = render_chunk(ic, sc, look, size, ext)
        noise = np.hypot(sc["noise_sigma"], look.sensor_noise)
        images[rows] = degrade(
            rgb, sc["blur_sigma"], noise, sc["jpeg_quality"], sc["texture_offsets"][:, 8:10]
        )
    return RenderBatch(images, ids, samples, look.name, size, identity, nuis)


@functools.cache
def keep_freed_memory() -> bool:
    """Stop glibc from handing freed buffers back to the kernel between numpy temporaries (once per process).

    Rendering allocates and frees many 0.4-1.2 MB temporaries; with glibc's default thresholds each becomes
    an mmap/munmap or a heap trim, and re-faulting the pages cost most of the render time (measured 1.6x
    overall, 7x on an ellipse). Freed memory is then kept for reuse (up to 256 MB retained by the process).
    Returns whether the setting took effect (False off glibc).
    """
    path = ctypes.util.find_library("c")
    libc = ctypes.CDLL(path) if path else None
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 32 << 20) and libc.mallopt(m_trim_threshold, 256 << 20))


def check_size(size) -> int:
    """``size`` as an int; a clear error unless it is an integer from MIN_SIZE to MAX_SIZE."""
    if isinstance(size, bool) or not isinstance(size, int | np.integer) or not MIN_SIZE <= size <= MAX_SIZE:
        raise ValueError(f"size={size!r}: expected an integer from {MIN_SIZE} to {MAX_SIZE} pixels")
    return int(size)


def _layer_order(identity: Columns, nuisance: Columns) -> np.ndarray:
    """Sample order that groups samples needing the same optional layers, so that most chunks skip them.

    Rendering is per-sample exact whatever the chunk holds, so the order changes speed, never pixels.
    """
    age = identity["age_base"] + nuisance["age"]
    needs = (
        identity["hair_style"] >= 3,  # medium and long hair reach below the face
        nuisance["hat"],
        nuisance["hand"],
        nuisance["glasses"],
        identity["beard_style"] > 0,
        age > 0.35,
        (identity["freckles"] > 0) | (age > 0.6),
        nuisance["background"] == 2,
        nuisance["mouth_open"] > 0,
        identity["mole_count"],
    )
    return np.lexsort(needs[::-1])


def _seeds(name: str, seeds) -> np.ndarray:
    arr = np.asarray(seeds)
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(
            f"{name}: expected a 1-D array of non-negative integers, got shape {arr.shape} {arr.dtype}"
        )
    if arr.size and arr.min() < 0:
        raise ValueError(f"{name}: expected non-negative integers, got minimum {arr.min()}")
    return arr.astype(np.int64)
