"""Vectorised rasterisation primitives over a batch: per-sample scalars broadcast against pixel grids."""

from __future__ import annotations

import numpy as np


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
    """Anti-aliased coverage in [0, 1] from a signed distance ``inside`` (> 0 inside the shape).

    ``gain`` converts ``inside`` to pixels divided by the style's edge width (the width of the 0..1 ramp).
    """
    out = inside * gain
    out += 0.5
    return np.clip(out, 0.0, 1.0, out=out)


def ellipse_q(du: np.ndarray, dv: np.ndarray, ru, rv) -> np.ndarray:
    """Implicit ellipse value ``(du/ru)^2 + (dv/rv)^2`` (< 1 inside)."""
    a = du / ru
    a *= a
    b = dv / rv
    b *= b
    a += b
    return a


def edge_distance(value: np.ndarray, grad_x: np.ndarray, grad_y: np.ndarray) -> np.ndarray:
    """First-order signed distance ``value / |grad|`` to the zero set of an implicit function.

    Works in place: returns ``value`` and overwrites the gradient arrays.
    """
    grad_x *= grad_x
    grad_y *= grad_y
    norm = np.sqrt(np.add(grad_x, grad_y, out=grad_x), out=grad_x)
    np.clip(norm, 1e-6, np.inf, out=norm)  # two-sided clip: numpy's fast path, unlike maximum with a scalar
    value /= norm
    return value


def ellipse(du: np.ndarray, dv: np.ndarray, ru, rv, gain, shrink: float = 1.0) -> np.ndarray:
    """Coverage of the ellipse with radii ``shrink * (ru, rv)``; ``gain`` = pixels per unit / edge width.

    The edge distance comes from the implicit function's gradient, so long thin ellipses get a ramp as
    sharp along their length as across it; far from the edge, where that estimate falls short, the
    distance to the bounding box (never more than the true distance) takes over.
    """
    a, b = du / ru, dv / rv
    value = a * a
    value += b * b
    np.subtract(shrink * shrink, value, out=value)
    a *= 2.0 / ru  # the gradient of the implicit function
    b *= 2.0 / rv
    inside = edge_distance(value, a, b)
    to_box = np.subtract(shrink * ru, np.abs(du, out=a), out=a)
    np.minimum(to_box, np.subtract(shrink * rv, np.abs(dv, out=b), out=b), out=to_box)
    return coverage(np.minimum(inside, to_box, out=inside), gain)


def paint(canvas: np.ndarray, alpha: np.ndarray, colour: np.ndarray) -> None:
    """Alpha-blend ``colour`` ((3,1,1), (N,3,1,1) or (N,3,H,W)) over the planar ``canvas`` in place."""
    delta = colour - canvas
    delta *= alpha[:, None]
    canvas += delta


def darken(lum: np.ndarray, alpha: np.ndarray, strength) -> None:
    """Multiply the brightness map ``lum`` by ``1 - strength * alpha`` in place."""
    lum *= 1.0 - alpha * strength


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
    m = matmul(rot, rot.transpose(0, 2, 1) / (radii[:, :, None] ** 2))  # R diag(1/r^2) R^T
    m = per_sample(m.reshape(-1, 9))
    mxx, mxy, mxz, myy, myz, mzz = (m[:, i] for i in (0, 1, 2, 4, 5, 8))
    zx, zy = mxz / mzz, myz / mzz  # the depth of the surface's midpoint falls by these per unit of x, y
    sxx, sxy, syy = mxx - mxz * zx, mxy - mxz * zy, myy - myz * zy  # the silhouette's quadratic form
    gx, gy = sxx * dx + sxy * dy, sxy * dx + syy * dy  # half its gradient
    inside = dx * gx
    inside += dy * gy
    np.subtract(1.0, inside, out=inside)
    if exact_edge:
        edge = edge_distance(inside * 0.5, gx, gy)
        # Far from the silhouette the gradient estimate falls short; the bounding circle never overestimates.
        np.minimum(edge, per_sample(radii.max(-1)) - np.sqrt(dx * dx + dy * dy), out=edge)
    else:
        edge = inside * per_sample(0.5 * radii.min(-1))
    bulge = np.sqrt(np.clip(inside, 0.0, 1.0))
    dz = bulge * (1.0 / np.sqrt(mzz)) - zx * dx - zy * dy
    r = per_sample(rot.reshape(-1, 9))
    u = r[:, 0] * dx + r[:, 3] * dy + r[:, 6] * dz
    v = r[:, 1] * dx + r[:, 4] * dy + r[:, 7] * dz
    w = r[:, 2] * dx + r[:, 5] * dy + r[:, 8] * dz
    return bulge, edge, dz, (u, v, w)


def ellipsoid_extent(rot: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """(N, 2) half-extents along view x and y of rotated ellipsoids: sqrt of the diagonal of R diag(r^2) R^T."""
    return np.sqrt(np.einsum("nij,nj,nij->ni", rot, radii**2, rot)[:, :2])
