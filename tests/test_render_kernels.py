"""The renderer's fused pixel loops: row-band plumbing, and each primitive against its formula in float64."""

from __future__ import annotations

import numpy as np
import pytest

from synthgen.procedural import kernels, raster
from synthgen.procedural.raster import per_sample

N, H, W = 5, 24, 20
RNG = np.random.default_rng(7)


def _maps(*shape, low=-1.5, high=1.5) -> np.ndarray:
    return RNG.uniform(low, high, size=shape).astype(np.float32)


def _reference_coverage(inside, gain):
    return np.clip(inside * gain + 0.5, 0.0, 1.0)


def test_rows_finds_the_full_array_behind_a_row_band():
    full = _maps(N, 3, H, W)
    assert kernels.rows(full)[0] is full and kernels.rows(full)[1] == 0
    band = full[..., 7:19, :]
    base, r0 = kernels.rows(band)
    assert base is full and r0 == 7
    assert np.array_equal(base[..., r0 : r0 + band.shape[-2], :], band)
    assert kernels.rows(full[..., :, 2:9]) is None  # a column crop is not a band of rows
    assert kernels.rows(full[1:, :, 3:6]) is None  # nor a slice of the samples
    assert kernels.rows(full.transpose(0, 1, 3, 2)[..., 2:5, :]) is None


def test_pixels_copy_only_what_is_not_a_band_and_targets_must_be_bands():
    full = _maps(N, H, W)
    band = full[:, 4:10]
    base, r0 = kernels.pixels(band, band.shape)
    assert base is full and r0 == 4
    per = per_sample(np.arange(N))
    copy, r0 = kernels.pixels(per, (N, 6, W))
    assert copy.shape == (N, 6, W) and copy.flags.c_contiguous and r0 == 0
    assert np.array_equal(copy[:, 3, 5], np.arange(N))
    with pytest.raises(ValueError, match="row band"):
        kernels.target(full[:, :, 3:8])
    with pytest.raises(ValueError, match="row band"):
        kernels.target(full.astype(np.float64))
    assert np.array_equal(kernels.samples(2.5, 3), [2.5, 2.5, 2.5])
    assert np.array_equal(kernels.samples(per, N), np.arange(N))
    with pytest.raises(ValueError, match="per-sample"):
        kernels.samples(np.ones(N + 1), N)


def test_coverage_and_ellipse_match_their_formulas():
    inside, gain = _maps(N, H, W), per_sample(RNG.uniform(2, 30, N))
    np.testing.assert_allclose(raster.coverage(inside, gain), _reference_coverage(inside, gain), atol=1e-6)
    du, dv = _maps(N, H, W), _maps(N, H, W)
    ru, rv = per_sample(RNG.uniform(0.2, 1.0, N)), per_sample(RNG.uniform(0.1, 0.6, N))
    for shrink in (1.0, 0.55):
        a, b = du.astype(np.float64) / ru, dv.astype(np.float64) / rv
        gradient = np.hypot(2 * a / ru, 2 * b / rv)
        inside = (shrink**2 - a * a - b * b) / np.maximum(gradient, 1e-6)
        to_box = np.minimum(shrink * ru - np.abs(du), shrink * rv - np.abs(dv))
        expected = _reference_coverage(np.minimum(inside, to_box), gain)
        got = raster.ellipse(du, dv, ru, rv, gain, shrink)
        np.testing.assert_allclose(got, expected, atol=2e-5)
        assert 0.0 < got.mean() < 1.0  # the test draws both inside and outside pixels


def test_a_band_gives_the_same_bits_as_the_full_image():
    """Pixels never depend on the band they are computed in (the renderer's byte-identity promise)."""
    du, dv = _maps(N, H, W), _maps(N, H, W)
    ru, rv, gain = per_sample(RNG.uniform(0.3, 1, N)), per_sample(RNG.uniform(0.3, 1, N)), 9.0
    full = raster.ellipse(du, dv, ru, rv, gain)
    assert np.array_equal(raster.ellipse(du[:, 5:17], dv[:, 5:17], ru, rv, gain), full[:, 5:17])
    canvas, alpha = _maps(N, 3, H, W, low=0, high=1), _maps(N, H, W, low=0, high=1)
    whole, banded = canvas.copy(), canvas.copy()
    raster.paint(whole, alpha, per_sample(RNG.uniform(0, 1, (N, 3))))
    raster.paint(banded[..., 3:11, :], alpha[:, 3:11], per_sample(RNG.uniform(0, 1, (N, 3))))
    assert np.array_equal(banded[..., :3, :], canvas[..., :3, :])  # rows outside the band untouched
    assert np.array_equal(banded[..., 11:, :], canvas[..., 11:, :])


@pytest.mark.parametrize("kind", ["constant", "per_sample", "map"])
def test_paint_and_darken_blend_in_place(kind):
    canvas, alpha = _maps(N, 3, H, W, low=0, high=1), _maps(N, H, W, low=0, high=1)
    colour = {
        "constant": np.float32([0.2, 0.5, 0.9]).reshape(3, 1, 1),
        "per_sample": per_sample(RNG.uniform(0, 1, (N, 3))),
        "map": _maps(N, 3, H, W, low=0, high=1),
    }[kind]
    band = slice(6, 20)
    expected = canvas.astype(np.float64)
    colour_band = colour[..., band, :] if kind == "map" else colour
    expected[..., band, :] += (colour_band - expected[..., band, :]) * alpha[:, None, band]
    raster.paint(canvas[..., band, :], alpha[:, band], colour_band)
    np.testing.assert_allclose(canvas, expected, atol=1e-6)

    lum, strength = _maps(N, H, W, low=0, high=1), per_sample(RNG.uniform(0, 1, N))
    expected = lum.astype(np.float64)
    expected[:, band] *= 1.0 - alpha[:, band] * strength
    raster.darken(lum[:, band], alpha[:, band], strength)
    np.testing.assert_allclose(lum, expected, atol=1e-6)


