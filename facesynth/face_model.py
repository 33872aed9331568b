"""The exported face-embedding model contract of DESIGN.md (the model that crosses synthgen/recog).

A model folder (local path or any storage URI) holds ``model.json`` (:class:`ModelSpec`) and the
file it names: TorchScript (``torch.jit.load``) or ONNX (needs ``onnxruntime``). Both are read
through ``facesynth.storage`` into memory, so S3 and local folders load the same way.

Images become embeddings as insightface's verification does: RGB uint8 NHWC batches are turned
into float NCHW ``((x / 255) - mean) / std`` in the model's channel order, the model output of
each image and of its horizontal mirror is fused (``sum``, or AdaFace's ``norm_weighted``) and
L2-normalised.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal, get_args

import numpy as np
import torch
from pydantic import AfterValidator, Field, ValidationError, field_validator

from facesynth import storage
from facesynth.config import StrictModel

FlipFusion = Literal["sum", "norm_weighted"]
ChannelOrder = Literal["RGB", "BGR"]
FLIP_FUSIONS: tuple[str, ...] = get_args(FlipFusion)
CHANNEL_ORDERS: tuple[str, ...] = get_args(ChannelOrder)


def _positive_std(value: tuple[float, float, float]) -> tuple[float, float, float]:
    if min(value) <= 0:
        raise ValueError(f"std={list(value)}: expected 3 positive values")
    return value


Std = Annotated[tuple[float, float, float], AfterValidator(_positive_std)]  # per-channel, all > 0

EmbedFn = Callable[[torch.Tensor], "torch.Tensor | np.ndarray"]


class ModelSpec(StrictModel):
    """``model.json``: how to feed the exported model and fuse flipped embeddings."""

    format: Literal["torchscript", "onnx"]
    file: str = Field(min_length=1)
    input_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: Std
    channel_order: ChannelOrder
    embedding_dim: int = Field(ge=1)
    flip_fusion: FlipFusion = "sum"

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

    @classmethod
    def build(cls, **fields: Any) -> ModelSpec:
        """Validate ``fields``; a bad one raises ValueError starting ``key=value:`` with pydantic's reason."""
        try:
            return cls(**fields)
        except ValidationError as exc:
            error = exc.errors()[0]
            key = str(error["loc"][0])
            where = ".".join(str(part) for part in error["loc"])
            raise ValueError(f"{key}={fields.get(key)!r}: {where}: {error['msg']}") from None


@dataclass(frozen=True)
class EmbeddedImages:
    """Flip-fused, L2-normalised embeddings (row i = image i) and insightface's XNorm."""

    embeddings: np.ndarray
    xnorm: float


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows divided by their L2 norm (zero rows stay zero), computed as sklearn's ``normalize``."""
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))
    norms[norms == 0.0] = 1.0
    return x / norms[:, np.newaxis]


def fuse_flip(emb: np.ndarray, emb_flip: np.ndarray, mode: str = "sum") -> np.ndarray:
    """Fuse embeddings of images and their mirrors into L2-normalised rows.

    ``sum`` (insightface): normalise(emb + emb_flip). ``norm_weighted`` (AdaFace
    ``fuse_features_with_norm``): each unit feature weighted by its own norm, summed, normalised.
    """
    if emb.shape != emb_flip.shape or emb.ndim != 2:
        raise ValueError(
            f"fuse_flip: emb {emb.shape} and emb_flip {emb_flip.shape} must be equal (N, D) arrays"
        )
    if mode == "sum":
        return l2_normalize(emb + emb_flip)
    if mode == "norm_weighted":
        norms = np.linalg.norm(emb, axis=1, keepdims=True)
        norms_flip = np.linalg.norm(emb_flip, axis=1, keepdims=True)
        unit, unit_flip = emb / np.maximum(norms, 1e-12), emb_flip / np.maximum(norms_flip, 1e-12)
        return l2_normalize(unit * norms + unit_flip * norms_flip)
    raise ValueError(f"fuse_flip: mode={mode!r}, expected one of {FLIP_FUSIONS}")


def check_images(images: np.ndarray) -> None:
    """Raise ValueError unless ``images`` is a non-empty uint8 (N, H, W, 3) array."""
    if (
        not isinstance(images, np.ndarray)
        or images.dtype != np.uint8
        or images.ndim != 4
        or images.shape[3] != 3
        or len(images) == 0
    ):
        shape = getattr(images, "shape", None)
        dtype = getattr(images, "dtype", type(images).__name__)
        raise ValueError(
            f"images: got shape {shape} dtype {dtype}, expected a non-empty uint8 array (N, H, W, 3) in RGB"
        )


