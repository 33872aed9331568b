"""The pipeline job: registered jobs chained in one YAML, each stage's output feeding the next.

A stage names a registered job (``facesynth.registry``), optionally a preset (default: the job's own),
and ``key=value`` overrides in which ``${root}`` is the pipeline's output and ``${NAME}`` the output of
the stage ``NAME``. Every stage writes to ``<output>/<stage name>``. All stage configs are validated
before the first stage runs; one Ray is started for the whole chain, offering the most CPUs any stage
asks for. A stage that finished with the same resolved config (recorded in ``<output>/pipeline.json``)
is skipped on a rerun; the jobs themselves resume where a stage was cut short. The driver prints one
line per stage; ``summary.md`` and the printed summary hold each stage's headline figures.

    python -m jobs.pipeline --config pipeline-quickstart            # make demo
    python -m jobs.pipeline --config pipeline-quickstart 'only=[render, train_fr]'
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from string import Template

from pydantic import BaseModel, Field, field_validator, model_validator

from facesynth import storage
from facesynth.config import ConfigError, OutputUri, StrictModel, load_config
from facesynth.preflight import check_output_writable
from facesynth.registry import JOBS, job
from facesynth.report import Report
from facesynth.runtime import RayConfig, init_ray

log = logging.getLogger(__name__)
RECORD = "pipeline.json"


class Stage(StrictModel):
    """One step of the chain: a registered job with its preset and overrides."""

    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$", description="also the stage's output folder")
    job: str = Field(description="a registered job (facesynth.registry)")
    preset: str | None = Field(None, description="default: the job's own preset")
    overrides: list[str] = Field(default_factory=list, description="key=value; ${root}, ${STAGE} expand")

    @field_validator("job")
    @classmethod
    def _registered(cls, name: str) -> str:
        if name not in JOBS:
            raise ValueError(f"unknown job {name!r}; known jobs: {sorted(JOBS)}")
        return name


class PipelineJob(StrictModel):
    """The pipeline: stages in order, written under one root."""

    output: OutputUri = Field(description="root folder: one subfolder per stage, summary.md, pipeline.json")
    stages: list[Stage] = Field(min_length=1)
    only: list[str] | None = Field(None, description="run just these stages (the rest must have run before)")
    overrides: dict[str, list[str]] = Field(
        default_factory=dict,
        description="extra key=value overrides per stage, e.g. {train_fr: [train.steps=50]}",
    )
    ray: RayConfig = Field(
        default_factory=RayConfig, description="defaults to the most CPUs any stage asks for"
    )

    @model_validator(mode="after")
    def _known_names(self) -> PipelineJob:
        names = [s.name for s in self.stages]
        twice = sorted({n for n in names if names.count(n) > 1})
        unknown = sorted((set(self.only or ()) | set(self.overrides)) - set(names))
        if twice or unknown:
            raise ValueError(
                f"stage names repeated {twice} or unknown in only/overrides {unknown}; stages: {names}"
            )
        return self


@dataclass
class StageResult:
    name: str
    job: str
    output: str
    seconds: float
    summary: dict
    headline: str
    reused: bool = False


@dataclass
class PipelineResult:
    """Every stage's summary, in order; ``report`` is ``summary.md``."""

    uri: str
    stages: list[StageResult]
    report: str = ""

    def summary(self) -> dict:
        return {s.name: s.summary for s in self.stages}

    def summary_text(self) -> str:
        width = max(len(s.name) for s in self.stages)
        lines = [f"pipeline {self.uri}"]
        for s in self.stages:
            took = "reused" if s.reused else f"{s.seconds:.0f} s"
            lines.append(f"  {s.name:<{width}}  {took:>7}  {s.headline}")
        lines.append(f"summary: {self.report}")
        return "\n".join(lines)