@pytest.mark.parametrize("exact_edge", [False, True])
def test_ray_ellipsoid_hits_the_surface(exact_edge):
    yaw, pitch = RNG.uniform(-1.0, 1.0, N), RNG.uniform(-0.4, 0.4, N)
    rot = raster.rotation(yaw, pitch).astype(np.float32)
    radii = np.stack([np.ones(N), RNG.uniform(1.1, 1.4, N), RNG.uniform(0.8, 1.1, N)], -1)
    grid = np.linspace(-1.6, 1.6, W, dtype=np.float32)
    dx = np.broadcast_to(grid[None, None, :], (N, H, W))
    dy = np.broadcast_to(np.linspace(-1.6, 1.6, H, dtype=np.float32)[None, :, None], (N, H, W))
    bulge, edge, dz, (u, v, w) = raster.ray_ellipsoid(dx, dy, rot, radii, exact_edge=exact_edge)
    hit = bulge > 0.05
    assert 0.2 < hit.mean() < 0.9
    on_surface = (u / radii[:, 0, None, None]) ** 2 + (v / radii[:, 1, None, None]) ** 2
    on_surface += (w / radii[:, 2, None, None]) ** 2
    np.testing.assert_allclose(on_surface[hit], 1.0, atol=2e-4)  # hits lie on the ellipsoid
    view = np.einsum("nij,njhw->nihw", rot, np.stack([u, v, w], 1))  # object -> view space
    np.testing.assert_allclose(view[:, 0], dx, atol=1e-5)
    np.testing.assert_allclose(view[:, 2], dz, atol=1e-5)
    assert (edge[hit] > 0).all() and (edge[bulge == 0] <= 0).all()
    assert (bulge[edge < -0.01] == 0).all()  # off the silhouette: no surface


@pytest.mark.parametrize("albedo_kind", ["per_sample", "map"])
def test_lit_is_albedo_times_ambient_plus_diffuse(albedo_kind):
    lam = _maps(N, H, W, low=0, high=1)
    albedo = per_sample(RNG.uniform(0, 1, (N, 3))) if albedo_kind == "per_sample" else _maps(N, 3, H, W)
    ambient, light = RNG.uniform(0.2, 1.0, (2, N, 3)).astype(np.float32)
    out = np.empty((N, 3, 10, W), np.float32)
    source = kernels.pixels(albedo[..., 4:14, :], (N, 3, 10, W)) if albedo_kind == "map" else (albedo, 0)
    kernels.lit(*source, lam, 4, ambient, light, out)
    rows = albedo[..., 4:14, :] if albedo_kind == "map" else albedo
    expected = rows * (ambient[..., None, None] + lam[:, None, 4:14] * light[..., None, None])
    np.testing.assert_allclose(out, expected, atol=1e-6)


@pytest.mark.parametrize("toon_levels, wrap", [(3, 0.0), (0, 0.45)])
def test_shade_matches_lambert_and_blinn_phong(toon_levels, wrap):
    normal = tuple(_maps(N, H, W) for _ in range(3))
    scale = RNG.uniform(0.5, 2.0, (N, 3)).astype(np.float32)
    light, half = (v / np.linalg.norm(v, axis=-1, keepdims=True) for v in _maps(2, N, 3))
    lam, spec = np.empty((N, H, W), np.float32), np.empty((N, H, W), np.float32)
    kernels.shade(*normal, scale, light, half, np.float32(toon_levels), np.float32(wrap), lam, spec)
    n = np.stack(normal, 1).astype(np.float64) * scale[:, :, None, None]
    norm = np.linalg.norm(n, axis=1) + 1e-6
    cos = np.einsum("nchw,nc->nhw", n, light) / norm
    if toon_levels:
        expected = np.ceil(np.clip(cos, 0, 1) * toon_levels) / toon_levels
        close = np.abs(np.clip(cos, 0, 1) * toon_levels - np.round(np.clip(cos, 0, 1) * toon_levels)) < 1e-4
        # at band edges float32 and float64 may round either way
        np.testing.assert_allclose(lam[~close], expected[~close], atol=1e-6)
    else:
        np.testing.assert_allclose(lam, np.clip((cos + wrap) / (1 + wrap), 0, 1), atol=1e-5)
    expected_spec = np.clip(np.einsum("nchw,nc->nhw", n, half) / norm, 0, 1) ** 32
    np.testing.assert_allclose(spec, expected_spec, atol=1e-5)


def test_quantise_adds_the_noise_crop_and_rounds():
    size = 16
    planar = _maps(N, 3, size, size, low=-0.1, high=1.1)
    bank = _maps(3, 2 * size, 2 * size, low=-3, high=3)
    starts = RNG.integers(0, size + 1, (N, 2))
    sigma = RNG.uniform(0, 0.05, N).astype(np.float32)
    out = np.empty((N, size, size, 3), np.uint8)
    kernels.quantise(planar, bank, starts, sigma, out)
    noise = np.stack([bank[:, r : r + size, c : c + size] for r, c in starts])
    expected = (planar + noise * sigma[:, None, None, None]) * 255.0 + 0.5
    expected = np.clip(expected, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    assert np.abs(out.astype(int) - expected).max() <= 1  # float32 rounding at .5 boundaries only
    assert (out == expected).mean() > 0.999
    assert out.min() == 0 and out.max() == 255  # values outside [0, 1] saturate
