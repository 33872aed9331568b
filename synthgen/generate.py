"""The generate job: any registered generator through the one Ray Data stage into a shard dataset.

``GenerateJob.generator`` is a discriminated union on ``kind`` (the generator registry). Every member
says which of its settings decide the images (pinned in the dataset's plan: a rerun with other ones is
refused), checks itself against the job before any work, prepares what its actors read from the output
(UIFace: ``identities.npy``) and returns a picklable factory. Everything else is shared: the unit plan
(identities x samples per unit), the stage, the card, one contact sheet ``grid.png`` (identities x
samples, read back from the committed shards), the t0 histogram and ``report.md``. Adding a generator
is one spec class here plus its member in :data:`GeneratorSpec`.

    python -m jobs.generate --config uiface-tiny output=/tmp/uiface identities.count=100
    python -m jobs.render output=s3://bucket/render identities.count=10000   # procedural preset
"""

from __future__ import annotations

import functools
import hashlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Literal

import numpy as np
from pydantic import Field, field_validator

from facesynth import images, shards, storage
from facesynth.config import ConfigError, OutputUri, StrictModel
from facesynth.preflight import check_output_writable
from facesynth.report import Report
from facesynth.runtime import RayConfig, init_ray
from synthgen.procedural.generator import ProceduralConfig, make_procedural
from synthgen.procedural.render import render_faces
from synthgen.procedural.styles import get_style
from synthgen.sd_lora.checkpoint import PipelineSource
from synthgen.sd_lora.generator import SDSampling
from synthgen.sd_lora.prompts import PromptSet, load_prompt_set
from synthgen.stage import Generator, StageConfig, StageResult, UnitPlan, claim_output, generate_dataset
from synthgen.uiface.generator import IdentitySampling
from synthgen.uiface.sampler import SamplerConfig
from synthgen.uiface.train import UIFaceModelSource

GRID_MAX = 8


class ProceduralSpec(ProceduralConfig):
    """The procedural renderer (identity ``i`` is the face of identity seed ``i``)."""

    kind: Literal["procedural"] = "procedural"
    preview_styles: list[str] = Field(
        default_factory=list,
        description="also write grid_<style>.png of the first identities rendered in each of these styles",
    )

    @field_validator("preview_styles")
    @classmethod
    def _known_styles(cls, styles: list[str]) -> list[str]:
        for style in styles:
            get_style(style)  # ValueError naming the known styles
        return styles

    def renderer(self) -> ProceduralConfig:
        return ProceduralConfig(**self.model_dump(include=set(ProceduralConfig.model_fields)))

    def title(self) -> str:
        return f"procedural faces ({self.style})"

    def settings(self) -> dict:
        return {"kind": self.kind, "renderer": self.renderer().model_dump(mode="json")}

    def check(self, job: GenerateJob) -> None:
        pass

    def prepare(self, job: GenerateJob) -> Callable[[], Generator]:
        return functools.partial(make_procedural, self.renderer())

    def previews(self, job: GenerateJob) -> list[str]:
        """One sheet per preview style: the job's first identities x samples with the dataset's own seeds."""
        ids, samples, seeds = _grid_rows(job)
        rows, cols = len(np.unique(ids)), len(np.unique(samples))
        out = []
        for style in self.preview_styles:
            batch = render_faces(
                ids,
                seeds,
                style=style,
                size=self.size,
                nuisance=self.nuisance,
                overrides=self.overrides or None,
            )
            out.append(
                images.save_grid(batch.images, storage.join(job.output, f"grid_{style}.png"), cols, rows)
            )
        return out


