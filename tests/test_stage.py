"""The Ray Data generation stage: same bytes as the plain loop, GPU actors scheduled, resumable."""

from __future__ import annotations

import functools
import io

import numpy as np
import pytest
from PIL import Image

from facesynth import manifest, shards
from synthgen.stage import StageConfig, encode_images, run_plain, run_ray
from tests.gen_fixtures import make_noise

UNITS = shards.plan_units(12, 4, 2)


def shas(uri):
    return {k: v["sha256"] for k, v in manifest.load(uri).shards.items()}


def test_ray_pipeline_equals_plain_loop_with_gpu_actors(ray_local, tmp_path):
    factory = functools.partial(make_noise, 16)
    plain = run_plain(UNITS, factory, str(tmp_path / "plain"), base_seed=3, cfg=StageConfig(batch_size=5))
    cfg = StageConfig(batch_size=5, units_per_call=2, num_gpus=1, num_cpus=0.5, min_actors=1, max_actors=2)
    result = run_ray(UNITS, factory, str(tmp_path / "ray"), base_seed=3, cfg=cfg)
    assert (plain.images, result.images, result.committed_now) == (48, 48, 6)
    assert shas(tmp_path / "ray") == shas(tmp_path / "plain")
    assert shards.verify(str(tmp_path / "ray")) == []


def test_ray_rerun_generates_only_missing_units(ray_local, tmp_path):
    uri = str(tmp_path / "ds")
    factory = functools.partial(make_noise, 16)
    run_plain(UNITS[:2], factory, uri, base_seed=3, cfg=StageConfig())
    result = run_ray(UNITS, factory, uri, base_seed=3, cfg=StageConfig(batch_size=8))
    assert (result.committed_before, result.committed_now, result.images) == (2, 4, 32)
    assert manifest.load(uri).complete
    rows = list(shards.iter_rows(uri, columns=["identity", "sample"]))
    assert len(rows) == 48 and len({(r["identity"], r["sample"]) for r in rows}) == 48


def test_generator_with_wrong_output_fails_clearly(tmp_path):
    class Broken:
        name, domain = "broken", "render"

        def generate(self, identities, samples, seeds):
            out = make_noise(16).generate(identities, samples, seeds)
            out.images = out.images[:1]
            return out

    with pytest.raises(ValueError, match="generator broken: expected uint8 images"):
        run_plain(UNITS[:1], Broken, str(tmp_path / "x"), base_seed=0, cfg=StageConfig())
    with pytest.raises(FileNotFoundError):
        shards.committed_files(str(tmp_path / "x"))


def test_read_dataset_sees_committed_shards_only(ray_local, tmp_path):
    uri = str(tmp_path / "ds")
    run_plain(UNITS[:3], functools.partial(make_noise, 16), uri, base_seed=3, cfg=StageConfig())
    # an uncommitted shard of a killed writer, sitting where a glob would find it
    (tmp_path / "ds" / "shards" / "part-00005.parquet").write_bytes(
        (tmp_path / "ds" / "shards" / "part-00000.parquet").read_bytes()
    )
    ds = shards.read_dataset(uri, columns=["identity", "sample", "seed"])
    rows = sorted((r["identity"], r["sample"]) for r in ds.iter_rows())
    assert rows == [(i, s) for i in range(6) for s in range(4)]


def test_cli_info_reports_counts(tmp_path):
    import json
    import subprocess
    import sys

    from tests.conftest import ROOT

    uri = str(tmp_path / "ds")
    run_plain(UNITS, functools.partial(make_noise, 16), uri, base_seed=3, cfg=StageConfig())
    out = subprocess.run(
        [sys.executable, "-m", "facesynth.cli", "dataset", "info", uri],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    info = json.loads(out.stdout)
    assert (info["rows"], info["shards"], info["identities"], info["complete"]) == (48, 6, 12, True)
    assert info["images_per_identity"] == {"min": 4, "mean": 4.0, "max": 4}
    assert info["generator"] == {"noise": 48}
    help_text = subprocess.run(
        [sys.executable, "-m", "facesynth.cli", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    ).stdout
    assert "dataset" in help_text


def test_encode_images_png_is_lossless_at_every_level_and_jpeg_is_close():
    rng = np.random.default_rng(0)
    images = (rng.random((3, 40, 32, 3)) * 12 + np.linspace(0, 240, 32)[:, None]).astype(np.uint8)
    sizes = {}
    for level in (0, 1, 9):
        data = encode_images(images, "png", png_compression=level)
        decoded = np.stack([np.asarray(Image.open(io.BytesIO(d)).convert("RGB")) for d in data])
        assert np.array_equal(decoded, images)  # RGB order kept, nothing lost
        assert data == encode_images(images, "png", png_compression=level)  # deterministic bytes
        sizes[level] = sum(map(len, data))
    assert sizes[0] > sizes[1] >= sizes[9]
    jpeg = encode_images(images, "jpeg", jpeg_quality=95)
    decoded = np.stack([np.asarray(Image.open(io.BytesIO(d)).convert("RGB")) for d in jpeg]).astype(int)
    assert Image.open(io.BytesIO(jpeg[0])).format == "JPEG"
    assert 0 < np.abs(decoded - images).mean() < 4  # measured 2.7 (grain is what JPEG loses)
