"""UIFace attention injection and cross-attention maps as a diffusers attention processor.

One UNet call carries both passes of a sampling step as the batch ``[source; target]`` (source = the
empty-context pass). Inside that call :class:`UIFaceAttnProcessor`, steered by an :class:`AttentionControl`
passed through ``cross_attention_kwargs={"control": ...}``, does what the reference
(TFace ``models/diffusion/nn.py: MultiHeadAttention.qkv_attention``) does across two calls:

- self-attention: the target's pre-softmax logits are replaced by the source's (it keeps its own V);
- cross-attention: AdaIN re-statistics of the target's logits toward the source's (:func:`adain_logits`);
- capture: the target's cross-attention logits of every layer are reduced to one map per sample
  (:func:`cross_attention_map`) for the adaptive stage switch.

Without a control (training, plain sampling) it is diffusers' ``AttnProcessor2_0``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0


@dataclass
class AttentionControl:
    """Instructions for every UIFace processor during one UNet call.

    paired: the batch is ``[source; target]`` halves.
    self_injection: (paired) the target's self-attention logits become the source's.
    cross_strength: (paired) AdaIN blend of the target's cross logits toward the source statistics; 0 = off.
    capture_size: if set, each cross-attention layer appends the target's ``(B, size, size)`` map to ``maps``.
    """

    paired: bool = False
    self_injection: bool = False
    cross_strength: float = 0.0
    capture_size: int | None = None
    maps: list[torch.Tensor] = field(default_factory=list)

    def acts_on(self, is_cross: bool) -> bool:
        """Whether a layer of this kind needs the explicit-logits path."""
        if is_cross:
            return self.capture_size is not None or (self.paired and self.cross_strength > 0)
        return self.paired and self.self_injection


def adain_logits(logits: torch.Tensor, source: torch.Tensor, strength: float) -> torch.Tensor:
    """Per query row (over keys): ``(logits - mu) / sigma * t_sigma + t_mu`` with
    ``t = strength * source_stat + (1 - strength) * own_stat``. Strength 0 is the identity; 1 gives the
    source's mean and std (the reference hard-codes 0.5)."""
    mean, std = logits.mean(-1, keepdim=True), logits.std(-1, keepdim=True)
    target_mean = strength * source.mean(-1, keepdim=True) + (1 - strength) * mean
    target_std = strength * source.std(-1, keepdim=True) + (1 - strength) * std
    return (logits - mean) / std.clamp_min(torch.finfo(std.dtype).tiny) * target_std + target_mean


def cross_attention_map(logits: torch.Tensor, heads: int, size: int) -> torch.Tensor:
    """Reference ``get_attn_map`` for one layer: ``(B*heads, Lq, Lk)`` pre-softmax logits -> ``(B, size, size)``.

    Softmax over the query axis, mean over keys, mean over heads, divide by the per-sample max, bilinear
    resize to ``size`` and clamp to [0, 1]. The query grid must be square.
    """
    queries = logits.shape[1]
    side = int(round(queries**0.5))
    if side * side != queries:
        raise ValueError(f"logits: expected a square query grid, got {queries} queries")
    m = logits.float().softmax(dim=1).mean(dim=2).view(-1, heads, queries).mean(dim=1)
    m = m / m.amax(dim=1, keepdim=True)
    m = F.interpolate(m.view(-1, 1, side, side), size=(size, size), mode="bilinear", align_corners=False)
    return m.squeeze(1).clamp(0, 1)


def combine_attention_maps(maps: list[torch.Tensor]) -> torch.Tensor:
    """Average per-layer maps and min-max normalise each sample to [0, 1] (a flat map becomes 0)."""
    if not maps:
        raise ValueError("maps: no cross-attention maps were captured (does the UNet have cross-attention?)")
    mean = torch.stack(maps).mean(dim=0)
    lo = mean.flatten(1).amin(dim=1)[:, None, None]
    hi = mean.flatten(1).amax(dim=1)[:, None, None]
    return (mean - lo) / (hi - lo).clamp_min(torch.finfo(mean.dtype).tiny)


def attention_logits(
    attn: Attention, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """Pre-softmax scores exactly as ``Attention.get_attention_scores`` forms them (scale, mask, upcast)."""
    if attn.upcast_attention:
        query, key = query.float(), key.float()
    if mask is None:
        return attn.scale * torch.bmm(query, key.transpose(-1, -2))
    return torch.baddbmm(mask, query, key.transpose(-1, -2), beta=1, alpha=attn.scale)


class UIFaceAttnProcessor(AttnProcessor2_0):
    """``AttnProcessor2_0`` that, given an :class:`AttentionControl`, injects and captures attention logits."""

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        control: AttentionControl | None = None,
        **kwargs,
    ) -> torch.Tensor:
        is_cross = encoder_hidden_states is not None
        if control is None or not control.acts_on(is_cross):
            return super().__call__(
                attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs
            )
        if hidden_states.ndim != 3 or attn.spatial_norm is not None or attn.group_norm is not None:
            raise ValueError(
                "UIFaceAttnProcessor: injection supports transformer-block attention (B, L, C) only"
            )
        if attn.norm_q is not None or attn.norm_k is not None or attn.residual_connection:
            raise ValueError(
                "UIFaceAttnProcessor: injection does not support q/k norms or residual attention"
            )

        batch = hidden_states.shape[0]
        context = hidden_states if not is_cross else encoder_hidden_states
        if is_cross and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        mask = attn.prepare_attention_mask(attention_mask, context.shape[1], batch)
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(context))
        value = attn.head_to_batch_dim(attn.to_v(context))
        logits = attention_logits(attn, query, key, mask)

        if control.paired:
            if batch % 2:
                raise ValueError(f"AttentionControl.paired: batch {batch} is not [source; target] halves")
            source, target = logits.chunk(2)
            if is_cross and control.capture_size is not None:
                control.maps.append(cross_attention_map(target, attn.heads, control.capture_size))
            if not is_cross:
                target = source
            elif control.cross_strength > 0:
                target = adain_logits(target, source, control.cross_strength)
            logits = torch.cat([source, target])
        elif control.capture_size is not None:
            control.maps.append(cross_attention_map(logits, attn.heads, control.capture_size))

        probs = (logits.float() if attn.upcast_softmax else logits).softmax(dim=-1).to(value.dtype)
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        out = attn.to_out[1](attn.to_out[0](out))
        return out / attn.rescale_output_factor
