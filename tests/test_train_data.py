"""Training data and settings without Ray: sources, mixing, labels, augmentation, schedules, input errors."""

from __future__ import annotations

import io
import math
import os
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import TypeAdapter

from facesynth import shards
from facesynth.config import ConfigError, load_config
from facesynth.images import decode as decode_rgb
from recog.data_sources import write_recordio
from recog.train import data as train_data
from recog.train.augment import AugmentList, augment_image, row_rng
from recog.train.config import DataConfig, OptimConfig, TrainFRJob
from recog.train.data import (
    LabelMap,
    TrainingData,
    epoch_extra_keys,
    epoch_quotas,
    inspect_data,
    steps_per_epoch,
)
from recog.train.optim import build_optimizer, build_scheduler, lr_factor
from recog.train.trainer import run as train_fr
from tests.test_train_fixtures import tiny_config, write_faces

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    """Two shard datasets: A = 4 identities x 4 samples, B = 2 identities x 4 samples (32 px)."""
    root = tmp_path_factory.mktemp("faces")
    return write_faces(str(root / "a"), 4, 4), write_faces(str(root / "b"), 2, 4, seed=2)


def _stream(sources, labels, cfg: DataConfig, epochs: int, seed: int = 0) -> list[dict]:
    """Run the Ray Data UDF by hand over one worker's plan, batch 1: every row of ``epochs`` epochs in order."""
    data = TrainingData.plan(sources, labels, cfg, input_size=32, seed=seed, epochs=epochs)
    rows = sum(data.quotas)
    out = []
    for item in data.rank_windows(rank=0, world=1, batch_size=1, start_step=0, stop_step=epochs * rows):
        for part in data.read_window(item):
            out += [
                {
                    "epoch": item["epoch"],
                    "source": int(lb >= labels.offsets[-1]),
                    "image": im,
                    "label": int(lb),
                }
                for im, lb in zip(part["image"], part["label"], strict=True)
            ]
    return out


def test_lr_schedule_matches_the_formulas():
    cos = OptimConfig(lr=0.2, schedule="cosine", warmup_steps=4, min_lr_ratio=0.1)
    assert [lr_factor(s, cos, 14) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    for s in (4, 9, 13):
        t = (s - 4) / 10
        assert lr_factor(s, cos, 14) == pytest.approx(0.1 + 0.9 * (1 + math.cos(math.pi * t)) / 2, abs=1e-12)
    step = OptimConfig(schedule="step", milestones=[5, 8], gamma=0.1)
    assert [lr_factor(s, step, 10) for s in (0, 4, 5, 7, 8, 9)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    assert lr_factor(7, OptimConfig(schedule="constant"), 10) == 1.0
    model = torch.nn.Linear(2, 2)
    opt = build_optimizer(model.parameters(), cos)
    sched = build_scheduler(opt, cos, 14)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.2 * lr_factor(s, cos, 14) for s in range(6)])
    assert isinstance(build_optimizer(model.parameters(), OptimConfig(name="adamw")), torch.optim.AdamW)


def test_epoch_quotas_use_largest_remainders():
    assert epoch_quotas([100, 50], [0.7, 0.3], None) == [105, 45]
    assert epoch_quotas([3, 3, 3], [1, 1, 1], 10) == [4, 3, 3]
    assert epoch_quotas([16, 8], [0.25, 0.75], 24) == [6, 18]
    keys = np.arange(100, 110)
    drawn = epoch_extra_keys(keys, 4, seed=0, epoch=1, source=0)
    assert len(set(drawn.tolist())) == 4 and set(drawn.tolist()) <= set(keys.tolist())
    np.testing.assert_array_equal(drawn, epoch_extra_keys(keys, 4, seed=0, epoch=1, source=0))


