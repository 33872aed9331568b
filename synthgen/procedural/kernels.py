"""Fused per-pixel loops (numba) behind the raster primitives: one pass over the pixels instead of a numpy
temporary per arithmetic step (about 4x faster per primitive on the renderer's chunk sizes).

Pixel arrays reach the loops as C-contiguous (N, H, W) or (N, C, H, W) arrays plus a first row: a band of
rows ``full[..., r0:r1, :]`` is passed as ``(full, r0)`` (see :func:`rows`), because numba compiles strided
views into scalar loops while whole rows of a C array vectorise. Per-sample values are float32 (N,) vectors.

Every loop runs over whole rows of fixed width in the same order and without fast-math, so a pixel's value
never depends on the band or the batch it was computed in (the renderer promises byte-identical images).
Compiled code is cached next to this file (``cache=True``): compiling them all takes ~2 s once per machine,
loading them ~0.3 s per process.
"""

from __future__ import annotations

import numba
import numpy as np

ZERO, HALF, ONE, TWO, TINY = (np.float32(v) for v in (0.0, 0.5, 1.0, 2.0, 1e-6))
_jit = numba.njit(cache=True, nogil=True, error_model="numpy")  # x / 0 -> inf, as numpy: loops vectorise


def rows(a: np.ndarray) -> tuple[np.ndarray, int] | None:
    """``(full, r0)`` with ``a`` the rows ``r0:r0 + a.shape[-2]`` of the C-contiguous array ``full``; None otherwise."""
    if a.flags.c_contiguous:
        return a, 0
    base = a.base
    if not (
        isinstance(base, np.ndarray)
        and base.flags.c_contiguous
        and base.dtype == a.dtype
        and base.shape[:-2] == a.shape[:-2]
        and base.shape[-1] == a.shape[-1]
        and base.strides == a.strides
    ):
        return None
    r0, rest = divmod(a.ctypes.data - base.ctypes.data, base.strides[-2])
    return (base, r0) if rest == 0 and 0 <= r0 and r0 + a.shape[-2] <= base.shape[-2] else None


def pixels(a, shape: tuple[int, ...]) -> tuple[np.ndarray, int]:
    """A float32 per-pixel input of ``shape`` as ``(full, r0)``: no copy for a C array or a row band of one."""
    a = np.asarray(a, np.float32)
    if a.shape == shape and (found := rows(a)) is not None:
        return found
    return np.ascontiguousarray(np.broadcast_to(a, shape)), 0


def target(a: np.ndarray) -> tuple[np.ndarray, int]:
    """An array written in place, as ``(full, r0)``; it must be float32 C-contiguous or a row band of such."""
    found = rows(a) if a.dtype == np.float32 else None
    if found is None:
        raise ValueError(
            f"in-place target must be a float32 C array or a row band of one: {a.shape} {a.strides}"
        )
    return found


def samples(value, n: int) -> np.ndarray:
    """A scalar or per-sample value (N, N x 1 x 1) as a float32 (N,) vector."""
    arr = np.asarray(value, np.float32).reshape(-1)
    if arr.size == 1:
        return np.full(n, arr[0], np.float32)
    if arr.size != n:
        raise ValueError(f"expected a scalar or {n} per-sample values, got shape {np.shape(value)}")
    return np.ascontiguousarray(arr)


def colours(value, n: int) -> np.ndarray:
    """A constant (3, 1, 1) or per-sample (N, 3, 1, 1) colour as float32 (N, 3)."""
    arr = np.asarray(value, np.float32).reshape(-1, 3)
    return np.ascontiguousarray(np.broadcast_to(arr, (n, 3)))


@_jit
def coverage(src, s0, gain, out):
    """``out = clip(src * gain + 0.5, 0, 1)`` over ``src``'s rows ``s0..`` (``out`` (N, h, W))."""
    n, h, w = out.shape
    for i in range(n):
        g = gain[i]
        for y in range(h):
            for x in range(w):
                out[i, y, x] = min(max(src[i, s0 + y, x] * g + HALF, ZERO), ONE)


@_jit
def ellipse(du, u0, dv, v0, ru, rv, gain, shrink, out):
    """Anti-aliased coverage of per-sample ellipses (see :func:`synthgen.procedural.raster.ellipse`)."""
    n, h, w = out.shape
    s2 = shrink * shrink
    for i in range(n):
        iu, iv, g = ONE / ru[i], ONE / rv[i], gain[i]
        gu, gv, bu, bv = TWO * iu, TWO * iv, shrink * ru[i], shrink * rv[i]
        for y in range(h):
            for x in range(w):
                pu, pv = du[i, u0 + y, x], dv[i, v0 + y, x]
                a, b = pu * iu, pv * iv
                grad_u, grad_v = a * gu, b * gv
                norm = max(np.sqrt(grad_u * grad_u + grad_v * grad_v), TINY)
                inside = min((s2 - a * a - b * b) / norm, min(bu - abs(pu), bv - abs(pv)))
                out[i, y, x] = min(max(inside * g + HALF, ZERO), ONE)


@_jit
def paint_flat(canvas, c0, h, alpha, a0, colour):
    """Blend per-sample colours (N, 3) over ``canvas`` rows ``c0..c0+h`` with coverage ``alpha`` rows ``a0..``."""
    n, channels, _, w = canvas.shape
    for i in range(n):
        for k in range(channels):
            col = colour[i, k]
            for y in range(h):
                for x in range(w):
                    value = canvas[i, k, c0 + y, x]
                    canvas[i, k, c0 + y, x] = value + (col - value) * alpha[i, a0 + y, x]


