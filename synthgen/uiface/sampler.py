"""UIFace sampling: single-stage CFG, two-stage with a fixed t0, and two-stage with a per-sample adaptive t0.

Follows TFace ``diffusion/ddpm.py: sample_ddim_2stage`` on diffusers schedulers (DDIM, DPM-Solver++, PNDM)
derived from the model's DDPM schedule. Per step, both passes (empty-context source, target) run as one
batched UNet call ``[source; target]`` and the attention processors inject inside it.

- ``single``: every step ``pred = (1+s) pred_cond - s pred_uncond`` (UIFace's ``cfg_scale`` s, on the UNet's
  prediction: epsilon in the reference, or v / x0, which CFG combines the same way).
- ``fixed``: empty context while ``t > t0``; from the first timestep ``t <= t0`` on, identity context with CFG.
- ``adaptive``: stage 1 (``t >= step_th``) runs the target pass with the identity context only for samples
  already switched (no CFG; the reference's pass B), reduces its cross-attention to one map per sample and
  switches a sample for good once the map stops changing (:func:`adaptive_switch`); stage 2 (``t < step_th``)
  conditions every sample with CFG.

``t0`` reports, per sample, the first timestep whose denoising used the identity context (-1: never, and
always -1 in ``single`` mode). Nothing is copied to the host inside the loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, PNDMScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from pydantic import Field, model_validator

from facesynth.config import StrictModel
from synthgen.uiface.attention import AttentionControl, combine_attention_maps
from synthgen.uiface.model import UIFaceModel


class SamplerConfig(StrictModel):
    """How UIFace samples: mode, guidance, stage boundaries, injection and the diffusers scheduler."""

    mode: Literal["single", "fixed", "adaptive"] = "adaptive"
    guidance: float = Field(1.0, ge=0, description="cfg_scale s: pred = (1+s) pred_cond - s pred_uncond")
    t0: int = Field(500, ge=-1, description="fixed mode: identity context for timesteps t <= t0")
    threshold: float = Field(
        0.006, ge=0, description="adaptive: switch when mean |map_t - map_prev| < threshold"
    )
    step_th: int = Field(
        500, ge=-1, description="adaptive: every sample conditioned, with CFG, for t < step_th"
    )
    injection: bool = Field(True, description="self/cross attention injection from the empty-context pass")
    cross_strength: float = Field(
        0.5, ge=0, le=1, description="AdaIN blend toward the empty-context statistics"
    )
    scheduler: Literal["ddim", "dpmsolver++", "pndm"] = "ddim"
    steps: int = Field(50, ge=1, le=1000)
    eta: float = Field(0.0, ge=0, le=1, description="DDIM stochasticity (ddim only)")

    @model_validator(mode="after")
    def _eta_needs_ddim(self) -> SamplerConfig:
        if self.eta > 0 and self.scheduler != "ddim":
            raise ValueError(f"eta: {self.eta} > 0 needs scheduler 'ddim', got {self.scheduler!r}")
        return self


@dataclass
class UIFaceSamples:
    """Decoded images (uint8, ``(B, H, W, 3)``, RGB) and each sample's switch timestep ``t0`` (int64)."""

    images: torch.Tensor
    t0: torch.Tensor


def build_scheduler(model: UIFaceModel, config: SamplerConfig) -> SchedulerMixin:
    """A fresh inference scheduler on the model's DDPM betas. DDIM matches the reference grid (980, 960, ..., 0
    for 50 steps) and uses alpha_bar = 1 after the last step."""
    base = model.noise_schedule.config
    if config.steps > base.num_train_timesteps:
        raise ValueError(
            f"steps: {config.steps} exceeds the model's {base.num_train_timesteps} training timesteps"
        )
    if config.scheduler == "ddim":
        return DDIMScheduler.from_config(
            base, set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading"
        )
    if config.scheduler == "dpmsolver++":
        return DPMSolverMultistepScheduler.from_config(base, algorithm_type="dpmsolver++", solver_order=2)
    return PNDMScheduler.from_config(base, skip_prk_steps=True, set_alpha_to_one=True)


def adaptive_switch(
    previous: torch.Tensor | None, current: torch.Tensor, switched: torch.Tensor, threshold: float
) -> torch.Tensor:
    """Adaptive partition rule: ``d = mean_{h,w} |A_t - A_prev|`` (the reference's "RMSE"); a sample switches
    for good at the first step with ``d < threshold``. Maps are ``(B, H, W)``; returns the new flags."""
    if previous is None:
        return switched
    change = (current - previous).abs().mean(dim=(-2, -1))
    return switched | (change < threshold)