def test_mixing_gives_exact_per_epoch_ratios_and_unaugmented_pixels(faces):
    cfg = DataConfig(
        datasets=[{"uri": faces[0], "weight": 0.25}, {"uri": faces[1], "weight": 0.75}],
        epoch_rows=24,
        augment=[],
    )
    sources, labels = inspect_data(cfg, 32)
    assert labels.num_classes == 6 and [s.rows for s in sources] == [16, 8]
    rows = _stream(sources, labels, cfg, epochs=2)
    for epoch in (0, 1):
        per_source = Counter(r["source"] for r in rows if r["epoch"] == epoch)
        assert per_source == {0: 6, 1: 18}
        # B (8 rows, quota 18): every row twice, plus 2 rows a third time
        counts = Counter(r["image"].tobytes() for r in rows if r["epoch"] == epoch and r["source"] == 1)
        assert sorted(counts.values()) == [2] * 6 + [3] * 2
    # without augmentation a row's pixels are its decoded PNG and its label its identity's class
    table = {}
    for i, uri in enumerate(faces):
        for r in shards.iter_rows(uri, columns=["image", "identity"]):
            table[decode_rgb(r["image"], "x").transpose(2, 0, 1).tobytes()] = labels.classes(
                i, np.array([r["identity"]])
            )[0]
    assert all(table[r["image"].tobytes()] == r["label"] for r in rows)
    assert steps_per_epoch(sources, cfg, num_workers=2, batch_size=4) == 3


def test_plain_pass_is_a_permutation_and_augmentation_differs_by_epoch(faces):
    cfg = DataConfig(datasets=[{"uri": faces[0]}], augment=[{"name": "rotate", "degrees": 30}])
    sources, labels = inspect_data(cfg, 32)
    rows = _stream(sources, labels, cfg, epochs=2)
    assert len(rows) == 32
    assert [Counter(r["label"] for r in rows if r["epoch"] == e) for e in (0, 1)] == [
        {0: 4, 1: 4, 2: 4, 3: 4}
    ] * 2
    again = _stream(sources, labels, cfg, epochs=2)
    assert all(np.array_equal(a["image"], b["image"]) for a, b in zip(rows, again, strict=True))
    first = {r["image"].tobytes() for r in rows if r["epoch"] == 0}
    assert not first & {r["image"].tobytes() for r in rows if r["epoch"] == 1}


def test_label_spaces_and_their_json_round_trip(faces):
    sources, per = inspect_data(DataConfig(datasets=[{"uri": faces[0]}, {"uri": faces[1]}]), 32)
    np.testing.assert_array_equal(per.classes(1, np.array([1, 0])), [5, 4])
    _, shared = inspect_data(
        DataConfig(datasets=[{"uri": faces[0]}, {"uri": faces[1]}], label_space="shared"), 32
    )
    assert shared.num_classes == 4
    np.testing.assert_array_equal(shared.classes(1, np.array([1, 0])), [1, 0])
    for m in (per, shared):
        back = LabelMap.from_json(m.to_json([faces[0], faces[1]]))
        assert back.num_classes == m.num_classes
        np.testing.assert_array_equal(back.classes(1, np.array([1])), m.classes(1, np.array([1])))
    with pytest.raises(ValueError, match="identity 7 is not in the label map"):
        per.classes(0, np.array([7]))


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def test_image_folder_and_recordio_sources(tmp_path):
    rng = np.random.default_rng(0)
    images = {(label, k): rng.integers(0, 256, (32, 32, 3), np.uint8) for label in range(2) for k in range(3)}
    for (label, k), image in images.items():
        os.makedirs(tmp_path / "folder" / f"person{label}", exist_ok=True)
        (tmp_path / "folder" / f"person{label}" / f"{k}.png").write_bytes(_png(image))
    write_recordio(
        str(tmp_path / "train.rec"),
        str(tmp_path / "train.idx"),
        [(_png(im), label) for (label, _), im in images.items()],
    )
    cfg = DataConfig(
        datasets=[
            {"uri": str(tmp_path / "folder"), "kind": "folder"},
            {"uri": str(tmp_path / "train.rec"), "kind": "recordio"},
        ],
        augment=[],
    )
    sources, labels = inspect_data(cfg, 32)
    assert [s.rows for s in sources] == [6, 6] and labels.num_classes == 4
    rows = _stream(sources, labels, cfg, epochs=1)
    expected = {
        (i * 2 + label, im.transpose(2, 0, 1).tobytes())
        for i in range(2)
        for (label, _), im in images.items()
    }
    assert len(rows) == 12 and {(r["label"], r["image"].tobytes()) for r in rows} == expected


