"""Exporting a backbone to the TorchScript + model.json contract and loading it back."""

from __future__ import annotations

import io
import json

import pytest
import torch

from facesynth import storage
from recog.backbones import build_backbone
from recog.export import export_embedder

torch.set_num_threads(2)


@pytest.fixture
def trained():
    """A tiny IResNet whose BatchNorm statistics moved off their initial values, left in training mode."""
    torch.manual_seed(0)
    model = build_backbone("iresnet18", embedding_dim=16, width=0.125, input_size=32)
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, 32, 32) * 2 + 0.5)
    return model


@pytest.mark.parametrize("scheme", ["", "file://"])
def test_exported_model_matches_eager(trained, tmp_path, scheme):
    out_uri = f"{scheme}{tmp_path}/embedder"
    before = {k: v.clone() for k, v in trained.state_dict().items()}
    export_embedder(trained, out_uri, input_size=32, embedding_dim=16, mean=[0.5] * 3, std=[0.5] * 3)
    assert trained.training
    assert all(torch.equal(v, before[k]) for k, v in trained.state_dict().items())
    loaded = torch.jit.load(io.BytesIO(storage.read_bytes(f"{out_uri}/model.pt")))
    x = torch.randn(5, 3, 32, 32)  # a batch size other than the traced one
    with torch.no_grad():
        expected = trained.eval()(x)
        torch.testing.assert_close(loaded(x), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(expected, trained.train()(x))  # eval mode (running statistics) was exported
    assert json.loads(storage.read_bytes(f"{out_uri}/model.json")) == {
        "format": "torchscript",
        "file": "model.pt",
        "input_size": [32, 32],
        "mean": [0.5, 0.5, 0.5],
        "std": [0.5, 0.5, 0.5],
        "channel_order": "RGB",
        "embedding_dim": 16,
        "flip_fusion": "sum",
    }
    assert sorted(p.name for p in (tmp_path / "embedder").iterdir()) == ["model.json", "model.pt"]


def test_adaface_style_metadata(trained, tmp_path):
    export_embedder(
        trained,
        str(tmp_path),
        input_size=(32, 32),
        embedding_dim=16,
        flip_fusion="norm_weighted",
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        channel_order="BGR",
    )
    spec = json.loads((tmp_path / "model.json").read_text())
    assert (spec["flip_fusion"], spec["channel_order"], spec["input_size"]) == (
        "norm_weighted",
        "BGR",
        [32, 32],
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"flip_fusion": "mean"}, "flip_fusion='mean'"),
        ({"channel_order": "RGBA"}, "channel_order='RGBA'"),
        ({"embedding_dim": 512}, r"embedding_dim=512: the backbone maps \(2, 3, 32, 32\) to \(2, 16\)"),
        ({"mean": [0.5, 0.5]}, "mean="),
        ({"std": [0.5, 0.0, 0.5]}, "std="),
        ({"input_size": (32, 32, 3)}, "input_size="),
    ],
)
def test_bad_export_settings_write_nothing(trained, tmp_path, kwargs, message):
    args = {"input_size": 32, "embedding_dim": 16, "mean": [0.5] * 3, "std": [0.5] * 3} | kwargs
    with pytest.raises(ValueError, match=message):
        export_embedder(trained, str(tmp_path / "out"), **args)
    assert not (tmp_path / "out").exists()
