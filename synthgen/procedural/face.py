"""Batch face renderer: an ellipsoid head whose features are painted in its surface coordinates.

Units: the head's half-width is 1 ("head units"); ``v`` quantities of the identity (``eye_v``, ``nose_v``,
``mouth_v``, ``hairline``, ``ear_v``) are fractions of the head half-height ``b``. View coordinates ``x, y``
are head units around the head centre with roll removed (x right, y down, z towards the viewer). A pixel on
the head has object coordinates ``(u, v, w)`` on the ellipsoid, so features move and foreshorten with yaw
and pitch, and vanish when they turn away. The nose is a second ellipsoid and the ears are z-tested
against the head, which gives profiles a nose and one ear.

Images are planar float32 (N, 3, H, W). Each layer is evaluated only inside the band of image rows that its
projected extent can reach in any sample of the chunk (views, so painting stays in place). Bands span the full
width: each image's part is then contiguous, which numpy's fast loops need (a column crop makes every
operation on it several times slower).
"""

from __future__ import annotations

import numpy as np

from synthgen.procedural import kernels, textures
from synthgen.procedural.params import HAIR_COLOURS, IRIS_COLOURS, SKIN_TONES, Columns
from synthgen.procedural.raster import (
    coverage,
    darken,
    ellipse,
    ellipse_q,
    ellipsoid_extent,
    matmul,
    paint,
    per_sample,
    ray_ellipsoid,
    rgb,
    rotation,
)
from synthgen.procedural.styles import Style

FACE_RADIUS = 0.6  # head half-width at scale 1, in normalised image units (the image spans [-1, 1])
FACE_DROP = -0.08  # head centre below the image centre, normalised units (eyes land at ~42% height)
NOSE_TILT = 0.35  # radians: the nose ellipsoid leans so that its lower end sticks out
BAND_MARGIN_PX = 2.0  # pixels added around layer bands, beyond the widest anti-aliasing ramp
# A 9 x 5 grid over each surface patch (u in [-1, 1], v in [0, 1] of the patch): dense enough that the
# extremes of the patch's projection (where the surface turns away) fall within a fraction of a pixel.
_PATCH_U = np.repeat(np.linspace(-1.0, 1.0, 9), 5)
_PATCH_V = np.tile(np.linspace(0.0, 1.0, 5), 9)

# Per hair style (bald, buzz, short, medium, long).
SHELL_VOLUME = np.array([0.0, 0.2, 1.0, 1.2, 1.3])  # multiplies the identity's hair_volume
SHELL_CUT = np.array([-9.0, -0.35, -0.02, 0.55, 1.9])  # lowest hair of the shell, view y / b
SHELL_STRETCH = np.array([1.0, 1.0, 1.0, 1.25, 2.2])  # downward elongation of the shell
SCALP_OPACITY = np.array([0.0, 0.55, 1.0, 1.0, 1.0])
EAR_COVER = np.array([0.0, 0.0, 0.25, 0.9, 1.0])
# Per beard style (none, stubble, moustache, goatee, full): opacity of jaw, chin and moustache hair.
BEARD_JAW = np.array([0.0, 0.35, 0.0, 0.0, 1.0])
BEARD_CHIN = np.array([0.0, 0.0, 0.0, 1.0, 0.0])
BEARD_MOUSTACHE = np.array([0.0, 0.35, 1.0, 1.0, 1.0])

_HAIR_RGB = np.array(list(HAIR_COLOURS.values()))
_IRIS_RGB = np.array(list(IRIS_COLOURS.values()))


def layer_extents(ic: Columns, sc: Columns, style: Style, size: int) -> Columns:
    """Per-sample row bands of the layers, computed once for a whole batch and sliced like the columns.

    Each value is an int array (N, 2): first row and row stop.
    """
    return _Scene(ic, sc, style, size).extents()


def render_chunk(ic: Columns, sc: Columns, style: Style, size: int, extents: Columns) -> np.ndarray:
    """Render identity columns ``ic`` under sample columns ``sc``: planar float32 RGB in [0, 1], (N, 3, S, S).

    ``extents`` are the :func:`layer_extents` of these samples.
    """
    s = _Scene(ic, sc, style, size, extents)
    canvas = s.background()
    s.body(canvas)
    shell = s.hair_shell(canvas)
    head = s.head(canvas)
    s.nose(canvas, head)
    s.ears(canvas, head, shell)
    if sc["glasses"].any():
        s.glasses(canvas, head)
    if sc["hat"].any():
        s.hat(canvas)
    if sc["hand"].any():
        s.hand(canvas)
    return s.finish(canvas)


Box = slice  # a band of image rows, full width


def _band(arr: np.ndarray, box: Box) -> np.ndarray:
    """The rows ``box`` of a per-pixel array (..., H, W); per-sample values (H = 1) pass through."""
    return arr[..., box, :] if arr.shape[-2] > 1 else arr


