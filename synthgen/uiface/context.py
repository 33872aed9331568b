"""Identity context for UIFace: FR embedding -> context vector -> K cross-attention tokens.

Mirrors the published model (TFace ``generation/uiface``): ``context_emb`` (Linear from the FR embedding
to the 256-d context), a learnable empty context (``nn.Parameter(256)``, N(0, 1) init) that replaces the
context of unconditioned samples, element-wise context dropout (IDiff-Face CPD), and ``c_proj_in`` + ``c_norm``
turning the 256-d vector into K tokens of 256 channels.

``num_classes > 0`` makes the class-conditional baseline (the cross-domain study's first attempt, a
class-conditional DDPM): a learned ``nn.Embedding`` row per class replaces the embedding projection, and the
condition of a row is its class id (int64) instead of an FR embedding; everything after the context vector
(empty context, dropout, tokens) is the same.

One deliberate difference: the reference gives every attention block its own ``c_proj_in``; diffusers'
``UNet2DConditionModel`` feeds one ``encoder_hidden_states`` to all blocks, so the token projection lives here
once and each block's own ``to_k``/``to_v`` specialise it. The empty context goes through the same projection
as an identity context, exactly as in the reference, where it replaces the 256-d vector *before* ``c_proj_in``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from synthgen.uiface.rng import draw


class IdentityContext(nn.Module):
    """Maps FR embeddings (any dim), or class ids with ``num_classes``, to ``(B, num_tokens, context_dim)``
    cross-attention tokens."""

    def __init__(
        self, embedding_dim: int, context_dim: int, num_tokens: int, norm_groups: int, num_classes: int = 0
    ) -> None:
        super().__init__()
        self.context_dim = context_dim
        self.num_tokens = num_tokens
        self.num_classes = num_classes
        if num_classes:
            self.classes = nn.Embedding(num_classes, context_dim)
        else:
            self.embed = nn.Linear(embedding_dim, context_dim)
        self.empty = nn.Parameter(torch.randn(context_dim))
        self.to_tokens = nn.Linear(context_dim, context_dim * num_tokens)
        self.norm = nn.GroupNorm(norm_groups, context_dim)

    def contexts(self, id_embeddings: torch.Tensor, use_identity: torch.Tensor | None = None) -> torch.Tensor:
        """L2-normalise and project embeddings (class-conditional: look up class ids) to ``(B, context_dim)``;
        rows where ``use_identity`` is False get the learnable empty context instead."""
        c = (
            self._class_contexts(id_embeddings)
            if self.num_classes
            else self._embedding_contexts(id_embeddings)
        )
        if use_identity is None:
            return c
        return torch.where(use_identity[:, None], c, self.empty_contexts(len(c)))

    def _embedding_contexts(self, id_embeddings: torch.Tensor) -> torch.Tensor:
        if id_embeddings.ndim != 2 or id_embeddings.shape[1] != self.embed.in_features:
            raise ValueError(
                f"id_embeddings: expected shape (batch, {self.embed.in_features}), got {tuple(id_embeddings.shape)}"
            )
        return self.embed(F.normalize(id_embeddings.to(self.embed.weight), dim=1))

    def _class_contexts(self, class_ids: torch.Tensor) -> torch.Tensor:
        if class_ids.ndim != 1 or class_ids.is_floating_point():
            raise ValueError(
                f"class ids: expected integer shape (batch,) for a class-conditional context, "
                f"got {class_ids.dtype} {tuple(class_ids.shape)}"
            )
        if len(class_ids) and (int(class_ids.min()) < 0 or int(class_ids.max()) >= self.num_classes):
            raise ValueError(
                f"class ids: expected values in [0, {self.num_classes}), got "
                f"{int(class_ids.min())}..{int(class_ids.max())}"
            )
        return self.classes(class_ids.long().to(self.classes.weight.device))

    def empty_contexts(self, batch: int) -> torch.Tensor:
        """The learnable empty context repeated ``batch`` times: ``(batch, context_dim)``."""
        return self.empty[None].expand(batch, -1)

    def tokens(self, contexts: torch.Tensor) -> torch.Tensor:
        """``(B, context_dim)`` -> ``(B, num_tokens, context_dim)`` (reference ``c_proj_in`` then ``c_norm``).

        The reference reshapes the projection channel-major (``b (n d) -> b n d`` with n = context_dim) and
        group-normalises over the context channels; the same layout is kept here.
        """
        t = self.to_tokens(contexts).view(len(contexts), self.context_dim, self.num_tokens)
        return self.norm(t).transpose(1, 2)


def context_dropout(contexts: torch.Tensor, p: float, generator: torch.Generator | None) -> torch.Tensor:
    """Element-wise inverted dropout (``nn.Dropout`` semantics) drawn from ``generator``, for reproducible CPD."""
    if p == 0.0:
        return contexts
    keep = draw(torch.rand, contexts.shape, generator=generator, device=contexts.device) >= p
    return contexts * keep / (1.0 - p)


def unconditional_mask(
    batch: int, p: float, generator: torch.Generator | None, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Training rule of UIFace: each sample is unconditioned with probability ``p``; sample 0 always is."""
    mask = draw(torch.rand, batch, generator=generator, device=device) < p
    mask[0] = True
    return mask
