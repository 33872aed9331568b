"""Nuisance ranges of the procedural renderer: everything that varies between samples of one identity."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field, model_validator

from facesynth.config import StrictModel


def _span(lo: float, hi: float) -> Any:
    bound = Annotated[float, Field(ge=lo, le=hi)]
    return tuple[bound, bound]


Angle = _span(-90.0, 90.0)
Unit = _span(0.0, 1.0)
Probability = Annotated[float, Field(ge=0.0, le=1.0)]


class NuisanceConfig(StrictModel):
    """Uniform ``(low, high)`` ranges and probabilities of the per-sample factors.

    Angles are in degrees; ``shift_range`` is a fraction of the image side; ``blur_sigma_range`` is in pixels
    at 112 px (scaled with the image size); ``noise_sigma_range`` is in 0..255 grey levels.
    """

    yaw_range: Angle = (-55.0, 55.0)
    pitch_range: Angle = (-18.0, 18.0)
    roll_range: Angle = (-15.0, 15.0)
    scale_range: _span(0.5, 1.5) = (0.88, 1.08)
    shift_range: _span(-0.2, 0.2) = (-0.05, 0.05)
    light_azimuth_range: Angle = (-70.0, 70.0)
    light_elevation_range: Angle = (-10.0, 50.0)
    light_intensity_range: _span(0.0, 2.0) = (0.25, 1.0)
    ambient_range: _span(0.0, 1.5) = (0.35, 0.8)
    light_warmth_range: _span(-1.0, 1.0) = (-0.9, 0.9)
    smile_range: _span(-1.0, 1.0) = (-0.3, 1.0)
    mouth_open_prob: Probability = 0.3
    mouth_open_range: Unit = (0.15, 0.8)
    brow_raise_range: Unit = (0.0, 0.8)
    eye_closure_range: Unit = (0.0, 0.45)
    gaze_range: _span(-1.0, 1.0) = (-0.35, 0.35)
    glasses_prob: Probability = 0.2
    sunglasses_prob: Probability = 0.25
    hat_prob: Probability = 0.12
    hand_prob: Probability = 0.1
    background_weights: tuple[
        Annotated[float, Field(ge=0.0)], Annotated[float, Field(ge=0.0)], Annotated[float, Field(ge=0.0)]
    ] = (0.3, 0.4, 0.3)
    blur_sigma_range: _span(0.0, 4.0) = (0.0, 2.6)
    noise_sigma_range: _span(0.0, 40.0) = (0.0, 12.0)
    jpeg_prob: Probability = 0.6
    jpeg_quality_range: _span(1.0, 100.0) = (25.0, 95.0)
    age_range: Unit = (0.0, 0.35)

    @model_validator(mode="after")
    def _ranges_ordered(self) -> NuisanceConfig:
        for name, value in self:
            if name.endswith("_range") and value[0] > value[1]:
                raise ValueError(f"{name}: low {value[0]} is above high {value[1]} (expected low <= high)")
        if sum(self.background_weights) <= 0:
            raise ValueError(
                "background_weights: expected at least one positive weight (flat, gradient, texture)"
            )
        return self


def apply_overrides(config: NuisanceConfig, overrides: dict[str, Any] | None) -> NuisanceConfig:
    """Return ``config`` with ``overrides`` applied, validated.

    A key is either a config field (``{"yaw_range": (60, 80)}``), a factor fixed for every sample, which
    pins its range (``{"yaw": 0.0}`` means ``yaw_range=(0, 0)``), or a boolean factor forced on or off
    (``{"glasses": True}`` means ``glasses_prob=1``). Fixing a factor leaves every other drawn value as is.
    """
    if not overrides:
        return config
    fields = NuisanceConfig.model_fields
    update: dict[str, Any] = {}
    for key, value in overrides.items():
        if key in fields:
            update[key] = value
        elif f"{key}_range" in fields:
            if isinstance(value, bool):
                raise ValueError(f"override {key!r}={value!r}: expected a number (it fixes {key}_range)")
            update[f"{key}_range"] = (value, value)
        elif f"{key}_prob" in fields:
            if not isinstance(value, bool):
                raise ValueError(f"override {key!r}={value!r}: expected True or False")
            update[f"{key}_prob"] = float(value)
        else:
            factors = sorted({n.removesuffix("_range").removesuffix("_prob") for n in fields} | set(fields))
            raise ValueError(f"unknown nuisance override {key!r}: expected one of {factors}")
    return NuisanceConfig.model_validate({**config.model_dump(), **update})
