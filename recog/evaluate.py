"""The evaluate job: verify an exported face model on insightface ``.bin`` sets and template lists.

Pair sets (``sets``): insightface's 10-fold accuracy ± std and VAL@FAR=1e-3 on flip-fused embeddings
(``recog.verification``), plus TAR@FMR on the pair cosines (``recog.roc``). Template sets
(``tar_pairs``, folders written by ``synthgen.benchmark_sets``): IJB-C pooling of the flip-fused unit
embeddings (insightface's N0 variant, no detector score) and TAR@FMR on the template pair cosines.
TAR is reported only at FMR targets the set can measure (target x impostor pairs >= 1).

Every input is checked (model.json and its model file, each ``.bin`` through the restricted reader,
template lists, image sizes) before anything is embedded, and nothing is written unless the whole
evaluation succeeds. Output at ``output``: ``metrics.json``, ``report.md`` with ``accuracy.png`` and
``roc.png``, and the resolved ``config.yaml``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
from pydantic import Field, field_validator, model_validator

from facesynth import binsets, images, storage, telemetry
from facesynth.binsets import TemplateSet, read_template_set
from facesynth.config import OutputUri, StrictModel, save_resolved
from facesynth.embed import EmbedPool
from facesynth.face_model import (
    ChannelOrder,
    EmbeddedImages,
    FlipFusion,
    ModelSpec,
    load_face_model,
    read_spec,
)
from facesynth.preflight import check_output_writable
from facesynth.report import markdown_table
from facesynth.runtime import RayConfig, init_ray
from recog.report import VerificationRow, write_report
from recog.roc import FMR_TARGETS, pool_templates, roc_points, tar_at_fmr, template_pair_scores
from recog.verification import VerificationResult, verify_embeddings

Embed = Callable[[np.ndarray], EmbeddedImages]


class NamedUri(StrictModel):
    """A set's URI; ``name`` defaults to its last path part without extension (``.../lfw.bin`` -> ``lfw``)."""

    uri: str = Field(min_length=1)
    name: str = Field(min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _default_name(cls, data: Any) -> Any:
        if isinstance(data, dict) and not data.get("name") and isinstance(data.get("uri"), str):
            stem = data["uri"].rstrip("/").rsplit("/", 1)[-1]
            return {**data, "name": stem.rsplit(".", 1)[0] if "." in stem else stem}
        return data


class EvaluateJob(StrictModel):
    model: str = Field(min_length=1, description="exported model folder: model.json + the file it names")
    sets: list[NamedUri] = Field(default_factory=list, description="insightface .bin pair sets")
    tar_pairs: list[NamedUri] = Field(default_factory=list, description="template set folders (TAR@FMR)")
    output: OutputUri = Field(description="folder URI for metrics.json, report.md and the plots")
    ray: RayConfig = RayConfig()
    num_workers: int = Field(1, ge=1, description="> 1: embed on that many Ray actors")
    batch_size: int = Field(256, ge=1)
    num_gpus_per_worker: float = Field(0.0, ge=0.0)
    flip: bool = Field(True, description="fuse the embeddings of each image and its mirror")
    flip_fusion: FlipFusion | None = Field(None, description="overrides model.json (AdaFace: norm_weighted)")
    channel_order: ChannelOrder | None = Field(None, description="overrides model.json (AdaFace: BGR)")
    resize: bool = Field(False, description="resize faces of another size as insightface does, else error")
    nrof_folds: int = Field(10, ge=1)
    fmr_targets: list[float] = Field(default_factory=lambda: list(FMR_TARGETS))

    @field_validator("fmr_targets")
    @classmethod
    def _rates(cls, value: list[float]) -> list[float]:
        if not value or not all(0.0 < t < 1.0 for t in value):
            raise ValueError(f"fmr_targets={value}: expected a non-empty list of rates in (0, 1)")
        return sorted(set(value))

    @model_validator(mode="after")
    def _distinct_sets(self) -> EvaluateJob:
        names = [s.name for s in (*self.sets, *self.tar_pairs)]
        if not names:
            raise ValueError("sets and tar_pairs are both empty: expected at least one set to evaluate")
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"set names {twice} appear more than once: give each set its own name")
        return self

    @property
    def overrides(self) -> dict[str, str]:
        """The model.json fields this job replaces."""
        fields = {"flip_fusion": self.flip_fusion, "channel_order": self.channel_order}
        return {k: v for k, v in fields.items() if v is not None}