def _inside(extents: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """The part of each per-sample band (N, 2) inside the band ``bounds`` (N, 2) (possibly empty, still inside)."""
    start = np.clip(extents[:, 0], bounds[:, 0], bounds[:, 1])
    return np.stack([start, np.clip(extents[:, 1], start, bounds[:, 1])], -1)


def _chunk_boxes(extents: Columns) -> dict[str, Box]:
    """The band of each layer over a chunk: the union of its samples' bands."""
    ext = np.stack(list(extents.values()), 1)  # (N, layers, 2)
    starts, stops = ext[..., 0].min(0).tolist(), ext[..., 1].max(0).tolist()
    return {name: slice(start, max(start, stop)) for name, start, stop in zip(extents, starts, stops)}


def _rectangle(x0, x1, y0, y1) -> np.ndarray:
    """Corners (N, 1, 4, 3) of per-sample view-space rectangles ``x0..x1`` by ``y0..y1`` (at z = 0)."""
    corners = np.zeros((len(x0), 1, 4, 3))
    corners[..., 0] = np.stack([x0, x0, x1, x1], -1)[:, None]
    corners[..., 1] = np.stack([y0, y1, y0, y1], -1)[:, None]
    return corners


class _Head:
    """The head's ray hit over its band of image rows ``box``: coverage and object coordinates ``u, v, w``, with
    ``uf`` (``u`` on the front; pushed far away on the back); and the image-sized depth ``z``, far behind
    everything outside the head.
    """

    def __init__(self, box: Box, z, cover, u, v, w, uf):
        self.box, self.z, self.cover, self.u, self.v, self.w, self.uf = box, z, cover, u, v, w, uf

    def band(self, box: Box) -> _Head:
        """The maps over the image rows ``box``, which lie inside the head's band."""
        rows = slice(box.start - self.box.start, box.stop - self.box.start)
        return _Head(box, self.z, *(a[..., rows, :] for a in (self.cover, self.u, self.v, self.w, self.uf)))


class _Scene:
    """Per-sample scalars, pixel grids and layer painters (each painter composites in place).

    Without ``extents`` only the scalars are set up (any number of samples: :meth:`extents` of a batch);
    with them, the pixel grids and each layer's band over these samples too, ready to paint.
    """

    def __init__(self, ic: Columns, sc: Columns, style: Style, size: int, extents: Columns | None = None):
        f = per_sample
        self.ic, self.sc, self.style, self.size, self.n = ic, sc, style, size, len(sc["yaw"])
        self.yaw, pitch, roll = (np.radians(sc[k]) for k in ("yaw", "pitch", "roll"))
        self.rot = rotation(self.yaw, pitch).astype(np.float32)
        self.b, self.c = ic["head_aspect"], ic["head_depth"]
        self.radius = FACE_RADIUS * sc["scale"]
        self.centre = np.stack([2.0 * sc["shift_x"], FACE_DROP + 2.0 * sc["shift_y"]], -1)
        self.cos_roll, self.sin_roll = np.cos(roll), np.sin(roll)
        self.gain = f(size * self.radius / (2.0 * style.edge_px))  # coverage gain per head unit
        self.margin_px = BAND_MARGIN_PX + style.edge_px  # + the anti-aliasing ramp of shapes
        self.hair_margin_px = BAND_MARGIN_PX + style.edge_px / min(
            style.hair_edge, 1.0
        )  # + hair's softer ramp
        self.age = np.clip(ic["age_base"] + sc["age"], 0.0, 1.0)
        self.offsets = sc["texture_offsets"]

        az, el = np.radians(sc["light_azimuth"]), np.radians(sc["light_elevation"])
        self.light = np.stack([np.sin(az) * np.cos(el), -np.sin(el), np.cos(az) * np.cos(el)], -1)
        half = self.light + np.array([0.0, 0.0, 1.0])
        self.half = half / np.linalg.norm(half, axis=-1, keepdims=True)
        warm = sc["light_warmth"]
        one = np.ones_like(warm)
        self.light_rgb = f(
            sc["light_intensity"][:, None] * np.stack([1 + 0.2 * warm, one, 1 - 0.2 * warm], -1)
        )
        self.ambient_rgb = f(sc["ambient"][:, None] * np.stack([1 - 0.06 * warm, one, 1 + 0.08 * warm], -1))

        self.skin = self._tone(self._skin())
        grey = np.clip((self.age - 0.45) * 1.8, 0.0, 0.85)[:, None]
        hair = _HAIR_RGB[ic["hair_colour"]] * ic["hair_shade"][:, None]
        self.hair = self._tone(hair + grey * (np.array([0.62, 0.6, 0.58]) - hair))
        self.hair_style = ic["hair_style"]
        if extents is not None:
            self._pixel_grids()
            self.boxes = _chunk_boxes(extents)
            self.head_box = self.boxes["head"]

    def _pixel_grids(self) -> None:
        """Per-pixel view coordinates ``x, y`` and ``xh`` (head units) and the hair colour map."""
        f, size = per_sample, self.size
        self.grid = (np.arange(size, dtype=np.float32) + 0.5) * (2.0 / size) - 1.0
        gx = (self.grid[None, None, :] - f(self.centre[:, 0])) / f(self.radius)
        gy = (self.grid[None, :, None] - f(self.centre[:, 1])) / f(self.radius)
        cr, sr = f(self.cos_roll), f(self.sin_roll)
        self.x = gx * cr + gy * sr
        self.y = gy * cr - gx * sr
        taper = 1.0 - f(self.ic["jaw_taper"]) * np.clip(self.y / f(self.b), 0.0, 1.0) ** 2
        self.xh = self.x / taper  # jaw-tapered x: the head and everything attached to it use this
        self.hair_map = self.hair
        if self.style.hair_strands:
            streaks = textures.crop(textures.noise_banks(size)["streaks"], self.offsets[:, 4:6], size)
            self.hair_map = self.hair * (1.0 + self.style.hair_strands * 0.5 * streaks)[:, None]

    # -- row bands ---------------------------------------------------------------------------------------
    def extents(self) -> Columns:
        """Per-sample row bands (N, 2) of the head, its surface features, nose, ears, hair shell and body."""
        half_x, half_y = ellipsoid_extent(self.rot, np.stack([np.ones(self.n), self.b, self.c], -1)).T
        head = self._extents(_rectangle(-half_x, half_x, -half_y, half_y), 0.0)[:, 0]
        patches = self._feature_patches()
        beard = {"beard": patches.pop("beard")}
        patches = {**self._surface_extents(patches), **self._surface_extents(beard, self.hair_margin_px)}
        out = {"head": head, **{name: _inside(e, head) for name, e in patches.items()}}
        _, radii, centre = self._nose_geometry()
        out["nose"] = self._extents(centre[:, None, None], radii.max(-1)[:, None], self.hair_margin_px)[:, 0]
        ears = self._extents(self._ear_centres()[:, :, None], self.ic["ear_size"][:, None])
        out["ear0"], out["ear1"] = ears[:, 0], ears[:, 1]
        rx, ry, cut, shift = self._shell_geometry()
        top = -0.08 * self.b - ry
        bottom = np.minimum(cut, top + ry * (1.0 + SHELL_STRETCH[self.hair_style]))
        shell = _rectangle(-rx - shift, rx - shift, top, bottom)
        out["shell"] = self._extents(shell, 0.0, tapered=False)[:, 0]
        neck_top = np.zeros((self.n, 2, 3))  # the clothes' and neck's highest points, view space
        neck_top[..., 0], neck_top[..., 1] = [-2.1, 2.1], 0.35 * self.b[:, None]
        body = self._extents(neck_top[:, None], 0.0, tapered=False)[:, 0]
        body[:, 1] = self.size  # everything below
        out["body"] = body
        return out

    def _extents(self, points: np.ndarray, reach, margin_px=None, tapered: bool = True) -> np.ndarray:
        """Per-sample row bands (N, F, 2) holding the pixels within ``reach[:, f]`` head units of ``points[:, f]``.

        ``points``: view space, (N, F, K, 3); ``reach``: (N, F) or a scalar; ``margin_px``: pixels added (default:
        those of shapes). ``tapered`` points are in the jaw-tapered space of the head, which pulls pixels towards
        the centre line by down to ``1 - jaw_taper``.
        """
        x, y = points[..., 0], points[..., 1]
        if tapered:
            x = np.concatenate([x, x * (1.0 - self.ic["jaw_taper"])[:, None, None]], -1)
            y = np.concatenate([y, y], -1)
        cr, sr = self.cos_roll[:, None, None], self.sin_roll[:, None, None]
        half = self.size / 2
        scale = self.radius[:, None, None] * half
        rows = (x * sr + y * cr) * scale + (self.centre[:, 1, None, None] + 1.0) * half - 0.5
        pad = np.broadcast_to(reach, x.shape[:2])[..., None] * scale + (margin_px or self.margin_px)
        ends = [np.floor((rows - pad).min(2)), np.ceil((rows + pad).max(2)) + 1]
        return np.clip(np.stack(ends, -1), 0, self.size).astype(np.int64)

    def _surface_extents(self, patches: dict[str, tuple], margin_px=None) -> Columns:
        """Row bands of head-surface patches ``name: (u_half, v_top, v_bottom)`` (per-sample or scalar)."""
        zero = np.zeros(self.n)
        spec = np.stack([np.stack(np.broadcast_arrays(*p, zero)[:3], -1) for p in patches.values()], 1)
        u = spec[..., 0:1] * _PATCH_U
        v = spec[..., 1:2] + (spec[..., 2:3] - spec[..., 1:2]) * _PATCH_V
        w = self.c[:, None, None] * np.sqrt(np.maximum(1.0 - u * u - (v / self.b[:, None, None]) ** 2, 0.0))
        points = np.einsum("nij,nfkj->nfki", self.rot, np.stack([u, v, w], -1))
        return dict(zip(patches, self._extents(points, 0.0, margin_px).transpose(1, 0, 2)))

    def _feature_patches(self) -> dict[str, tuple]:
        """The head-surface patch ``(u_half, v_top, v_bottom)`` holding each painted feature, in every sample."""
        ic, sc, b = self.ic, self.sc, self.b
        eye_v, mouth_v, nose_v = ic["eye_v"] * b, ic["mouth_v"] * b, ic["nose_v"] * b
        brow_v = eye_v - ic["brow_gap"] - 0.05 * sc["brow_raise"]
        brow_top = brow_v - 0.07 * ic["brow_arch"] - ic["brow_thick"] - 0.05
        lips = ic["lip_thick"] + 0.075 * sc["mouth_open"] + 0.06 * np.abs(sc["smile"]) + 0.01
        frames = 0.72 * (ic["eye_w"] * 1.3 + 0.05) + 0.02  # half-height of the glasses' frames
        patches = {
            "blush": (0.8, nose_v + 0.08 - 0.22, nose_v + 0.08 + 0.22),
            "spots": (0.8, nose_v - 0.5, nose_v + 0.5),
            "beard": (1.0, np.minimum(mouth_v - ic["lip_thick"] - 0.2, ic["ear_v"] * b), b),
            "wrinkles": (0.8, ic["hairline"] * b + 0.1, mouth_v + 0.08),
            "eyes": (
                ic["eye_sep"] + np.maximum(0.3, ic["brow_shift"] + ic["brow_len"]),
                brow_top,
                eye_v + 0.18,
            ),
            "mouth": (ic["mouth_w"], mouth_v - lips, mouth_v + lips),
            "glasses": (1.0, eye_v + 0.01 - frames, eye_v + 0.01 + frames),
        }
        for k in range(ic["mole_r"].shape[1]):
            r, mv = ic["mole_r"][:, k], ic["mole_v"][:, k] * b
            patches[f"mole{k}"] = (np.abs(ic["mole_u"][:, k]) + r, mv - r, mv + r)
        return patches

    # -- colours and light ------------------------------------------------------------------------------
    def _skin(self) -> np.ndarray:
        tone = self.ic["skin_tone"] * (len(SKIN_TONES) - 1)
        low = np.minimum(tone.astype(np.int64), len(SKIN_TONES) - 2)
        frac = (tone - low)[:, None]
        skin = SKIN_TONES[low] + frac * (SKIN_TONES[low + 1] - SKIN_TONES[low])
        skin = skin + self.ic["skin_hue"][:, None] * np.array([0.03, -0.005, -0.03])
        return skin * (1.0 - 0.12 * self.age[:, None]) + self.age[:, None] * np.array([0.0, 0.0, 0.02])

    def _tone(self, colours: np.ndarray) -> np.ndarray:
        """Apply the style's saturation to (N, 3) colours; return (N, 3, 1, 1) float32."""
        mean = colours.mean(-1, keepdims=True)
        return per_sample(np.clip(mean + self.style.saturation * (colours - mean), 0.0, 1.0))

    def _lit(self, albedo, lam) -> np.ndarray:
        """``albedo`` (per sample or a map) under the sample's ambient + diffuse light (``lam`` a map or a constant)."""
        if np.ndim(lam) == 0:
            return albedo * (self.ambient_rgb + np.float32(lam) * self.light_rgb)
        n, _, h, w = shape = (self.n, 3, *np.shape(lam)[-2:])
        if np.shape(albedo)[-2:] == (1, 1):
            source = np.ascontiguousarray(np.broadcast_to(albedo, (n, 3, 1, 1)), np.float32), 0
        else:
            source = kernels.pixels(albedo, shape)
        out = np.empty(shape, np.float32)
        ambient, light = (np.ascontiguousarray(c.reshape(n, 3)) for c in (self.ambient_rgb, self.light_rgb))
        kernels.lit(*source, *kernels.pixels(lam, (n, h, w)), ambient, light, out)
        return out

    def _shade(self, normal, scale, rot, with_specular=False):
        """Diffuse (and specular) terms for object-space normals ``normal * scale`` of a body rotated by ``rot``.

        ``normal``: three (N, h, W) maps; ``scale``: (N, 3) per-sample factors of their components.
        """
        st, shape = self.style, normal[0].shape
        lam = np.empty(shape, np.float32)
        spec = np.empty(shape if with_specular and st.specular else (self.n, 0, 0), np.float32)
        light, half = (np.einsum("nji,nj->ni", rot, d).astype(np.float32) for d in (self.light, self.half))
        kernels.shade(
            *(np.ascontiguousarray(a, np.float32) for a in normal),
            np.ascontiguousarray(scale, np.float32),
            light,
            half,
            np.float32(st.toon_levels),
            np.float32(st.wrap),
            lam,
            spec,
        )
        return lam, spec if spec.size else None

    # -- layers ------------------------------------------------------------------------------------------
    def background(self) -> np.ndarray:
        sc, size, f = self.sc, self.size, per_sample
        colours = (
            0.25 + 0.3 * sc["background_colours"] + 0.3 * sc["background_colours"].mean(-1, keepdims=True)
        )
        c0, c1 = self._tone(colours[:, 0]), self._tone(colours[:, 1])
        kind, ang = sc["background"], sc["background_angle"]
        ramp = f(0.5 * (kind == 1))
        t = (
            self.grid[None, None, :] * f(np.cos(ang)) + self.grid[None, :, None] * f(np.sin(ang))
        ) * ramp + ramp
        if (kind == 2).any():
            smooth = textures.crop(textures.noise_banks(size)["smooth"], self.offsets[:, 0:2], size)
            t = t + (0.5 + 0.3 * smooth) * f(kind == 2)
        return c0 + t[:, None] * (c1 - c0)

    def body(self, canvas) -> None:
        f, b, box = per_sample, per_sample(self.b), self.boxes["body"]
        x, y, g = _band(self.x, box) + f(0.12 * np.sin(self.yaw)), _band(self.y, box), self.gain
        out = _band(canvas, box)
        clothes = ellipse(x, y - (b + 1.05), 2.1, 0.95, g)
        paint(out, clothes, self._lit(self._tone(0.1 + 0.8 * self.sc["clothing_colour"]), 0.7))
        neck = coverage(0.55 - np.abs(x), g) * coverage(y - 0.35 * b, g)
        paint(out, neck, self._lit(self.skin * 0.72, 0.55))

    def hair_shell(self, canvas) -> np.ndarray:
        """Hair volume behind the head (nothing for bald identities); returns its coverage."""
        st, box = self.hair_style, self.boxes["shell"]
        rx, ry, cut, shift = self._shell_geometry()
        f, x, y = per_sample, _band(self.x, box), _band(self.y, box)
        hx = (x + f(shift)) / f(rx)
        hy = (y + f(0.08 * self.b)) / f(ry)
        hy *= 1.0 + (hy > 0) * f(1.0 / SHELL_STRETCH[st] - 1.0)  # stretched downwards (no np.where: slow)
        q = hx * hx + hy * hy
        cover = coverage(1.0 - q, f(0.5 * rx) * self.gain) * coverage(f(cut) - y, self.gain)
        cover *= f(st > 0)
        lo = per_sample(self.light)
        lam = np.clip(hx * lo[:, 0] + hy * lo[:, 1] + np.sqrt(np.clip(1.0 - q, 0.0, 1.0)) * lo[:, 2], 0, 1)
        paint(_band(canvas, box), cover, self._lit(_band(self.hair_map, box) * 0.85, lam))
        shell = np.zeros_like(self.x)
        _band(shell, box)[...] = cover
        return shell

    def _shell_geometry(self) -> tuple[np.ndarray, ...]:
        """The hair shell's radii ``rx, ry``, its cut line (view y) and its sideways shift, per sample."""
        st = self.hair_style
        a_eff = np.sqrt(np.cos(self.yaw) ** 2 + (self.c * np.sin(self.yaw)) ** 2)
        vol = 1.0 + self.ic["hair_volume"] * SHELL_VOLUME[st]
        cut = np.minimum(SHELL_CUT[st], 2.5) * self.b
        return a_eff * vol, self.b * vol, cut, 0.2 * self.c * np.sin(self.yaw)

    def head(self, canvas) -> _Head:
        """The head with its painted features, inside ``head_box`` (a band); returns its maps."""
        ic, box, shape = self.ic, self.head_box, self.x.shape
        radii = np.stack([np.ones(self.n), self.b, self.c], -1)
        bulge, edge, z, (u, v, w) = ray_ellipsoid(_band(self.xh, box), _band(self.y, box), self.rot, radii)
        z -= (bulge <= 0) * np.float32(1e4)  # off the head: far behind everything
        depth = np.full(shape, -1e3, np.float32)
        _band(depth, box)[...] = z
        head = _Head(box, depth, coverage(edge, self.gain), u, v, w, u + (w <= -0.05) * np.float32(9.0))
        # Image-sized so that features index them in image coordinates; only the head band is ever touched.
        albedo, lum = np.empty((self.n, 3, *shape[1:]), np.float32), np.empty(shape, np.float32)
        _band(albedo, box)[...] = self.skin
        if self.style.falloff:  # darker towards the silhouette, where the surface turns away
            _band(lum, box)[...] = 1.0 - self.style.falloff * (1.0 - bulge)
        else:
            _band(lum, box)[...] = 1.0
        self._skin_texture(head, albedo, lum)
        if (ic["beard_style"] > 0).any():
            self._beard(head, albedo)
        if (self.age > 0.35).any():
            self._wrinkles(head, lum)
        self._eyes_and_brows(head, albedo, lum)
        self._mouth(head, albedo)
        albedo, lum = _band(albedo, box), _band(lum, box)
        scalp = self._scalp(head)
        paint(albedo, scalp, _band(self.hair_map, box))
        scale = np.stack([np.ones(self.n), self.b**-2, self.c**-2], -1)
        lam, spec = self._shade((u, v, w), scale, self.rot, with_specular=True)
        albedo *= lum[:, None]
        colour = self._lit(albedo, lam)
        if spec is not None:
            spec *= 1.0 - scalp
            colour += spec[:, None] * (self.style.specular * self.light_rgb)
        paint(_band(canvas, box), head.cover, colour)
        return head

    def _skin_texture(self, h: _Head, albedo, lum) -> None:
        ic, st, f, size, b = self.ic, self.style, per_sample, self.size, self.b
        banks = textures.noise_banks(size)
        if st.pores or st.blotch:
            box = self.head_box
            pores = _band(textures.crop(banks["pores"], self.offsets[:, 2:4], size), box)
            smooth = _band(textures.crop(banks["smooth"], self.offsets[:, 0:2][:, ::-1], size), box)
            _band(lum, box)[...] *= 1.0 + st.pores * pores + st.blotch * smooth
        cheek_v = ic["nose_v"] * b + 0.08
        if st.blush:
            box = self.boxes["blush"]
            hb = h.band(box)
            q = ellipse_q(np.abs(hb.uf) - 0.5, hb.v - f(cheek_v), 0.3, 0.22)
            amount = np.clip(1.0 - q, 0.0, 1.0) * f(st.blush * 0.45 * ic["blush"])
            paint(_band(albedo, box), amount, self.skin * rgb([1.08, 0.72, 0.72]))
        spots = ic["freckles"] + np.clip(self.age - 0.6, 0.0, 1.0)
        if (spots > 0).any():
            box = self.boxes["spots"]
            hb = h.band(box)
            field = _band(textures.crop(banks["spots"], self.offsets[:, 6:8], size), box)
            region = np.clip(1.0 - ellipse_q(hb.uf, hb.v - f(ic["nose_v"] * b), 0.8, 0.5), 0.0, 1.0)
            dots = np.clip((field - f(2.6 - 0.9 * spots)) * 2.0, 0.0, 1.0)
            darken(_band(lum, box), dots * region, f(0.35 * (spots > 0)))
        for k in range(ic["mole_r"].shape[1]):
            r = ic["mole_r"][:, k]
            if (r > 0).any():
                mu, mv = ic["mole_u"][:, k], ic["mole_v"][:, k] * b
                box = self.boxes[f"mole{k}"]
                hb, rr = h.band(box), f(np.maximum(r, 1e-3))
                mole = ellipse(hb.uf - f(mu), hb.v - f(mv), rr, rr, self.gain)
                darken(_band(lum, box), mole, f(0.65 * (r > 0)))

    def _beard(self, h: _Head, albedo) -> None:
        ic, f, g, box = self.ic, per_sample, self.gain, self.boxes["beard"]
        hb = h.band(box)
        au, style = np.abs(hb.uf), ic["beard_style"]
        mv, lip = f(ic["mouth_v"] * self.b), f(ic["lip_thick"])
        top = mv - 0.16
        top = top - (top - f(ic["ear_v"] * self.b + 0.05)) * np.clip((au - 0.3) / 0.6, 0.0, 1.0)
        jaw = coverage(hb.v - top, g * self.style.hair_edge) * coverage(0.98 - au, g)
        chin = jaw * coverage(0.3 - au, g)
        moustache = coverage(hb.v - (mv - lip - 0.09), g) * coverage(mv - lip * 0.5 - hb.v, g)
        moustache *= coverage(f(ic["mouth_w"] * 1.15) - au, g)
        growth = ic["beard_density"] * np.clip(0.45 + self.age, 0.0, 1.0)
        amount = f(BEARD_JAW[style] * growth) * jaw + f(BEARD_CHIN[style] * growth) * chin
        amount += f(BEARD_MOUSTACHE[style] * growth) * moustache
        paint(_band(albedo, box), np.clip(amount, 0.0, 1.0), _band(self.hair_map, box) * 0.9)

    def _wrinkles(self, h: _Head, lum) -> None:
        ic, f, g, b = self.ic, per_sample, self.gain, self.b
        box = self.boxes["wrinkles"]
        hb, lum = h.band(box), _band(lum, box)
        amount = f(np.clip((self.age - 0.35) * 1.6, 0.0, 1.0))
        au = np.abs(hb.uf)
        top, bottom = f(ic["hairline"] * b + 0.12), f((ic["eye_v"] * b) - ic["brow_gap"] - 0.08)
        region = coverage(hb.v - top, g) * coverage(bottom - hb.v, g) * coverage(0.5 - au, g)
        t = hb.v * (1.0 / 0.075)
        lines = coverage(np.abs(t - np.floor(t) - 0.5) - 0.38, 0.075 * g)
        darken(lum, region * lines, 0.3 * amount)
        nose_end = f(ic["nose_v"] * b + ic["nose_len"] * 0.9)
        fold = np.abs(au - f(ic["nose_w"] + 0.05) - (hb.v - nose_end) * 0.45)
        fold_cover = coverage(0.012 - fold, g) * coverage(hb.v - nose_end + 0.03, g)
        fold_cover *= coverage(f(ic["mouth_v"] * b + 0.06) - hb.v, g)
        darken(lum, fold_cover, 0.35 * amount)

    def _eyes_and_brows(self, h: _Head, albedo, lum) -> None:
        ic, sc, f, g = self.ic, self.sc, per_sample, self.gain
        eye_v = ic["eye_v"] * self.b
        brow_v = eye_v - ic["brow_gap"] - 0.05 * sc["brow_raise"]
        box = self.boxes["eyes"]
        h, albedo, lum = h.band(box), _band(albedo, box), _band(lum, box)
        sep, width = f(ic["eye_sep"]), f(ic["eye_w"])
        ev = h.v - f(eye_v)
        side = np.abs(h.uf) - sep  # mirrored: positive towards the outer corner
        darken(lum, np.clip(1.0 - ellipse_q(side, ev + 0.01, 0.27, 0.16), 0.0, 1.0), f(0.1 + 0.12 * self.age))

        bu = np.abs(h.uf) - f(ic["eye_sep"] + ic["brow_shift"])
        length, thick = f(ic["brow_len"]), f(ic["brow_thick"])
        t = bu / length
        centre = f(brow_v) - f(0.07 * ic["brow_arch"]) * (1.0 - t * t) - f(0.5 * ic["brow_tilt"]) * bu
        brows = ellipse(bu, h.v - centre, length, thick, g)
        paint(albedo, brows, _band(self.hair_map, box) * 0.75 + 0.04)

        ct, st = f(np.cos(ic["eye_tilt"])), f(np.sin(ic["eye_tilt"]))
        tu, tv = side * ct + ev * st, ev * ct - side * st
        height = f(ic["eye_w"] * ic["eye_h"] * (1.0 - sc["eye_closure"]) + 0.004)
        sclera = ellipse(tu, tv, width, height, g)
        darken(lum, ellipse(tu, tv, width + 0.022, height + 0.022, g) - sclera, 0.88)  # lids and lashes
        paint(albedo, sclera, rgb([0.93, 0.91, 0.88]))
        radius = f(ic["iris_r"] * ic["eye_w"])
        iu = (
            h.uf + sep - (h.uf >= 0) * (2 * sep) - f(0.35 * sc["gaze_u"] * ic["eye_w"])
        )  # offset from its eye
        iv = ev - f(0.4 * sc["gaze_v"] * ic["eye_w"] * ic["eye_h"])
        q = (iu * iu + iv * iv) / (radius * radius)
        iris = coverage(1.0 - q, 0.5 * radius * g) * sclera
        paint(albedo, iris, self._tone(_IRIS_RGB[ic["iris_colour"]]))
        paint(albedo, coverage(0.16 - q, 1.25 * radius * g) * sclera, rgb([0.02, 0.02, 0.02]))
        if self.style.specular:
            glint = ellipse(iu + 0.35 * radius, iv + 0.35 * radius, 0.3 * radius, 0.3 * radius, g) * iris
            paint(albedo, glint, rgb([1.0, 1.0, 1.0]))

    def _mouth(self, h: _Head, albedo) -> None:
        ic, sc, f, g = self.ic, self.sc, per_sample, self.gain
        mouth_v, box = ic["mouth_v"] * self.b, self.boxes["mouth"]
        h, albedo = h.band(box), _band(albedo, box)
        width, thick = f(ic["mouth_w"]), f(ic["lip_thick"])
        t = h.uf / width
        mv = h.v - f(mouth_v) + f(0.06 * sc["smile"]) * t * t
        gap = f(0.075 * sc["mouth_open"])
        lip = self.skin * rgb([0.82, 0.55, 0.55]) + f(ic["lip_tone"][:, None] * [0.12, 0.024, 0.036])
        paint(albedo, ellipse(h.uf, mv, width, thick + gap, g), lip)
        opening = ellipse(h.uf, mv, width * 0.85, gap + 0.005, g)
        paint(albedo, opening, rgb([0.12, 0.04, 0.04]))
        if (sc["mouth_open"] > 0).any():
            teeth = opening * coverage(-(mv + 0.35 * gap), g) * f(sc["mouth_open"] > 0)
            paint(albedo, teeth, rgb([0.9, 0.88, 0.82]))

    def _scalp(self, h: _Head) -> np.ndarray:
        """Coverage of hair on the head surface: above the hairline, the temples and the back."""
        ic, f = self.ic, per_sample
        b = f(self.b)
        u2 = h.u * h.u
        side_drop = f((ic["ear_v"] - ic["hairline"]) * self.b - 0.12)
        line = f(ic["hairline"]) * b - f(ic["temple_recess"]) * u2 + f(0.05 * ic["hair_part"]) * h.u
        line += side_drop * np.clip((np.abs(h.u) - 0.74) * 4.0, 0.0, 1.0)
        line += np.clip(3.0 * (0.05 - h.w - 0.4 * h.v / b), 0.0, 1.0) * (2.5 * b)  # back of the head
        line += f(ic["fringe"]) * b * np.clip(1.0 - u2 * (1 / 0.3), 0.0, 1.0)
        return coverage(line - h.v, self.gain * self.style.hair_edge) * f(SCALP_OPACITY[self.hair_style])

    def nose(self, canvas, h: _Head) -> None:
        ic, f, box = self.ic, per_sample, self.boxes["nose"]
        rot, radii, centre = self._nose_geometry()
        dx, dy = _band(self.xh, box) - f(centre[:, 0]), _band(self.y, box) - f(centre[:, 1])
        _, edge, dz, (nu, nv, nw) = ray_ellipsoid(dx, dy, rot, radii, exact_edge=True)
        cover = coverage(edge, self.gain * self.style.hair_edge)
        cover *= dz + f(centre[:, 2]) > _band(h.z, box)
        lam, _ = self._shade((nu, nv, nw), radii**-2, rot)
        lateral = (np.abs(nu) / f(ic["nose_w"]) - 0.5) / 0.25
        nostril = coverage(
            1.0 - lateral * lateral - ((nv / f(ic["nose_len"]) - 0.62) / 0.2) ** 2, 0.1 * self.gain
        )
        paint(_band(canvas, box), cover, self._lit(self.skin, lam * (1.0 - 0.8 * nostril)))

    def _nose_geometry(self) -> tuple[np.ndarray, ...]:
        """The nose ellipsoid: rotation (N, 3, 3), radii (N, 3) and view-space centre (N, 3)."""
        ic = self.ic
        radii = np.stack([ic["nose_w"], ic["nose_len"], ic["nose_depth"]], -1)
        ct, st = np.cos(NOSE_TILT), np.sin(NOSE_TILT)
        rot = matmul(self.rot, np.float32([[1, 0, 0], [0, ct, -st], [0, st, ct]]))
        depth = self.c * np.sqrt(1.0 - ic["nose_v"] ** 2) - 0.3 * ic["nose_depth"]
        centre = np.stack([np.zeros(self.n), ic["nose_v"] * self.b, depth], -1)
        return rot, radii, np.einsum("nij,nj->ni", self.rot, centre)

    def ears(self, canvas, h: _Head, shell) -> None:
        ic, f = self.ic, per_sample
        size_ = ic["ear_size"]
        openness = np.abs(self.rot[:, 2, 0])
        rx, ry = f(size_ * (0.3 + 0.4 * openness)), f(size_)
        boxes = self.boxes["ear0"], self.boxes["ear1"]
        for centre, box in zip(self._ear_centres().transpose(1, 0, 2), boxes):
            dx, dy = _band(self.xh, box) - f(centre[:, 0]), _band(self.y, box) - f(centre[:, 1])
            cover = ellipse(dx, dy, rx, ry, self.gain) * (f(centre[:, 2]) > _band(h.z, box))
            cover *= 1.0 - _band(shell, box) * f(EAR_COVER[self.hair_style])
            inner = ellipse(dx, dy, rx, ry, self.gain, shrink=0.55)
            paint(_band(canvas, box), cover, self._lit(self.skin * 0.95, 0.55 * (1.0 - 0.6 * inner)))

    def _ear_centres(self) -> np.ndarray:
        """View-space centres (N, 2, 3) of the left and right ear."""
        anchors = np.zeros((self.n, 2, 3))
        anchors[..., 0], anchors[..., 1], anchors[..., 2] = (
            [-0.97, 0.97],
            (self.ic["ear_v"] * self.b)[:, None],
            (-0.12 * self.c)[:, None],
        )
        return np.einsum("nij,nfj->nfi", self.rot, anchors)

    def glasses(self, canvas, h: _Head) -> None:
        ic, sc, f, g = self.ic, self.sc, per_sample, self.gain
        width = ic["eye_w"] * 1.3 + 0.05
        eye_v = ic["eye_v"] * self.b + 0.01
        box = self.boxes["glasses"]
        h = h.band(box)
        on = f(sc["glasses"]) * h.cover
        sep, width = f(ic["eye_sep"]), f(width)
        height, rim = width * 0.72, 0.03
        side, ev = np.abs(h.uf) - sep, h.v - f(eye_v)
        lens = ellipse(side, ev, width - rim, height - rim, g)
        frame = ellipse(side, ev, width, height, g) - lens
        bar = coverage(0.6 * rim - np.abs(ev + 0.02), g)
        arm = coverage(side - width + 0.01, g) * coverage(1.0 - np.abs(h.uf), g)  # ends at the ear
        frame += bar * (coverage(sep - width + 0.02 - np.abs(h.uf), g) + arm)
        dark = sc["sunglasses"]
        lens_rgb = np.where(dark[:, None], [0.05, 0.05, 0.06], [0.8, 0.86, 0.9])
        out = _band(canvas, box)
        paint(out, lens * on * f(np.where(dark, 0.85, 0.12)), self._tone(lens_rgb))
        paint(out, np.clip(frame, 0.0, 1.0) * on, self._lit(self._tone(sc["glasses_colour"]), 0.6))

    def hat(self, canvas) -> None:
        sc, f = self.sc, per_sample
        b = f(self.b)
        a_eff = f(np.sqrt(np.cos(self.yaw) ** 2 + (self.c * np.sin(self.yaw)) ** 2) * 1.1)
        q = ellipse_q(self.x + f(0.15 * np.sin(self.yaw)), self.y + 0.05 * b, a_eff, b * 1.09)
        edge = f(sc["hat_line"]) * b + 0.12 * (self.x / a_eff) ** 2
        cover = coverage(1.0 - q, 0.5 * a_eff * self.gain) * coverage(edge - self.y, self.gain) * f(sc["hat"])
        band = coverage(self.y - (edge - 0.1), self.gain)
        paint(canvas, cover, self._lit(self._tone(0.1 + 0.8 * sc["hat_colour"]), 0.7 - 0.25 * band))

    def hand(self, canvas) -> None:
        sc, f = self.sc, per_sample
        dx, dy = self.x - f(sc["hand_x"]), self.y - f(sc["hand_y"] * self.b)
        cover = ellipse(dx, dy, 0.42, 0.55, self.gain) * f(sc["hand"])
        lo = per_sample(self.light)
        lam = np.clip(0.55 + 0.4 * (dx * lo[:, 0] + dy * lo[:, 1]), 0.0, 1.0)
        paint(canvas, cover, self._lit(self.skin * 0.95, lam))

    def finish(self, canvas) -> np.ndarray:
        if self.style.vignette:
            canvas *= 1.0 - 0.5 * self.style.vignette * (self.grid[None, :] ** 2 + self.grid[:, None] ** 2)
        return canvas