def stage_configs(cfg: PipelineJob) -> list[tuple[Stage, BaseModel]]:
    """Every stage's validated job config, outputs and ``${...}`` references resolved, before any runs."""
    outputs = {s.name: storage.join(cfg.output, s.name) for s in cfg.stages}
    planned = []
    for stage in cfg.stages:
        spec = job(stage.job)
        overrides = [f"output={outputs[stage.name]}", *stage.overrides, *cfg.overrides.get(stage.name, [])]
        try:
            resolved = [Template(o).substitute(root=cfg.output, **outputs) for o in overrides]
        except (KeyError, ValueError) as exc:
            raise ConfigError(
                f"stages.{stage.name}.overrides: unknown reference {exc} (known: root, {', '.join(outputs)})"
            ) from None
        try:
            planned.append((stage, load_config(spec.config_class(), stage.preset or spec.preset, resolved)))
        except ConfigError as exc:
            raise ConfigError(f"stage {stage.name} ({stage.job}): {exc}") from None
    return planned


def shared_ray(cfg: PipelineJob, configs: list[BaseModel]) -> RayConfig:
    """One Ray for every stage: the pipeline's own settings, else the most CPUs any stage asks for."""
    if cfg.ray != RayConfig():
        return cfg.ray
    wanted = [c.ray.num_cpus for c in configs if isinstance(getattr(c, "ray", None), RayConfig)]
    return RayConfig(num_cpus=None if not wanted or None in wanted else max(wanted))


def run(cfg: PipelineJob) -> PipelineResult:
    """Run the selected stages in order (finished ones with an unchanged config are reused)."""
    planned = stage_configs(cfg)
    check_output_writable(cfg.output)
    record_uri = storage.join(cfg.output, RECORD)
    record = json.loads(storage.read_bytes(record_uri)) if storage.exists(record_uri) else {}
    todo = {
        s.name
        for s, c in planned
        if (cfg.only is None or s.name in cfg.only)
        and record.get(s.name, {}).get("config") != c.model_dump(mode="json")
    }
    missing = [s.name for s, _ in planned if s.name not in todo and s.name not in record]
    if missing:
        raise ConfigError(f"only={cfg.only}: stages {missing} have not run yet; include them")
    init_ray(shared_ray(cfg, [c for s, c in planned if s.name in todo]))
    results = []
    for k, (stage, config) in enumerate(planned, start=1):
        step = f"[{k}/{len(planned)}] {stage.name}"
        if stage.name not in todo:
            done = record[stage.name]
            results.append(
                StageResult(
                    stage.name,
                    stage.job,
                    config.output,
                    done["seconds"],
                    done["summary"],
                    done["headline"],
                    reused=True,
                )
            )
            print(f"{step}: reused ({done['headline']})", flush=True)
            continue
        print(f"{step} ({stage.job}) -> {config.output}", flush=True)
        start = time.perf_counter()
        result = job(stage.job).run_function()(config)
        seconds = time.perf_counter() - start
        headline = result.headline() if hasattr(result, "headline") else ""
        results.append(StageResult(stage.name, stage.job, config.output, seconds, result.summary(), headline))
        print(f"{step} done in {seconds:.0f} s: {headline}", flush=True)
        record[stage.name] = {
            "config": config.model_dump(mode="json"),
            "summary": results[-1].summary,
            "seconds": seconds,
            "headline": headline,
        }
        storage.write_bytes(record_uri, json.dumps(record, indent=1, default=str).encode())
    out = PipelineResult(cfg.output, results)
    out.report = write_report(cfg, out)
    return out


def write_report(cfg: PipelineJob, result: PipelineResult) -> str:
    """``summary.md``: a row per stage with its job, output, time and headline figures."""
    report = Report("facesynth pipeline").text(f"Everything below lives under `{cfg.output}`.")
    report.table(
        ["stage", "job", "output", "seconds", "result"],
        [
            [s.name, s.job, f"`{s.output}`", "reused" if s.reused else f"{s.seconds:.0f}", s.headline]
            for s in result.stages
        ],
    )
    return report.write(cfg.output, "summary.md")
