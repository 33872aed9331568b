"""Procedural face renderer: determinism, identity signal, sizes, styles, overrides and the PNG grid."""

from __future__ import annotations

import json

import numpy as np
import pytest

from synthgen.procedural import NuisanceConfig, apply_overrides, render_faces
from synthgen.procedural import face as face_module

CLEAN = {"jpeg": False, "blur_sigma": 0.0, "noise_sigma": 0.0}  # no camera degradations
SMALL_NUISANCE = {
    **CLEAN,
    "yaw_range": (-4, 4),
    "pitch_range": (-3, 3),
    "roll_range": (-3, 3),
    "scale_range": (0.98, 1.02),
    "shift_range": (-0.01, 0.01),
    "light_azimuth_range": (-10, 10),
    "light_elevation_range": (10, 20),
    "light_intensity_range": (0.55, 0.6),
    "ambient_range": (0.55, 0.6),
    "light_warmth": 0.0,
    "glasses": False,
    "hat": False,
    "hand": False,
    "mouth_open": 0.0,
    "age_range": (0.0, 0.05),
    "smile_range": (0.0, 0.2),
    "eye_closure_range": (0.0, 0.1),
    "brow_raise_range": (0.0, 0.1),
}
EXTREME = NuisanceConfig(  # every layer and pose corner, to catch clipped feature boxes
    yaw_range=(-89, 89),
    pitch_range=(-40, 40),
    roll_range=(-45, 45),
    scale_range=(0.5, 1.5),
    shift_range=(-0.2, 0.2),
    glasses_prob=0.5,
    hat_prob=0.3,
    hand_prob=0.3,
    mouth_open_prob=0.5,
    age_range=(0.0, 1.0),
    smile_range=(-1.0, 1.0),
    brow_raise_range=(0.0, 1.0),
)


@pytest.mark.parametrize("style", ["render", "photo"])
def test_same_seeds_give_byte_identical_images_whatever_the_batch(style):
    ids, samples = np.array([3, 3, 9, 1, 4, 4, 4, 7, 2, 5]), np.arange(10) + 100
    first = render_faces(ids, samples, style=style, size=48)
    again = render_faces(ids, samples, style=style, size=48)
    assert first.images.dtype == np.uint8 and first.images.shape == (10, 48, 48, 3)
    assert np.array_equal(first.images, again.images)
    assert first.params == again.params
    reversed_ = render_faces(ids[::-1], samples[::-1], style=style, size=48)
    assert np.array_equal(reversed_.images[::-1], first.images)
    alone = render_faces(ids[4:5], samples[4:5], style=style, size=48)
    assert np.array_equal(alone.images[0], first.images[4])


@pytest.mark.parametrize("style", ["render", "photo"])
def test_feature_boxes_never_clip_features(monkeypatch, style):
    """Features are evaluated inside per-chunk pixel boxes; with boxes as large as the image nothing changes."""
    ids, samples = np.arange(120) % 23, np.arange(120) * 7 + 1
    boxed = render_faces(ids, samples, style=style, size=64, nuisance=EXTREME).images
    monkeypatch.setattr(face_module, "BAND_MARGIN_PX", 10_000.0)
    full = render_faces(ids, samples, style=style, size=64, nuisance=EXTREME).images
    assert np.array_equal(boxed, full)