class UIFaceSpec(StrictModel):
    """UIFace identity-conditioned latent diffusion (single / fixed t0 / adaptive t0 sampling)."""

    kind: Literal["uiface"] = "uiface"
    model: UIFaceModelSource = Field(default_factory=UIFaceModelSource)
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    identities: IdentitySampling = Field(default_factory=IdentitySampling)
    device: str = Field("auto", pattern="^(auto|cpu|cuda(:[0-9]+)?)$")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    threads: int | None = Field(
        None, ge=1, description="torch threads per generator (fix for bit-identical CPU)"
    )

    def title(self) -> str:
        return "UIFace synthetic dataset"

    def settings(self) -> dict:
        return self.model_dump(mode="json", include={"kind", "model", "sampler", "identities", "dtype"})

    def check(self, job: GenerateJob) -> None:
        """The sampler against the model's schedule, identities from 0 (ConfigError naming the key)."""
        last = self.model.architecture().train_timesteps - 1
        for key in ("t0", "step_th"):
            value = getattr(self.sampler, key)
            if value > last:
                raise ConfigError(
                    f"generator.sampler.{key}: {value} is outside the model's schedule [-1, {last}]"
                )
        if self.sampler.steps > last + 1:
            raise ConfigError(
                f"generator.sampler.steps: {self.sampler.steps} exceeds the model's {last + 1} timesteps"
            )
        if job.identities.offset:
            raise ConfigError("identities.offset: UIFace identities are rows of identities.npy; expected 0")
        classes = self.model.architecture().num_classes
        if classes and job.identities.count > classes:
            raise ConfigError(
                f"identities.count: {job.identities.count} identities, but the class-conditional model has "
                f"{classes} classes (identity i is class i)"
            )

    def prepare(self, job: GenerateJob) -> Callable[[], Generator]:
        """Draw the identities into ``<output>/identities.npy`` (deterministic) and return the factory.

        Class-conditional models: ``identities.npy`` holds the class ids ``0..count-1`` (identity i = class i).
        """
        from synthgen.identity_embeddings import save_npy
        from synthgen.uiface.generator import IDENTITIES_FILE, UIFaceFactory, identity_embeddings

        architecture = self.model.architecture()
        if architecture.conditioning == "class":
            embeddings = np.arange(job.identities.count, dtype=np.int64)
        else:
            embeddings = identity_embeddings(
                job.identities.count, self.identities, architecture.embedding_dim
            )
        uri = storage.join(job.output, IDENTITIES_FILE)
        save_npy(embeddings, uri)
        return UIFaceFactory(self.model, self.sampler, uri, self.device, self.dtype, self.threads)

    def previews(self, job: GenerateJob) -> list[str]:
        return []


class SDLoraSpec(StrictModel):
    """Stable Diffusion (+ a LoRA from ``finetune_lora``) over a prompt set: the cross-domain study's generator.

    Identity ``identities.offset + i`` is person ``i`` of ``prompts``; its sample ``s`` is image
    ``s % images_per_template`` of template ``s // images_per_template``, so ``identities.samples_per_identity``
    must be ``templates x images_per_template``. Rows carry the prompt text, the person's name and, in
    ``params``, the template id and the sampling settings.
    """

    kind: Literal["sd_lora"] = "sd_lora"
    base: PipelineSource = Field(description="the text-to-image checkpoint (the one the LoRA was trained on)")
    lora: str | None = Field(
        None, description="LoRA folder URI (<finetune_lora output>/lora); null: base only"
    )
    prompts: PromptSet = Field(
        description="a prompt-set name in configs/prompts/, a YAML path, or the set inline"
    )
    images_per_template: int | None = Field(None, ge=1, description="override the prompt set's count")
    sampling: SDSampling = Field(default_factory=SDSampling)
    device: str = Field("auto", pattern="^(auto|cpu|cuda(:[0-9]+)?)$")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    threads: int | None = Field(
        None, ge=1, description="torch threads per generator (fix for bit-identical CPU)"
    )
    fuse_lora: bool = Field(
        False, description="fold the LoRA into the weights (faster; pixels may move a level)"
    )
    channels_last: bool = Field(False, description="UNet in channels-last memory format (GPU)")
    compile: bool = Field(False, description="torch.compile the UNet (GPU, long runs)")

    @field_validator("prompts", mode="before")
    @classmethod
    def _load_prompts(cls, value):
        return load_prompt_set(value) if isinstance(value, str) else value

    def prompt_set(self) -> PromptSet:
        """The prompt set with ``images_per_template`` applied."""
        if self.images_per_template is None:
            return self.prompts
        return self.prompts.model_copy(update={"images_per_template": self.images_per_template})

    def title(self) -> str:
        return "Stable Diffusion + LoRA prompt-set dataset"

    def settings(self) -> dict:
        """The base, the LoRA (its weights' sha256), the prompt set and sampling, the dtype and LoRA fusing."""
        from synthgen.sd_lora.lora import WEIGHTS_FILE

        weights = None
        if self.lora is not None and storage.exists(storage.join(self.lora, WEIGHTS_FILE)):
            weights = hashlib.sha256(storage.read_bytes(storage.join(self.lora, WEIGHTS_FILE))).hexdigest()
        return {
            **self.model_dump(
                mode="json", include={"kind", "base", "lora", "sampling", "dtype", "fuse_lora"}
            ),
            "prompts": self.prompt_set().model_dump(mode="json"),
            "lora_sha256": weights,
        }

    def check(self, job: GenerateJob) -> None:
        """The checkpoint and LoRA exist; the unit plan matches the prompt set (ConfigError naming the key)."""
        from synthgen.sd_lora.lora import check_lora_folder

        self.base.check("generator.base")
        if self.lora is not None:
            try:
                check_lora_folder(self.lora, "generator.lora")
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        prompts = self.prompt_set()
        if job.identities.count > len(prompts.people):
            raise ConfigError(
                f"identities.count: {job.identities.count}, but the prompt set has {len(prompts.people)} people"
            )
        if job.identities.samples_per_identity != prompts.samples_per_person:
            raise ConfigError(
                f"identities.samples_per_identity: expected {prompts.samples_per_person} = "
                f"{len(prompts.templates)} templates x {prompts.images_per_template} images per template, "
                f"got {job.identities.samples_per_identity}"
            )

    def prepare(self, job: GenerateJob) -> Callable[[], Generator]:
        from synthgen.sd_lora.generator import SDLoraFactory

        return SDLoraFactory(
            base=self.base,
            lora=self.lora,
            prompts=self.prompt_set(),
            sampling=self.sampling,
            offset=job.identities.offset,
            device=self.device,
            dtype=self.dtype,
            threads=self.threads,
            fuse_lora=self.fuse_lora,
            channels_last=self.channels_last,
            compile=self.compile,
        )

    def previews(self, job: GenerateJob) -> list[str]:
        return []