def per_sample_noise(
    generators: Sequence[torch.Generator], shape: tuple[int, ...], device, dtype: torch.dtype
) -> torch.Tensor:
    """One ``randn(shape)`` per sample from its own CPU generator (seeded by the row seed), so a sample depends
    neither on its batch neighbours nor on the accelerator."""
    return torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device, dtype)


def _guided_step(config: SamplerConfig, t: int) -> bool:
    """Whether timestep ``t`` conditions every sample on its identity, with CFG (single mode, stage 2)."""
    if config.mode == "single":
        return True
    if config.mode == "fixed":
        return t <= config.t0
    return t < config.step_th


def _prediction_pair(
    model: UIFaceModel,
    x: torch.Tensor,
    t: int,
    source: torch.Tensor,
    target: torch.Tensor,
    control: AttentionControl | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Source and target predictions from one batched UNet call on ``[x; x]``."""
    return model.predict(torch.cat([x, x]), t, torch.cat([source, target]), control).chunk(2)


def _guided_prediction(
    model: UIFaceModel,
    x: torch.Tensor,
    t: int,
    identity: torch.Tensor,
    empty: torch.Tensor,
    config: SamplerConfig,
) -> torch.Tensor:
    if config.injection:
        control = AttentionControl(paired=True, self_injection=True, cross_strength=config.cross_strength)
    elif config.guidance == 0:
        return model.predict(x, t, identity)
    else:
        control = None
    uncond, cond = _prediction_pair(model, x, t, empty, identity, control)
    return (1 + config.guidance) * cond - config.guidance * uncond


def _stage_one_prediction(
    model: UIFaceModel, x: torch.Tensor, t: int, contexts: torch.Tensor, empty: torch.Tensor, injection: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference pass B (with self-attention injection from pass A when enabled) and its attention map."""
    control = AttentionControl(
        paired=injection, self_injection=injection, capture_size=model.config.latent_size
    )
    if injection:
        pred = _prediction_pair(model, x, t, empty, contexts, control)[1]
    else:
        pred = model.predict(x, t, contexts, control)
    return pred, combine_attention_maps(control.maps)


@torch.no_grad()
def sample_latents(
    model: UIFaceModel, config: SamplerConfig, id_embeddings: torch.Tensor, seeds: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Denoise one latent per (identity embedding, seed) row; returns ``(latents, t0)``."""
    if len(seeds) != len(id_embeddings):
        raise ValueError(
            f"seeds: expected one per id_embeddings row ({len(id_embeddings)}), got {len(seeds)}"
        )
    param = next(model.unet.parameters())
    device, dtype, batch = param.device, param.dtype, len(seeds)
    scheduler = build_scheduler(model, config)
    scheduler.set_timesteps(config.steps)
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    x = per_sample_noise(generators, model.latent_shape, device, dtype) * scheduler.init_noise_sigma

    identity = model.context.contexts(id_embeddings.to(device)).to(dtype)
    empty = model.context.empty_contexts(batch).to(dtype)
    switched = torch.zeros(batch, dtype=torch.bool, device=device)
    t0 = torch.full((batch,), -1, dtype=torch.long, device=device)
    previous_map = None
    for t in scheduler.timesteps.tolist():
        x_in = scheduler.scale_model_input(x, t)
        if _guided_step(config, t):
            pred = _guided_prediction(model, x_in, t, identity, empty, config)
            conditioned = torch.ones_like(switched)
        elif config.mode == "fixed":
            pred = model.predict(x_in, t, empty)
            conditioned = switched
        else:
            contexts = torch.where(switched[:, None], identity, empty)
            pred, attention_map = _stage_one_prediction(model, x_in, t, contexts, empty, config.injection)
            conditioned = switched
            switched = adaptive_switch(previous_map, attention_map, switched, config.threshold)
            previous_map = attention_map
        if config.mode != "single":
            t0 = torch.where(conditioned & (t0 < 0), t, t0)
        step_kwargs = {"eta": config.eta} if config.scheduler == "ddim" else {}
        if config.eta > 0:  # DDIM noise continues each sample's own stream (a host-to-device copy per step)
            step_kwargs["variance_noise"] = per_sample_noise(generators, model.latent_shape, device, dtype)
        x = scheduler.step(pred, t, x, **step_kwargs).prev_sample
    return x, t0


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1], NCHW -> uint8 NHWC."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)


@torch.no_grad()
def sample(
    model: UIFaceModel, config: SamplerConfig, id_embeddings: torch.Tensor, seeds: Sequence[int]
) -> UIFaceSamples:
    """Sample and decode: uint8 RGB images ``(B, image_size, image_size, 3)`` plus per-sample ``t0``."""
    latents, t0 = sample_latents(model, config, id_embeddings, seeds)
    return UIFaceSamples(images=to_uint8(model.decode(latents).float()), t0=t0)
