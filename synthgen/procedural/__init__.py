"""Procedural face renderer: offline ground-truth identities (the analogue of DigiFace-1M's 3D renders)."""

from synthgen.procedural.nuisance import NuisanceConfig, apply_overrides
from synthgen.procedural.render import RenderBatch, render_faces
from synthgen.procedural.styles import STYLES

__all__ = ["STYLES", "NuisanceConfig", "RenderBatch", "apply_overrides", "render_faces"]
