"""Margin-based classification heads for face recognition, with Partial FC.

Target logit of class y for an embedding x, with theta the angle between x and the class centre:

- softmax: plain linear logits ``W x`` (the baseline of the ArcFace paper).
- combined margin (ArcFace paper, eq. 4): ``s * (cos(m1 * theta + m2) - m3)``; CosFace (Wang et
  al. 2018) is ``m2 = 0``: ``s * (cos(theta) - m3)``; ArcFace (Deng et al. 2019) is ``m3 = 0``:
  ``s * cos(theta + m2)``. Because ``cos(theta + m2)`` stops decreasing once ``theta + m2 > pi``,
  ArcFace's reference implementation uses, when ``cos(theta) <= cos(pi - m2)``, the CosFace-like
  fallback ``cos(theta) - m2 * sin(pi - m2)``; with ``easy_margin`` the margin is applied only
  where ``cos(theta) > 0``. For ``m1 != 1`` the threshold angle is ``(pi - m2) / m1``.
- AdaFace (Kim et al., CVPR 2022, eq. 10-12): the margin adapts to the feature norm ||x||, a
  proxy of image quality. With ``mu, sigma`` the EMA (momentum 0.01) of the batch mean / std of
  ``clip(||x||, 0.001, 100)``, ``z = clip(h * (||x|| - mu) / (sigma + eps), -1, 1)``,
  ``g_angle = -m z``, ``g_add = m + m z`` and the target logit is
  ``s * (cos(clip(theta + g_angle, eps, pi - eps)) - g_add)``.

Partial FC (An et al., ICCV 2021 workshop / CVPR 2022): each of the ``world_size`` ranks holds
``num_classes / world_size`` class centres. When ``torch.distributed`` is initialised, the
embeddings and labels of all ranks are all-gathered, every rank scores the whole batch against
its own centres (in training mode with ``sample_rate < 1``: the positive centres of the batch
plus random negatives, ``sample_rate * num_local`` in all) and the softmax cross-entropy is
reduced across ranks. Without a process group it is a single rank holding every centre. The
head's parameters are sharded, so do not wrap it in DDP.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class HeadOutput(NamedTuple):
    """``loss``: scalar; ``logits``: margin-free logits of the (all-gathered) batch against this
    rank's (sampled) centres; ``labels``: each row's column in ``logits``, -1 where another rank
    holds the class. With one rank and no sampling, ``logits.argmax(1) == labels`` is accuracy."""

    loss: torch.Tensor
    logits: torch.Tensor
    labels: torch.Tensor


def _process_group() -> tuple[int, int]:
    """(rank, world_size) of the default process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class CombinedMargin(nn.Module):
    """Target cosine ``cos(m1 * theta + m2) - m3`` with the ArcFace threshold fallback (see module doc)."""

    def __init__(self, m1: float = 1.0, m2: float = 0.0, m3: float = 0.0, easy_margin: bool = False) -> None:
        super().__init__()
        if m1 < 1.0 or not 0.0 <= m2 < math.pi / 2 or m3 < 0.0:
            raise ValueError(f"margins m1={m1}, m2={m2}, m3={m3}: expected m1 >= 1, 0 <= m2 < pi/2, m3 >= 0")
        self.m1, self.m2, self.m3, self.easy_margin = m1, m2, m3, easy_margin

    def forward(self, cos: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
        if self.m1 == 1.0 and self.m2 == 0.0:
            return cos - self.m3
        sin = torch.sqrt((1.0 - cos * cos).clamp_min(1e-12))  # exact at cos = 1, unlike a clamped acos
        theta = torch.atan2(sin, cos)
        target = torch.cos(self.m1 * theta + self.m2) - self.m3
        if self.easy_margin:
            return torch.where(cos > 0, target, cos - self.m3)
        threshold = math.cos((math.pi - self.m2) / self.m1)
        fallback = cos - self.m3 - self.m2 * math.sin(math.pi - self.m2)
        return torch.where(cos > threshold, target, fallback)

    def extra_repr(self) -> str:
        return f"m1={self.m1}, m2={self.m2}, m3={self.m3}, easy_margin={self.easy_margin}"


class AdaFaceMargin(nn.Module):
    """AdaFace's feature-norm adaptive margin; the norm statistics update in training mode only."""

    def __init__(self, m: float = 0.4, h: float = 0.333, momentum: float = 0.01, eps: float = 1e-3) -> None:
        super().__init__()
        if m < 0 or h < 0 or not 0 < momentum <= 1:
            raise ValueError(
                f"AdaFace m={m}, h={h}, momentum={momentum}: expected m, h >= 0 and 0 < momentum <= 1"
            )
        self.m, self.h, self.momentum, self.eps = m, h, momentum, eps
        self.register_buffer("batch_mean", torch.tensor(20.0))
        self.register_buffer("batch_std", torch.tensor(100.0))

    def forward(self, cos: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
        safe_norms = norms.detach().clamp(0.001, 100.0)
        if self.training and safe_norms.numel() > 1:
            self.batch_mean.lerp_(safe_norms.mean(), self.momentum)
            self.batch_std.lerp_(safe_norms.std(), self.momentum)
        scaler = ((safe_norms - self.batch_mean) / (self.batch_std + self.eps) * self.h).clamp(-1.0, 1.0)
        theta = torch.acos(cos.clamp(-1.0 + self.eps, 1.0 - self.eps))
        theta_m = (theta - self.m * scaler).clamp(self.eps, math.pi - self.eps)
        return torch.cos(theta_m) - (self.m + self.m * scaler)

    def extra_repr(self) -> str:
        return f"m={self.m}, h={self.h}, momentum={self.momentum}"


class _GatherRows(torch.autograd.Function):
    """Every rank's rows, concatenated in rank order (equal row counts); backward sums the gradient that
    each rank's loss sends to a row and hands every rank that of its own rows."""

    @staticmethod
    def forward(ctx, local: torch.Tensor) -> torch.Tensor:
        local = local.contiguous()
        out = local.new_empty((dist.get_world_size() * local.shape[0], *local.shape[1:]))
        dist.all_gather_into_tensor(out, local)
        ctx.rows = local.shape[0]
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        start = dist.get_rank() * ctx.rows
        return grad[start : start + ctx.rows]


class _ShardedCrossEntropy(torch.autograd.Function):
    """Softmax cross-entropy over logits whose class columns are split across ranks (Partial FC)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, world_size: int) -> torch.Tensor:
        row_max = logits.detach().max(dim=1).values
        if world_size > 1:
            dist.all_reduce(row_max, dist.ReduceOp.MAX)
        exp = torch.exp(logits - row_max[:, None])
        sum_exp = exp.sum(dim=1)
        has = labels >= 0
        target = torch.where(has, logits.gather(1, labels.clamp_min(0)[:, None]).squeeze(1), 0.0)
        if world_size > 1:
            dist.all_reduce(sum_exp)
            dist.all_reduce(target)
        ctx.save_for_backward(exp / sum_exp[:, None], labels)
        return (torch.log(sum_exp) + row_max - target).mean()

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        prob, labels = ctx.saved_tensors
        grad = prob.clone()
        rows = torch.nonzero(labels >= 0).squeeze(1)
        grad[rows, labels[rows]] -= 1.0
        return grad * (grad_loss / labels.numel()), None, None


class MarginHead(nn.Module):
    """Class centres (this rank's Partial FC shard) + a margin; ``forward(embeddings, labels) -> HeadOutput``.

    ``margin=None`` gives plain linear softmax logits; otherwise logits are ``s * cos`` with the
    target cosine replaced by ``margin(cos_target, feature_norms)``.
    """

    def __init__(
        self,
        embedding_dim: int,
        num_classes: int,
        *,
        margin: nn.Module | None,
        s: float = 64.0,
        sample_rate: float = 1.0,
    ) -> None:
        super().__init__()
        self.rank, self.world_size = _process_group()
        if embedding_dim < 1:
            raise ValueError(f"embedding_dim={embedding_dim}: expected a positive size")
        if num_classes < self.world_size:
            raise ValueError(
                f"num_classes={num_classes}: expected at least one class per rank ({self.world_size})"
            )
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate={sample_rate}: expected a fraction in (0, 1]")
        if s <= 0:
            raise ValueError(f"s={s}: expected a positive logit scale")
        self.num_classes, self.margin, self.s, self.sample_rate = num_classes, margin, s, sample_rate
        base, extra = divmod(num_classes, self.world_size)
        self.num_local = base + int(self.rank < extra)
        self.class_start = base * self.rank + min(self.rank, extra)
        self.num_sample = max(1, int(sample_rate * self.num_local))
        self.weight = nn.Parameter(torch.normal(0.0, 0.01, (self.num_local, embedding_dim)))

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, class_start={self.class_start}, num_local={self.num_local}, "
            f"s={self.s}, sample_rate={self.sample_rate}"
        )

    def sample_centres(self, local_labels: torch.Tensor) -> torch.Tensor:
        """Sorted indices of the local centres to score: the batch's positives plus random negatives."""
        positive = torch.unique(local_labels[local_labels >= 0])
        if positive.numel() >= self.num_sample:
            return positive
        priority = torch.rand(self.num_local, device=local_labels.device)
        priority[positive] = 2.0
        return torch.topk(priority, k=self.num_sample).indices.sort().values

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> HeadOutput:
        if embeddings.ndim != 2 or labels.shape != embeddings.shape[:1]:
            shapes = f"embeddings {tuple(embeddings.shape)} / labels {tuple(labels.shape)}"
            raise ValueError(f"{shapes}: expected (N, D) and (N,)")
        if bool(((labels < 0) | (labels >= self.num_classes)).any()):
            got = f"{int(labels.min())}..{int(labels.max())}"
            raise ValueError(f"labels: expected class ids in [0, {self.num_classes}), got {got}")
        embeddings = embeddings.float()
        if self.world_size > 1:
            embeddings, labels = _GatherRows.apply(embeddings), _GatherRows.apply(labels)
        local = labels - self.class_start
        local = torch.where((local >= 0) & (local < self.num_local), local, -1)
        weight = self.weight
        if self.training and self.num_sample < self.num_local:
            index = self.sample_centres(local)
            weight = weight[index]
            local = torch.where(local >= 0, torch.searchsorted(index, local.clamp_min(0)), -1)
        if self.margin is None:
            logits = embeddings @ weight.t()
            scaled = logits
        else:
            logits = F.linear(F.normalize(embeddings), F.normalize(weight)).clamp(-1.0, 1.0)
            has = local >= 0
            column = local.clamp_min(0)[:, None]
            cos = logits.gather(1, column).squeeze(1)
            target = torch.where(has, self.margin(cos, embeddings.norm(dim=1)), cos)
            scaled = logits.scatter(1, column, target[:, None]) * self.s
            logits = logits * self.s
        loss = _ShardedCrossEntropy.apply(scaled, local, self.world_size)
        return HeadOutput(loss, logits.detach(), local)


MARGIN_PRESETS: dict[str, tuple[dict[str, float], tuple[str, ...]]] = {
    # name: (published margins (m1, m2, m3), the margins a caller may change)
    "softmax": ({"m1": 1.0, "m2": 0.0, "m3": 0.0}, ()),
    "cosface": ({"m1": 1.0, "m2": 0.0, "m3": 0.4}, ("m3",)),
    "arcface": ({"m1": 1.0, "m2": 0.5, "m3": 0.0}, ("m2",)),
    "combined": ({"m1": 1.0, "m2": 0.3, "m3": 0.2}, ("m1", "m2", "m3")),
    "adaface": ({"m1": 1.0, "m2": 0.0, "m3": 0.0}, ()),
}


def build_head(
    name: str,
    *,
    embedding_dim: int,
    num_classes: int,
    s: float = 64.0,
    m1: float | None = None,
    m2: float | None = None,
    m3: float | None = None,
    sample_rate: float = 1.0,
    **kw,
) -> MarginHead:
    """Build a head by name: ``softmax``, ``cosface``, ``arcface``, ``combined`` or ``adaface``.

    Margins left at None take the published values (CosFace m3=0.4, ArcFace m2=0.5, combined
    (1.0, 0.3, 0.2)); a named head refuses a value for a margin it does not use, other than the
    neutral one (m1=1, m2=0, m3=0). ``kw`` goes to the margin: ``easy_margin`` for the cosine
    heads, ``m``, ``h``, ``momentum`` for AdaFace. ``s`` is ignored by the plain-linear
    ``softmax``. ``sample_rate < 1`` turns on Partial FC sampling of the class centres (0.1 in the
    Partial FC paper); sharding across ranks follows the process group whatever the rate.
    """
    if name not in MARGIN_PRESETS:
        raise ValueError(f"head {name!r} is unknown: expected one of {sorted(MARGIN_PRESETS)}")
    defaults, free = MARGIN_PRESETS[name]
    given = {k: v for k, v in {"m1": m1, "m2": m2, "m3": m3}.items() if v is not None}
    refused = {k: v for k, v in given.items() if k not in free and v != defaults[k]}
    if refused:
        raise ValueError(
            f"head {name!r} takes only {list(free) or 'no'} margins, got {refused}: use 'combined'"
        )
    if name == "softmax":
        if kw:
            raise ValueError(f"head 'softmax' is a plain linear classifier: unexpected options {kw}")
        margin = None
    elif name == "adaface":
        margin = AdaFaceMargin(**kw)
    else:
        margin = CombinedMargin(**{**defaults, **given}, **kw)
    return MarginHead(embedding_dim, num_classes, margin=margin, s=s, sample_rate=sample_rate)
