"""Real photos through decode, Haar detection, cropping and the verification .bin writer/reader."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from facesynth.binsets import decode_images, read_bin, write_bin
from facesynth.images import decode as decode_rgb
from synthgen.ingest.faces import FaceCropConfig, crop_face, detect_faces, extract_faces
from tests.fetch_real_faces import PhotosUnavailable, fetch_real_faces


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _iou(a: tuple[int, ...], b: tuple[int, ...]) -> float:
    ix = max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


@pytest.fixture(scope="module")
def photos() -> dict:
    try:
        return fetch_real_faces()
    except PhotosUnavailable as exc:
        pytest.skip(f"real face photos unavailable: {exc}")


@pytest.fixture(scope="module")
def crops(photos) -> dict:
    """The largest face of every photo: ``{(person, k): FaceCrop}``."""
    cfg = FaceCropConfig(strict=True, max_faces=1)
    return {
        (person, k): extract_faces(path.read_bytes(), cfg, source=str(path))[0]
        for person, paths in photos.items()
        for k, path in enumerate(paths)
    }


def test_fetch_finds_two_people(photos):
    assert sorted(photos) == ["biden", "obama"]
    assert len(photos["biden"]) >= 1 and len(photos["obama"]) >= 2


def test_faces_found_and_cropped(photos, crops):
    for (person, k), face in crops.items():
        image = decode_rgb(photos[person][k].read_bytes(), "photo")
        x, y, w, h = face.box
        assert face.image.shape == (112, 112, 3) and face.image.dtype == np.uint8
        assert 0 <= x and 0 <= y and x + w <= image.shape[1] and y + h <= image.shape[0]
        assert w * h >= 0.01 * image.shape[0] * image.shape[1], f"{person}{k}: face box {face.box} too small"
        # detecting on the downscaled copy finds the same face as on the full photo
        full = detect_faces(image, FaceCropConfig(detect_max_side=max(image.shape[:2])))
        assert max(_iou(face.box, b) for b in full) > 0.6


def test_pair_set_round_trip(crops, tmp_path):
    obama = [face.image for (person, _), face in sorted(crops.items()) if person == "obama"]
    biden = crops["biden", 0].image
    pairs = [
        (obama[0], obama[1], True),
        (obama[0], biden, False),
        (obama[-1], obama[0], True),
        (biden, obama[1], False),
    ]
    images = np.stack([im for a, b, _ in pairs for im in (a, b)])
    bins, issame = [_png(im) for im in images], [same for *_, same in pairs]
    write_bin(str(tmp_path / "real.bin"), bins, issame)
    got_bins, got_issame = read_bin(str(tmp_path / "real.bin"))
    assert got_bins == bins and got_issame.tolist() == [True, False, True, False]
    np.testing.assert_array_equal(decode_images(got_bins), images)


def test_no_face_strict_and_lenient():
    blank = _png(np.full((200, 200, 3), 128, dtype=np.uint8))
    assert extract_faces(blank, FaceCropConfig()) == []
    with pytest.raises(ValueError, match=r"blank\.png: no face found \(Haar cascade, min_face=40px"):
        extract_faces(blank, FaceCropConfig(strict=True), source="blank.png")
    with pytest.raises(ValueError, match=r"a\.jpg: not a decodable image"):
        extract_faces(b"not a photo", FaceCropConfig(), source="a.jpg")


def test_crop_geometry_exact():
    image = np.random.default_rng(0).integers(0, 256, size=(150, 200, 3), dtype=np.uint8)
    # box side 56, margin 0.5 -> square side 112 centred on the box: a plain slice, no resize
    np.testing.assert_array_equal(crop_face(image, (40, 40, 56, 56), 112, 0.5), image[12:124, 12:124])
    corner = crop_face(image, (0, 0, 56, 56), 112, 0.5)  # starts 28 px above and left of the photo
    assert not corner[:28].any() and not corner[:, :28].any()
    np.testing.assert_array_equal(corner[28:, 28:], image[:84, :84])
    half = crop_face(image, (40, 40, 56, 56), 56, 0.5)  # 112 -> 56: 2x2 area average, rounded half up
    block_mean = image[12:124, 12:124].reshape(56, 2, 56, 2, 3).astype(np.float64).mean(axis=(1, 3))
    np.testing.assert_array_equal(half, np.floor(block_mean + 0.5))


def test_config_rejects_impossible_values():
    with pytest.raises(ValidationError, match="margin"):
        FaceCropConfig(margin=2.0)
    with pytest.raises(ValidationError, match="size"):
        FaceCropConfig(size=8)


def test_unreachable_registry_is_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    with pytest.raises(PhotosUnavailable, match=r"pip download face_recognition==1\.3\.0 failed"):
        fetch_real_faces(tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing half-fetched is left in the cache
