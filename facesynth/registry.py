"""The one job registry: name -> config class, library ``run`` function and default preset.

Every capability is a library function ``run(cfg) -> Result`` (``result.summary()`` is its one-screen
summary as JSON values); ``jobs/NAME.py`` only parses the command line and calls it through
:func:`facesynth.jobmain.job_main`. The demo, the pipeline, Tune and ``--help`` read this table.
Entries name their code as ``module:attribute`` strings, imported on use, so ``facesynth`` stays
free of ``synthgen``/``recog`` imports.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Job:
    """One job: ``config`` and ``run`` as ``module:attribute``; ``preset``: its default config in ``configs/``."""

    name: str
    config: str
    run: str
    preset: str
    description: str

    def config_class(self) -> type:
        return _load(self.config)

    def run_function(self):
        return _load(self.run)


def _load(target: str):
    module, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module), attribute)


JOBS: dict[str, Job] = {
    job.name: job
    for job in (
        Job(
            "generate",
            "synthgen.generate:GenerateJob",
            "synthgen.generate:run",
            "uiface-tiny",
            "generate a synthetic face dataset with any registered generator (procedural, uiface, sd_lora) on Ray Data",
        ),
        Job(
            "render",
            "synthgen.generate:GenerateJob",
            "synthgen.generate:run",
            "render-quickstart",
            "the generate job with the procedural renderer (its default preset)",
        ),
        Job(
            "build_benchmark",
            "synthgen.benchmark_sets:BenchmarkJob",
            "synthgen.benchmark_sets:run",
            "build-benchmark-quickstart",
            "offline verification sets (insightface .bin) and an IJB-C-style template set",
        ),
        Job(
            "uiface_train",
            "synthgen.uiface.train:UIFaceTrainJob",
            "synthgen.uiface.train:run",
            "uiface-train-quickstart",
            "train the UIFace identity-conditioned diffusion model on Ray Train",
        ),
        Job(
            "finetune_lora",
            "synthgen.sd_lora.finetune:FinetuneLoraJob",
            "synthgen.sd_lora.finetune:run",
            "finetune-lora-tiny",
            "LoRA fine-tuning of a Stable Diffusion checkpoint on labelled identities on Ray Train",
        ),
        Job(
            "train_fr",
            "recog.train.config:TrainFRJob",
            "recog.train.trainer:run",
            "train-fr-quickstart",
            "face-recognition training on Ray Train (DDP / DeepSpeed), exported model",
        ),
        Job(
            "evaluate",
            "recog.evaluate:EvaluateJob",
            "recog.evaluate:run",
            "evaluate-quickstart",
            "insightface-exact verification, TAR@FMR and ROC of an exported model",
        ),
        Job(
            "dataset_quality",
            "recog.dataset_quality:DatasetQualityJob",
            "recog.dataset_quality:run",
            "dataset-quality-quickstart",
            "identity consistency, diversity, FID/precision/recall and leakage of a dataset",
        ),
        Job(
            "pipeline",
            "facesynth.pipeline:PipelineJob",
            "facesynth.pipeline:run",
            "pipeline-quickstart",
            "registered jobs chained in one YAML, each stage's output feeding the next (make demo)",
        ),
        Job(
            "demo",
            "facesynth.pipeline:PipelineJob",
            "facesynth.pipeline:run",
            "pipeline-quickstart",
            "the pipeline job with the quickstart chain (its default preset)",
        ),
        Job(
            "cross_domain",
            "recog.cross_domain:CrossDomainJob",
            "recog.cross_domain:run",
            "cross-domain-quickstart",
            "the cross-domain study's five train->test classification experiments",
        ),
    )
}


def job(name: str) -> Job:
    """The registered job ``name`` (a ``KeyError`` names the known jobs)."""
    try:
        return JOBS[name]
    except KeyError:
        raise KeyError(f"unknown job {name!r}; known jobs: {sorted(JOBS)}") from None
