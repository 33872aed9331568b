"""The dataset_quality job: judge a shard dataset with an exported face model (metrics: :mod:`recog.quality`).

Embeds the dataset (and an optional real/training ``reference``) with the judge on Ray Data
actors, then writes ``quality.json`` (identity consistency, intra-class diversity, inter-class
separation, precision/recall and FID against the reference, identity leakage, t0 histogram,
LPIPS), ``report.md`` with tables and a sample grid, and the resolved config to ``output``.
All inputs are checked before any model runs; ``quality.json`` is written last.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import Field

from facesynth import images, storage
from facesynth.config import OutputUri, StrictModel, save_resolved
from facesynth.embed import (
    EmbeddedDataset,
    EmbedPlan,
    choose_subset,
    plan_embedding,
    read_faces,
    run_embedding,
)
from facesynth.preflight import check_output_writable
from facesynth.runtime import RayConfig, init_ray
from recog import quality
from recog.classification import markdown_table
from recog.report import write_report

LOWEST_LISTED = 10


class DatasetQualityJob(StrictModel):
    """The dataset_quality job: which dataset, judged by which model against which reference."""

    dataset: str = Field(min_length=1, description="shard dataset URI to judge")
    reference: str | None = Field(None, description="real/training shard dataset URI: P/R, FID, leakage")
    judge: str = Field(min_length=1, description="exported face-model folder (model.json + model.pt)")
    output: OutputUri = Field(description="folder URI for quality.json, report.md and samples.png")
    max_identities: int | None = Field(
        None, ge=2, description="per set, evenly spaced over its sorted identity ids"
    )
    max_images_per_identity: int | None = Field(
        None, ge=1, description="per set, the smallest sample numbers"
    )
    resize: bool = Field(
        False, description="resize images to the judge's input_size (else a size mismatch is an error)"
    )
    flip: bool = Field(True, description="fuse the embeddings of each image and its mirror")
    batch_size: int = Field(64, ge=1)
    num_workers: int = Field(1, ge=1, description="embedding actors")
    num_gpus_per_worker: float = Field(0.0, ge=0)
    num_cpus_per_worker: float = Field(1.0, gt=0)
    k: int = Field(3, ge=1, description="nearest neighbours of the precision/recall manifolds")
    leakage_threshold: float | None = Field(
        None,
        ge=-1.0,
        le=1.0,
        description="centre cosine that flags a leaked identity; None: from the reference, at leakage_fpr",
    )
    leakage_fpr: float = Field(
        0.01, gt=0.0, lt=1.0, description="share of new identities (drawn like the reference) flagged"
    )
    lpips: bool = False
    lpips_net: Literal["alex", "vgg", "squeeze"] = "alex"
    lpips_images_per_identity: int = Field(8, ge=2)
    grid_identities: int = Field(8, ge=1)
    grid_samples: int = Field(8, ge=1)
    use_ray: bool = True
    ray: RayConfig = RayConfig()


def _finite(value: float) -> float | None:
    return None if math.isnan(value) else value


def _per_identity_summary(per_identity: dict[int, float]) -> dict:
    values = np.array(list(per_identity.values()))
    if len(values) == 0:
        return {"identities": 0}
    return {
        "identities": len(values),
        "min": float(values.min()),
        "median": float(np.median(values)),
        "max": float(values.max()),
    }


def t0_histogram(t0: np.ndarray) -> dict | None:
    """Rows per two-stage switch step ``t0`` (and how many rows were single-stage, t0 = -1); None if none."""
    t0 = np.asarray(t0, np.int64)
    values, counts = np.unique(t0[t0 >= 0], return_counts=True)
    if len(values) == 0:
        return None
    return {"t0": values.tolist(), "count": counts.tolist(), "single_stage_rows": int((t0 < 0).sum())}


def quality_metrics(
    syn: EmbeddedDataset,
    ref: EmbeddedDataset | None,
    *,
    k: int,
    leakage_threshold: float | None,
    leakage_fpr: float = 0.01,
) -> dict:
    """The embedding statistics of ``quality.json`` (see :mod:`recog.quality`).

    ``leakage_threshold`` None: :func:`recog.quality.nearest_identity_threshold` of the reference at ``leakage_fpr``.
    """
    consistency = quality.identity_consistency(syn.embeddings, syn.identities)
    diversity = quality.intra_class_diversity(syn.embeddings, syn.identities)
    lowest = sorted(consistency["per_identity"].items(), key=lambda kv: (kv[1], kv[0]))[:LOWEST_LISTED]
    out = {
        "images": len(syn.identities),
        "identities": len(np.unique(syn.identities)),
        "identity_consistency": {
            "mean": consistency["mean"],
            "chance": quality.consistency_chance(syn.embeddings, syn.identities),
            "per_identity": _per_identity_summary(consistency["per_identity"]),
            "lowest": [{"identity": i, "cosine": c} for i, c in lowest],
        },
        "intra_class_diversity": {
            "mean": _finite(diversity["mean"]),
            "per_identity": _per_identity_summary(diversity["per_identity"]),
        },
        "inter_class_separation": quality.inter_class_separation(syn.embeddings, syn.identities),
        "precision_recall": None,
        "fid": None,
        "leakage": None,
        "t0_histogram": t0_histogram(syn.columns["t0"]),
    }
    if ref is not None:
        source = "config"
        if leakage_threshold is None:
            leakage_threshold = quality.nearest_identity_threshold(
                ref.embeddings, ref.identities, leakage_fpr
            )
            source = f"reference nearest-identity cosines at FPR {leakage_fpr:g}"
        leaks = quality.identity_leakage(
            syn.embeddings, syn.identities, ref.embeddings, ref.identities, leakage_threshold
        )
        out.update(
            reference_images=len(ref.identities),
            reference_identities=len(np.unique(ref.identities)),
            precision_recall=quality.precision_recall(ref.embeddings, syn.embeddings, k=k),
            fid=quality.fid(ref.embeddings, syn.embeddings),
            leakage={
                "threshold": leakage_threshold,
                "threshold_source": source,
                "identities_checked": len(leaks),
                "max_cosine": max(row["cosine"] for row in leaks),
                "flagged": [
                    {key: row[key] for key in ("synthetic_identity", "nearest_real_identity", "cosine")}
                    for row in leaks
                    if row["leaked"]
                ],
            },
        )
    return out


def check_plans(cfg: DatasetQualityJob, syn: EmbedPlan, ref: EmbedPlan | None) -> None:
    """Errors the statistics would raise after embedding, raised before it."""
    if len(syn.subset.identities) < 2:
        raise ValueError(
            f"dataset={cfg.dataset!r}: {len(syn.subset.identities)} identity to judge; "
            "inter-class separation needs at least 2"
        )
    if ref is not None and not cfg.k < min(syn.rows, ref.rows):
        raise ValueError(
            f"k={cfg.k}: precision/recall needs k < the images of both sets "
            f"(dataset {syn.rows}, reference {ref.rows})"
        )


def write_sample_grid(plan: EmbedPlan, emb: EmbeddedDataset, identities: int, samples: int, uri: str) -> None:
    """PNG grid at ``uri``: a row per judged identity (up to ``identities``, evenly spaced), its first
    images (up to ``samples``, fewer columns when no identity has that many) in sample order."""
    subset = choose_subset(emb.identities, emb.columns["sample"], identities, samples)
    faces, ids, smp = read_faces(plan, subset)
    order = np.lexsort((smp, ids))
    faces, ids = faces[order], ids[order]
    cols = int(np.unique(ids, return_counts=True)[1].max())
    grid = np.full((len(subset.identities) * cols, *faces.shape[1:]), 255, dtype=np.uint8)
    for row, identity in enumerate(subset.identities):
        members = faces[ids == identity]
        grid[row * cols : row * cols + len(members)] = members
    images.save_grid(grid, uri, cols=cols)


def lpips_report(cfg: DatasetQualityJob, plan: EmbedPlan, emb: EmbeddedDataset) -> dict:
    """LPIPS diversity on a few images per identity, or ``status: skipped`` with the reason."""
    if not cfg.lpips:
        return {"status": "skipped", "reason": "lpips=false in the config"}
    reason = quality.lpips_unavailable_reason(cfg.lpips_net)
    if reason is not None:
        return {"status": "skipped", "reason": reason}
    subset = choose_subset(emb.identities, emb.columns["sample"], None, cfg.lpips_images_per_identity)
    images, ids, _ = read_faces(plan, subset)
    return quality.lpips_diversity(images, ids, net=cfg.lpips_net)


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"


def report_sections(q: dict) -> dict[str, str]:
    """Markdown sections of ``report.md``: summary, lowest-consistency identities, leakage, t0, LPIPS."""
    sep = q["inter_class_separation"]
    rows = [
        ("images / identities", f"{q['images']} / {q['identities']}"),
        ("identity consistency (mean cosine to centre)", _fmt(q["identity_consistency"]["mean"])),
        ("identity consistency at chance (labels shuffled)", _fmt(q["identity_consistency"]["chance"])),
        ("intra-class diversity (mean 1 - cosine)", _fmt(q["intra_class_diversity"]["mean"])),
        ("inter-class mean centre cosine", _fmt(sep["mean_centre_cosine"])),
        (
            "inter-class nearest centre cosine (mean / max)",
            f"{_fmt(sep['nearest_centre_cosine_mean'])} / {_fmt(sep['nearest_centre_cosine_max'])}",
        ),
    ]
    if q["precision_recall"] is not None:
        pr = q["precision_recall"]
        rows += [
            (
                f"precision / recall (k={pr['k']}) vs reference",
                f"{_fmt(pr['precision'])} / {_fmt(pr['recall'])}",
            ),
            ("FID on face embeddings vs reference", _fmt(q["fid"])),
        ]
    sections = {
        "Summary": markdown_table([{"metric": m, "value": v} for m, v in rows]),
        "Lowest identity consistency": markdown_table(
            [
                {"identity": r["identity"], "cosine": _fmt(r["cosine"])}
                for r in q["identity_consistency"]["lowest"]
            ]
        ),
    }
    if q["leakage"] is not None:
        leak = q["leakage"]
        flagged = [
            {
                "identity": r["synthetic_identity"],
                "nearest reference identity": r["nearest_real_identity"],
                "cosine": _fmt(r["cosine"]),
            }
            for r in leak["flagged"]
        ]
        head = (
            f"{len(flagged)} of {leak['identities_checked']} identities have a reference identity centre "
            f"above cosine {_fmt(leak['threshold'])} ({leak['threshold_source']}; max {_fmt(leak['max_cosine'])})."
        )
        sections["Identity leakage"] = head + ("\n\n" + markdown_table(flagged) if flagged else "")
    if q["t0_histogram"] is not None:
        hist = q["t0_histogram"]
        sections["Two-stage t0"] = (
            markdown_table([{"t0": t, "images": c} for t, c in zip(hist["t0"], hist["count"], strict=True)])
            + f"\n\nSingle-stage rows (t0 = -1): {hist['single_stage_rows']}"
        )
    lp = q["lpips"]
    sections["LPIPS diversity"] = (
        f"mean LPIPS ({lp['net']}) between consecutive images of an identity: {_fmt(lp['mean'])}"
        if lp["status"] == "ok"
        else f"skipped: {lp['reason']}"
    )
    sections["Samples"] = (
        "Rows: identities; columns: their images in sample order.\n\n![samples](samples.png)"
    )
    return sections


@dataclass(frozen=True)
class DatasetQualityResult:
    """The judgement written at ``uri``; ``quality`` is ``quality.json``'s content."""

    uri: str
    quality: dict

    def summary(self) -> dict:
        return self.quality

    def headline(self) -> str:
        q = self.quality
        ic, leak = q["identity_consistency"], q["leakage"]
        text = (
            f"identity consistency {ic['mean']:.3f} (chance {ic['chance']:.3f}), "
            f"diversity {_fmt(q['intra_class_diversity']['mean'])}"
        )
        return text + (f", leaked {len(leak['flagged'])} of {leak['identities_checked']}" if leak else "")

    def summary_text(self) -> str:
        return "\n".join(summary_lines(self.quality))


