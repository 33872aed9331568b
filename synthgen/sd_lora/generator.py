"""SD + LoRA in the generation stage: (identity, sample, seed) rows -> prompt-set images, one pipeline call per batch.

Row ``(identity, sample, seed)`` is person ``identity - offset`` of the prompt set, template
``sample // images_per_template``; its prompt is the template filled with the person's name and attributes.
A batch is one ``StableDiffusionPipeline`` call with a list of prompts and a list of CPU ``torch.Generator``
seeded from the rows' seeds: the pipeline draws each row's initial latents (and any sampler noise) from the
row's own generator, so a row's image does not depend on its batch neighbours and is the same on CPU and GPU
(up to kernel numerics). Images are ``round(255 * x)`` of the pipeline's ``[0, 1]`` output, as its PIL output.

Speed options: ``fuse_lora`` (fold ``W + scale * B A`` into the weights and drop the adapters: no LoRA matmuls
per step; pixels may then differ by a level from an unfused pipeline), ``channels_last``, ``compile``
(``torch.compile`` of the UNet), a half ``dtype`` on GPUs; diffusers' SDPA attention is its default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from facesynth.config import StrictModel
from synthgen.sd_lora.checkpoint import PipelineSource, SchedulerName, set_scheduler
from synthgen.sd_lora.lora import load_lora
from synthgen.sd_lora.prompts import PromptSet
from synthgen.stage import Generated, Generator


class SDSampling(StrictModel):
    """Sampling settings of every row (what decides the images besides the seed and prompt)."""

    steps: int = Field(50, ge=1, description="denoising steps")
    guidance_scale: float = Field(7.5, ge=0, description="classifier-free guidance scale (<= 1: no CFG)")
    scheduler: SchedulerName = Field("ddim", description="sampler; default: the checkpoint's own")
    negative_prompt: str = Field("", description="the unconditional prompt of CFG")
    resolution: int = Field(512, ge=8, multiple_of=8, description="square image size in pixels")
    lora_scale: float = Field(1.0, ge=0, description="LoRA strength")


@dataclass
class SDLoraGenerator(Generator):
    """A loaded pipeline (base + LoRA) over a prompt set; identity ``offset + i`` is person ``i``."""

    pipe: object
    prompts: PromptSet
    sampling: SDSampling
    offset: int
    describe: dict
    unfused_scale: float | None = None

    name = "sd_lora"
    domain = "diffusion"

    def rows(self, identities: np.ndarray, samples: np.ndarray) -> list[tuple]:
        return [self.prompts.row(int(i) - self.offset, int(s)) for i, s in zip(identities, samples)]

    def generate(self, identities: np.ndarray, samples: np.ndarray, seeds: np.ndarray) -> Generated:
        rows = self.rows(identities, samples)
        s = self.sampling
        texts = [text for _, _, text in rows]
        kwargs = (
            {} if self.unfused_scale is None else {"cross_attention_kwargs": {"scale": self.unfused_scale}}
        )
        with torch.inference_mode():
            out = self.pipe(
                prompt=texts,
                negative_prompt=[s.negative_prompt] * len(texts) if s.negative_prompt else None,
                generator=[torch.Generator().manual_seed(int(seed)) for seed in seeds],
                num_inference_steps=s.steps,
                guidance_scale=s.guidance_scale,
                height=s.resolution,
                width=s.resolution,
                output_type="np",
                **kwargs,
            ).images
        params = [
            {
                "template_id": template.id,
                "prompt": text,
                "negative_prompt": s.negative_prompt,
                "guidance_scale": s.guidance_scale,
                "steps": s.steps,
                "scheduler": type(self.pipe.scheduler).__name__,
                "resolution": s.resolution,
                **self.describe,
            }
            for _, template, text in rows
        ]
        return Generated(
            images=(out * 255).round().astype(np.uint8),
            identity_names=[person.name for person, _, _ in rows],
            prompts=texts,
            params=params,
        )


@dataclass(frozen=True)
class SDLoraFactory:
    """Picklable recipe that loads the pipeline (and LoRA) inside each generator actor."""

    base: PipelineSource
    lora: str | None
    prompts: PromptSet
    sampling: SDSampling
    offset: int = 0
    device: str = "auto"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    threads: int | None = None
    fuse_lora: bool = False
    channels_last: bool = False
    compile: bool = False

    def __call__(self) -> SDLoraGenerator:
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        device = ("cuda" if torch.cuda.is_available() else "cpu") if self.device == "auto" else self.device
        pipe = self.base.load(self.dtype)
        set_scheduler(pipe, self.sampling.scheduler)
        unfused = None
        if self.lora is not None:
            load_lora(pipe, self.lora)
            if self.fuse_lora:
                pipe.fuse_lora(lora_scale=self.sampling.lora_scale)
                pipe.unload_lora_weights()
            elif self.sampling.lora_scale != 1.0:
                unfused = self.sampling.lora_scale
        pipe.to(device)
        if self.channels_last:
            pipe.unet.to(memory_format=torch.channels_last)
        if self.compile:
            pipe.unet = torch.compile(pipe.unet)
        describe = {"base": self.base.describe(), "lora": self.lora, "lora_scale": self.sampling.lora_scale}
        return SDLoraGenerator(pipe, self.prompts, self.sampling, self.offset, describe, unfused)
