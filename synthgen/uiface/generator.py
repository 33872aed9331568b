"""UIFace in the generation stage: synthetic identities x samples -> images, t0 and embeddings per row.

Identity ``i`` of a job is row ``i`` of the identity embeddings drawn once by :func:`identity_embeddings`
(deterministic from the config seed) and stored at ``<output>/identities.npy``; every generator actor reads
that file, so all actors and reruns condition on the same identities. For the class-conditional baseline the
file holds class ids (identity i = class i) and rows carry no embedding. Row seeds make each image independent
of the batch it is sampled in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from facesynth.config import StrictModel
from synthgen.identity_embeddings import load_npy
from synthgen.stage import Generated, Generator
from synthgen.uiface.identities import sample_identities
from synthgen.uiface.model import UIFaceModel
from synthgen.uiface.sampler import SamplerConfig, sample
from synthgen.uiface.train import UIFaceModelSource

IDENTITIES_FILE = "identities.npy"


class IdentitySampling(StrictModel):
    """How a UIFace job draws its synthetic identity embeddings (row ``i`` conditions identity ``i``)."""

    max_cosine: float = Field(0.3, ge=-1, le=1, description="reject an identity closer than this to another")
    method: Literal["sphere", "gaussian"] = "sphere"
    training: str | None = Field(
        None,
        description=".npy of training identities to keep away from (<model>/identities.npy; gaussian fits it)",
    )
    seed: int = Field(0, ge=0, description="seed of the identity embeddings")


def identity_embeddings(count: int, cfg: IdentitySampling, dim: int) -> np.ndarray:
    """The job's ``(count, dim)`` float32 identity embeddings (row i = identity i), deterministic from the seed."""
    training = None
    if cfg.training is not None:
        training = load_npy(cfg.training)
    return sample_identities(
        count, seed=cfg.seed, dim=dim, max_cosine=cfg.max_cosine, method=cfg.method, training=training
    )


class UIFaceGenerator(Generator):
    """Samples UIFace images for (identity, sample, seed) rows; ``t0`` and the identity embedding per row."""

    name = "uiface"
    domain = "diffusion"

    def __init__(
        self, model: UIFaceModel, sampler: SamplerConfig, embeddings: np.ndarray, params: dict
    ) -> None:
        self.classes = model.config.conditioning == "class"
        if self.classes and embeddings.ndim != 1:
            raise ValueError(f"class ids: expected (identities,), got {embeddings.shape}")
        if not self.classes and (embeddings.ndim != 2 or embeddings.shape[1] != model.config.embedding_dim):
            raise ValueError(
                f"embeddings: expected (identities, {model.config.embedding_dim}), got {embeddings.shape}"
            )
        self.model = model.eval()
        self.sampler = sampler
        self.embeddings = embeddings.astype(np.int64 if self.classes else np.float32)
        self.params = params

    def generate(self, identities: np.ndarray, samples: np.ndarray, seeds: np.ndarray) -> Generated:
        if len(identities) and int(identities.max()) >= len(self.embeddings):
            raise ValueError(
                f"identities: index {int(identities.max())} but only {len(self.embeddings)} "
                "identity embeddings exist"
            )
        rows = self.embeddings[identities]
        out = sample(self.model, self.sampler, torch.from_numpy(rows), seeds.tolist())
        n = len(identities)
        return Generated(
            images=out.images.cpu().numpy(),
            identity_names=[f"uiface-{int(i):06d}" for i in identities],
            prompts=[""] * n,
            params=[self.params] * n,
            t0=out.t0.cpu().numpy(),
            embeddings=None if self.classes else rows,
        )


@dataclass(frozen=True)
class UIFaceFactory:
    """Picklable recipe that builds a :class:`UIFaceGenerator` inside each generator actor."""

    model: UIFaceModelSource
    sampler: SamplerConfig
    embeddings_uri: str
    device: str = "auto"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    threads: int | None = None

    def __call__(self) -> UIFaceGenerator:
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        device = ("cuda" if torch.cuda.is_available() else "cpu") if self.device == "auto" else self.device
        model = self.model.build(device).to(getattr(torch, self.dtype))
        embeddings = load_npy(self.embeddings_uri)
        params = {
            "sampler": self.sampler.model_dump(mode="json"),
            "model": self.model.describe(),
            "dtype": self.dtype,
        }
        return UIFaceGenerator(model, self.sampler, embeddings, params)