def run(cfg: DatasetQualityJob) -> DatasetQualityResult:
    """Run the job (checks first, ``quality.json`` last)."""
    limits = {
        "max_identities": cfg.max_identities,
        "max_images_per_identity": cfg.max_images_per_identity,
        "resize": cfg.resize,
    }
    syn_plan = plan_embedding(cfg.dataset, cfg.judge, **limits)
    ref_plan = plan_embedding(cfg.reference, cfg.judge, **limits) if cfg.reference else None
    check_plans(cfg, syn_plan, ref_plan)
    check_output_writable(cfg.output)
    if cfg.use_ray:
        init_ray(cfg.ray)
    run = {
        "batch_size": cfg.batch_size,
        "num_workers": cfg.num_workers,
        "flip": cfg.flip,
        "num_gpus_per_worker": cfg.num_gpus_per_worker,
        "num_cpus_per_worker": cfg.num_cpus_per_worker,
        "use_ray": cfg.use_ray,
    }
    syn, *rest = run_embedding([syn_plan, *([ref_plan] if ref_plan else [])], **run)
    ref = rest[0] if rest else None
    q = {
        "dataset": cfg.dataset,
        "reference": cfg.reference,
        "judge": cfg.judge,
        **quality_metrics(
            syn, ref, k=cfg.k, leakage_threshold=cfg.leakage_threshold, leakage_fpr=cfg.leakage_fpr
        ),
        "lpips": lpips_report(cfg, syn_plan, syn),
    }
    write_sample_grid(
        syn_plan, syn, cfg.grid_identities, cfg.grid_samples, storage.join(cfg.output, "samples.png")
    )
    q["report"] = write_report(cfg.output, f"Dataset quality: {cfg.dataset}", sections=report_sections(q))
    save_resolved(cfg, cfg.output)
    storage.write_bytes(storage.join(cfg.output, "quality.json"), json.dumps(q, indent=2).encode())
    return DatasetQualityResult(cfg.output, q)


