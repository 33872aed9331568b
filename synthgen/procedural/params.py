"""Identity and nuisance parameters, drawn deterministically from seeds.

Every identity seed gets one vector of uniforms (``numpy`` SeedSequence ``[seed, IDENTITY_STREAM]``) and
every (identity seed, sample seed) pair another; each parameter reads a fixed position of its vector, so
a parameter's value never depends on the config of any other parameter, or on the rest of the batch.
Values are kept in float64 columns (one array per parameter over the batch).
"""

from __future__ import annotations

import numpy as np

from synthgen.procedural.nuisance import NuisanceConfig

IDENTITY_STREAM = 0x1D
SAMPLE_STREAM = 0x5A
IDENTITY_DRAWS = 80
SAMPLE_DRAWS = 64

HAIR_STYLES = ("bald", "buzz", "short", "medium", "long")
HAIR_STYLE_WEIGHTS = (0.05, 0.13, 0.37, 0.25, 0.2)
HAIR_COLOURS = {
    "black": (0.05, 0.045, 0.04),
    "dark_brown": (0.16, 0.1, 0.065),
    "brown": (0.32, 0.2, 0.11),
    "auburn": (0.46, 0.19, 0.08),
    "light_brown": (0.52, 0.38, 0.22),
    "blond": (0.78, 0.64, 0.38),
}
HAIR_COLOUR_WEIGHTS = (0.3, 0.25, 0.18, 0.07, 0.1, 0.1)
SKIN_TONES = np.array(  # dark to light anchors, interpolated by ``skin_tone``
    [(0.3, 0.18, 0.12), (0.5, 0.32, 0.21), (0.72, 0.5, 0.36), (0.88, 0.68, 0.54), (0.97, 0.8, 0.7)]
)
IRIS_COLOURS = {
    "dark_brown": (0.16, 0.08, 0.04),
    "brown": (0.34, 0.18, 0.08),
    "hazel": (0.42, 0.34, 0.14),
    "green": (0.26, 0.42, 0.22),
    "blue": (0.26, 0.42, 0.62),
    "grey": (0.45, 0.5, 0.54),
}
IRIS_COLOUR_WEIGHTS = (0.35, 0.25, 0.1, 0.08, 0.15, 0.07)
BEARD_STYLES = ("none", "stubble", "moustache", "goatee", "full")
BEARD_STYLE_WEIGHTS = (0.6, 0.12, 0.08, 0.08, 0.12)
BACKGROUNDS = ("flat", "gradient", "texture")
MAX_MOLES = 3

Columns = dict[str, np.ndarray]


class _Uniforms:
    """Hands out the columns of a (rows, draws) uniform matrix in a fixed order."""

    def __init__(self, uniforms: np.ndarray):
        self._u = uniforms
        self._next = 0

    def take(self, count: int = 1) -> np.ndarray:
        out = self._u[:, self._next : self._next + count]
        if out.shape[1] != count:
            raise RuntimeError(
                "parameter draws exceed the reserved uniforms; raise *_DRAWS (changes outputs)"
            )
        self._next += count
        return out[:, 0] if count == 1 else out

    def uniform(self, low: float, high: float) -> np.ndarray:
        return low + (high - low) * self.take()

    def span(self, bounds: tuple[float, float]) -> np.ndarray:
        return self.uniform(*bounds)

    def chance(self, probability: float) -> np.ndarray:
        return self.take() < probability

    def choice(self, weights) -> np.ndarray:
        cdf = np.cumsum(weights) / np.sum(weights)
        return np.minimum(np.searchsorted(cdf, self.take(), side="right"), len(cdf) - 1)


def seed_uniforms(seeds: list[tuple[int, ...]], count: int) -> np.ndarray:
    """One row of ``count`` uniforms per seed tuple, from a SeedSequence over that tuple."""
    return (
        np.stack([np.random.default_rng(list(s)).random(count) for s in seeds])
        if seeds
        else np.zeros((0, count))
    )


