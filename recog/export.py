"""Export a trained face-embedding backbone to the model contract shared by synthgen and recog.

The folder at ``out_uri`` gets ``model.pt`` (TorchScript traced in eval mode on CPU; it maps
float NCHW input normalised as ``((x / 255) - mean) / std`` to embeddings) and ``model.json``
describing the input size, normalisation, channel order, embedding size and flip fusion:
``sum`` (insightface verification: embeddings of an image and its mirror are added) or
``norm_weighted`` (AdaFace: the pair is averaged with weights proportional to each norm).
``model.json`` is written last, so its presence marks a complete export.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Sequence

import torch
from torch import nn

from facesynth import storage
from facesynth.face_model import ModelSpec


def export_embedder(
    backbone: nn.Module,
    out_uri: str,
    *,
    input_size: int | Sequence[int],
    embedding_dim: int,
    flip_fusion: str = "sum",
    mean: Sequence[float],
    std: Sequence[float],
    channel_order: str = "RGB",
) -> ModelSpec:
    """Write ``model.pt`` + ``model.json`` for ``backbone`` (left unchanged) under ``out_uri``.

    ``input_size`` is one side of a square or ``(height, width)``; ``flip_fusion`` and
    ``channel_order`` take the values of ``facesynth.face_model.FLIP_FUSIONS`` / ``CHANNEL_ORDERS``.
    Returns the written spec.
    """
    spec = ModelSpec.build(
        format="torchscript",
        file="model.pt",
        input_size=(input_size, input_size) if isinstance(input_size, int) else input_size,
        mean=mean,
        std=std,
        channel_order=channel_order,
        embedding_dim=embedding_dim,
        flip_fusion=flip_fusion,
    )
    height, width = spec.input_size
    model = copy.deepcopy(backbone).to(device="cpu", dtype=torch.float32).eval()
    example = torch.randn(2, 3, height, width)
    with torch.no_grad():
        out = model(example)
        if out.shape != (2, embedding_dim):
            raise ValueError(
                f"embedding_dim={embedding_dim}: the backbone maps {tuple(example.shape)} "
                f"to {tuple(out.shape)}, expected (2, {embedding_dim})"
            )
        traced = torch.jit.trace(model, example)
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    storage.write_bytes(storage.join(out_uri, spec.file), buffer.getvalue())
    storage.write_bytes(storage.join(out_uri, "model.json"), spec.model_dump_json(indent=2).encode())
    return spec
