"""The base text-to-image pipeline: a diffusers Stable Diffusion checkpoint, or a tiny random-weight one.

``PipelineSource.path`` is a local folder (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``,
``tokenizer/``, ``scheduler/``) or a hub id; it loads with ``StableDiffusionPipeline.from_pretrained(...,
local_files_only=True)`` unless ``allow_hub`` is set (nothing downloads by default). ``PipelineSource.tiny``
builds random weights of diffusers' own SD 2 test shapes (UNet 32/64 channels with cross-attention 32, a
2-level KL VAE, a 5-layer CLIP text encoder of width 32, the offline CLIP tokenizer), seeded, saves them
with ``save_pretrained`` to a folder and loads that folder through the same ``from_pretrained``: tests and
``make demo``-size runs take the real loading path.

Schedulers by name (``SCHEDULERS``) are built with ``from_config`` of the checkpoint's own scheduler config,
so its betas, timestep spacing and ``prediction_type`` (SD 2.1-base: epsilon; SD 2.1 768: v_prediction) hold.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from typing import Literal

from pydantic import Field, model_validator

from facesynth.config import ConfigError, StrictModel

SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
    "ddpm": "DDPMScheduler",
}
SchedulerName = Literal["default", "ddim", "pndm", "euler", "euler_a", "dpm++", "unipc", "ddpm"]


class TinyPipeline(StrictModel):
    """Random-weight SD parts; the defaults are diffusers' SD 2 test shapes (seconds per image on a CPU),
    :data:`SD21_BASE` the SD 2.1-base architecture (benchmarks without weights)."""

    unet_channels: list[int] = Field([32, 64], min_length=1, description="UNet block_out_channels")
    attention_heads: list[int] = Field([2, 4], min_length=1, description="UNet heads per level")
    cross_attention_levels: list[bool] | None = Field(
        None, description="cross-attention per UNet level (default: all but the first)"
    )
    layers_per_block: int = Field(2, ge=1)
    cross_attention_dim: int = Field(32, ge=1, description="= the text encoder's width")
    vae_channels: list[int] = Field([32, 64], min_length=1, description="VAE levels (downsampling 2^(n-1))")
    vae_layers_per_block: int = Field(1, ge=1)
    text_layers: int = Field(5, ge=1)
    text_heads: int = Field(4, ge=1)
    text_intermediate: int = Field(37, ge=1)
    image_size: int = Field(32, ge=8, description="the UNet's sample size is image_size / VAE downsampling")
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    seed: int = Field(0, ge=0, description="seed of the random weights")

    @model_validator(mode="after")
    def _check(self) -> TinyPipeline:
        if len(self.attention_heads) != len(self.unet_channels):
            raise ValueError("attention_heads: expected one per unet_channels level")
        if self.cross_attention_levels is not None and len(self.cross_attention_levels) != len(
            self.unet_channels
        ):
            raise ValueError("cross_attention_levels: expected one per unet_channels level")
        if self.cross_attention_dim % self.text_heads:
            raise ValueError(f"text_heads: {self.text_heads} does not divide cross_attention_dim")
        return self

    def attention_levels(self) -> list[bool]:
        if self.cross_attention_levels is not None:
            return self.cross_attention_levels
        return [False] + [True] * (len(self.unet_channels) - 1)


# stabilityai/stable-diffusion-2-1-base: UNet 320/640/1280/1280 (heads of 64 channels, linear projections,
# cross-attention 1024 in the first three levels), the SD VAE (128..512, 2 layers per block), OpenCLIP ViT-H
# as a CLIPTextModel (width 1024, 23 layers, 16 heads, MLP 4096), 512 px.
SD21_BASE = {
    "unet_channels": [320, 640, 1280, 1280],
    "attention_heads": [5, 10, 20, 20],
    "cross_attention_levels": [True, True, True, False],
    "cross_attention_dim": 1024,
    "vae_channels": [128, 256, 512, 512],
    "vae_layers_per_block": 2,
    "text_layers": 23,
    "text_heads": 16,
    "text_intermediate": 4096,
    "image_size": 512,
}


class PipelineSource(StrictModel):
    """Which base pipeline: a checkpoint (``path``: local folder or hub id) or random ``tiny`` weights."""

    path: str | None = Field(None, description="local diffusers folder, or a hub id with allow_hub")
    allow_hub: bool = Field(False, description="let from_pretrained download a hub id (default: local only)")
    variant: str | None = Field(None, description="weights variant of the checkpoint, e.g. fp16")
    tiny: TinyPipeline | None = Field(
        None, description="random weights of this shape instead of a checkpoint"
    )

    @model_validator(mode="after")
    def _one_source(self) -> PipelineSource:
        if (self.path is None) == (self.tiny is None):
            raise ValueError("expected exactly one of path (a checkpoint) or tiny (random weights)")
        return self

    def describe(self) -> str:
        return self.path if self.path is not None else f"tiny(seed={self.tiny.seed})"

    def check(self, key: str) -> None:
        """ConfigError naming ``key`` if the checkpoint cannot load without downloading (when not allowed)."""
        if self.path is None:
            return
        if os.path.isdir(self.path):
            if not os.path.exists(os.path.join(self.path, "model_index.json")):
                raise ConfigError(
                    f"{key}.path: {self.path} has no model_index.json; expected a diffusers pipeline folder"
                )
            return
        if not self.allow_hub:
            raise ConfigError(
                f"{key}.path: {self.path!r} is not a local folder (no such directory); give the folder of a "
                f"diffusers checkpoint, or set {key}.allow_hub=true to load it as a hub id"
            )

    @contextlib.contextmanager
    def location(self) -> Iterator[str]:
        """The folder or hub id to load: ``path``, or a temporary folder holding the saved tiny pipeline."""
        if self.tiny is None:
            yield self.path
            return
        with tempfile.TemporaryDirectory(prefix="tiny-sd-") as folder:
            save_tiny_pipeline(self.tiny, folder)
            yield folder

    def load(self, dtype: str = "float32"):
        """The ``StableDiffusionPipeline`` (on CPU, progress bars off)."""
        with self.location() as where:
            return load_pipeline(where, dtype=dtype, allow_hub=self.allow_hub, variant=self.variant)


def load_pipeline(where: str, *, dtype: str = "float32", allow_hub: bool = False, variant: str | None = None):
    """``StableDiffusionPipeline.from_pretrained(where)`` offline unless ``allow_hub``; progress bars off."""
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        where, dtype=getattr(torch, dtype), local_files_only=not allow_hub, variant=variant
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_tiny_pipeline(cfg: TinyPipeline):
    """A ``StableDiffusionPipeline`` with random weights of ``cfg`` (global RNG untouched)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from synthgen.sd_lora.tokenizer import clip_tokenizer

    attention = cfg.attention_levels()
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention))
    vae_levels = len(cfg.vae_channels)
    tokenizer = clip_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        unet = UNet2DConditionModel(
            block_out_channels=tuple(cfg.unet_channels),
            layers_per_block=cfg.layers_per_block,
            sample_size=cfg.image_size // 2 ** (vae_levels - 1),
            in_channels=4,
            out_channels=4,
            down_block_types=down,
            up_block_types=up,
            cross_attention_dim=cfg.cross_attention_dim,
            attention_head_dim=tuple(cfg.attention_heads),
            use_linear_projection=True,
            norm_num_groups=min(32, min(cfg.unet_channels)),
        )
        vae = AutoencoderKL(
            block_out_channels=tuple(cfg.vae_channels),
            layers_per_block=cfg.vae_layers_per_block,
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * vae_levels,
            up_block_types=("UpDecoderBlock2D",) * vae_levels,
            latent_channels=4,
            norm_num_groups=min(32, min(cfg.vae_channels)),
            sample_size=cfg.image_size,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                hidden_size=cfg.cross_attention_dim,
                intermediate_size=cfg.text_intermediate,
                num_attention_heads=cfg.text_heads,
                num_hidden_layers=cfg.text_layers,
                vocab_size=len(tokenizer),
                max_position_embeddings=tokenizer.model_max_length,
                hidden_act="gelu",
                layer_norm_eps=1e-5,
            )
        )
    scheduler = DDIMScheduler(  # SD's schedule: scaled-linear betas 0.00085..0.012, "leading" spacing
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=cfg.prediction_type,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_tiny_pipeline(cfg: TinyPipeline, folder: str) -> str:
    """Save the tiny pipeline of ``cfg`` as a diffusers folder (loadable by ``from_pretrained``)."""
    build_tiny_pipeline(cfg).save_pretrained(folder)
    return folder


def set_scheduler(pipe, name: SchedulerName) -> None:
    """Replace ``pipe.scheduler`` by the named one, built from the checkpoint's scheduler config."""
    if name == "default":
        return
    import diffusers

    cls = getattr(diffusers, SCHEDULERS[name])
    pipe.scheduler = cls.from_config(pipe.scheduler.config)