GeneratorSpec = Annotated[ProceduralSpec | UIFaceSpec | SDLoraSpec, Field(discriminator="kind")]


class GridConfig(StrictModel):
    """The contact sheet ``grid.png``: the first identities x samples of the dataset."""

    identities: int = Field(GRID_MAX, ge=1)
    samples: int = Field(GRID_MAX, ge=1)


class GenerateJob(StrictModel):
    """The generate job: which identities x samples, made by which generator, written where."""

    output: OutputUri = Field(description="dataset URI (s3://bucket/prefix, file:///path or a path)")
    seed: int = Field(0, ge=0, description="base seed of the per-row seeds")
    identities: UnitPlan
    generator: GeneratorSpec = Field(discriminator="kind")
    stage: StageConfig = Field(default_factory=StageConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    grid: GridConfig = Field(default_factory=GridConfig)
    use_ray: bool = Field(True, description="false: the same per-unit code in this process (debugging)")


@dataclass
class GenerateResult:
    """What a generate run left at ``uri``; ``stage`` is this run's share."""

    uri: str
    stage: StageResult
    rows: int
    identities: int
    t0_histogram: dict[int, int]
    grid: str
    previews: list[str] = field(default_factory=list)
    report: str = ""

    @property
    def images_per_s(self) -> float:
        return self.stage.images_per_s

    def headline(self) -> str:
        t0 = self.summary()["t0_mean"]
        return (
            f"{self.rows} images of {self.identities} identities ({self.stage.images} now, "
            f"{self.images_per_s:.1f} images/s)" + (f", mean t0 {t0:.0f}" if t0 is not None else "")
        )

    def summary(self) -> dict:
        switched = {k: v for k, v in self.t0_histogram.items() if k >= 0}
        return {
            "dataset": self.uri,
            "images": self.rows,
            "identities": self.identities,
            "generated_now": self.stage.images,
            "seconds": round(self.stage.seconds, 2),
            "images_per_s": round(self.images_per_s, 3),
            "t0_histogram": {str(k): v for k, v in self.t0_histogram.items()},
            "t0_mean": float(np.average(list(switched), weights=list(switched.values())))
            if switched
            else None,
            "grid": self.grid,
            "report": self.report,
        }


@dataclass(frozen=True)
class GeneratePlan:
    """A checked, claimed generate job: its work units, the generator factory and the pinned settings."""

    units: list
    factory: Callable[[], Generator]
    settings: dict


def plan(job: GenerateJob) -> GeneratePlan:
    """Check the job and its output, claim the output for its plan and prepare the generator (no Ray)."""
    job.generator.check(job)
    check_output_writable(job.output)
    units = job.identities.units()
    settings = job.generator.settings()
    claim_output(units, job.output, base_seed=job.seed, stage=job.stage, settings=settings)
    return GeneratePlan(units, job.generator.prepare(job), settings)


def run(job: GenerateJob) -> GenerateResult:
    """Generate ``job``'s dataset (resumable: committed units are skipped), its contact sheet and report."""
    prepared = plan(job)
    if job.use_ray:
        init_ray(job.ray)
    stage = generate_dataset(
        prepared.units,
        prepared.factory,
        job.output,
        base_seed=job.seed,
        stage=job.stage,
        settings=prepared.settings,
        resolved_config=job,
        title=job.generator.title(),
        use_ray=job.use_ray,
    )
    info = shards.summary(job.output)
    result = GenerateResult(
        uri=job.output,
        stage=stage,
        rows=info["rows"],
        identities=info["identities"],
        t0_histogram=t0_histogram(job.output),
        grid=write_grid(job),
        previews=job.generator.previews(job),
    )
    result.report = write_report(job, result)
    return result


def _grid_rows(job: GenerateJob) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(identity, sample, seed) of the contact sheet's rows: the first identities x samples, row-major."""
    n_id = min(job.grid.identities, job.identities.count)
    n_s = min(job.grid.samples, job.identities.samples_per_identity)
    ids = np.repeat(np.arange(job.identities.offset, job.identities.offset + n_id), n_s)
    samples = np.tile(np.arange(n_s), n_id)
    return ids, samples, shards.row_seeds(job.seed, ids, samples)


def write_grid(job: GenerateJob) -> str:
    """``grid.png``: the first identities x samples as the dataset holds them (read from its shards)."""
    ids, samples, _ = _grid_rows(job)
    wanted = set(zip(ids.tolist(), samples.tolist()))
    found: dict[tuple[int, int], bytes] = {}
    for table in shards.iter_tables(job.output, columns=["image", "identity", "sample"]):
        for rec in table.to_pylist():
            if (rec["identity"], rec["sample"]) in wanted:
                found[rec["identity"], rec["sample"]] = rec["image"]
        if len(found) == len(wanted):
            break
    encoded = [found[key] for key in zip(ids.tolist(), samples.tolist())]
    size = images.probe_size(encoded[0], f"{job.output} grid image 0")
    decoded = images.decode_to_size(encoded, size, resize="exact", what=f"{job.output} grid image")
    cols = len(np.unique(samples))
    return images.save_grid(decoded, storage.join(job.output, "grid.png"), cols, len(ids) // cols)


def t0_histogram(dataset_uri: str) -> dict[int, int]:
    """Images per recorded t0 (-1: single-stage, never switched, or not a two-stage generator)."""
    counts: Counter = Counter()
    for table in shards.iter_tables(dataset_uri, columns=["t0"]):
        counts.update(table.column("t0").to_pylist())
    return dict(sorted(counts.items()))


def write_report(job: GenerateJob, result: GenerateResult) -> str:
    """``report.md``: the dataset, the generator's settings, this run's throughput, the t0 histogram."""
    gen, s = job.generator, result.stage
    report = Report(gen.title()).bullets(
        [
            f"dataset: `{result.uri}` ({result.rows} images, {job.identities.count} identities x "
            f"{job.identities.samples_per_identity} samples)",
            f"generator: `{gen.kind}`; settings pinned in the dataset's plan: "
            f"`{', '.join(sorted(gen.settings()))}`",
            f"this run: {s.committed_now} of {s.units_total} units ({s.committed_before} already committed), "
            f"{s.images} images in {s.seconds:.1f} s = {result.images_per_s:.2f} images/s",
        ]
    )
    if set(result.t0_histogram) != {-1}:
        report.section("t0 (switch to the identity context)").table(
            ["t0", "images"], sorted(result.t0_histogram.items())
        )
    report.section("Samples").figure("grid.png", "identities x samples")
    for uri in result.previews:
        report.figure(uri.rsplit("/", 1)[-1])
    return report.write(job.output)
