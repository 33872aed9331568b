"""LoRA adapters on a Stable Diffusion pipeline (peft) and their diffusers-format weights file.

A LoRA layer adds ``(alpha / r) * B A x`` to a frozen linear map ``W x`` (A: r x in, B: out x r); diffusers'
LoRA example puts them on the UNet attention projections ``to_q``, ``to_k``, ``to_v``, ``to_out.0`` with
``init_lora_weights="gaussian"`` (A ~ N(0, 1/r), B = 0, so training starts at the base model) and trains only
them. The optional text-encoder LoRA targets CLIP's ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``.

The weights are written by ``StableDiffusionPipeline.save_lora_weights`` from
``convert_state_dict_to_diffusers(get_peft_model_state_dict(...))``: ``pytorch_lora_weights.safetensors`` with
``unet.*.lora.down/up.weight`` keys, which ``pipe.load_lora_weights(folder)`` of a plain diffusers pipeline
reads. ``lora.json`` beside it (written last) records the base and the adapter settings.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from pydantic import Field

from facesynth import storage
from facesynth.config import StrictModel

WEIGHTS_FILE = "pytorch_lora_weights.safetensors"
LORA_JSON = "lora.json"
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


class LoraSettings(StrictModel):
    """The adapters: rank, scale (alpha / rank), target modules, optional text-encoder LoRA."""

    rank: int = Field(4, gt=0, description="LoRA rank r (> 0)")
    alpha: float = Field(4.0, gt=0, description="LoRA alpha; the update is scaled by alpha / rank")
    dropout: float = Field(0.0, ge=0, lt=1)
    targets: list[str] = Field(
        ["to_q", "to_k", "to_v", "to_out.0"], min_length=1, description="UNet modules that get adapters"
    )
    text_encoder: bool = Field(False, description="also train LoRA on the text encoder's attention")


def add_adapters(pipe, settings: LoraSettings) -> None:
    """Freeze the pipeline and add LoRA adapters (the only trainable parameters) to its UNet (+ text encoder).

    Adapter weights come from the global torch RNG: seed it first for the same adapters on every rank.
    """
    from peft import LoraConfig

    for part in (pipe.unet, pipe.vae, pipe.text_encoder):
        part.requires_grad_(False)
    common = {"r": settings.rank, "lora_alpha": settings.alpha, "lora_dropout": settings.dropout}
    pipe.unet.add_adapter(LoraConfig(init_lora_weights="gaussian", target_modules=settings.targets, **common))
    if settings.text_encoder:
        pipe.text_encoder.add_adapter(
            LoraConfig(init_lora_weights="gaussian", target_modules=TEXT_ENCODER_TARGETS, **common)
        )


def lora_parameters(pipe) -> dict:
    """``{"unet.<name>" | "text_encoder.<name>": parameter}`` of every trainable parameter, in a fixed order."""
    return {
        f"{part}.{name}": p
        for part in ("unet", "text_encoder")
        for name, p in getattr(pipe, part).named_parameters()
        if p.requires_grad
    }


def save_lora(pipe, uri: str, meta: dict) -> str:
    """Write the adapters of ``pipe`` in the diffusers format to the folder ``uri``, then ``lora.json``."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    layers = {"unet_lora_layers": convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))}
    if getattr(pipe.text_encoder, "peft_config", None):
        layers["text_encoder_lora_layers"] = convert_state_dict_to_diffusers(
            get_peft_model_state_dict(pipe.text_encoder)
        )
    with tempfile.TemporaryDirectory() as tmp:
        StableDiffusionPipeline.save_lora_weights(tmp, **layers)
        storage.write_bytes(storage.join(uri, WEIGHTS_FILE), Path(tmp, WEIGHTS_FILE).read_bytes())
    storage.write_bytes(storage.join(uri, LORA_JSON), json.dumps(meta, indent=1).encode())
    return uri


def check_lora_folder(uri: str, key: str) -> None:
    """ValueError naming ``key`` unless ``uri`` holds a LoRA written by :func:`save_lora` (or a plain
    ``pytorch_lora_weights.safetensors``)."""
    if not storage.exists(storage.join(uri, WEIGHTS_FILE)):
        raise ValueError(
            f"{key}: {uri} has no {WEIGHTS_FILE}; expected the lora/ folder of a finetune_lora run"
        )


def load_lora(pipe, uri: str) -> None:
    """``pipe.load_lora_weights`` of the LoRA folder at ``uri`` (any storage URI; copied to a temp folder)."""
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, WEIGHTS_FILE).write_bytes(storage.read_bytes(storage.join(uri, WEIGHTS_FILE)))
        pipe.load_lora_weights(tmp, weight_name=WEIGHTS_FILE)
