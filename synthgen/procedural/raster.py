"""Vectorised rasterisation primitives over a batch: per-sample scalars broadcast against pixel grids."""

from __future__ import annotations

import numpy as np

from synthgen.procedural import kernels


def per_sample(values) -> np.ndarray:
    """(N,) values -> float32 (N, 1, 1); (N, K) vectors or colours -> (N, K, 1, 1), to broadcast over images.

    Images are planar, (N, 3, H, W), so that every inner loop runs over contiguous pixels.
    """
    arr = np.asarray(values, dtype=np.float32)
    return arr.reshape(*arr.shape, 1, 1)


def rgb(values) -> np.ndarray:
    """A constant colour as float32 (3, 1, 1)."""
    return np.asarray(values, dtype=np.float32).reshape(3, 1, 1)


def coverage(inside: np.ndarray, gain) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] from a signed distance ``inside`` (> 0 inside the shape), (N, H, W).

    ``gain`` (scalar or per sample) converts ``inside`` to pixels divided by the style's edge width (the width
    of the 0..1 ramp).
    """
    out = np.empty(np.shape(inside), np.float32)
    kernels.coverage(*kernels.pixels(inside, out.shape), kernels.samples(gain, len(out)), out)
    return out


def ellipse_q(du: np.ndarray, dv: np.ndarray, ru, rv) -> np.ndarray:
    """Implicit ellipse value ``(du/ru)^2 + (dv/rv)^2`` (< 1 inside)."""
    a = du / ru
    a *= a
    b = dv / rv
    b *= b
    a += b
    return a


def ellipse(du: np.ndarray, dv: np.ndarray, ru, rv, gain, shrink: float = 1.0) -> np.ndarray:
    """Coverage of the ellipse with radii ``shrink * (ru, rv)``; ``gain`` = pixels per unit / edge width.

    ``du, dv`` are per-pixel offsets from the centre (N, H, W); radii and gain are scalars or per sample.
    The edge distance comes from the implicit function's gradient, so long thin ellipses get a ramp as
    sharp along their length as across it; far from the edge, where that estimate falls short, the
    distance to the bounding box (never more than the true distance) takes over.
    """
    out = np.empty(np.broadcast_shapes(np.shape(du), np.shape(dv)), np.float32)
    n = len(out)
    kernels.ellipse(
        *kernels.pixels(du, out.shape),
        *kernels.pixels(dv, out.shape),
        kernels.samples(ru, n),
        kernels.samples(rv, n),
        kernels.samples(gain, n),
        np.float32(shrink),
        out,
    )
    return out


def paint(canvas: np.ndarray, alpha: np.ndarray, colour) -> None:
    """Alpha-blend ``colour`` ((3,1,1), (N,3,1,1) or (N,3,H,W)) over the planar ``canvas`` in place.

    ``canvas`` is a float32 C array or a band of its rows; ``alpha`` is per pixel (N, H, W).
    """
    full, c0 = kernels.target(canvas)
    n, _, h, w = canvas.shape
    alpha_rows = kernels.pixels(alpha, (n, h, w))
    if np.shape(colour)[-2:] == (1, 1):
        kernels.paint_flat(full, c0, h, *alpha_rows, kernels.colours(colour, n))
    else:
        kernels.paint_map(full, c0, h, *alpha_rows, *kernels.pixels(colour, canvas.shape))


def darken(lum: np.ndarray, alpha: np.ndarray, strength) -> None:
    """Multiply the brightness map ``lum`` by ``1 - strength * alpha`` in place (``strength`` scalar or per sample)."""
    full, l0 = kernels.target(lum)
    kernels.darken(
        full, l0, lum.shape[-2], *kernels.pixels(alpha, lum.shape), kernels.samples(strength, len(lum))
    )


def matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Batched (broadcast) 3x3 matrix product without BLAS, whose worker threads burn CPU on these tiny sizes."""
    return np.einsum("...ij,...jk->...ik", a, b)


def rotation(yaw: np.ndarray, pitch: np.ndarray) -> np.ndarray:
    """(N, 3, 3) object-to-view rotations ``Rx(pitch) @ Ry(yaw)`` (radians; x right, y down, z to viewer)."""
    cy, sy, cp, sp = np.cos(yaw), np.sin(yaw), np.cos(pitch), np.sin(pitch)
    one, zero = np.ones_like(yaw), np.zeros_like(yaw)
    ry = np.stack(
        [np.stack([cy, zero, sy], -1), np.stack([zero, one, zero], -1), np.stack([-sy, zero, cy], -1)], -2
    )
    rx = np.stack(
        [np.stack([one, zero, zero], -1), np.stack([zero, cp, -sp], -1), np.stack([zero, sp, cp], -1)], -2
    )
    return matmul(rx, ry)


def ray_ellipsoid(
    dx: np.ndarray, dy: np.ndarray, rot: np.ndarray, radii: np.ndarray, exact_edge: bool = False
):
    """Front surface of rotated ellipsoids under orthographic view along -z.

    ``dx, dy``: view offsets from each ellipsoid centre (N, H, W); ``rot``: (N, 3, 3) object-to-view;
    ``radii``: (N, 3). Returns ``bulge`` (the front surface's height over the silhouette's plane as a fraction
    of its highest: 1 at the centre of the silhouette, 0 on its edge and outside), ``edge`` (signed distance
    to the silhouette, positive inside), ``dz`` (depth of the front surface, towards the viewer) and the
    object coordinates ``(u, v, w)``. Without ``exact_edge`` the distance is the first-order
    ``inside * r_min / 2``, good for ellipsoids whose silhouette is not much longer than wide.
    """
    m = matmul(rot, rot.transpose(0, 2, 1) / (radii[:, :, None] ** 2)).reshape(-1, 9)  # R diag(1/r^2) R^T
    mxx, mxy, mxz, myy, myz, mzz = (m[:, i] for i in (0, 1, 2, 4, 5, 8))
    zx, zy = mxz / mzz, myz / mzz  # the depth of the surface's midpoint falls by these per unit of x, y
    form = [mxx - mxz * zx, mxy - mxz * zy, myy - myz * zy]  # the silhouette's quadratic form
    extra = [zx, zy, 1.0 / np.sqrt(mzz), radii.max(-1), 0.5 * radii.min(-1)]
    coef = np.concatenate([np.stack(form + extra, -1), rot.reshape(-1, 9)], -1).astype(np.float32)
    shape = np.broadcast_shapes(np.shape(dx), np.shape(dy))
    maps = [np.empty(shape, np.float32) for _ in range(6)]  # separate arrays: bands of them stay bands
    kernels.ray_ellipsoid(
        *kernels.pixels(dx, shape), *kernels.pixels(dy, shape), np.ascontiguousarray(coef), exact_edge, *maps
    )
    bulge, edge, dz, u, v, w = maps
    return bulge, edge, dz, (u, v, w)


def ellipsoid_extent(rot: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """(N, 2) half-extents along view x and y of rotated ellipsoids: sqrt of the diagonal of R diag(r^2) R^T."""
    return np.sqrt(np.einsum("nij,nj,nij->ni", rot, radii**2, rot)[:, :2])