def summary_lines(q: dict) -> list[str]:
    """The one-screen printed summary."""
    sep = q["inter_class_separation"]
    lines = [
        f"dataset quality of {q['dataset']} judged by {q['judge']}",
        f"  {q['images']} images, {q['identities']} identities",
        f"  identity consistency   {_fmt(q['identity_consistency']['mean'])}"
        f"  (chance {_fmt(q['identity_consistency']['chance'])}, "
        f"per identity min {_fmt(q['identity_consistency']['per_identity']['min'])})",
        f"  intra-class diversity  {_fmt(q['intra_class_diversity']['mean'])}",
        f"  inter-class centres    mean cos {_fmt(sep['mean_centre_cosine'])}, "
        f"nearest max {_fmt(sep['nearest_centre_cosine_max'])}",
    ]
    if q["precision_recall"] is not None:
        pr, leak = q["precision_recall"], q["leakage"]
        lines += [
            f"  vs {q['reference']}: precision {_fmt(pr['precision'])}, recall {_fmt(pr['recall'])}, "
            f"FID {_fmt(q['fid'])}",
            f"  leakage: {len(leak['flagged'])} of {leak['identities_checked']} identities above cosine "
            f"{_fmt(leak['threshold'])} ({leak['threshold_source']})",
        ]
    if q["t0_histogram"] is not None:
        hist = q["t0_histogram"]
        lines.append("  t0: " + ", ".join(f"{t}x{c}" for t, c in zip(hist["t0"], hist["count"], strict=True)))
    lines += [f"  lpips: {q['lpips'].get('mean', q['lpips'].get('reason'))}", f"  report: {q['report']}"]
    return lines
