"""Face-recognition backbones, built by name.

- IResNet-18/34/50/100: the "improved residual" network of ArcFace (Deng et al., CVPR 2019,
  section 3.3, "IR" blocks BN-conv-BN-PReLU-conv-BN) in the layout of insightface's
  ``arcface_torch``: a 3x3 stem at full resolution, four stride-2 stages and the "E" output
  (BN2d -> dropout -> flatten -> FC -> BN1d with a frozen unit scale).
- ResNet-18 from torchvision (He et al., CVPR 2016): the closed-set classifier of the
  cross-domain study.

``width`` scales every channel count and ``input_size`` sets the final FC size
(``channels * (input_size / 16) ** 2``), so the same code builds a 65M-parameter IR-100 for
112x112 faces and a tiny CPU model for 32x32 test images.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from functools import partial

import torch
import torchvision
from torch import nn

from facesynth import storage

IRESNET_STAGES: dict[str, tuple[int, int, int, int]] = {
    "iresnet18": (2, 2, 2, 2),
    "iresnet34": (3, 4, 6, 3),
    "iresnet50": (3, 4, 14, 3),
    "iresnet100": (3, 13, 30, 3),
}
STAGE_WIDTHS = (64, 128, 256, 512)


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """IR block: BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN, plus the (projected) input."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = _conv3x3(cin, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.prelu = nn.PReLU(cout)
        self.conv2 = _conv3x3(cout, cout, stride)
        self.bn3 = nn.BatchNorm2d(cout)
        self.downsample = (
            nn.Sequential(
                nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )
            if stride != 1 or cin != cout
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        identity = x if self.downsample is None else self.downsample(x)
        return out + identity


class IResNet(nn.Module):
    """IResNet with ``stages`` blocks per stage; maps ``(N, 3, S, S)`` images to ``(N, embedding_dim)``."""

    def __init__(
        self,
        stages: Sequence[int],
        *,
        embedding_dim: int = 512,
        width: float = 1.0,
        input_size: int = 112,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if len(stages) != 4 or min(stages) < 1:
            raise ValueError(f"stages={tuple(stages)}: expected four positive block counts")
        if input_size < 16 or input_size % 16:
            raise ValueError(
                f"input_size={input_size}: expected a positive multiple of 16 (e.g. 32, 64, 112)"
            )
        if width <= 0:
            raise ValueError(f"width={width}: expected a positive channel multiplier")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout={dropout}: expected a probability in [0, 1)")
        if embedding_dim < 1:
            raise ValueError(f"embedding_dim={embedding_dim}: expected a positive size")
        widths = [max(1, round(c * width)) for c in STAGE_WIDTHS]
        self.conv1 = _conv3x3(3, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.prelu = nn.PReLU(widths[0])
        cin = widths[0]
        for i, (blocks, cout) in enumerate(zip(stages, widths, strict=True), start=1):
            layer = [IBasicBlock(cin, cout, stride=2)] + [
                IBasicBlock(cout, cout, stride=1) for _ in range(blocks - 1)
            ]
            self.add_module(f"layer{i}", nn.Sequential(*layer))
            cin = cout
        self.bn2 = nn.BatchNorm2d(cin)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(cin * (input_size // 16) ** 2, embedding_dim)
        self.features = nn.BatchNorm1d(embedding_dim)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.dropout(self.bn2(x)), 1)
        return self.features(self.fc(x))


def _build_iresnet(
    stages: Sequence[int], *, embedding_dim: int, width: float, input_size: int, dropout: float
) -> IResNet:
    return IResNet(stages, embedding_dim=embedding_dim, width=width, input_size=input_size, dropout=dropout)


def _build_resnet18(
    *,
    embedding_dim: int,
    width: float,
    input_size: int,
    dropout: float,
    num_classes: int | None = None,
    weights_path: str | None = None,
) -> nn.Module:
    """torchvision ResNet-18 whose last layer outputs ``num_classes`` logits (or ``embedding_dim`` features).

    ``weights_path`` (a storage URI of a torchvision state dict, e.g. ImageNet weights) initialises
    every layer but ``fc``, which is always new. ``input_size`` is not needed: the global average
    pool makes the network size-agnostic.
    """
    del input_size
    if width != 1.0:
        raise ValueError(f"width={width}: torchvision resnet18 has fixed channel counts; expected width=1.0")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout={dropout}: expected a probability in [0, 1)")
    out = num_classes if num_classes is not None else embedding_dim
    if out < 1:
        raise ValueError(f"num_classes/embedding_dim={out}: expected a positive output size")
    model = torchvision.models.resnet18(weights=None)
    if weights_path is not None:
        state = torch.load(
            io.BytesIO(storage.read_bytes(weights_path)), map_location="cpu", weights_only=True
        )
        trunk = {k: v for k, v in state.items() if not k.startswith("fc.")}
        expected = {k for k in model.state_dict() if not k.startswith("fc.")}
        bad = f"weights_path={weights_path!r} is not a torchvision resnet18 state dict"
        if set(trunk) != expected:
            missing, unexpected = sorted(expected - set(trunk)), sorted(set(trunk) - expected)
            raise ValueError(f"{bad}: missing {missing[:5]}, unexpected {unexpected[:5]}")
        try:
            model.load_state_dict(trunk, strict=False)
        except RuntimeError as exc:
            raise ValueError(f"{bad}: {exc}") from exc
    fc = nn.Linear(model.fc.in_features, out)
    model.fc = nn.Sequential(nn.Dropout(dropout), fc) if dropout > 0 else fc
    return model


BACKBONES: dict[str, Callable[..., nn.Module]] = {
    **{name: partial(_build_iresnet, stages) for name, stages in IRESNET_STAGES.items()},
    "resnet18": _build_resnet18,
}


def build_backbone(
    name: str,
    *,
    embedding_dim: int = 512,
    width: float = 1.0,
    input_size: int = 112,
    dropout: float = 0.0,
    **kw,
) -> nn.Module:
    """Build the backbone registered as ``name`` (see ``BACKBONES``); ``kw`` goes to that builder."""
    try:
        builder = BACKBONES[name]
    except KeyError:
        raise ValueError(f"backbone {name!r} is unknown: expected one of {sorted(BACKBONES)}") from None
    return builder(embedding_dim=embedding_dim, width=width, input_size=input_size, dropout=dropout, **kw)
