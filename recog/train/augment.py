"""Training augmentations as a config list, applied per image on CPU with per-row random streams.

Each entry is a small pydantic model with a ``name`` (the list is a discriminated union, so an
unknown name fails with its config key) and an ``apply(image, rng)`` over a uint8 ``(3, H, W)``
tensor, built on ``torchvision.transforms.v2.functional``. Parameters are drawn from a numpy
generator seeded by (run seed, epoch, row key, copy), so a row gets the same augmentation in every
run with the same seed, whichever process decodes it, and a different one each epoch.

The cross-domain study's set is ``flip``, ``rotate``, ``color_jitter`` and ``grayscale`` (p=0.3);
``crop`` (random resized crop back to the input size) adds scale jitter.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from pydantic import Field, model_validator
from torchvision.transforms import InterpolationMode

from facesynth.config import StrictModel


class Flip(StrictModel):
    """Horizontal mirror with probability ``p``."""

    name: Literal["flip"] = "flip"
    p: float = Field(0.5, ge=0, le=1)

    def apply(self, image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        return TF.horizontal_flip(image) if rng.random() < self.p else image


class Rotate(StrictModel):
    """Rotation by an angle uniform in ``[-degrees, degrees]`` (bilinear, black fill), with probability ``p``."""

    name: Literal["rotate"] = "rotate"
    degrees: float = Field(10.0, ge=0, le=180)
    p: float = Field(1.0, ge=0, le=1)

    def apply(self, image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        angle = rng.uniform(-self.degrees, self.degrees)
        if rng.random() >= self.p:
            return image
        return TF.rotate(image, angle, interpolation=InterpolationMode.BILINEAR)


class ColorJitter(StrictModel):
    """Brightness, contrast and saturation factors uniform in ``[1 - x, 1 + x]``, hue shift in ``[-hue, hue]``."""

    name: Literal["color_jitter"] = "color_jitter"
    brightness: float = Field(0.2, ge=0, le=1)
    contrast: float = Field(0.2, ge=0, le=1)
    saturation: float = Field(0.2, ge=0, le=1)
    hue: float = Field(0.0, ge=0, le=0.5)
    p: float = Field(1.0, ge=0, le=1)

    def apply(self, image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        b, c, s = (rng.uniform(1 - x, 1 + x) for x in (self.brightness, self.contrast, self.saturation))
        h = rng.uniform(-self.hue, self.hue)
        if rng.random() >= self.p:
            return image
        image = TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(image, b), c), s)
        return TF.adjust_hue(image, h) if self.hue else image


class Grayscale(StrictModel):
    """Grey image (3 equal channels) with probability ``p``; 0.3 in the cross-domain study."""

    name: Literal["grayscale"] = "grayscale"
    p: float = Field(0.3, ge=0, le=1)

    def apply(self, image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        return TF.rgb_to_grayscale(image, num_output_channels=3) if rng.random() < self.p else image


class Crop(StrictModel):
    """Random resized crop: area fraction in ``scale``, aspect ratio in ``ratio``, resized back to the input."""

    name: Literal["crop"] = "crop"
    scale: tuple[float, float] = (0.8, 1.0)
    ratio: tuple[float, float] = (0.75, 1.3333333)
    p: float = Field(1.0, ge=0, le=1)

    @model_validator(mode="after")
    def _ordered(self) -> Crop:
        if not 0 < self.scale[0] <= self.scale[1] <= 1 or not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"scale={self.scale}, ratio={self.ratio}: expected 0 < lo <= hi (scale hi <= 1)")
        return self

    def apply(self, image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        height, width = image.shape[-2:]
        area = rng.uniform(*self.scale) * height * width
        aspect = math.exp(rng.uniform(math.log(self.ratio[0]), math.log(self.ratio[1])))
        h = min(height, max(1, round(math.sqrt(area / aspect))))
        w = min(width, max(1, round(math.sqrt(area * aspect))))
        top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
        if rng.random() >= self.p:
            return image
        return TF.resized_crop(image, top, left, h, w, [height, width], antialias=True)


Augment = Annotated[Flip | Rotate | ColorJitter | Grayscale | Crop, Field(discriminator="name")]
AugmentList = list[Augment]


def default_augment() -> list:
    """insightface's training augmentation: a horizontal flip with p=0.5."""
    return [Flip()]


def row_rng(seed: int, epoch: int, key: int, copy: int) -> np.random.Generator:
    """The random stream of one row in one epoch (``copy`` tells repeats of a row apart)."""
    return np.random.default_rng([seed, epoch, key & 0xFFFFFFFFFFFFFFFF, copy])


def augment_image(image: torch.Tensor, augments: list, rng: np.random.Generator) -> torch.Tensor:
    """Apply ``augments`` in order to a uint8 ``(3, H, W)`` tensor."""
    for aug in augments:
        image = aug.apply(image, rng)
    return image