def embed_images(
    embed_fn: EmbedFn,
    images: np.ndarray,
    batch_size: int = 256,
    flip: bool = True,
    *,
    mean: Sequence[float] = (0.5, 0.5, 0.5),
    std: Sequence[float] = (0.5, 0.5, 0.5),
    channel_order: str = "RGB",
    flip_fusion: str = "sum",
) -> EmbeddedImages:
    """Embed RGB uint8 NHWC images as insightface's verification does.

    Each batch becomes float NCHW ``((x / 255) - mean) / std`` in ``channel_order`` and goes through
    ``embed_fn``; with ``flip`` the mirrored batch too, fused by ``flip_fusion``. XNorm is the mean
    norm of all raw outputs (originals and mirrors).
    """
    check_images(images)
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: expected >= 1")
    if channel_order not in CHANNEL_ORDERS:
        raise ValueError(f"channel_order={channel_order!r}: expected one of {CHANNEL_ORDERS}")
    if flip_fusion not in FLIP_FUSIONS:
        raise ValueError(f"flip_fusion={flip_fusion!r}: expected one of {FLIP_FUSIONS}")
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    def run(batch: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2)
        if channel_order == "BGR":
            x = x.flip(1)
        out = embed_fn(((x / 255) - mean_t) / std_t)
        return (
            out.detach().cpu().float().numpy()
            if isinstance(out, torch.Tensor)
            else np.asarray(out, np.float32)
        )

    views = [images, images[:, :, ::-1]] if flip else [images]
    raw = [
        np.concatenate([run(view[i : i + batch_size]) for i in range(0, len(images), batch_size)])
        for view in views
    ]
    xnorm = float(np.mean(np.linalg.norm(np.concatenate(raw), axis=1)))
    embeddings = fuse_flip(raw[0], raw[1], flip_fusion) if flip else l2_normalize(raw[0])
    return EmbeddedImages(embeddings=embeddings, xnorm=xnorm)


class FaceEmbedder:
    """An exported model plus its ``model.json``: ``embed`` maps RGB uint8 NHWC images to unit rows.

    Non-finite (NaN/inf) embeddings are an error naming the model (``uri``), never passed on.
    """

    def __init__(
        self,
        spec: ModelSpec,
        forward: Callable[[torch.Tensor], np.ndarray],
        device: str = "cpu",
        uri: str = "(in-memory model)",
    ):
        self.spec = spec
        self.forward = forward
        self.device = device
        self.uri = uri

    def embed_set(self, images: np.ndarray, batch_size: int = 256, flip: bool = True) -> EmbeddedImages:
        """Flip-fused, L2-normalised embeddings and XNorm (see :func:`embed_images`)."""
        height, width = self.spec.input_size
        if getattr(images, "ndim", 0) == 4 and tuple(images.shape[1:3]) != (height, width):
            raise ValueError(
                f"images: got {images.shape[1]}x{images.shape[2]} pixels, the model expects "
                f"{height}x{width} (model.json input_size); align and resize faces first"
            )
        embedded = embed_images(
            self._checked_forward,
            images,
            batch_size,
            flip,
            mean=self.spec.mean,
            std=self.spec.std,
            channel_order=self.spec.channel_order,
            flip_fusion=self.spec.flip_fusion,
        )
        bad = int(np.count_nonzero(~np.isfinite(embedded.embeddings).all(axis=1)))
        if bad:
            raise ValueError(
                f"{self.uri}: the model gave non-finite (NaN/inf) embeddings for {bad} of {len(images)} "
                "images; the exported model is broken (diverged training, or a bad export)"
            )
        return embedded

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


def read_spec(model_uri: str, overrides: Mapping[str, Any] | None = None) -> ModelSpec:
    """Parse and validate ``model.json`` under ``model_uri``, with ``overrides`` replacing its fields.

    Overrides serve checkpoints exported without the right metadata (e.g. an AdaFace model that
    wants ``channel_order="BGR"`` and ``flip_fusion="norm_weighted"``).
    """
    uri = storage.join(model_uri, "model.json")
    if not storage.exists(uri):
        raise FileNotFoundError(
            f"{uri}: no model.json; expected an exported model folder (model.json + the model file it names)"
        )
    try:
        return ModelSpec.model_validate({**json.loads(storage.read_bytes(uri)), **(overrides or {})})
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


def load_face_model(
    model_uri: str, device: str = "cpu", overrides: Mapping[str, Any] | None = None
) -> FaceEmbedder:
    """Load the exported model folder at ``model_uri`` (path, ``file://`` or ``s3://``) onto ``device``.

    ``overrides`` replace ``model.json`` fields (see :func:`read_spec`).
    """
    spec = read_spec(model_uri, overrides)
    data = storage.read_bytes(storage.join(model_uri, spec.file))
    loader = _torchscript_forward if spec.format == "torchscript" else _onnx_forward
    return FaceEmbedder(spec, loader(data, device), device, uri=model_uri)
