"""Load the exported face-embedding model contract and embed images with it.

A model folder (local path or any storage URI) holds ``model.json`` and the file it names:
TorchScript (``torch.jit.load``) or ONNX (needs ``onnxruntime``). Both are read through
``facesynth.storage`` into memory, so S3 and local folders load the same way.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
from pydantic import Field, field_validator

from facesynth import storage
from facesynth.config import StrictModel
from recog.verification import EmbeddedImages, embed_pairs


class ModelSpec(StrictModel):
    """``model.json``: how to feed the exported model and fuse flipped embeddings."""

    format: Literal["torchscript", "onnx"]
    file: str = Field(min_length=1)
    input_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    channel_order: Literal["RGB", "BGR"]
    embedding_dim: int = Field(ge=1)
    flip_fusion: Literal["sum", "norm_weighted"] = "sum"

    @field_validator("file")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if "/" in value or "\\" in value or value in (".", ".."):
            raise ValueError(f"file={value!r}: expected a file name inside the model folder")
        return value

    @field_validator("input_size")
    @classmethod
    def _positive_size(cls, value: tuple[int, int]) -> tuple[int, int]:
        if min(value) < 1:
            raise ValueError(f"input_size={list(value)}: expected positive [height, width]")
        return value

    @field_validator("std")
    @classmethod
    def _positive_std(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        if min(value) <= 0:
            raise ValueError(f"std={list(value)}: expected 3 positive values")
        return value


class FaceEmbedder:
    """An exported model plus its ``model.json``: ``embed`` maps RGB uint8 NHWC images to unit rows."""

    def __init__(self, spec: ModelSpec, forward: Callable[[torch.Tensor], np.ndarray], device: str = "cpu"):
        self.spec = spec
        self.forward = forward
        self.device = device

    def embed_set(self, images: np.ndarray, batch_size: int = 256, flip: bool = True) -> EmbeddedImages:
        """Flip-fused, L2-normalised embeddings and XNorm (see ``recog.verification.embed_pairs``)."""
        height, width = self.spec.input_size
        if getattr(images, "ndim", 0) == 4 and tuple(images.shape[1:3]) != (height, width):
            raise ValueError(
                f"images: got {images.shape[1]}x{images.shape[2]} pixels, the model expects "
                f"{height}x{width} (model.json input_size); align and resize faces first"
            )
        return embed_pairs(
            self._checked_forward,
            images,
            batch_size,
            flip,
            mean=self.spec.mean,
            std=self.spec.std,
            channel_order=self.spec.channel_order,
            flip_fusion=self.spec.flip_fusion,
        )

    def embed(self, images: np.ndarray, batch_size: int = 256, flip: bool = True) -> np.ndarray:
        """(N, embedding_dim) flip-fused, L2-normalised embeddings of RGB uint8 (N, H, W, 3) images."""
        return self.embed_set(images, batch_size, flip).embeddings

    def _checked_forward(self, x: torch.Tensor) -> np.ndarray:
        out = self.forward(x)
        if out.shape != (len(x), self.spec.embedding_dim):
            raise ValueError(
                f"model output {tuple(out.shape)} for a batch of {len(x)}: model.json says "
                f"embedding_dim={self.spec.embedding_dim}"
            )
        return out


def read_spec(model_uri: str) -> ModelSpec:
    """Parse and validate ``model.json`` under ``model_uri``."""
    uri = storage.join(model_uri, "model.json")
    try:
        return ModelSpec.model_validate(json.loads(storage.read_bytes(uri)))
    except (json.JSONDecodeError, ValueError) as exc:
        raise ValueError(f"{uri}: invalid model.json: {exc}") from exc


def _torchscript_forward(data: bytes, device: str) -> Callable[[torch.Tensor], np.ndarray]:
    model = torch.jit.load(io.BytesIO(data), map_location=device).eval()

    def forward(x: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return model(x.to(device)).float().cpu().numpy()

    return forward


def _onnx_forward(data: bytes, device: str) -> Callable[[torch.Tensor], np.ndarray]:
    try:
        import onnxruntime
    except ImportError as exc:
        raise ImportError(
            "model.json format 'onnx' needs the onnxruntime package, which is not installed"
        ) from exc
    providers = ["CUDAExecutionProvider"] if device.startswith("cuda") else []
    session = onnxruntime.InferenceSession(data, providers=[*providers, "CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name

    def forward(x: torch.Tensor) -> np.ndarray:
        return np.asarray(session.run(None, {input_name: x.numpy()})[0], dtype=np.float32)

    return forward


def load_face_model(model_uri: str, device: str = "cpu") -> FaceEmbedder:
    """Load the exported model folder at ``model_uri`` (path, ``file://`` or ``s3://``) onto ``device``."""
    spec = read_spec(model_uri)
    data = storage.read_bytes(storage.join(model_uri, spec.file))
    loader = _torchscript_forward if spec.format == "torchscript" else _onnx_forward
    return FaceEmbedder(spec, loader(data, device), device)
