"""The pipeline job: stages chained through their outputs, finished stages reused on a rerun."""

from __future__ import annotations

import json
import os

import pytest

from facesynth import shards, storage
from facesynth.config import ConfigError, load_config
from facesynth.pipeline import PipelineJob, run

STAGES = [
    "stages=["
    "{name: faces, job: render, overrides: [identities.count=4, identities.samples_per_identity=2,"
    " identities.per_unit=2, generator.size=32, 'generator.preview_styles=[]', use_ray=false]},"
    "{name: bench, job: build_benchmark, overrides: [num_identities=20, size=32,"
    " 'pair_counts={lfw-like: 20, cfp-fp-like: 0, agedb-like: 0, ijbc-like: 0}']}"
    "]"
]


def test_stages_run_in_order_and_a_rerun_reuses_finished_ones(ray_local, tmp_path, capsys):
    root = str(tmp_path / "p")
    first = run(load_config(PipelineJob, None, [f"output={root}", *STAGES]))
    assert [(s.name, s.reused) for s in first.stages] == [("faces", False), ("bench", False)]
    assert shards.summary(f"{root}/faces")["rows"] == 8 and os.path.exists(f"{root}/bench/lfw-like.bin")
    assert first.stages[1].headline == "lfw-like: 20 pairs"
    summary = open(first.report).read()
    assert "| faces | render | `" in summary and "8 images of 4 identities" in summary
    record = json.loads(storage.read_bytes(f"{root}/pipeline.json"))
    assert set(record) == {"faces", "bench"} and record["faces"]["summary"]["images"] == 8

    mtime = os.path.getmtime(f"{root}/bench/lfw-like.bin")
    again = run(load_config(PipelineJob, None, [f"output={root}", *STAGES, "overrides={bench: [seed=1]}"]))
    assert [(s.name, s.reused) for s in again.stages] == [("faces", True), ("bench", False)]
    assert os.path.getmtime(f"{root}/bench/lfw-like.bin") > mtime  # its config changed: it ran again
    printed = capsys.readouterr().out
    assert (
        "[1/2] faces: reused (8 images of 4 identities" in printed
        and "[2/2] bench (build_benchmark)" in printed
    )

    with pytest.raises(ConfigError, match=r"stages \['faces'\] have not run yet"):
        run(load_config(PipelineJob, None, [f"output={tmp_path / 'new'}", *STAGES, "only=[bench]"]))


def test_a_job_keeps_its_full_log_under_the_output_and_bad_input_leaves_nothing(tmp_path, capsys):
    from jobs.render import main

    out = tmp_path / "r"
    args = [f"output={out}", "identities.count=2", "identities.samples_per_identity=2", "generator.size=32"]
    assert main([*args, "use_ray=false", "generator.preview_styles=[]"]) == 0
    log = (out / "logs" / "render.log").read_text()
    assert f"INFO facesynth.shards: {out}: 0 units committed, 1 to write" in log
    assert "INFO" not in capsys.readouterr().err  # the terminal shows warnings and progress only
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "notes.txt").write_text("mine")
    assert main([f"output={tmp_path / 'theirs'}", *args[1:], "use_ray=false"]) == 2
    assert os.listdir(tmp_path / "theirs") == ["notes.txt"]