def test_augmentations_follow_their_definitions():
    image = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (3, 16, 16), np.uint8))
    augs = TypeAdapter(AugmentList).validate_python(
        [{"name": "flip", "p": 1.0}, {"name": "crop", "scale": [1, 1], "ratio": [1, 1]}]
    )
    assert torch.equal(augment_image(image, augs, row_rng(0, 0, 1, 0)), image.flip(-1))
    grey = augment_image(
        image, TypeAdapter(AugmentList).validate_python([{"name": "grayscale", "p": 1}]), row_rng(0, 0, 1, 0)
    )
    formula = (0.2989 * image[0] + 0.587 * image[1] + 0.114 * image[2]).float()
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])
    assert (grey[0].float() - formula).abs().max() <= 1.0
    # grayscale p=0.3: the fraction of grey rows over many row streams
    g = TypeAdapter(AugmentList).validate_python([{"name": "grayscale"}])
    hits = sum(torch.equal(*augment_image(image, g, row_rng(0, 0, k, 0))[:2]) for k in range(2000))
    assert abs(hits / 2000 - 0.3) < 0.04
    jitter = TypeAdapter(AugmentList).validate_python([{"name": "color_jitter"}, {"name": "rotate"}])
    a, b = (augment_image(image, jitter, row_rng(5, e, 9, 0)) for e in (0, 0))
    assert torch.equal(a, b) and not torch.equal(a, augment_image(image, jitter, row_rng(5, 1, 9, 0)))


def test_config_names_the_bad_key():
    base = ["output=/tmp/x", "data.datasets=[{uri: /tmp/d}]", "train.steps=10"]
    cases = {
        "model.backbone=iresnet7": "model.backbone",
        "model.head=sphereface": "model.head",
        "optim.name=lamb": "optim.name",
        "data.augment=[{name: cutout}]": "data.augment.0",
        "data.augment=[{name: crop, scale: [0.9, 0.5]}]": "data.augment.0.crop",
        "optim.warmup_steps=10": "warmup_steps",
        "model.sample_rate=0": "model.sample_rate",
        "model.std=[0.5, 0.0, 0.5]": "model.std",
        "model.flip_fusion=max": "model.flip_fusion",
    }
    for override, key in cases.items():
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(TrainFRJob, None, [*base, override])


def test_bad_input_fails_before_training_and_writes_nothing(tmp_path, faces):
    import ray

    one = write_faces(str(tmp_path / "one"), identities=1, samples=4)
    big = write_faces(str(tmp_path / "big"), identities=2, samples=2, size=48)
    broken = write_faces(str(tmp_path / "broken"), identities=4, samples=2)
    with open(os.path.join(broken, shards.shard_file(1)), "r+b") as f:
        f.seek(-64, os.SEEK_END)
        f.write(b"\0" * 64)  # clobbers the parquet footer
    out = str(tmp_path / "out")
    cases = [
        (tiny_config(out, [one]), r"1 identity in all; .* at least 2 identities"),
        (tiny_config(out, [big]), r"images are 48x48 pixels, expected model.input_size=32"),
        (tiny_config(out, [broken]), r"shard .*part-00001.parquet is not readable parquet"),
        (
            tiny_config(out, [broken], "data.verify=sha256"),
            r"unreadable shards: shards/part-00001.parquet: sha256",
        ),
        (
            tiny_config(out, [faces[0]], "model.backbone=resnet18", "model.width=0.5"),
            r"model \('resnet18'.*width=0.5",
        ),
        (tiny_config(out, [faces[0]], "model.head=arcface", "model.m3=0.2"), r"head 'arcface' takes only"),
        (
            tiny_config(out, [faces[0]], "train.batch_size=64", "scaling.num_workers=2"),
            r"train.batch_size=64: an epoch has 16 rows",
        ),
    ]
    for cfg, message in cases:
        with pytest.raises(ValueError, match=message):
            train_fr(cfg)
    assert not os.path.exists(out) and not ray.is_initialized()


