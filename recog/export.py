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
import json
from collections.abc import Sequence

import torch
from torch import nn

from facesynth import storage

FLIP_FUSIONS = ("sum", "norm_weighted")
CHANNEL_ORDERS = ("RGB", "BGR")


def _input_hw(input_size: int | Sequence[int]) -> tuple[int, int]:
    hw = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    if len(hw) != 2 or min(hw) < 1:
        raise ValueError(f"input_size={input_size!r}: expected a positive int or (height, width)")
    return int(hw[0]), int(hw[1])


def _triple(name: str, values: Sequence[float], positive: bool) -> list[float]:
    out = [float(v) for v in values]
    if len(out) != 3 or (positive and min(out) <= 0):
        raise ValueError(f"{name}={values!r}: expected 3 per-channel {'positive ' if positive else ''}values")
    return out


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
) -> None:
    """Write ``model.pt`` + ``model.json`` for ``backbone`` (left unchanged) under ``out_uri``."""
    height, width = _input_hw(input_size)
    spec = {
        "format": "torchscript",
        "file": "model.pt",
        "input_size": [height, width],
        "mean": _triple("mean", mean, positive=False),
        "std": _triple("std", std, positive=True),
        "channel_order": channel_order,
        "embedding_dim": embedding_dim,
        "flip_fusion": flip_fusion,
    }
    if flip_fusion not in FLIP_FUSIONS:
        raise ValueError(f"flip_fusion={flip_fusion!r}: expected one of {FLIP_FUSIONS}")
    if channel_order not in CHANNEL_ORDERS:
        raise ValueError(f"channel_order={channel_order!r}: expected one of {CHANNEL_ORDERS}")
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
    storage.write_bytes(storage.join(out_uri, "model.pt"), buffer.getvalue())
    storage.write_bytes(storage.join(out_uri, "model.json"), json.dumps(spec, indent=2).encode())
