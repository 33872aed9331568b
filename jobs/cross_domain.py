"""``python -m jobs.cross_domain --config cross-domain-quickstart key=value ...``: the cross-domain study.

Real and synthetic shard datasets of the same people are split per identity (and prompt) into
train/test shard datasets under ``<output>/splits/{real,synthetic}/{train,test}``; three closed-set
classifiers (real, synthetic, combined = both train splits) are trained with ``recog.train`` and
each is tested on both test splits: real→real, real→syn, syn→syn, syn→real, combined→syn,
combined→real. Output: ``cross_domain.md`` (the study's tables, per person and per prompt,
confusion matrices), ``cross_domain.json``, ``confusion.png``, ``predictions/*.parquet`` and the
resolved ``config.yaml``. Inputs are checked before anything is written; a rerun skips committed
split units and resumes (or skips) finished trainings.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Literal

from pydantic import Field

from facesynth import manifest, storage
from facesynth.config import StrictModel, parse_job_args, save_resolved
from facesynth.runtime import RayConfig
from recog import cross_domain as cd
from recog.classification import render_experiments
from recog.train.augment import AugmentList, ColorJitter, Flip, Grayscale, Rotate
from recog.train.config import (
    DataConfig,
    DatasetSpec,
    ModelConfig,
    OptimConfig,
    ScalingConfig,
    TrainConfig,
    TrainSection,
)
from recog.train.data import inspect_source
from recog.train.trainer import train_fr

log = logging.getLogger(__name__)
DOMAINS = ("real", "synthetic")


def study_augment() -> list:
    """The study's augmentation: flips, rotation, colour jitter, grayscale with p=0.3."""
    return [Flip(), Rotate(), ColorJitter(), Grayscale(p=0.3)]


class TrainingData(DataConfig):
    """``data`` of the three trainings; the job fills ``datasets`` with its train splits."""

    datasets: list[DatasetSpec] = Field(
        default_factory=list, max_length=0, description="set by the job (its train splits); leave empty"
    )
    label_space: Literal["shared"] = Field(
        "shared", description="equal identity values are one class across real and synthetic images"
    )
    augment: AugmentList = Field(default_factory=study_augment)


class StudyModel(ModelConfig):
    """``model`` of the three trainings: a closed-set classifier, by default the study's ResNet-18."""

    task: Literal["closed_set"] = "closed_set"
    backbone: str = "resnet18"
    input_size: int = Field(64, ge=16, description="square input side in pixels; images must have this size")


class StudyOptim(OptimConfig):
    """``optim`` of the three trainings: the study's Adam by default."""

    name: str = "adam"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)


class StudyTrain(TrainSection):
    """``train`` of the three trainings, with quickstart-sized defaults."""

    steps: int = Field(200, ge=1, description="optimiser steps of each training")
    batch_size: int = Field(32, ge=1, description="images per worker per step")


class DomainLabels(StrictModel):
    """How the report names the domains (the study says "Diffusion" for its synthetic images)."""

    real: str = "Real"
    synthetic: str = "Diffusion"
    combined: str = "Combined"


class CrossDomainJob(StrictModel):
    """Cross-domain study settings; ``model``/``data``/``optim``/``train``/``scaling`` go to every training."""

    real: str = Field(min_length=1, description="shard dataset URI of the real photos")
    synthetic: str = Field(min_length=1, description="shard dataset URI of the synthetic images")
    output: str = Field(min_length=1)
    identities: Literal["same", "intersection"] = Field(
        "same",
        description="same: both datasets must hold the same identities; intersection: keep the common ones",
    )
    test_fraction: float = Field(
        0.2, gt=0, lt=1, description="share of each identity's (and prompt's) samples"
    )
    seed: int = Field(0, ge=0, description="split seed")
    labels: DomainLabels = DomainLabels()
    model: StudyModel = Field(default_factory=StudyModel)
    data: TrainingData = Field(default_factory=TrainingData)
    optim: StudyOptim = Field(default_factory=StudyOptim)
    train: StudyTrain = Field(default_factory=StudyTrain)
    scaling: ScalingConfig = ScalingConfig()
    eval_batch_size: int = Field(256, ge=1)
    ray: RayConfig = RayConfig()


