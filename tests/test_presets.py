"""Every preset in configs/ validates against its job, and the demo wires all stages consistently."""

from __future__ import annotations

import glob
import json
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


def test_demo_summary_keeps_stages_an_earlier_run_left(tmp_path):
    from jobs.demo import summary_markdown, with_earlier_results

    root = str(tmp_path / "q")
    evaluate = {"sets": {"lfw-like": {"accuracy": 0.9123, "std": 0.01}}}
    quality = {
        "identity_consistency": {"mean": 0.72, "chance": 0.59},
        "intra_class_diversity": {"mean": 0.63},
        "leakage": {"flagged": [3], "identities_checked": 16, "threshold": 0.927},
    }
    assert with_earlier_results(root, {"evaluate": evaluate}) == ({"evaluate": evaluate}, ())
    os.makedirs(root)
    with open(os.path.join(root, "demo.json"), "w") as f:
        json.dump({"evaluate": evaluate, "quality:old": {"stale": True}}, f)
    key = f"quality:{root}/quality-adaptive"
    merged, earlier = with_earlier_results(root, {key: quality, "quality:old": quality})
    assert merged == {"evaluate": evaluate, "quality:old": quality, key: quality} and earlier == ("evaluate",)
    text = summary_markdown(root, merged, earlier)
    assert "| lfw-like | 91.23% | 1.00% |" in text
    assert "| two-stage (adaptive t0) | 0.720 | 0.590 | 0.630 | 1 of 16 (cosine > 0.927) |" in text
    assert "earlier run" in text and "`evaluate`" in text
    assert "earlier run" not in summary_markdown(root, merged)
