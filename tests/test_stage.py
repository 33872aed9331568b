"""The Ray Data generation stage: same bytes as the plain loop, GPU actors scheduled, resumable."""

from __future__ import annotations

import functools

import pytest

from facesynth import manifest, shards
from synthgen.stage import StageConfig, run_plain, run_ray
from tests.gen_fixtures import SETTINGS, make_noise

UNITS = shards.plan_units(12, 4, 2)


def shas(uri):
    return {k: v["sha256"] for k, v in manifest.load(uri).shards.items()}


def test_ray_pipeline_equals_plain_loop_with_gpu_actors(ray_local, tmp_path):
    factory = functools.partial(make_noise, 16)
    plain = run_plain(
        UNITS, factory, str(tmp_path / "plain"), base_seed=3, cfg=StageConfig(batch_size=5), settings=SETTINGS
    )
    cfg = StageConfig(batch_size=5, units_per_call=2, num_gpus=1, num_cpus=0.5, min_actors=1, max_actors=2)
    result = run_ray(UNITS, factory, str(tmp_path / "ray"), base_seed=3, cfg=cfg, settings=SETTINGS)
    assert (plain.images, result.images, result.committed_now) == (48, 48, 6)
    assert shas(tmp_path / "ray") == shas(tmp_path / "plain")
    assert shards.verify(str(tmp_path / "ray")) == []


def test_ray_rerun_generates_only_missing_units(ray_local, tmp_path):
    uri = str(tmp_path / "ds")
    factory = functools.partial(make_noise, 16)
    run_plain(UNITS, factory, uri, base_seed=3, cfg=StageConfig(), settings=SETTINGS)
    reference = shas(uri)
    plan = manifest.load(uri).plan
    manifest.uncommit(uri, [2, 3, 4, 5], plan)  # as if killed after two commits
    result = run_ray(UNITS, factory, uri, base_seed=3, cfg=StageConfig(batch_size=8), settings=SETTINGS)
    assert (result.committed_before, result.committed_now, result.images) == (2, 4, 32)
    assert manifest.load(uri).complete and shas(uri) == reference
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
        run_plain(UNITS[:1], Broken, str(tmp_path / "x"), base_seed=0, cfg=StageConfig(), settings={})
    with pytest.raises(FileNotFoundError):
        shards.committed_shards(str(tmp_path / "x"))


def test_read_dataset_sees_committed_shards_only(ray_local, tmp_path):
    uri = str(tmp_path / "ds")
    run_plain(UNITS[:3], functools.partial(make_noise, 16), uri, base_seed=3, cfg=StageConfig(), settings={})
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
    run_plain(UNITS, functools.partial(make_noise, 16), uri, base_seed=3, cfg=StageConfig(), settings={})
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


def test_read_dataset_refuses_a_damaged_shard_naming_it(ray_local, tmp_path):
    uri = str(tmp_path / "ds")
    run_plain(UNITS[:3], functools.partial(make_noise, 16), uri, base_seed=3, cfg=StageConfig(), settings={})
    path = tmp_path / "ds" / shards.shard_file(1)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(Exception, match=r"part-00001.parquet: sha256 .* does not match") as info:
        shards.read_dataset(uri, columns=["identity"]).materialize()
    assert isinstance(info.value, shards.CorruptShard) or "CorruptShard" in str(info.value)
