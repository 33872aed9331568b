"""Exported model contract: loading model.json + TorchScript, preprocessing, flip fusion, Ray fan-out."""

from __future__ import annotations

import io
import json
import re
import sys

import numpy as np
import pytest
import torch
from torch import nn

from facesynth import storage
from facesynth.embed import embed_with_ray
from facesynth.face_model import load_face_model, read_spec
from recog.export import export_embedder

torch.set_num_threads(1)
DIM = 8


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, stride=2)
        self.fc = nn.Linear(4 * 7 * 5, DIM)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def _images(n=5, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, 16, 12, 3), dtype=np.uint8)


def _expected(net, images, mean, std, bgr=False, fusion="sum"):
    """Preprocess in numpy, run the eager module, fuse in float64."""
    x = images[..., ::-1] if bgr else images
    x = (x.astype(np.float32) / 255 - np.float32(mean)) / np.float32(std)

    def run(a):
        with torch.no_grad():
            return net(torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))).double().numpy()

    raw, raw_flip = run(x), run(x[:, :, ::-1])
    if fusion == "sum":
        fused = raw + raw_flip
    else:
        n1, n2 = np.linalg.norm(raw, axis=1, keepdims=True), np.linalg.norm(raw_flip, axis=1, keepdims=True)
        fused = n1 * raw / n1 + n2 * raw_flip / n2
    return fused / np.linalg.norm(fused, axis=1, keepdims=True), raw


@pytest.fixture
def exported(tmp_path):
    net = TinyNet().eval()
    export_embedder(
        net, str(tmp_path / "m"), input_size=(16, 12), embedding_dim=DIM, mean=[0.5] * 3, std=[0.5] * 3
    )
    return net, str(tmp_path / "m")


def test_embed_matches_eager_model(exported):
    net, uri = exported
    embedder = load_face_model(uri)
    assert embedder.spec.input_size == (16, 12) and embedder.spec.flip_fusion == "sum"
    images = _images()
    expected, raw = _expected(net, images, 0.5, 0.5)
    np.testing.assert_allclose(embedder.embed(images, batch_size=2), expected, atol=1e-5)
    no_flip = embedder.embed(images, flip=False)
    np.testing.assert_allclose(no_flip, raw / np.linalg.norm(raw, axis=1, keepdims=True), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(no_flip, axis=1), 1.0, atol=1e-6)


def test_bgr_norm_weighted_and_custom_normalisation(tmp_path):
    net = TinyNet().eval()
    uri = str(tmp_path / "bgr")
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.3, 0.25]
    export_embedder(
        net,
        uri,
        input_size=(16, 12),
        embedding_dim=DIM,
        mean=mean,
        std=std,
        channel_order="BGR",
        flip_fusion="norm_weighted",
    )
    images = _images(4, seed=1)
    expected, _ = _expected(net, images, mean, std, bgr=True, fusion="norm_weighted")
    np.testing.assert_allclose(load_face_model(f"file://{uri}").embed(images), expected, atol=1e-5)
    # BGR really changes the answer (guards against a no-op channel swap)
    rgb, _ = _expected(net, images, mean, std, bgr=False, fusion="norm_weighted")
    assert np.abs(rgb - expected).max() > 1e-3


def test_overrides_replace_model_json_fields(exported):
    """An AdaFace checkpoint exported with RGB/sum metadata, evaluated as BGR + norm_weighted."""
    net, uri = exported
    images = _images(4, seed=2)
    overrides = {"channel_order": "BGR", "flip_fusion": "norm_weighted"}
    embedder = load_face_model(uri, overrides=overrides)
    assert (embedder.spec.channel_order, embedder.spec.flip_fusion) == ("BGR", "norm_weighted")
    expected, _ = _expected(net, images, 0.5, 0.5, bgr=True, fusion="norm_weighted")
    np.testing.assert_allclose(embedder.embed(images), expected, atol=1e-5)
    assert read_spec(uri).channel_order == "RGB"  # the file itself is untouched
    with pytest.raises(ValueError, match="flip_fusion"):
        read_spec(uri, {"flip_fusion": "mean"})


