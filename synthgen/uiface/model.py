"""UIFace identity-conditioned (latent) diffusion model on diffusers building blocks.

``UNet2DConditionModel`` cross-attends to K identity tokens (:mod:`synthgen.uiface.context`); an optional
``VQModel`` / ``AutoencoderKL`` maps 128^2 faces to a 3x32x32 latent (``space="pixel"`` trains on images
directly, for tiny CPU configs). The noise schedule is a diffusers ``DDPMScheduler`` (T=1000, linear beta
1e-4..0.02) whose ``prediction_type`` says what the UNet predicts (epsilon in the reference; the tiny CPU
preset predicts v); the samplers derive their schedulers from its config.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel, VQModel
from pydantic import Field, model_validator
from torch import nn

from facesynth.config import StrictModel
from synthgen.uiface.attention import AttentionControl, UIFaceAttnProcessor
from synthgen.uiface.context import IdentityContext, context_dropout, unconditional_mask
from synthgen.uiface.rng import draw


class UIFaceModelConfig(StrictModel):
    """Architecture and training-rule settings of a UIFace model."""

    image_size: int = Field(128, ge=8, le=1024, description="square face crop size in pixels")
    space: Literal["pixel", "vq", "kl"] = Field(
        "vq", description="diffusion space: pixels or an autoencoder's latent"
    )
    autoencoder_path: str | None = Field(
        None, description="local folder or hub id of pretrained autoencoder weights"
    )
    autoencoder_channels: list[int] = Field(
        [128, 256, 512], min_length=1, description="per-level AE channels"
    )
    autoencoder_layers_per_block: int = Field(2, ge=1, le=4)
    latent_channels: int = Field(3, ge=1, le=64)
    num_vq_embeddings: int = Field(8192, ge=2)
    latent_scale: float = Field(
        1.0, gt=0, description="latents = scale * encoder output (1.0 for the LDM VQ-f4)"
    )
    block_channels: list[int] = Field(
        [96, 192, 384, 768],
        min_length=1,
        description="UNet channels per level (the reference's base 96 with *cumulative* multipliers [1,2,2,2])",
    )
    attention_levels: list[bool] = Field([False, True, True, True], min_length=1)
    layers_per_block: int = Field(2, ge=1, le=8)
    head_dim: int = Field(32, ge=1)
    norm_groups: int = Field(32, ge=1)
    embedding_dim: int = Field(512, ge=1, description="dim of the FR identity embedding")
    conditioning: Literal["embedding", "class"] = Field(
        "embedding",
        description="embedding: FR identity embeddings (UIFace); class: a learned embedding per class id "
        "(the class-conditional baseline; class = the dataset's identity value, < num_classes)",
    )
    num_classes: int = Field(
        0, ge=0, description="classes of the class-conditional baseline (conditioning=class)"
    )
    context_dim: int = Field(256, ge=1)
    context_tokens: int = Field(32, ge=1, description="K cross-attention tokens made from one context")
    context_dropout: float = Field(0.25, ge=0, lt=1, description="element-wise dropout on the context (CPD)")
    uncond_prob: float = Field(
        0.2, ge=0, le=1, description="training p of replacing a context by the empty one"
    )
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = Field(
        "epsilon",
        description="what the UNet predicts: noise (the reference), velocity v, or the clean sample x0",
    )
    train_timesteps: int = Field(1000, ge=2)
    beta_start: float = Field(1e-4, gt=0, lt=1)
    beta_end: float = Field(0.02, gt=0, lt=1)

    @model_validator(mode="after")
    def _check_shapes(self) -> UIFaceModelConfig:
        if len(self.attention_levels) != len(self.block_channels):
            raise ValueError(
                f"attention_levels: expected one flag per block_channels level ({len(self.block_channels)}), "
                f"got {len(self.attention_levels)}"
            )
        for key, channels in (("block_channels", self.block_channels), ("context_dim", [self.context_dim])):
            bad = [c for c in channels if c % self.norm_groups]
            if bad:
                raise ValueError(f"{key}: {bad} not divisible by norm_groups={self.norm_groups}")
        attended = [c for c, a in zip(self.block_channels, self.attention_levels, strict=True) if a]
        bad = [c for c in [*attended, self.block_channels[-1]] if c % self.head_dim]
        if bad:
            raise ValueError(f"block_channels: {bad} not divisible by head_dim={self.head_dim}")
        down = 2 ** (len(self.block_channels) - 1)
        if self.latent_size % down:
            raise ValueError(
                f"image_size: latent size {self.latent_size} must be divisible by {down} for "
                f"{len(self.block_channels)} UNet levels"
            )
        if self.space != "pixel" and self.image_size % 2 ** (len(self.autoencoder_channels) - 1):
            raise ValueError(f"image_size: {self.image_size} not divisible by the autoencoder downsampling")
        if self.space == "pixel" and self.latent_channels != 3:
            raise ValueError(f"latent_channels: pixel space has 3 channels, got {self.latent_channels}")
        if (self.conditioning == "class") != (self.num_classes > 0):
            raise ValueError(
                f"num_classes: {self.num_classes} with conditioning={self.conditioning!r}; expected >= 1 for "
                "class conditioning and 0 for embedding conditioning"
            )
        if self.beta_end <= self.beta_start:
            raise ValueError(f"beta_end: {self.beta_end} must exceed beta_start={self.beta_start}")
        return self

    @property
    def latent_size(self) -> int:
        """Spatial size of the diffusion input."""
        if self.space == "pixel":
            return self.image_size
        return self.image_size // 2 ** (len(self.autoencoder_channels) - 1)


PRESETS: dict[str, dict] = {
    # TFace generation/uiface: 128^2 CASIA, VQ-f4 latent 3x32x32, labml UNet 96 x [1,2,2,2] (cumulative).
    "uiface-casia": {},
    # CPU-sized: pixel space 32^2, two levels, ~1M parameters. v-prediction: after 600 CPU steps an
    # epsilon model's DDIM samples are still noise while a v model's are faces (BENCHMARKS.md, UIFace).
    "tiny": {
        "prediction_type": "v_prediction",
        "image_size": 32,
        "space": "pixel",
        "block_channels": [32, 64],
        "attention_levels": [False, True],
        "layers_per_block": 1,
        "head_dim": 16,
        "norm_groups": 8,
        "context_dim": 32,
        "context_tokens": 4,
    },
}


def preset(name: str, **overrides) -> UIFaceModelConfig:
    """A named :class:`UIFaceModelConfig` (``uiface-casia`` or ``tiny``) with field overrides."""
    if name not in PRESETS:
        raise ValueError(f"UIFace preset {name!r} unknown; expected one of {sorted(PRESETS)}")
    return UIFaceModelConfig(**{**PRESETS[name], **overrides})


def build_unet(config: UIFaceModelConfig) -> UNet2DConditionModel:
    """The denoiser: cross-attention at ``attention_levels`` and in the middle block, head dim ``head_dim``.

    ``resnet_time_scale_shift="scale_shift"`` is the reference's adaptive group norm. diffusers'
    ``attention_head_dim`` argument of this class is the *number of heads* per level (diffusers issue 2011).
    """
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in config.attention_levels)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(config.attention_levels))
    return UNet2DConditionModel(
        sample_size=config.latent_size,
        in_channels=config.latent_channels,
        out_channels=config.latent_channels,
        down_block_types=down,
        up_block_types=up,
        mid_block_type="UNetMidBlock2DCrossAttn",
        block_out_channels=tuple(config.block_channels),
        layers_per_block=config.layers_per_block,
        attention_head_dim=tuple(c // config.head_dim for c in config.block_channels),
        cross_attention_dim=config.context_dim,
        norm_num_groups=config.norm_groups,
        resnet_time_scale_shift="scale_shift",
    )


def build_autoencoder(config: UIFaceModelConfig) -> VQModel | AutoencoderKL | None:
    """The first stage: pretrained from ``autoencoder_path`` or random weights of the configured shape."""
    if config.space == "pixel":
        return None
    cls = VQModel if config.space == "vq" else AutoencoderKL
    if config.autoencoder_path is not None:
        ae = cls.from_pretrained(config.autoencoder_path)
        levels = len(ae.config.block_out_channels)
        if ae.config.latent_channels != config.latent_channels or levels != len(config.autoencoder_channels):
            raise ValueError(
                f"autoencoder_path: {config.autoencoder_path} has {ae.config.latent_channels} latent channels and "
                f"{levels} levels; config expects {config.latent_channels} and {len(config.autoencoder_channels)}"
            )
        return ae
    levels = len(config.autoencoder_channels)
    kwargs = {
        "down_block_types": ("DownEncoderBlock2D",) * levels,
        "up_block_types": ("UpDecoderBlock2D",) * levels,
        "block_out_channels": tuple(config.autoencoder_channels),
        "layers_per_block": config.autoencoder_layers_per_block,
        "latent_channels": config.latent_channels,
        "norm_num_groups": min(32, min(config.autoencoder_channels)),
        "sample_size": config.image_size,
    }
    if config.space == "vq":
        kwargs |= {"num_vq_embeddings": config.num_vq_embeddings, "vq_embed_dim": config.latent_channels}
    return cls(**kwargs)


def noise_schedule(config: UIFaceModelConfig) -> DDPMScheduler:
    """The training DDPM schedule (linear betas, the model's prediction type, no clipping)."""
    return DDPMScheduler(
        num_train_timesteps=config.train_timesteps,
        beta_start=config.beta_start,
        beta_end=config.beta_end,
        beta_schedule="linear",
        prediction_type=config.prediction_type,
        clip_sample=False,
    )


class UIFaceModel(nn.Module):
    """UNet + identity context + optional autoencoder + DDPM schedule."""

    def __init__(
        self,
        config: UIFaceModelConfig,
        unet: UNet2DConditionModel,
        context: IdentityContext,
        autoencoder: VQModel | AutoencoderKL | None,
    ) -> None:
        super().__init__()
        self.config = config
        self.unet = unet
        self.context = context
        self.autoencoder = autoencoder
        self.noise_schedule = noise_schedule(config)
        unet.set_attn_processor(UIFaceAttnProcessor())

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of the diffusion input."""
        return (self.config.latent_channels, self.config.latent_size, self.config.latent_size)

    def predict(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor | int,
        contexts: torch.Tensor,
        control: AttentionControl | None = None,
    ) -> torch.Tensor:
        """The UNet's prediction (epsilon, v or x0, per ``config.prediction_type``) for ``(B, context_dim)``
        contexts; ``control`` drives the attention processors."""
        return self.unet(
            latents,
            timesteps,
            encoder_hidden_states=self.context.tokens(contexts),
            cross_attention_kwargs=None if control is None else {"control": control},
        ).sample

    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [-1, 1], NCHW -> diffusion inputs (identity in pixel space)."""
        if self.autoencoder is None:
            return images
        if isinstance(self.autoencoder, VQModel):
            z = self.autoencoder.encode(images).latents
        else:
            z = self.autoencoder.encode(images).latent_dist.sample(generator)
        return z * self.config.latent_scale

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Diffusion outputs -> images in [-1, 1], NCHW (VQ latents are quantised, as in LDM)."""
        if self.autoencoder is None:
            return latents
        return self.autoencoder.decode(latents / self.config.latent_scale).sample

    def training_loss(
        self, images_or_latents: torch.Tensor, id_embeddings: torch.Tensor, generator: torch.Generator | None
    ) -> torch.Tensor:
        """MSE loss on the configured prediction target with CPD context dropout and the empty-context rule.

        ``images_or_latents``: images in [-1, 1] of shape ``(B, 3, image_size, image_size)`` (encoded without
        gradients) or latents of shape ``(B, *latent_shape)``. All randomness (timesteps, noise, dropout, the
        unconditioned mask) comes from ``generator``.
        """
        latents = self._as_latents(images_or_latents, generator)
        batch, device = len(latents), latents.device
        if id_embeddings.shape[0] != batch:
            raise ValueError(
                f"id_embeddings: expected {batch} rows to match the images, got {id_embeddings.shape[0]}"
            )
        steps = self.config.train_timesteps
        t = draw(torch.randint, 0, steps, (batch,), generator=generator, device=device)
        noise = draw(torch.randn, latents.shape, generator=generator, device=device).to(latents.dtype)
        noisy = self.noise_schedule.add_noise(latents, noise, t)
        contexts = context_dropout(
            self.context.contexts(id_embeddings), self.config.context_dropout, generator
        )
        uncond = unconditional_mask(batch, self.config.uncond_prob, generator, device)
        contexts = torch.where(uncond[:, None], self.context.empty_contexts(batch), contexts)
        prediction = self.predict(noisy, t, contexts)
        return F.mse_loss(prediction.float(), self._target(latents, noise, t).float())

    def _target(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        kind = self.config.prediction_type
        if kind == "epsilon":
            return noise
        if kind == "sample":
            return latents
        return self.noise_schedule.get_velocity(latents, noise, t)

    def _as_latents(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        image_shape = (3, self.config.image_size, self.config.image_size)
        if x.ndim == 4 and tuple(x.shape[1:]) == self.latent_shape:
            return x
        if x.ndim == 4 and tuple(x.shape[1:]) == image_shape:
            with torch.no_grad():
                return self.encode(x, generator)
        raise ValueError(
            f"images_or_latents: expected (B, *{image_shape}) images or (B, *{self.latent_shape}) latents, "
            f"got {tuple(x.shape)}"
        )


def build_context(config: UIFaceModelConfig) -> IdentityContext:
    """The identity context of ``config``: an embedding projection, or a class embedding table."""
    return IdentityContext(
        config.embedding_dim,
        config.context_dim,
        config.context_tokens,
        config.norm_groups,
        config.num_classes,
    )


def build_uiface(config: UIFaceModelConfig) -> UIFaceModel:
    """Build a UIFace model with random weights (the autoencoder loads from ``autoencoder_path`` if set)."""
    context = build_context(config)  # first: the RNG order fixes the random weights of a preset + init_seed
    return UIFaceModel(config, build_unet(config), context, build_autoencoder(config))
