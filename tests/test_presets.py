"""Every preset in configs/ validates against its job, and the demo wires all stages consistently."""

from __future__ import annotations

import glob
import os

import pytest

from facesynth.config import ConfigError, load_config
from tests.conftest import ROOT


def job_models() -> dict[str, type]:
    from jobs.build_benchmark import BenchmarkJob
    from jobs.cross_domain import CrossDomainJob
    from jobs.dataset_quality import QualityJob
    from jobs.demo import DemoConfig
    from jobs.evaluate import EvaluateJob
    from jobs.generate import GenerateConfig
    from jobs.render import RenderJob
    from jobs.train_idcond import TrainIdCondConfig
    from recog.train.config import TrainConfig

    models = {
        "render-": RenderJob,
        "benchmark-": BenchmarkJob,
        "train-fr-": TrainConfig,
        "evaluate-": EvaluateJob,
        "quality-": QualityJob,
        "uiface-train-": TrainIdCondConfig,
        "uiface-": GenerateConfig,
        "cross-domain-": CrossDomainJob,
        "demo-": DemoConfig,
    }
    return models


PRESETS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))


@pytest.mark.parametrize("path", PRESETS, ids=[os.path.basename(p) for p in PRESETS])
def test_preset_validates(path):
    name = os.path.basename(path)
    model = next(m for prefix, m in job_models().items() if name.startswith(prefix))
    cfg = load_config(model, path)
    assert cfg.model_dump()


def test_demo_plans_every_stage_under_one_root(tmp_path):
    from jobs.demo import STAGES, DemoConfig, plan_configs, shared_ray

    root = str(tmp_path / "q")
    planned = plan_configs(DemoConfig(output=root, overrides={"train_fr": ["train.steps=50"]}))
    assert [name for name, _, _ in planned] == [*STAGES[:-2], "generate", "generate", "quality", "quality"]
    outputs = [cfg.output for _, _, cfg in planned]
    assert all(o.startswith(root) for o in outputs) and len(set(outputs)) == len(outputs)
    by_name = {name: cfg for name, _, cfg in planned}
    assert by_name["train_fr"].train.steps == 50
    assert by_name["train_fr"].data.datasets[0].uri == f"{root}/render"
    assert by_name["evaluate"].model == by_name["train_uiface"].judge == f"{root}/train-fr/model"
    # UIFace training asks for 3 logical CPUs (a 2-CPU worker + its decode step): the shared Ray offers them
    assert by_name["train_uiface"].ray.num_cpus == 3 and shared_ray(planned).num_cpus == 3
    with pytest.raises(ConfigError, match="unknown"):
        plan_configs(DemoConfig(output=root, stages=["render", "paint"]))
