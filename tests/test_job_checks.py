"""Checks come first: output URIs, renderer styles and pair counts at config time, the output's bucket or
folder before Ray starts; expected errors are one ``error:`` line with exit code 2; ``--help`` lists every key."""

from __future__ import annotations

import importlib
import os

import pytest
import yaml

from facesynth.config import ConfigError, load_config, save_resolved
from facesynth.preflight import PreflightError, check_output_writable
from tests.conftest import ROOT
from tests.test_presets import job_models

JOBS = sorted(
    p[:-3] for p in os.listdir(os.path.join(ROOT, "jobs")) if p.endswith(".py") and p != "__init__.py"
)
# the job model of each preset family, with one preset that validates as it is
PRESET_OF = {
    "render-": "render-quickstart",
    "build-benchmark-": "build-benchmark-quickstart",
    "train-fr-": "train-fr-quickstart",
    "evaluate-": "evaluate-quickstart",
    "dataset-quality-": "dataset-quality-quickstart",
    "uiface-train-": "uiface-train-quickstart",
    "uiface-": "uiface-tiny",
    "cross-domain-": "cross-domain-quickstart",
    "pipeline-": "pipeline-calibration",
}


@pytest.mark.parametrize("prefix", list(PRESET_OF))
@pytest.mark.parametrize(
    ("output", "why"),
    [
        ("", "storage URI is empty"),
        ("/", "is the filesystem root"),
        ("file:///", "is the filesystem root"),
        ("/tmp/..", "is the filesystem root"),
        ("s3://", "has no bucket"),
        ("gs://bucket/run", "unsupported scheme 'gs'"),
        ("file://out/run", "file URI needs an absolute path"),
    ],
)
def test_every_job_refuses_bad_output_uris_when_loading(prefix, output, why):
    with pytest.raises(ConfigError) as err:
        load_config(job_models()[prefix], PRESET_OF[prefix], [f"output={output}"])
    assert "  output: " in str(err.value) and why in str(err.value)


def test_bucket_without_prefix_and_checkpoint_uri_are_output_uris():
    from recog.train.config import TrainFRJob

    assert (
        load_config(job_models()["render-"], "render-quickstart", ["output=s3://bucket"]).output
        == "s3://bucket"
    )
    with pytest.raises(ConfigError, match="  storage: .*filesystem root"):
        load_config(TrainFRJob, "train-fr-quickstart", ["storage=/"])


def test_preflight_s3_bucket_must_exist(s3_bucket):
    check_output_writable(s3_bucket)
    check_output_writable(f"{s3_bucket}/runs/one")
    with pytest.raises(
        PreflightError, match=r"s3://no-such-bucket-9f3: bucket does not exist or is not reachable \("
    ):
        check_output_writable("s3://no-such-bucket-9f3/runs/one")


def test_preflight_local_parent_must_be_a_writable_folder(tmp_path):
    check_output_writable(str(tmp_path / "new" / "deeper"))
    check_output_writable(f"file://{tmp_path}")
    (tmp_path / "file").write_text("x")
    with pytest.raises(PreflightError, match="is a file, expected a folder"):
        check_output_writable(str(tmp_path / "file" / "run"))
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        with pytest.raises(PreflightError, match="is not writable"):
            check_output_writable(str(locked / "run"))


def test_missing_bucket_fails_before_ray_starts(s3_bucket, capsys):
    import ray

    from jobs.render import main

    assert not ray.is_initialized()
    code = main(["output=s3://no-such-bucket-9f3/render", "identities.count=2", "use_ray=true"])
    assert code == 2 and not ray.is_initialized()
    err = capsys.readouterr().err
    assert err.startswith("error: s3://no-such-bucket-9f3: bucket does not exist") and "Traceback" not in err


def test_unknown_preview_style_fails_when_loading():
    with pytest.raises(
        ConfigError,
        match=r"  generator.procedural.preview_styles: .*unknown style 'cartoon': expected one of "
        r"\['photo', 'render'\]",
    ):
        load_config(
            job_models()["render-"], "render-quickstart", ["generator.preview_styles=[render, cartoon]"]
        )


def test_resolved_benchmark_config_records_every_sets_count(tmp_path):
    model = job_models()["build-benchmark-"]
    cfg = load_config(
        model, "build-benchmark-quickstart", [f"output={tmp_path}", "pair_counts={lfw-like: 40}"]
    )
    expected = {"lfw-like": 40, "cfp-fp-like": 7000, "agedb-like": 6000, "ijbc-like": 20000}
    assert cfg.pair_counts == expected
    saved = yaml.safe_load(open(save_resolved(cfg, str(tmp_path))))
    assert saved["pair_counts"] == expected
    assert load_config(model, str(tmp_path / "config.yaml")) == cfg
    with pytest.raises(
        ConfigError, match=r"  pair_counts: .*pair_counts\['lfw-like'\]=30: expected a multiple of 20"
    ):
        load_config(model, "build-benchmark-quickstart", ["pair_counts={lfw-like: 30}"])


def test_expected_errors_are_one_line_and_bugs_keep_their_traceback(tmp_path, capsys):
    from facesynth.jobmain import run_main
    from jobs.build_benchmark import main

    out = tmp_path / "bench"
    # the standard ijbc-like set needs 2000 identities: a ValueError from the library, before any write
    code = main(["--config", "build-benchmark-quickstart", f"output={out}", "pair_counts={ijbc-like: 20000}"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: num_identities=400:") and err.count("\n") == 1
    assert not out.exists()

    def bug():
        raise KeyError("a bug")

    with pytest.raises(KeyError, match="a bug"):
        run_main(bug)
    assert run_main(lambda: None) == 0


@pytest.mark.parametrize("name", JOBS)
def test_help_lists_keys_defaults_and_the_default_preset(name, capsys):
    job = importlib.import_module(f"jobs.{name}")
    with pytest.raises(SystemExit) as exit_:
        job.main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "config keys (override with key=value):" in text and "\n  output (str, " in text
    if name == "render":
        batch = (
            job_models()["render-"].model_fields["stage"].get_default(call_default_factory=True).batch_size
        )
        assert f"  stage.batch_size (int, default {batch}): images per generator call" in text
        assert "  identities.count (int, required): number of identities" in text
        assert "default preset (without --config): render-quickstart" in text
        assert "\n  identities: {count: 200, samples_per_identity: 10" in text  # the preset's YAML
    if name == "build_benchmark":
        assert '  pair_counts (dict[str, int], default {"lfw-like": 6000, "cfp-fp-like": 7000' in text