@dataclasses.dataclass(frozen=True)
class PairImages:
    name: str
    images: np.ndarray  # uint8 (2N, H, W, 3), pairs consecutive
    issame: np.ndarray


@dataclasses.dataclass(frozen=True)
class TemplateImages:
    name: str
    images: np.ndarray  # uint8 (N, H, W, 3), row i = templates.template_ids[i]
    templates: TemplateSet  # as read, without its encoded images


def check_model(cfg: EvaluateJob) -> ModelSpec:
    """The model's spec with the job's overrides; errors when model.json or its model file is missing."""
    spec = read_spec(cfg.model, cfg.overrides)
    model_file = storage.join(cfg.model, spec.file)
    if not storage.exists(model_file):
        raise FileNotFoundError(f"{model_file}: model.json names {spec.file!r}, which is missing")
    height, width = spec.input_size
    if height != width:
        raise ValueError(f"{cfg.model}: input_size {height}x{width}; verification faces are square")
    return spec


def decode_checked(uri: str, encoded: Sequence[bytes], size: int, resize: bool) -> np.ndarray:
    """Decode faces to uint8 RGB ``size`` x ``size``; another size is an error unless ``resize``."""
    if not resize:
        for i, data in enumerate(encoded):
            found = images.probe_size(data, f"{uri}: image {i}")
            if found != (size, size):
                raise ValueError(
                    f"{uri}: image {i} is {found[1]}x{found[0]} pixels, the model expects {size}x{size} "
                    "(model.json input_size); set resize=true to resize as insightface does"
                )
    try:
        return binsets.decode_images(encoded, size)
    except ValueError as exc:
        raise ValueError(f"{uri}: {exc}") from exc


def load_pairs(pair_set: NamedUri, size: int, resize: bool) -> PairImages:
    """Read a ``.bin`` through the restricted reader and decode its faces."""
    encoded, issame = binsets.read_bin(pair_set.uri)
    if len(issame) == 0:
        raise ValueError(f"{pair_set.uri}: the set holds no pairs")
    return PairImages(pair_set.name, decode_checked(pair_set.uri, encoded, size, resize), issame)


def load_templates(template_set: NamedUri, size: int, resize: bool) -> TemplateImages:
    """Read a template set folder (``templates.parquet`` + ``pairs.parquet``) and decode its faces."""
    templates = read_template_set(template_set.uri)
    issame = np.asarray(templates.issame, dtype=bool)
    if issame.all() or not issame.any():
        raise ValueError(f"{template_set.uri}: pairs.parquet needs both genuine and impostor pairs")
    images = decode_checked(template_set.uri, templates.images, size, resize)
    return TemplateImages(template_set.name, images, dataclasses.replace(templates, images=[], issame=issame))


@contextlib.contextmanager
def open_embedder(cfg: EvaluateJob) -> Iterator[Embed]:
    """images -> EmbeddedImages: an ``EmbedPool`` of Ray actors when ``num_workers > 1``, else this process."""
    if cfg.num_workers > 1:
        init_ray(cfg.ray)
        with EmbedPool(cfg.model, cfg.num_workers, cfg.num_gpus_per_worker, cfg.overrides) as pool:
            yield functools.partial(pool.embed, batch_size=cfg.batch_size, flip=cfg.flip)
    else:
        device = "cuda" if cfg.num_gpus_per_worker > 0 else "cpu"
        embedder = load_face_model(cfg.model, device=device, overrides=cfg.overrides)
        yield functools.partial(embedder.embed_set, batch_size=cfg.batch_size, flip=cfg.flip)


def measurable_targets(targets: Sequence[float], n_impostors: int) -> list[float]:
    """The FMR targets a set can measure: at least one impostor pair may be accepted."""
    return [t for t in targets if t * n_impostors >= 1.0]


def _tar(scores: np.ndarray, issame: np.ndarray, targets: Sequence[float]) -> dict[float, float]:
    measurable = measurable_targets(targets, int(np.sum(~issame)))
    return tar_at_fmr(scores, issame, measurable) if measurable else {}