def _face_crop(images: np.ndarray) -> np.ndarray:
    s = images.shape[1]
    return images[:, s // 4 : 3 * s // 4, s // 4 : 3 * s // 4].astype(np.float64)


@pytest.mark.parametrize("style", ["render", "photo"])
def test_identities_differ_more_than_samples_of_one_identity(style):
    n_id, n_s = 10, 3
    ids, samples = np.repeat(np.arange(n_id), n_s), np.tile(np.arange(n_s), n_id)
    batch = render_faces(ids, samples, style=style, size=64, overrides=SMALL_NUISANCE)
    face = _face_crop(batch.images).reshape(n_id, n_s, -1)
    within = np.mean(
        [np.abs(face[i, a] - face[i, b]).mean() for i in range(n_id) for a, b in ((0, 1), (0, 2), (1, 2))]
    )
    between = np.mean(
        [np.abs(face[i, 0] - face[j, 0]).mean() for i in range(n_id) for j in range(i + 1, n_id)]
    )
    assert between > 2.0 * within > 0.0  # measured: ratio ~4 for both styles
    # identity parameters are a function of the identity seed alone
    per_identity = [json.dumps(p["identity"], sort_keys=True) for p in batch.params]
    assert len(set(per_identity)) == n_id
    assert all(per_identity[i * n_s] == per_identity[i * n_s + k] for i in range(n_id) for k in range(n_s))


@pytest.mark.parametrize("size", [32, 64, 112, 128])
def test_supported_sizes(size):
    batch = render_faces(np.array([0, 1]), np.array([0, 1]), size=size)
    assert batch.images.shape == (2, size, size, 3) and batch.images.dtype == np.uint8
    assert all(p["size"] == size for p in batch.params)


@pytest.mark.parametrize("size", [31, 129, 0, 112.0, "112", True])
def test_unsupported_size_is_a_clear_error(size):
    with pytest.raises(ValueError, match=r"size=.*expected an integer from 32 to 128"):
        render_faces(np.array([0]), np.array([0]), size=size)


def test_unknown_style_is_a_clear_error():
    with pytest.raises(ValueError, match=r"unknown style 'cartoon': expected one of \['photo', 'render'\]"):
        render_faces(np.array([0]), np.array([0]), style="cartoon")


@pytest.mark.parametrize(
    ("ids", "samples", "message"),
    [
        (np.array([-1]), np.array([0]), "identity_seeds: expected non-negative"),
        (np.array([0.5]), np.array([0]), "identity_seeds: expected a 1-D array of non-negative integers"),
        (np.array([[0]]), np.array([0]), "identity_seeds: expected a 1-D array"),
        (np.array([0, 1]), np.array([0]), "identity_seeds has 2 entries but sample_seeds has 1"),
    ],
)
def test_bad_seeds_are_clear_errors(ids, samples, message):
    with pytest.raises(ValueError, match=message):
        render_faces(ids, samples)


def test_styles_differ_and_photo_is_textured():
    ids = np.arange(6)
    render = render_faces(ids, ids, style="render", size=112, overrides=CLEAN).images
    photo = render_faces(ids, ids, style="photo", size=112, overrides=CLEAN).images
    assert np.abs(render.astype(int) - photo).mean() > 5.0
    colours = [
        [len(np.unique(image.reshape(-1, 3), axis=0)) for image in images] for images in (render, photo)
    ]
    # flat cel shading gives a few hundred colours (measured 425-800); textured soft light thousands (8k-11k)
    assert max(colours[0]) < 1500 < 4000 < min(colours[1])


def test_fixing_one_factor_leaves_every_other_draw_unchanged():
    ids, samples = np.arange(8), np.arange(8)
    free = render_faces(ids, samples, size=48)
    frontal = render_faces(ids, samples, size=48, overrides={"yaw": 0.0})
    turned = render_faces(ids, samples, size=48, overrides={"yaw_range": (60.0, 80.0)})
    assert [p["nuisance"]["yaw"] for p in frontal.params] == [0.0] * 8
    assert all(60.0 <= p["nuisance"]["yaw"] <= 80.0 for p in turned.params)
    for batch in (frontal, turned):
        for p, q in zip(batch.params, free.params):
            assert p["identity"] == q["identity"]
            assert {k: v for k, v in p["nuisance"].items() if k != "yaw"} == {
                k: v for k, v in q["nuisance"].items() if k != "yaw"
            }
    assert [
        p["nuisance"]["glasses"]
        for p in render_faces(ids, samples, size=48, overrides={"glasses": True}).params
    ] == [True] * 8


def test_frontal_faces_are_mirror_symmetric_and_profiles_are_not():
    ids = np.arange(6)
    still = {**SMALL_NUISANCE, "roll": 0.0, "pitch": 0.0, "shift": 0.0, "light_azimuth": 0.0, "scale": 1.0}

    def asymmetry(yaw: float) -> float:
        faces = _face_crop(render_faces(ids, ids, size=64, overrides={**still, "yaw": yaw}).images)
        return float(np.abs(faces - faces[:, :, ::-1]).mean())

    frontal, profile = asymmetry(0.0), asymmetry(70.0)
    assert profile > 3.0 * frontal
    left = _face_crop(render_faces(ids, ids, size=64, overrides={**still, "yaw": -70.0}).images)
    right = _face_crop(render_faces(ids, ids, size=64, overrides={**still, "yaw": 70.0}).images)
    assert np.abs(left - right).mean() > np.abs(left - right[:, :, ::-1]).mean()  # turning is mirrored


def test_bad_overrides_are_clear_errors():
    with pytest.raises(ValueError, match="unknown nuisance override 'tilt': expected one of"):
        render_faces(np.array([0]), np.array([0]), overrides={"tilt": 3.0})
    with pytest.raises(ValueError, match=r"yaw_range\.0\s+Input should be less than or equal to 90"):
        render_faces(np.array([0]), np.array([0]), overrides={"yaw": 120.0})
    with pytest.raises(ValueError, match="override 'glasses'=0.5: expected True or False"):
        render_faces(np.array([0]), np.array([0]), overrides={"glasses": 0.5})
    with pytest.raises(
        ValueError, match=r"override 'mouth_open'=False: expected a number \(it fixes mouth_open_range\)"
    ):
        render_faces(np.array([0]), np.array([0]), overrides={"mouth_open": False})


def test_nuisance_config_rejects_impossible_ranges_by_name():
    with pytest.raises(ValueError, match=r"pitch_range: low 10.0 is above high -10.0"):
        NuisanceConfig(pitch_range=(10, -10))
    with pytest.raises(ValueError, match=r"jpeg_prob\s+Input should be less than or equal to 1"):
        NuisanceConfig(jpeg_prob=1.5)
    with pytest.raises(ValueError, match=r"shear_range\s+Extra inputs are not permitted"):
        NuisanceConfig(shear_range=(0, 1))
    assert apply_overrides(NuisanceConfig(), {"age": 0.9}).age_range == (0.9, 0.9)


def test_age_change_greys_hair_and_is_recorded():
    ids = np.arange(6)
    young = render_faces(ids, ids, size=64, overrides={**CLEAN, "age": 0.0})
    old = render_faces(ids, ids, size=64, overrides={**CLEAN, "age": 1.0})
    assert [p["nuisance"]["age"] for p in old.params] == [1.0] * 6
    saturation = [float(np.mean(b.images.max(-1).astype(int) - b.images.min(-1))) for b in (young, old)]
    assert saturation[1] < saturation[0]  # grey hair and paler skin


def test_params_are_json_serialisable_and_complete():
    batch = render_faces(np.array([5, 6]), np.array([10, 11]), style="photo", size=32)
    text = json.dumps(batch.params)
    params = json.loads(text)
    assert [(p["identity_seed"], p["sample_seed"], p["style"], p["size"]) for p in params] == [
        (5, 10, "photo", 32),
        (6, 11, "photo", 32),
    ]
    assert params[0]["identity"]["hair_style"] in {"bald", "buzz", "short", "medium", "long"}
    assert params[0]["nuisance"]["background"] in {"flat", "gradient", "texture"}
    assert set(params[0]["nuisance"]) >= {
        "yaw",
        "pitch",
        "roll",
        "age",
        "jpeg_quality",
        "blur_sigma",
        "glasses",
    }
