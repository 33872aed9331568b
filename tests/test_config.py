"""Config loading: YAML + dotted overrides; errors name the key before any work."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from facesynth.config import ConfigError, find_config, load_config, save_resolved
from synthgen.generate import GenerateJob as RenderJob
from tests.conftest import ROOT


def test_preset_plus_overrides_are_typed(tmp_path):
    cfg = load_config(
        RenderJob,
        "render-quickstart",
        [
            "output=s3://bucket/run",
            "identities.count=7",
            "generator.nuisance.yaw_range=[-5, 5]",
            "stage.num_gpus=1",
            "generator.preview_styles=[photo]",
        ],
    )
    assert cfg.output == "s3://bucket/run" and cfg.identities.count == 7
    assert cfg.generator.nuisance.yaw_range == (-5.0, 5.0) and cfg.stage.num_gpus == 1.0
    assert cfg.generator.preview_styles == ["photo"]
    uri = save_resolved(cfg, str(tmp_path))
    again = load_config(RenderJob, uri)
    assert again == cfg


@pytest.mark.parametrize(
    ("override", "key", "why"),
    [
        ("identities.cuont=3", "identities.cuont", "unknown key"),
        ("bogus=1", "bogus", "unknown key"),
        ("identities.count=-4", "identities.count", "greater than or equal to 1"),
        ("identities.count=many", "identities.count", "valid integer"),
        ("identities.count=true", "identities.count", "expected a number, not a boolean"),
        ("stage.num_gpus=false", "stage.num_gpus", "expected a number, not a boolean"),
        (
            "generator.nuisance.yaw_range=[true, 5]",
            "generator.procedural.nuisance.yaw_range.0",
            "not a boolean",
        ),
        ("ray.num_cpus=true", "ray.num_cpus", "expected a number, not a boolean"),
        ("stage.batch_size=0", "stage.batch_size", "greater than or equal to 1"),
        ("generator.style=cartoon", "generator.procedural.style", "pattern"),
        ("generator.size=512", "generator.procedural.size", "less than or equal to 128"),
        (
            "generator.nuisance.yaw_range=[30, -30]",
            "generator.procedural.nuisance",
            "yaw_range: low 30.0 is above high",
        ),
    ],
)
def test_errors_name_the_key(override, key, why):
    with pytest.raises(ConfigError) as err:
        load_config(RenderJob, "render-quickstart", [override])
    assert f"  {key}: " in str(err.value) and why in str(err.value)


def test_missing_required_and_bad_override_syntax(tmp_path):
    with pytest.raises(ConfigError, match="output: Field required"):
        load_config(
            RenderJob,
            None,
            ["identities.count=1", "identities.samples_per_identity=1", "generator.kind=procedural"],
        )
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(RenderJob, "render-quickstart", ["identities.count"])
    with pytest.raises(ConfigError, match="identities.count is not a section"):
        load_config(RenderJob, "render-quickstart", ["identities.count.x=1"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(RenderJob, bad)
    with pytest.raises(ConfigError, match="known presets: .*render-quickstart"):
        find_config("no-such-preset")


def test_job_cli_fails_before_any_work(tmp_path):
    out = tmp_path / "never"
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.render", f"output={out}", "identities.count=0"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 2
    assert "identities.count: Input should be greater than or equal to 1" in proc.stderr
    assert not out.exists()


def test_every_preset_validates():
    import glob
    import os

    jobs = {"render": RenderJob}
    for path in sorted(glob.glob(os.path.join(ROOT, "configs", "render-*.yaml"))):
        load_config(jobs["render"], path)
        assert yaml.safe_load(open(path))
