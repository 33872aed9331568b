"""Rendering styles: one code path, different shading and texture constants."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Style:
    """Shading/texture constants of a style (amplitudes are fractions of brightness unless noted)."""

    name: str
    edge_px: float  # anti-aliasing ramp width of shape edges, pixels
    toon_levels: int  # >0: quantise diffuse light into this many bands (cel shading); 0: smooth
    wrap: float  # wrap lighting: light reaching past the terminator (soft, skin-like falloff)
    specular: float  # strength of the Blinn-Phong highlight on skin
    pores: float  # fine skin-texture noise
    blotch: float  # low-frequency skin-tone variation
    hair_strands: float  # streak texture on hair
    blush: float  # red tint on cheeks
    falloff: float  # darkening of the head towards its silhouette
    hair_edge: float  # sharpness of hair, beard and nose edges relative to other shapes (< 1: softer)
    sensor_noise: float  # base sensor noise, grey levels (0..255), on top of the sampled noise
    vignette: float  # darkening at the corners
    saturation: float  # colour saturation multiplier


STYLES: dict[str, Style] = {
    "render": Style(
        name="render",
        edge_px=0.5,
        toon_levels=3,
        wrap=0.0,
        specular=0.0,
        pores=0.0,
        blotch=0.0,
        hair_strands=0.0,
        blush=0.0,
        falloff=0.0,
        hair_edge=1.0,
        sensor_noise=0.0,
        vignette=0.0,
        saturation=1.25,
    ),
    "photo": Style(
        name="photo",
        edge_px=1.1,
        toon_levels=0,
        wrap=0.45,
        specular=0.22,
        pores=0.03,
        blotch=0.05,
        hair_strands=0.4,
        blush=0.5,
        falloff=0.35,
        hair_edge=0.3,
        sensor_noise=2.5,
        vignette=0.35,
        saturation=0.9,
    ),
}


def get_style(name: str) -> Style:
    """The style called ``name``; a clear error for unknown names."""
    if name not in STYLES:
        raise ValueError(f"unknown style {name!r}: expected one of {sorted(STYLES)}")
    return STYLES[name]
