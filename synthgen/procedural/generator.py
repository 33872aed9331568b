"""The procedural renderer as a generation-stage :class:`~synthgen.stage.Generator`."""

from __future__ import annotations

from pydantic import Field

from facesynth.config import StrictModel
from synthgen.procedural.nuisance import NuisanceConfig
from synthgen.procedural.render import render_faces
from synthgen.stage import Generated, Generator


class ProceduralConfig(StrictModel):
    """Renderer settings: style, image size and the nuisance ranges."""

    style: str = Field("render", pattern="^(render|photo)$")
    size: int = Field(112, ge=32, le=128)
    nuisance: NuisanceConfig = NuisanceConfig()
    overrides: dict = Field(default_factory=dict, description="fixed nuisance values, e.g. {yaw: 0.0}")


class ProceduralGenerator(Generator):
    """Identity ``i`` is always the face of identity seed ``i``; the row seed draws its nuisance."""

    name = "procedural"

    def __init__(self, cfg: ProceduralConfig):
        self.cfg = cfg
        self.domain = "render"

    def generate(self, identities, samples, seeds) -> Generated:
        batch = render_faces(
            identities,
            seeds,
            style=self.cfg.style,
            size=self.cfg.size,
            nuisance=self.cfg.nuisance,
            overrides=self.cfg.overrides or None,
        )
        return Generated(
            images=batch.images,
            identity_names=[f"procedural-{int(i):07d}" for i in identities],
            prompts=[""] * len(identities),
            params=batch.params,
        )


def make_procedural(cfg: ProceduralConfig) -> ProceduralGenerator:
    """Picklable factory for generator actors."""
    return ProceduralGenerator(cfg)