def pair_metrics(
    embedded: EmbeddedImages, issame: np.ndarray, nrof_folds: int, fmr_targets: Sequence[float]
) -> tuple[VerificationResult, dict[float, float], np.ndarray]:
    """Accuracy/VAL (insightface), TAR@FMR and the pair cosines of pairs (2i, 2i+1)."""
    emb1, emb2 = embedded.embeddings[0::2], embedded.embeddings[1::2]
    result = verify_embeddings(emb1, emb2, issame, nrof_folds, xnorm=embedded.xnorm)
    scores = np.sum(emb1.astype(np.float64) * emb2, axis=1)
    return result, _tar(scores, issame, fmr_targets), scores


def template_scores(embedded: EmbeddedImages, templates: TemplateSet) -> np.ndarray:
    """Cosine of each template pair after IJB-C media/template pooling."""
    ids, features = pool_templates(embedded.embeddings, templates.media_ids, templates.template_ids)
    return template_pair_scores(ids, features, templates.template_1, templates.template_2)


def _fmr_keys(table: dict[float, float]) -> dict[str, float]:
    return {f"{fmr:g}": tar for fmr, tar in table.items()}


def pair_record(result: VerificationResult, tar: dict[float, float], seconds: float) -> dict:
    """The ``metrics.json`` entry of one pair set (fractions, not percent)."""
    return {
        "pairs": result.n_pairs,
        "accuracy": result.accuracy,
        "std": result.std,
        "val_at_far_1e-3": result.val,
        "val_std": result.val_std,
        "far": result.far,
        "xnorm": result.xnorm,
        "fold_accuracies": result.fold_accuracies.tolist(),
        "best_thresholds": result.best_thresholds.tolist(),
        "tar_at_fmr": _fmr_keys(tar),
        "embed_seconds": round(seconds, 3),
        "pairs_per_s": round(result.n_pairs / max(seconds, 1e-9), 1),
    }


def template_table(records: dict[str, dict]) -> str:
    """Markdown table of the template sets: pairs, templates, images and TAR per FMR (percent)."""
    fmrs = sorted({k for r in records.values() for k in r["tar_at_fmr"]}, key=float)
    header = ["Set", "Pairs", "Templates", "Images", *(f"TAR@FMR={float(k):.0e} (%)" for k in fmrs)]
    return markdown_table(
        header,
        (
            [name, r["pairs"], r["templates"], r["images"]]
            + [f"{100 * r['tar_at_fmr'][k]:.2f}" if k in r["tar_at_fmr"] else "–" for k in fmrs]
            for name, r in records.items()
        ),
    )


def model_section(spec: ModelSpec, cfg: EvaluateJob) -> str:
    overrides = ", ".join(f"{k}={v}" for k, v in cfg.overrides.items()) or "none"
    return (
        f"`{cfg.model}`: {spec.format}, input {spec.input_size[0]}x{spec.input_size[1]} {spec.channel_order}, "
        f"mean {list(spec.mean)}, std {list(spec.std)}, embedding {spec.embedding_dim}, "
        f"flip fusion {spec.flip_fusion if cfg.flip else 'off'} (overrides: {overrides}). "
        f"Accuracy and VAL@FAR=1e-3: insightface protocol, {cfg.nrof_folds} folds. TAR@FMR: "
        "sklearn ROC of pair (or pooled template) cosines, only at FMRs the set can measure."
    )


