"""facesynth.images: encode/decode round trips, strict errors, resize policies and contact sheets."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from facesynth import images


def gradient(n: int = 3, h: int = 40, w: int = 32) -> np.ndarray:
    rng = np.random.default_rng(0)
    return (rng.random((n, h, w, 3)) * 12 + np.linspace(0, 240, w)[:, None]).astype(np.uint8)


def test_png_is_lossless_at_every_level_and_jpeg_is_close():
    faces = gradient()
    sizes = {}
    for level in (0, 1, 9):
        data = images.encode(faces, "png", png_compression=level)
        decoded = np.stack([np.asarray(Image.open(io.BytesIO(d)).convert("RGB")) for d in data])
        assert np.array_equal(decoded, faces)  # RGB order kept, nothing lost
        assert data == images.encode(faces, "png", png_compression=level)  # deterministic bytes
        sizes[level] = sum(map(len, data))
    assert sizes[0] > sizes[1] >= sizes[9]
    jpeg = images.encode(faces, "jpeg", jpeg_quality=95)
    decoded = np.stack([images.decode(d, "x") for d in jpeg]).astype(int)
    assert Image.open(io.BytesIO(jpeg[0])).format == "JPEG"
    assert 0 < np.abs(decoded - faces).mean() < 4  # measured 2.7 (grain is what JPEG loses)
    with pytest.raises(ValueError, match="image format 'gif'"):
        images.encode(faces, "gif")


def test_decode_and_probe_name_bad_bytes_and_read_the_header_only():
    data = images.encode(gradient(1, 24, 16))[0]
    assert images.probe_size(data, "x") == (24, 16)
    assert images.probe_size(data[:64], "x") == (24, 16)  # the header is enough
    for fn in (images.decode, images.probe_size):
        with pytest.raises(ValueError, match=r"row 7: not a decodable image"):
            fn(b"not an image", "row 7")


def test_decode_to_size_policies():
    small, big = images.encode(gradient(1, 16, 16)), images.encode(gradient(1, 24, 24))
    exact = images.decode_to_size(small, (16, 16), resize="exact", what="row")
    assert exact.shape == (1, 16, 16, 3) and exact.dtype == np.uint8
    with pytest.raises(ValueError, match=r"^shard row 0: image is 24x24 pixels, expected 16x16; resize it$"):
        images.decode_to_size(big, (16, 16), resize="exact", what="shard row", hint="; resize it")
    bilinear = images.decode_to_size(big, (16, 12), resize="bilinear", what="row")
    assert bilinear.shape == (1, 16, 12, 3)
    expected = np.asarray(Image.fromarray(gradient(1, 24, 24)[0]).resize((12, 16), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(bilinear[0], expected)
    assert images.decode_to_size(big, (16, 16), resize="short_side", what="row").shape == (1, 16, 16, 3)
    tall = images.encode(gradient(1, 30, 20))
    with pytest.raises(ValueError, match=r"verification image 0: shape \(24, 16\) after resizing"):
        images.decode_to_size(tall, (16, 16), resize="short_side", what="verification image")


def test_grid_places_rows_and_pads_and_save_grid_writes_png(tmp_path):
    faces = np.arange(6)[:, None, None, None].repeat(4, 1).repeat(3, 2).repeat(3, 3).astype(np.uint8)
    sheet = images.grid(faces, cols=3, rows=2)
    assert sheet.shape == (8, 9, 3)
    assert (sheet[4:8, 6:9] == 5).all()  # row 1, column 2
    padded = images.grid(faces[:5], cols=2)
    assert padded.shape == (12, 6, 3) and (padded[8:, 3:] == 255).all() and (padded[8:, :3] == 4).all()
    with pytest.raises(ValueError, match=r"rows=2 x cols=2: expected positive and equal to the 6 images"):
        images.grid(faces, cols=2, rows=2)
    with pytest.raises(ValueError, match="uint8"):
        images.grid(faces.astype(float), cols=2)
    uri = images.save_grid(faces, str(tmp_path / "g.png"), cols=3, rows=2)
    np.testing.assert_array_equal(np.asarray(Image.open(uri)), sheet)
