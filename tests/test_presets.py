"""Every preset in configs/ validates against its job, and the demo wires all stages consistently."""

from __future__ import annotations

import glob
import os

import pytest

from facesynth.config import ConfigError, load_config
from tests.conftest import ROOT


def job_models() -> dict[str, type]:
    """Preset file-name prefix -> the job config class its presets validate against (longest prefix first)."""
    from facesynth.pipeline import PipelineJob
    from recog.cross_domain import CrossDomainJob
    from recog.dataset_quality import DatasetQualityJob
    from recog.evaluate import EvaluateJob
    from recog.train.config import TrainFRJob
    from synthgen.benchmark_sets import BenchmarkJob
    from synthgen.generate import GenerateJob
    from synthgen.sd_lora.finetune import FinetuneLoraJob
    from synthgen.uiface.train import UIFaceTrainJob

    return {
        "render-": GenerateJob,
        "build-benchmark-": BenchmarkJob,
        "train-fr-": TrainFRJob,
        "evaluate-": EvaluateJob,
        "dataset-quality-": DatasetQualityJob,
        "uiface-train-": UIFaceTrainJob,
        "uiface-": GenerateJob,
        "cross-domain-": CrossDomainJob,
        "sd21-lora-generate": GenerateJob,
        "sd21-lora": FinetuneLoraJob,
        "sd-lora-": GenerateJob,
        "finetune-lora-": FinetuneLoraJob,
        "pipeline-": PipelineJob,
    }


PRESETS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))


@pytest.mark.parametrize("path", PRESETS, ids=[os.path.basename(p) for p in PRESETS])
def test_preset_validates(path):
    name = os.path.basename(path)
    model = next(m for prefix, m in job_models().items() if name.startswith(prefix))
    cfg = load_config(model, path)
    assert cfg.model_dump()


def test_every_registered_job_has_a_valid_default_preset_and_a_thin_module():
    import ast

    from facesynth.registry import JOBS

    for name, spec in JOBS.items():
        cfg = load_config(spec.config_class(), spec.preset)
        assert cfg.model_dump() and callable(spec.run_function())
        module = ast.parse(open(os.path.join(ROOT, "jobs", f"{name}.py")).read())
        imported = {
            alias.name if isinstance(node, ast.Import) else f"{node.module}.{alias.name}"
            for node in ast.walk(module)
            if isinstance(node, ast.Import | ast.ImportFrom)
            for alias in node.names
        }
        assert imported == {"__future__.annotations", "sys", "facesynth.jobmain.job_main"}, (name, imported)
    assert sorted(
        os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "jobs", "[a-z]*.py"))
    ) == sorted(JOBS)


def test_pipeline_resolves_outputs_and_references_before_any_stage(tmp_path):
    from facesynth.pipeline import PipelineJob, shared_ray, stage_configs

    root = str(tmp_path / "q")
    cfg = load_config(
        PipelineJob, "pipeline-quickstart", [f"output={root}", "overrides={train_fr: [train.steps=50]}"]
    )
    planned = {stage.name: c for stage, c in stage_configs(cfg)}
    assert list(planned) == [s.name for s in cfg.stages] and all(
        c.output == f"{root}/{name}" for name, c in planned.items()
    )
    assert planned["train_fr"].train.steps == 50
    assert planned["train_fr"].data.datasets[0].uri == f"{root}/render"
    assert planned["evaluate"].model == planned["uiface_train"].judge == f"{root}/train_fr/model"
    assert planned["quality_single"].dataset == f"{root}/uiface_single"
    assert planned["uiface_single"].generator.sampler.mode == "single"
    # UIFace training asks for 3 logical CPUs (a 2-CPU worker + its decode step): the shared Ray offers them
    assert planned["uiface_train"].ray.num_cpus == 3 and shared_ray(cfg, list(planned.values())).num_cpus == 3
    with pytest.raises(ConfigError, match=r"unknown in only/overrides \['paint'\]"):
        load_config(PipelineJob, "pipeline-quickstart", [f"output={root}", "only=[render, paint]"])
    bad = load_config(
        PipelineJob, "pipeline-quickstart", [f"output={root}", "overrides={render: ['seed=${nowhere}']}"]
    )
    with pytest.raises(ConfigError, match=r"stages.render.overrides: unknown reference 'nowhere'"):
        stage_configs(bad)
    bad = load_config(
        PipelineJob, "pipeline-quickstart", [f"output={root}", "overrides={evaluate: [nrof_folds=0]}"]
    )
    with pytest.raises(ConfigError, match=r"(?s)stage evaluate \(evaluate\): .*nrof_folds"):
        stage_configs(bad)
    with pytest.raises(
        ConfigError, match=r"override 'overrides=\{render: \[seed=\$\{x\}\]\}': the value is not valid YAML"
    ):
        load_config(PipelineJob, "pipeline-quickstart", [f"output={root}", "overrides={render: [seed=${x}]}"])
    with pytest.raises(ConfigError, match="unknown job 'paint'"):
        load_config(PipelineJob, None, [f"output={root}", "stages=[{name: a, job: paint}]"])