@_jit
def paint_map(canvas, c0, h, alpha, a0, colour, k0):
    """Blend a colour map (N, 3, ., W) rows ``k0..`` over ``canvas`` rows ``c0..c0+h``."""
    n, channels, _, w = canvas.shape
    for i in range(n):
        for k in range(channels):
            for y in range(h):
                for x in range(w):
                    value = canvas[i, k, c0 + y, x]
                    canvas[i, k, c0 + y, x] = value + (colour[i, k, k0 + y, x] - value) * alpha[i, a0 + y, x]


@_jit
def darken(lum, l0, h, alpha, a0, strength):
    """``lum *= 1 - strength * alpha`` over ``lum`` rows ``l0..l0+h``; ``strength`` per sample."""
    n, _, w = lum.shape
    for i in range(n):
        s = strength[i]
        for y in range(h):
            for x in range(w):
                lum[i, l0 + y, x] *= ONE - alpha[i, a0 + y, x] * s


@_jit
def ray_ellipsoid(dx, x0, dy, y0, coef, exact_edge, bulge, edge, dz, u, v, w):
    """Front-surface hit of per-sample ellipsoids (see :func:`synthgen.procedural.raster.ray_ellipsoid`).

    ``coef`` (N, 17): the silhouette's form ``sxx, sxy, syy``, depth slopes ``zx, zy``, ``1/sqrt(mzz)``, the
    largest radius and half the smallest, then the rotation's 9 entries (row-major).
    """
    n, h, wd = bulge.shape
    for i in range(n):
        sxx, sxy, syy, zx, zy, depth, r_max, half_min = coef[i, :8]
        r = coef[i, 8:]
        for y in range(h):
            for x in range(wd):
                px, py = dx[i, x0 + y, x], dy[i, y0 + y, x]
                gx, gy = sxx * px + sxy * py, sxy * px + syy * py
                inside = ONE - (px * gx + py * gy)
                if exact_edge:
                    norm = max(np.sqrt(gx * gx + gy * gy), TINY)
                    e = min(inside * HALF / norm, r_max - np.sqrt(px * px + py * py))
                else:
                    e = inside * half_min
                b = np.sqrt(min(max(inside, ZERO), ONE))
                z = b * depth - zx * px - zy * py
                bulge[i, y, x], edge[i, y, x], dz[i, y, x] = b, e, z
                u[i, y, x] = r[0] * px + r[3] * py + r[6] * z
                v[i, y, x] = r[1] * px + r[4] * py + r[7] * z
                w[i, y, x] = r[2] * px + r[5] * py + r[8] * z


@_jit
def shade(nu, nv, nw, scale, light, half, toon_levels, wrap, lam, spec):
    """Diffuse (``lam``) and, when ``spec`` has rows, specular (cosine to the 32nd) terms of the normals
    ``(nu, nv, nw) * scale[i]`` (all (N, h, W), C) for per-sample light and half vectors (N, 3)."""
    n, h, w = lam.shape
    with_spec = spec.shape[1] == h
    for i in range(n):
        su, sv, sw = scale[i, 0], scale[i, 1], scale[i, 2]
        l0, l1, l2 = light[i, 0], light[i, 1], light[i, 2]
        h0, h1, h2 = half[i, 0], half[i, 1], half[i, 2]
        for y in range(h):
            for x in range(w):
                a, b, c = nu[i, y, x] * su, nv[i, y, x] * sv, nw[i, y, x] * sw
                norm = np.sqrt(a * a + b * b + c * c) + TINY
                cos = (a * l0 + b * l1 + c * l2) / norm
                if toon_levels > 0:
                    lam[i, y, x] = np.ceil(min(max(cos, ZERO), ONE) * toon_levels) / toon_levels
                else:
                    lam[i, y, x] = min(max((cos + wrap) / (ONE + wrap), ZERO), ONE)
                if with_spec:
                    s = min(max((a * h0 + b * h1 + c * h2) / norm, ZERO), ONE)
                    s *= s
                    s *= s
                    s *= s
                    s *= s
                    spec[i, y, x] = s * s


@_jit
def quantise(planar, noise, starts, sigma, out):
    """``out[i, y, x, k] = uint8(clip((planar[i, k, y, x] + noise crop * sigma[i]) * 255 + 0.5, 0, 255))``.

    ``noise`` is the (3, 2S, 2S) white-noise bank, ``starts`` (N, 2) each sample's crop corner.
    """
    n, channels, h, w = planar.shape
    for i in range(n):
        oy, ox, s = starts[i, 0], starts[i, 1], sigma[i]
        for k in range(channels):
            for y in range(h):
                for x in range(w):
                    value = (planar[i, k, y, x] + noise[k, oy + y, ox + x] * s) * np.float32(255.0) + HALF
                    out[i, y, x, k] = np.uint8(min(max(value, ZERO), np.float32(255.0)))


@_jit
def lit(albedo, a0, lam, l0, ambient, light, out):
    """``out = albedo * (ambient + lam * light)``: per-sample (N, 3) light colours, a per-pixel ``lam`` (rows
    ``l0..``) and an albedo that is per sample (N, 3, 1, 1) or a map (N, 3, ., W) read from row ``a0``."""
    n, channels, h, w = out.shape
    flat = albedo.shape[2] == 1
    for i in range(n):
        for k in range(channels):
            amb, lig = ambient[i, k], light[i, k]
            if flat:
                base = albedo[i, k, 0, 0]
                for y in range(h):
                    for x in range(w):
                        out[i, k, y, x] = base * (amb + lam[i, l0 + y, x] * lig)
            else:
                for y in range(h):
                    for x in range(w):
                        out[i, k, y, x] = albedo[i, k, a0 + y, x] * (amb + lam[i, l0 + y, x] * lig)
