"""IResNet / ResNet-18 backbones: layout, parameter counts, sizes, channels_last, registry errors."""

from __future__ import annotations

import pytest
import torch
import torchvision

from recog.backbones import IRESNET_STAGES, build_backbone

torch.set_num_threads(2)


def expected_iresnet_params(stages, width=1.0, input_size=112, embedding_dim=512):
    """Parameter count written out from the architecture description, block by block."""
    c = [max(1, round(w * width)) for w in (64, 128, 256, 512)]
    bn = lambda n: 2 * n  # noqa: E731 - weight + bias
    total = 3 * 9 * c[0] + bn(c[0]) + c[0]  # stem conv3x3, BN, PReLU
    cin = c[0]
    for blocks, cout in zip(stages, c, strict=True):
        for b in range(blocks):
            total += bn(cin) + 9 * cin * cout + bn(cout) + cout + 9 * cout * cout + bn(cout)
            if b == 0:  # stride-2 projection shortcut
                total += cin * cout + bn(cout)
            cin = cout
    total += bn(cin) + cin * (input_size // 16) ** 2 * embedding_dim + embedding_dim + bn(embedding_dim)
    return total


def n_params(model, trainable=False):
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)


@pytest.mark.parametrize(
    ("name", "published"),
    [
        ("iresnet18", 24_025_600),
        ("iresnet34", 34_139_328),
        ("iresnet50", 43_590_848),
        ("iresnet100", 65_156_160),
    ],
)
def test_full_size_parameter_counts(name, published):
    with torch.device("meta"):
        model = build_backbone(name)
    assert n_params(model) == published == expected_iresnet_params(IRESNET_STAGES[name])
    # the frozen unit scale of the output BatchNorm1d is the only non-trainable parameter
    assert n_params(model) - n_params(model, trainable=True) == 512
    assert not model.features.weight.requires_grad


def test_published_sizes_rounded():
    assert round(expected_iresnet_params(IRESNET_STAGES["iresnet50"]) / 1e6, 1) == 43.6
    assert round(expected_iresnet_params(IRESNET_STAGES["iresnet100"]) / 1e6, 1) == 65.2


@pytest.mark.parametrize(("input_size", "width", "dim"), [(32, 0.125, 16), (64, 0.125, 32), (48, 0.25, 8)])
def test_tiny_shapes_and_counts(input_size, width, dim):
    model = build_backbone("iresnet18", embedding_dim=dim, width=width, input_size=input_size).eval()
    assert model.fc.in_features == round(512 * width) * (input_size // 16) ** 2
    assert n_params(model) == expected_iresnet_params((2, 2, 2, 2), width, input_size, dim)
    out = model(torch.randn(3, 3, input_size, input_size))
    assert out.shape == (3, dim)


def test_call_order_matches_ir_layout():
    model = build_backbone("iresnet18", embedding_dim=8, width=0.125, input_size=32).eval()
    calls = []
    for name, module in model.named_modules():
        if not list(module.children()):
            module.register_forward_hook(lambda m, i, o, name=name: calls.append(name))
    model(torch.randn(2, 3, 32, 32))
    first_block = ["bn1", "conv1", "bn2", "prelu", "conv2", "bn3", "downsample.0", "downsample.1"]
    assert calls[:3] == ["conv1", "bn1", "prelu"]
    assert calls[3:11] == [f"layer1.0.{n}" for n in first_block]
    assert calls[11:17] == [f"layer1.1.{n}" for n in first_block[:6]]  # identity shortcut
    assert calls[-4:] == ["bn2", "dropout", "fc", "features"]
    assert model.layer1[0].conv2.stride == (2, 2) and model.layer1[0].conv1.stride == (1, 1)
    assert [m.prelu.num_parameters for m in (model.layer1[0], model.layer4[1])] == [8, 64]


def test_output_batchnorm_scale_is_fixed_at_one():
    model = build_backbone("iresnet18", embedding_dim=8, width=0.125, input_size=32)
    model(torch.randn(4, 3, 32, 32)).square().sum().backward()
    assert model.features.weight.grad is None
    assert torch.equal(model.features.weight, torch.ones(8))
    assert model.features.bias.grad is not None and model.conv1.weight.grad.abs().sum() > 0


def test_channels_last_gives_same_embeddings():
    torch.manual_seed(0)
    model = build_backbone("iresnet34", embedding_dim=16, width=0.125, input_size=32).eval()
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)
    model = model.to(memory_format=torch.channels_last)
    got = model(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_dropout_only_in_training():
    torch.manual_seed(0)
    model = build_backbone("iresnet18", embedding_dim=8, width=0.125, input_size=32, dropout=0.5)
    x = torch.randn(4, 3, 32, 32)
    model.eval()
    torch.testing.assert_close(model(x), model(x))
    model.train()
    assert not torch.allclose(model(x), model(x))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"input_size": 100}, "input_size=100"),
        ({"width": 0.0}, "width=0.0"),
        ({"dropout": 1.0}, "dropout=1.0"),
        ({"embedding_dim": 0}, "embedding_dim=0"),
    ],
)
def test_bad_iresnet_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_backbone("iresnet18", **kwargs)


def test_unknown_name_lists_known():
    with pytest.raises(ValueError, match=r"'iresnet200'.*iresnet100.*resnet18"):
        build_backbone("iresnet200")


def test_resnet18_classifier_and_local_weights(tmp_path):
    torch.manual_seed(0)
    source = torchvision.models.resnet18(weights=None)  # stands in for an ImageNet checkpoint
    path = tmp_path / "resnet18.pt"
    torch.save(source.state_dict(), path)
    model = build_backbone("resnet18", num_classes=5, weights_path=str(path), dropout=0.2).eval()
    assert n_params(model) == 11_176_512 + 513 * 5  # published 11.69M minus the 1000-way fc
    torch.testing.assert_close(model.layer4[1].conv2.weight, source.layer4[1].conv2.weight)
    assert model.fc[1].out_features == 5 and isinstance(model.fc[0], torch.nn.Dropout)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 5)
    assert build_backbone("resnet18", embedding_dim=12)(torch.randn(2, 3, 32, 32)).shape == (2, 12)


def test_resnet18_rejects_other_checkpoints_and_width(tmp_path):
    path = tmp_path / "ir.pt"
    torch.save(build_backbone("iresnet18", width=0.125, input_size=32).state_dict(), path)
    with pytest.raises(ValueError, match="not a torchvision resnet18 state dict"):
        build_backbone("resnet18", num_classes=3, weights_path=str(path))
    state = torchvision.models.resnet18(weights=None).state_dict()
    state["conv1.weight"] = state["conv1.weight"][:, :1]  # a grayscale stem
    torch.save(state, path)
    with pytest.raises(ValueError, match="conv1.weight"):
        build_backbone("resnet18", num_classes=3, weights_path=str(path))
    with pytest.raises(ValueError, match="width=0.5"):
        build_backbone("resnet18", num_classes=3, width=0.5)