def test_a_shard_damaged_after_the_footer_check_stops_training_naming_it(tmp_path):
    uri = write_faces(str(tmp_path / "ds"), identities=4, samples=2)
    path = os.path.join(uri, shards.shard_file(1))
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF  # inside the image column: the parquet footer still reads
    open(path, "wb").write(bytes(data))
    cfg = DataConfig(datasets=[{"uri": uri}])
    sources, labels = inspect_data(cfg, 32)
    with pytest.raises(shards.CorruptShard, match=r"ds/shards/part-00001.parquet: sha256"):
        _stream(sources, labels, cfg, epochs=1)


def _batches(
    data: TrainingData, *, rank: int, world: int, start: int, stop: int, batch: int
) -> list[np.ndarray]:
    """Worker ``rank``'s decoded images of steps ``[start, stop)``, one array per step."""
    items = data.rank_windows(rank=rank, world=world, batch_size=batch, start_step=start, stop_step=stop)
    images = np.concatenate([part["image"] for item in items for part in data.read_window(item)])
    return list(images.reshape(stop - start, batch, *images.shape[1:]))


def test_workers_split_each_epoch_and_a_resume_seeks_without_decoding_earlier_rows(faces, monkeypatch):
    cfg = DataConfig(
        datasets=[{"uri": faces[0], "weight": 0.25}, {"uri": faces[1], "weight": 0.75}],
        epoch_rows=24,
        shuffle_buffer=7,
        decode_batch=3,
        augment=[{"name": "rotate"}],
    )
    sources, labels = inspect_data(cfg, 32)
    data = TrainingData.plan(sources, labels, cfg, input_size=32, seed=5, epochs=4)
    # two workers, batch 4: 3 steps per epoch each, disjoint rows that together are the epoch's first 24
    whole = _batches(data, rank=0, world=1, start=0, stop=12, batch=4)  # 6 steps an epoch, 2 epochs
    ranks = [_batches(data, rank=r, world=2, start=0, stop=6, batch=4) for r in (0, 1)]
    for epoch in (0, 1):
        steps = slice(epoch * 3, epoch * 3 + 3)
        assert np.array_equal(
            np.concatenate(ranks[0][steps] + ranks[1][steps]),
            np.concatenate(whole[2 * steps.start : 2 * steps.stop]),
        )

    uninterrupted = _batches(data, rank=1, world=2, start=0, stop=12, batch=4)
    decoded = []
    real = train_data.decode_augment
    monkeypatch.setattr(
        train_data, "decode_augment", lambda encoded, *a: decoded.append(len(encoded)) or real(encoded, *a)
    )
    for start in range(12):  # resume at any step of 4 epochs: the same batch, decoding only rows from it on
        decoded.clear()
        items = data.rank_windows(rank=1, world=2, batch_size=4, start_step=start, stop_step=12)
        parts, rows = (p["image"] for it in items for p in data.read_window(it)), []
        while sum(map(len, rows)) < 4:
            rows.append(next(parts))
        assert sum(decoded) < 4 + cfg.decode_batch  # the same for every step: no earlier row is decoded
        assert np.array_equal(np.concatenate(rows)[:4], uninterrupted[start])