def check_sources(cfg: CrossDomainJob) -> list[int]:
    """Both datasets readable with images of ``model.input_size``; returns the identities to use."""
    found = {}
    for key in DOMAINS:
        uri = getattr(cfg, key)
        if not manifest.load(uri).shards:
            raise ValueError(
                f"{key}={uri!r}: no shard dataset there (no manifest.json or no committed shards)"
            )
        try:
            found[key] = set(inspect_source(DatasetSpec(uri=uri), cfg.model.input_size).identities.tolist())
        except ValueError as exc:
            raise ValueError(f"{key}: {exc}") from exc
    only_real, only_syn = (
        sorted(found["real"] - found["synthetic"]),
        sorted(found["synthetic"] - found["real"]),
    )
    if (only_real or only_syn) and cfg.identities == "same":
        raise ValueError(
            f"real and synthetic hold different identities: only in real {only_real}, only in synthetic "
            f"{only_syn}; expected the same people (or set identities=intersection)"
        )
    common = sorted(found["real"] & found["synthetic"])
    if only_real or only_syn:
        log.warning(
            "using the %d common identities; dropping %s (real) and %s (synthetic)",
            len(common),
            only_real,
            only_syn,
        )
    if len(common) < 2:
        raise ValueError(f"real and synthetic share identities {common}: expected at least 2")
    return common


def check_split(key: str, counts: dict[str, dict[int, int]], identities: list[int]) -> None:
    """Every identity needs train and test samples."""
    for part in cd.SPLITS:
        missing = [i for i in identities if not counts[part].get(i)]
        if missing:
            raise ValueError(
                f"{key}: identities {missing} have no {part} samples (fewer than 2 samples each); "
                "add samples or drop those identities"
            )


def check_split_record(uri: str, record: dict) -> None:
    """Splits already under ``output`` must come from the same inputs and settings."""
    if storage.exists(uri):
        old = json.loads(storage.read_bytes(uri))
        if old != record:
            changed = sorted(k for k in record if old.get(k) != record[k])
            raise ValueError(
                f"{uri}: the splits there were made with other settings "
                f"({', '.join(f'{k}={old.get(k)!r}' for k in changed)}); expected {changed} to match: "
                "use another output or delete it"
            )


def training_config(
    cfg: CrossDomainJob, name: str, splits: dict[str, str], rows: dict[str, int]
) -> TrainConfig:
    """The ``name`` training (real, synthetic or combined) over its train splits, each with its own rows."""
    domains = DOMAINS if name == "combined" else (name,)
    data = {
        **cfg.data.model_dump(),
        "datasets": [{"uri": splits[d], "weight": rows[d]} for d in domains],  # weights: concatenation
    }
    return TrainConfig(
        output=storage.join(cfg.output, "train", name),
        run_name=name,
        model=cfg.model,
        data=DataConfig.model_validate(data),
        optim=cfg.optim,
        train=cfg.train,
        scaling=cfg.scaling,
        ray=cfg.ray,
    )


def train_once(tc: TrainConfig) -> dict:
    """``train_fr`` summary of one training; skipped (no Ray Train start) when it already finished
    with this exact config, as recorded in ``<training output>/training.json``."""
    uri = storage.join(tc.output, "training.json")
    config = tc.model_dump(mode="json")
    if storage.exists(uri):
        done = json.loads(storage.read_bytes(uri))
        if done["config"] == config:
            print(
                f"[cross_domain] {tc.run_name}: finished earlier, reusing {done['result']['model_uri']}",
                flush=True,
            )
            return done["result"]
    result = train_fr(tc).summary()
    storage.write_bytes(uri, json.dumps({"config": config, "result": result}, indent=1).encode())
    return result


def write_report(cfg: CrossDomainJob, experiments: list, results: dict, names: dict, counts: dict) -> str:
    """``cross_domain.md`` + ``confusion.png``; returns the report URI."""
    label = cfg.labels.model_dump()
    cd.plot_confusions(experiments, names, storage.join(cfg.output, "confusion.png"))
    split_rows = [
        f"| {label[d]} | `{getattr(cfg, d)}` | {sum(counts[d]['train'].values())} | {sum(counts[d]['test'].values())} |"
        for d in DOMAINS
    ]
    m, t = cfg.model, cfg.train
    parts = [
        "# Cross-domain face classification",
        "",
        f"- {len(names)} identities; split per identity and prompt, test fraction {cfg.test_fraction:g}, seed {cfg.seed}",
        f"- {m.backbone} ({m.input_size}px), softmax CE, {cfg.optim.name} lr {cfg.optim.lr:g}, "
        f"{t.steps} steps x {t.batch_size} images, augment: {', '.join(a.name for a in cfg.data.augment) or 'none'}",
        "",
        "| domain | dataset | train images | test images |",
        "|---|---|---|---|",
        *split_rows,
        "",
        "## Results",
        "",
        cd.study_table(cd.RUNS, [e.metrics.accuracy for e in experiments], label),
        "",
        render_experiments(experiments).replace("### ", "## ", 1),
        "",
        "## Confusion matrices",
        "",
        "![confusion matrices](confusion.png)",
    ]
    for e in experiments:
        parts += ["", f"### {e.train} → {e.test}", "", cd.confusion_markdown(e, names)]
    parts += ["", "## Trainings", ""]
    parts += [
        f"- {label[k]}: `{r['output']}/report.md` (final loss {r['final_loss']:.4f})"
        for k, r in results.items()
    ]
    uri = storage.join(cfg.output, "cross_domain.md")
    storage.write_bytes(uri, ("\n".join(parts) + "\n").encode())
    return uri