def identity_columns(identity_seeds: np.ndarray) -> Columns:
    """Face geometry, colouring, hair and marks of each identity seed (units: head half-width = 1)."""
    d = _Uniforms(seed_uniforms([(int(s), IDENTITY_STREAM) for s in identity_seeds], IDENTITY_DRAWS))
    c: Columns = {}
    c["head_aspect"] = d.uniform(1.15, 1.42)
    c["head_depth"] = d.uniform(1.0, 1.2)
    c["jaw_taper"] = d.uniform(0.12, 0.5)
    c["skin_tone"] = d.uniform(0.0, 1.0)
    c["skin_hue"] = d.uniform(-1.0, 1.0)
    c["blush"] = d.uniform(0.0, 1.0)
    c["eye_sep"] = d.uniform(0.3, 0.45)
    c["eye_v"] = d.uniform(-0.16, 0.02)
    c["eye_w"] = d.uniform(0.14, 0.2)
    c["eye_h"] = d.uniform(0.36, 0.62)  # height / width
    c["eye_tilt"] = d.uniform(-0.15, 0.25)
    c["iris_r"] = d.uniform(0.42, 0.56)  # radius / eye width
    c["iris_colour"] = d.choice(IRIS_COLOUR_WEIGHTS)
    c["brow_gap"] = d.uniform(0.11, 0.21)
    c["brow_len"] = d.uniform(0.15, 0.26)
    c["brow_thick"] = d.uniform(0.028, 0.06)
    c["brow_arch"] = d.uniform(0.0, 1.0)
    c["brow_tilt"] = d.uniform(-0.25, 0.2)
    c["brow_shift"] = d.uniform(-0.03, 0.05)
    c["nose_v"] = d.uniform(0.14, 0.3)
    c["nose_len"] = d.uniform(0.17, 0.29)
    c["nose_w"] = d.uniform(0.1, 0.18)
    c["nose_depth"] = d.uniform(0.14, 0.28)
    c["mouth_v"] = d.uniform(0.52, 0.66)
    c["mouth_w"] = d.uniform(0.24, 0.36)
    c["lip_thick"] = d.uniform(0.035, 0.07)
    c["lip_tone"] = d.uniform(0.0, 1.0)
    c["ear_size"] = d.uniform(0.2, 0.3)
    c["ear_v"] = d.uniform(-0.08, 0.08)
    c["hair_style"] = d.choice(HAIR_STYLE_WEIGHTS)
    c["hair_colour"] = d.choice(HAIR_COLOUR_WEIGHTS)
    c["hair_shade"] = d.uniform(0.8, 1.2)
    c["hair_volume"] = d.uniform(0.05, 0.22)
    c["hairline"] = d.uniform(-0.8, -0.5)
    c["temple_recess"] = d.uniform(0.0, 0.35)
    c["hair_part"] = d.uniform(-1.0, 1.0)
    c["fringe"] = np.where(d.chance(0.3), d.uniform(0.15, 0.45), 0.0)
    c["beard_style"] = d.choice(BEARD_STYLE_WEIGHTS)
    c["beard_density"] = d.uniform(0.55, 1.0)
    c["freckles"] = np.where(d.chance(0.2), d.uniform(0.3, 1.0), 0.0)
    c["mole_count"] = d.choice((0.5, 0.25, 0.15, 0.1))
    moles = d.take(3 * MAX_MOLES).reshape(-1, MAX_MOLES, 3)
    c["mole_u"] = (moles[..., 0] * 1.4 - 0.7) * (np.arange(MAX_MOLES) < c["mole_count"][:, None])
    c["mole_v"] = moles[..., 1] * 1.1 - 0.3
    c["mole_r"] = (0.018 + 0.022 * moles[..., 2]) * (np.arange(MAX_MOLES) < c["mole_count"][:, None])
    c["age_base"] = d.uniform(0.0, 0.35)
    return c


def sample_columns(identity_seeds: np.ndarray, sample_seeds: np.ndarray, nuisance: NuisanceConfig) -> Columns:
    """Pose, light, expression, occluders, background and degradations of each sample."""
    d = _Uniforms(
        seed_uniforms(
            [(int(i), int(s), SAMPLE_STREAM) for i, s in zip(identity_seeds, sample_seeds)], SAMPLE_DRAWS
        )
    )
    n = nuisance
    c: Columns = {}
    for factor in ("yaw", "pitch", "roll", "scale"):
        c[factor] = d.span(getattr(n, f"{factor}_range"))
    c["shift_x"] = d.span(n.shift_range)
    c["shift_y"] = d.span(n.shift_range)
    for factor in ("light_azimuth", "light_elevation", "light_intensity", "ambient", "light_warmth", "smile"):
        c[factor] = d.span(getattr(n, f"{factor}_range"))
    c["mouth_open"] = np.where(d.chance(n.mouth_open_prob), d.span(n.mouth_open_range), 0.0)
    c["brow_raise"] = d.span(n.brow_raise_range)
    c["eye_closure"] = d.span(n.eye_closure_range)
    c["gaze_u"] = d.span(n.gaze_range)
    c["gaze_v"] = d.span(n.gaze_range)
    c["glasses"] = d.chance(n.glasses_prob)
    c["sunglasses"] = c["glasses"] & d.chance(n.sunglasses_prob)
    c["glasses_colour"] = d.take(3) * 0.35
    c["hat"] = d.chance(n.hat_prob)
    c["hat_colour"] = d.take(3)
    c["hat_line"] = d.uniform(-0.75, -0.45)
    c["hand"] = d.chance(n.hand_prob)
    c["hand_x"] = d.uniform(-0.6, 0.6)
    c["hand_y"] = d.uniform(0.35, 1.0)
    c["background"] = d.choice(n.background_weights)
    c["background_colours"] = d.take(6).reshape(-1, 2, 3)
    c["background_angle"] = d.uniform(0.0, 2 * np.pi)
    c["clothing_colour"] = d.take(3)
    c["texture_offsets"] = d.take(10)  # crop positions: background, pores, streaks, spots, sensor noise
    c["blur_sigma"] = d.span(n.blur_sigma_range)
    c["noise_sigma"] = d.span(n.noise_sigma_range)
    c["jpeg_quality"] = np.where(d.chance(n.jpeg_prob), np.rint(d.span(n.jpeg_quality_range)), 0).astype(
        np.int64
    )
    c["age"] = d.span(n.age_range)
    return c