@dataclasses.dataclass(frozen=True)
class EvaluateResult:
    """The evaluation written at ``uri``; ``metrics`` is ``metrics.json``'s content."""

    uri: str
    metrics: dict

    def summary(self) -> dict:
        """Per set: accuracy ± std, VAL@FAR=1e-3 and TAR@FMR (fractions); the mean accuracy and the report."""
        keep = ("pairs", "accuracy", "std", "val_at_far_1e-3", "tar_at_fmr", "templates")
        m = self.metrics
        return {
            "model": m["model"],
            "mean_accuracy": m["mean_accuracy"],
            "sets": {name: {k: v for k, v in rec.items() if k in keep} for name, rec in m["sets"].items()},
            "tar_pairs": {
                name: {k: v for k, v in rec.items() if k in keep} for name, rec in m["tar_pairs"].items()
            },
            "report": m["report"],
        }

    def headline(self) -> str:
        sets = self.metrics["sets"]
        return ", ".join(
            f"{name} {100 * r['accuracy']:.2f}% ± {100 * r['std']:.2f}" for name, r in sets.items()
        )

    def summary_text(self) -> str:
        """One screen: per set accuracy ± std, VAL@FAR=1e-3 and the TAR at the lowest measured FMR."""
        m = self.metrics
        lines = [
            f"model: {m['model']}",
            f"{'set':<22}{'pairs':>7}{'accuracy %':>18}{'VAL@1e-3 %':>12}{'TAR % @FMR':>17}",
        ]
        for name, rec in {**m["sets"], **m["tar_pairs"]}.items():
            acc = f"{100 * rec['accuracy']:.2f} ± {100 * rec['std']:.2f}" if "accuracy" in rec else "–"
            val = f"{100 * rec['val_at_far_1e-3']:.2f}" if "accuracy" in rec else "–"
            lines.append(f"{name:<22}{rec['pairs']:>7}{acc:>18}{val:>12}{_lowest_tar(rec['tar_at_fmr']):>17}")
        lines.append(f"report: {m['report']}")
        return "\n".join(lines)


def _lowest_tar(tar_at_fmr: dict[str, float]) -> str:
    if not tar_at_fmr:
        return "–"
    fmr = min(tar_at_fmr, key=float)
    return f"{100 * tar_at_fmr[fmr]:.2f} @{float(fmr):.0e}"


def run(cfg: EvaluateJob) -> EvaluateResult:
    """Run the evaluation and write its outputs (``metrics.json``, ``report.md``, plots, config)."""
    spec = check_model(cfg)
    size = spec.input_size[0]
    pair_sets = [load_pairs(s, size, cfg.resize) for s in cfg.sets]
    template_sets = [load_templates(s, size, cfg.resize) for s in cfg.tar_pairs]
    check_output_writable(cfg.output)

    rows, curves, pair_records, template_records = [], {}, {}, {}
    with open_embedder(cfg) as embed:
        for pairs in pair_sets:
            start = time.perf_counter()
            embedded = embed(pairs.images)
            seconds = time.perf_counter() - start
            result, tar, scores = pair_metrics(embedded, pairs.issame, cfg.nrof_folds, cfg.fmr_targets)
            rows.append(VerificationRow(pairs.name, result, tar))
            curves[pairs.name] = roc_points(scores, pairs.issame)
            pair_records[pairs.name] = pair_record(result, tar, seconds)
            telemetry.set_gauge("facesynth_eval_pairs_per_s", result.n_pairs / max(seconds, 1e-9))
            print(
                f"[evaluate] {pairs.name}: accuracy {100 * result.accuracy:.2f}% ({seconds:.1f}s)", flush=True
            )
        for ts in template_sets:
            start = time.perf_counter()
            scores = template_scores(embed(ts.images), ts.templates)
            seconds = time.perf_counter() - start
            issame = ts.templates.issame
            tar = _tar(scores, issame, cfg.fmr_targets)
            curves[ts.name] = roc_points(scores, issame)
            template_records[ts.name] = {
                "pairs": len(issame),
                "templates": int(len(np.unique(ts.templates.template_ids))),
                "images": len(ts.images),
                "tar_at_fmr": _fmr_keys(tar),
                "embed_seconds": round(seconds, 3),
            }
            print(f"[evaluate] {ts.name}: {len(issame)} template pairs ({seconds:.1f}s)", flush=True)

    metrics = {
        "model": cfg.model,
        "model_spec": spec.model_dump(mode="json"),
        "mean_accuracy": float(np.mean([r["accuracy"] for r in pair_records.values()])) if rows else None,
        "sets": pair_records,
        "tar_pairs": template_records,
        "report": storage.join(cfg.output, "report.md"),
        "config": cfg.model_dump(mode="json"),
    }
    sections = {"Model and protocol": model_section(spec, cfg)}
    if template_records:
        sections["Template sets (TAR@FMR)"] = template_table(template_records)
    write_report(
        cfg.output, f"Verification: {cfg.model}", verification=rows, roc_curves=curves, sections=sections
    )
    save_resolved(cfg, cfg.output)
    storage.write_bytes(storage.join(cfg.output, "metrics.json"), json.dumps(metrics, indent=2).encode())
    return EvaluateResult(cfg.output, metrics)