def cross_domain(cfg: CrossDomainJob) -> dict:
    """Run the study (splits, three trainings, six evaluations) and return what ``cross_domain.json`` holds."""
    start = time.perf_counter()
    identities = check_sources(cfg)
    plans = {d: cd.plan_split(getattr(cfg, d), identities, cfg.test_fraction, cfg.seed) for d in DOMAINS}
    counts = {d: plans[d].counts() for d in DOMAINS}
    for d in DOMAINS:
        check_split(d, counts[d], identities)
    record = {
        "real": cfg.real,
        "synthetic": cfg.synthetic,
        "identities": identities,
        "test_fraction": cfg.test_fraction,
        "seed": cfg.seed,
    }
    record_uri = storage.join(cfg.output, "splits", "split.json")
    check_split_record(record_uri, record)
    storage.write_bytes(record_uri, json.dumps(record, indent=1).encode())

    split_base = {d: storage.join(cfg.output, "splits", d) for d in DOMAINS}
    for d in DOMAINS:
        written = cd.write_split(plans[d], split_base[d], record)
        print(
            f"[cross_domain] {d} split: {written} of {len(plans[d].units)} units written "
            f"({sum(counts[d]['train'].values())} train / {sum(counts[d]['test'].values())} test)",
            flush=True,
        )
    train_uris = {d: cd.split_uris(split_base[d])["train"] for d in DOMAINS}
    train_rows = {d: sum(counts[d]["train"].values()) for d in DOMAINS}

    results = {}
    for name in ("real", "synthetic", "combined"):
        results[name] = train_once(training_config(cfg, name, train_uris, train_rows))

    tests = {
        d: cd.read_test_rows(cd.split_uris(split_base[d])["test"], cfg.model.input_size) for d in DOMAINS
    }
    names = {}
    for d in DOMAINS:
        names.update(zip(tests[d]["identity"].tolist(), tests[d]["identity_name"]))
    label = cfg.labels.model_dump()
    experiments, records = [], []
    for i, run in enumerate(cd.RUNS, start=1):
        probs, classes = cd.predict_probs(
            results[run.train]["model_uri"], tests[run.test]["images"], cfg.eval_batch_size
        )
        table = cd.predictions_table(tests[run.test], probs, classes)
        uri = storage.join(cfg.output, "predictions", f"{run.slug}.parquet")
        cd.write_table(table, uri)
        e = cd.experiment_from_predictions(
            f"({i}) {run.role}", label[run.train], label[run.test], table, names
        )
        experiments.append(e)
        records.append({**cd.metrics_record(e), "run": run.slug, "predictions": uri})
        print(f"[cross_domain] {e.train} → {e.test}: accuracy {100 * e.metrics.accuracy:.2f}%", flush=True)

    report = write_report(cfg, experiments, results, names, counts)
    save_resolved(cfg, cfg.output)
    out = {
        "report": report,
        "identities": identities,
        "identity_names": {str(k): v for k, v in sorted(names.items())},
        "splits": {
            d: {part: {str(k): v for k, v in counts[d][part].items()} for part in cd.SPLITS} for d in DOMAINS
        },
        "experiments": records,
        "trainings": results,
        "seconds": time.perf_counter() - start,
        "config": cfg.model_dump(mode="json"),
    }
    storage.write_bytes(storage.join(cfg.output, "cross_domain.json"), json.dumps(out, indent=1).encode())
    return out


def summary_text(result: dict) -> str:
    """One screen: accuracy, F1 and confidence of the six experiments."""
    lines = [f"{'train → test':<28}{'n':>6}{'accuracy %':>12}{'F1 %':>9}{'conf. %':>9}"]
    for e in result["experiments"]:
        lines.append(
            f"{e['train'] + ' → ' + e['test']:<28}{e['n']:>6}{100 * e['accuracy']:>12.2f}"
            f"{100 * e['macro_f1']:>9.2f}{100 * e['mean_confidence']:>9.2f}"
        )
    lines.append(f"report: {result['report']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_job_args(CrossDomainJob, argv, __doc__, default="cross-domain-quickstart")
    result = cross_domain(cfg)
    print(summary_text(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
