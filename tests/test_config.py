"""Config loading: YAML + dotted overrides; errors name the key before any work."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from facesynth.config import ConfigError, find_config, load_config, save_resolved
from jobs.render import RenderJob
from tests.conftest import ROOT


def test_preset_plus_overrides_are_typed(tmp_path):
    cfg = load_config(
        RenderJob,
        "render-quickstart",
        [
            "output=s3://bucket/run",
            "identities.count=7",
            "renderer.nuisance.yaw_range=[-5, 5]",
            "stage.num_gpus=1",
            "grid.styles=[photo]",
        ],
    )
    assert cfg.output == "s3://bucket/run" and cfg.identities.count == 7
    assert cfg.renderer.nuisance.yaw_range == (-5.0, 5.0) and cfg.stage.num_gpus == 1.0
    assert cfg.grid.styles == ["photo"]
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
        ("stage.batch_size=0", "stage.batch_size", "greater than or equal to 1"),
        ("renderer.style=cartoon", "renderer.style", "pattern"),
        ("renderer.size=512", "renderer.size", "less than or equal to 128"),
        ("renderer.nuisance.yaw_range=[30, -30]", "renderer.nuisance", "yaw_range: low 30.0 is above high"),
    ],
)
def test_errors_name_the_key(override, key, why):
    with pytest.raises(ConfigError) as err:
        load_config(RenderJob, "render-quickstart", [override])
    assert f"  {key}: " in str(err.value) and why in str(err.value)


def test_missing_required_and_bad_override_syntax(tmp_path):
    with pytest.raises(ConfigError, match="output: Field required"):
        load_config(RenderJob, None, ["identities.count=1", "identities.samples_per_identity=1"])
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

    from jobs.render import RenderJob as Render

    jobs = {"render": Render}
    for path in sorted(glob.glob(os.path.join(ROOT, "configs", "render-*.yaml"))):
        load_config(jobs["render"], path)
        assert yaml.safe_load(open(path))