def test_loads_from_s3(exported, s3_bucket):
    _, local = exported
    remote = storage.join(s3_bucket, "models", "tiny")
    for name in ("model.json", "model.pt"):
        storage.write_bytes(storage.join(remote, name), storage.read_bytes(storage.join(local, name)))
    images = _images(3)
    np.testing.assert_array_equal(load_face_model(remote).embed(images), load_face_model(local).embed(images))


def _write_spec(folder, **changes):
    spec = {
        "format": "torchscript",
        "file": "model.pt",
        "input_size": [16, 12],
        "mean": [0.5] * 3,
        "std": [0.5] * 3,
        "channel_order": "RGB",
        "embedding_dim": DIM,
        "flip_fusion": "sum",
    }
    spec.update(changes)
    storage.write_bytes(str(folder / "model.json"), json.dumps(spec).encode())


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"colour": "RGB"}, "colour"),
        ({"std": [0.5, 0.0, 0.5]}, "std"),
        ({"file": "../model.pt"}, "file"),
        ({"channel_order": "RBG"}, "channel_order"),
        ({"embedding_dim": 0}, "embedding_dim"),
        ({"flip_fusion": "max"}, "flip_fusion"),
        ({"input_size": [112]}, "input_size"),
    ],
)
def test_invalid_model_json_names_the_key(tmp_path, changes, match):
    _write_spec(tmp_path, **changes)
    with pytest.raises(ValueError, match=match):
        read_spec(str(tmp_path))


def test_missing_model_and_onnx_without_runtime(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="model.json"):
        load_face_model(str(tmp_path / "nowhere"))
    _write_spec(tmp_path, format="onnx", file="model.onnx")
    storage.write_bytes(str(tmp_path / "model.onnx"), b"not really onnx")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed
    with pytest.raises(ImportError, match="needs the onnxruntime package"):
        load_face_model(str(tmp_path))


def test_wrong_image_size_and_embedding_dim(tmp_path, exported):
    _, uri = exported
    with pytest.raises(ValueError, match="16x12"):
        load_face_model(uri).embed(np.zeros((2, 112, 112, 3), np.uint8))
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.trace(TinyNet().eval(), torch.zeros(1, 3, 16, 12)), buffer)
    storage.write_bytes(str(tmp_path / "model.pt"), buffer.getvalue())
    _write_spec(tmp_path, embedding_dim=512)
    with pytest.raises(ValueError, match="embedding_dim=512"):
        load_face_model(str(tmp_path)).embed(_images(2))


class BrightNaN(TinyNet):
    """TinyNet whose output is NaN for bright images (mean normalised pixel above 0)."""

    def forward(self, x):
        out = super().forward(x)
        return torch.where(x.mean(dim=(1, 2, 3)).unsqueeze(1) > 0, out * float("nan"), out)


def test_nan_embeddings_name_the_model_and_count_the_rows(tmp_path):
    uri = str(tmp_path / "nan-model")
    export_embedder(
        BrightNaN().eval(), uri, input_size=(16, 12), embedding_dim=DIM, mean=[0.5] * 3, std=[0.5] * 3
    )
    images = _images(5)
    images[[1, 3]] = 255  # bright: NaN out of the model
    images[[0, 2, 4]] //= 4  # dark: finite
    embedder = load_face_model(uri)
    with pytest.raises(
        ValueError, match=rf"{re.escape(uri)}: .*non-finite \(NaN/inf\) embeddings for 2 of 5 images"
    ):
        embedder.embed_set(images, batch_size=2)
    assert np.isfinite(embedder.embed(images[[0, 2, 4]])).all()


def test_embed_with_ray_keeps_order(exported, ray_local):
    _, uri = exported
    images = _images(11, seed=3)
    local = load_face_model(uri).embed_set(images, batch_size=4)
    spread = embed_with_ray(uri, images, num_workers=2, batch_size=4)
    np.testing.assert_allclose(spread.embeddings, local.embeddings, atol=1e-6)
    assert spread.xnorm == pytest.approx(local.xnorm, rel=1e-6)
    overrides = {"channel_order": "BGR"}
    bgr = embed_with_ray(uri, images, num_workers=2, batch_size=4, overrides=overrides)
    np.testing.assert_allclose(
        bgr.embeddings, load_face_model(uri, overrides=overrides).embed(images), atol=1e-6
    )
    assert np.abs(bgr.embeddings - local.embeddings).max() > 1e-3
