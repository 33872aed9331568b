"""The cross-domain study (real vs synthetic faces of the same people): splits, predictions, report.

- Split: every (identity, prompt) group of a dataset is cut by sample into train and test; the
  test part is the ``round(test_fraction * n)`` rows (at least 1, at most n - 1; none when n = 1)
  with the smallest ``shards.row_seeds(seed, identity, sample)``, so the split depends only on the
  rows' keys, never on their order or shard layout. It is materialised as two shard datasets
  (``train``, ``test``) whose unit ``k`` holds source unit ``k``'s rows, so a rerun skips committed
  units.
- Predictions: a closed-set classifier exported by ``recog.train`` (``classifier.json`` + TorchScript
  ``model.pt``) gives softmax probabilities; the predicted identity is the arg-max class's identity.
- The job (:class:`CrossDomainJob`, :func:`run`): checks both datasets, splits them, trains the real,
  synthetic and combined classifiers through ``recog.train`` (a finished training is reused) and tests
  each on both test splits.
- Report: the study's "Training → Testing | Accuracy | Key Finding" table, then accuracy, F1 and
  confidence per experiment with per-person and per-prompt breakdowns (``recog.classification``)
  and the confusion matrices.
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from pydantic import Field

from facesynth import images, manifest, shards, storage
from facesynth.config import OutputUri, StrictModel, save_resolved
from facesynth.preflight import check_output_writable
from facesynth.report import Report, markdown_table
from facesynth.runtime import RayConfig
from recog.classification import (
    Experiment,
    classification_metrics,
    per_class_table,
    per_group_table,
    render_experiments,
)
from recog.train.augment import AugmentList, ColorJitter, Flip, Grayscale, Rotate
from recog.train.config import (
    DataConfig,
    DatasetSpec,
    ModelConfig,
    OptimConfig,
    ScalingConfig,
    TrainFRJob,
    TrainSection,
)
from recog.train.data import inspect_source
from recog.train.trainer import run as train_fr

log = logging.getLogger(__name__)
NO_PROMPT = "(none)"
SPLITS = ("train", "test")


@dataclass(frozen=True)
class Run:
    """One train -> test experiment; ``train``/``test`` are domain keys (real, synthetic, combined)."""

    train: str
    test: str
    role: str

    @property
    def slug(self) -> str:
        return f"{self.train}-to-{self.test}"


# The study's five experiments in its order and with its objectives, plus combined -> real.
RUNS = (
    Run("real", "real", "baseline"),
    Run("real", "synthetic", "forward transfer"),
    Run("synthetic", "synthetic", "synthetic baseline"),
    Run("synthetic", "real", "reverse transfer"),
    Run("combined", "synthetic", "data mixing"),
    Run("combined", "real", "data mixing on real"),
)


def split_mask(
    identity: np.ndarray, sample: np.ndarray, prompt: Sequence[str], test_fraction: float, seed: int
) -> np.ndarray:
    """Boolean test mask over rows, stratified per (identity, prompt); see the module doc for the rule."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction={test_fraction}: expected a fraction in (0, 1)")
    identity = np.asarray(identity, np.int64)
    sample = np.asarray(sample, np.int64)
    if identity.shape != sample.shape or len(prompt) != len(identity):
        raise ValueError(
            f"identity {identity.shape}, sample {sample.shape}, prompt ({len(prompt)},): expected equal lengths"
        )
    if len(identity) == 0:
        return np.zeros(0, bool)
    _, prompt_code = np.unique(np.asarray(prompt, dtype=object).astype(str), return_inverse=True)
    _, group = np.unique(np.stack([identity, prompt_code.ravel()], 1), axis=0, return_inverse=True)
    group = group.ravel()
    order = np.lexsort((shards.row_seeds(seed, identity, sample), group))
    sizes = np.bincount(group)
    starts = np.cumsum(sizes) - sizes
    rank = np.empty(len(group), np.int64)
    rank[order] = np.arange(len(group)) - starts[group[order]]
    n_test = np.where(sizes > 1, np.clip(np.floor(test_fraction * sizes + 0.5), 1, sizes - 1), 0)
    return rank < n_test[group]


def split_uris(base_uri: str) -> dict[str, str]:
    """``{"train": <base>/train, "test": <base>/test}``."""
    return {part: storage.join(base_uri, part) for part in SPLITS}


@dataclass(frozen=True)
class SplitPlan:
    """A dataset's split: source units in order and, per unit, each row's identity and code
    (0 dropped, 1 train, 2 test)."""

    source: str
    units: list[int]
    identity: list[np.ndarray]
    codes: list[np.ndarray]

    def counts(self) -> dict[str, dict[int, int]]:
        """Rows per identity in each split: ``{"train": {identity: n}, "test": {...}}``."""
        identity, code = np.concatenate(self.identity), np.concatenate(self.codes)
        out = {}
        for value, part in enumerate(SPLITS, start=1):
            ids, n = np.unique(identity[code == value], return_counts=True)
            out[part] = dict(zip(ids.tolist(), n.tolist()))
        return out


def plan_split(source_uri: str, keep_identities: Iterable[int], test_fraction: float, seed: int) -> SplitPlan:
    """Split the rows of ``source_uri`` (identities outside ``keep_identities`` are dropped).

    Only the identity, sample and prompt columns are read.
    """
    tables = list(shards.iter_tables(source_uri, columns=["identity", "sample", "prompt"]))
    table = pa.concat_tables(tables)
    identity = table["identity"].to_numpy()
    keep = np.isin(identity, np.fromiter(keep_identities, np.int64))
    test = np.zeros(len(identity), bool)
    test[keep] = split_mask(
        identity[keep],
        table["sample"].to_numpy()[keep],
        np.asarray(pc.fill_null(table["prompt"], "").to_pylist(), dtype=object)[keep],
        test_fraction,
        seed,
    )
    codes = np.where(keep, np.where(test, 2, 1), 0).astype(np.int8)
    bounds = np.cumsum([0] + [len(t) for t in tables]).tolist()
    parts = list(zip(bounds[:-1], bounds[1:]))
    return SplitPlan(
        source_uri,
        sorted(manifest.load(source_uri).shards),
        [identity[a:b] for a, b in parts],
        [codes[a:b] for a, b in parts],
    )


def write_split(plan: SplitPlan, base_uri: str, card: dict) -> int:
    """Write the ``train``/``test`` shard datasets of ``plan`` under ``base_uri`` (unit i: the rows of the
    source's i-th shard); committed units are skipped. Returns the number of units written now."""
    refs = shards.committed_shards(plan.source)
    source_plan = manifest.load(plan.source).plan
    written = 0
    for value, (part, uri) in enumerate(split_uris(base_uri).items(), start=1):
        settings = {**card, "split": part, "source_fingerprint": source_plan and source_plan.fingerprint}

        def produce(pending: list[int], value=value, uri=uri) -> Iterable[dict]:
            for i in pending:
                table = refs[i].read()
                yield shards.write_shard(uri, i, table.filter(pa.array(plan.codes[i] == value)))

        result = shards.write_units(
            uri,
            manifest.Plan(len(refs), settings),
            list(range(len(refs))),
            produce,
            commit_every_s=0,
            desc=f"split {part}",
        )
        written = max(written, result.committed_now)
        shards.write_card(uri, {**card, "split": part}, title=f"cross-domain {part} split of {plan.source}")
    return written


def read_test_rows(uri: str, input_size: int) -> dict:
    """A test split's decoded images (uint8 NHWC), identities, names, samples and prompts."""
    table = pa.concat_tables(
        shards.iter_tables(uri, columns=["image", "identity", "identity_name", "sample", "prompt"])
    )
    size = (input_size, input_size)
    faces = images.decode_to_size(table["image"].to_pylist(), size, resize="exact", what=f"{uri} row")
    prompts = pc.fill_null(table["prompt"], "").to_pylist()
    return {
        "images": faces,
        "identity": table["identity"].to_numpy(),
        "identity_name": table["identity_name"].to_pylist(),
        "sample": table["sample"].to_numpy(),
        "prompt": [p or NO_PROMPT for p in prompts],
    }


def predict_probs(model_uri: str, images: np.ndarray, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Softmax probabilities (float32, N x C) of an exported classifier and the identity of each class."""
    spec = json.loads(storage.read_bytes(storage.join(model_uri, "classifier.json")))
    if spec.get("format") != "torchscript":
        raise ValueError(
            f"{model_uri}/classifier.json: format {spec.get('format')!r}, expected 'torchscript'"
        )
    size = tuple(spec["input_size"])
    if tuple(images.shape[1:3]) != size:
        raise ValueError(f"images are {images.shape[1]}x{images.shape[2]}, the classifier expects {size}")
    model = torch.jit.load(io.BytesIO(storage.read_bytes(storage.join(model_uri, spec["file"]))))
    model.eval()
    mean = torch.tensor(spec["mean"], dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(spec["std"], dtype=torch.float32).view(1, 3, 1, 1)
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size])).permute(0, 3, 1, 2)
            out.append(torch.softmax(model(((x / 255) - mean) / std).float(), dim=1).numpy())
    classes = np.array([identity for _, identity in spec["class_identity"]], np.int64)
    return np.concatenate(out).astype(np.float32), classes


def predictions_table(rows: dict, probs: np.ndarray, classes: np.ndarray) -> pa.Table:
    """The saved predictions of one experiment: keys, true and predicted identity, prompt, probabilities."""
    return pa.table(
        {
            "identity": pa.array(rows["identity"], pa.int64()),
            "sample": pa.array(rows["sample"], pa.int64()),
            "prompt": pa.array(rows["prompt"], pa.string()),
            "predicted": pa.array(classes[probs.argmax(axis=1)], pa.int64()),
            "probs": pa.array(list(probs), pa.list_(pa.float32())),
        }
    )


def write_table(table: pa.Table, uri: str) -> None:
    """Write ``table`` as one parquet file at ``uri`` (atomically, through ``facesynth.storage``)."""
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    storage.write_bytes(uri, buffer.getvalue())


def experiment_from_predictions(name: str, train: str, test: str, table: pa.Table, names: dict) -> Experiment:
    """Metrics and per-person / per-prompt tables of one experiment from its predictions table."""
    y_true, y_pred = table["identity"].to_numpy(), table["predicted"].to_numpy()
    probs = np.stack(table["probs"].to_numpy(zero_copy_only=False)).astype(np.float32)
    return Experiment(
        name=name,
        train=train,
        test=test,
        metrics=classification_metrics(y_true, y_pred, probs),
        per_class=per_class_table(y_true, y_pred, probs, class_names=names),
        per_group=per_group_table(y_true, y_pred, table["prompt"].to_pylist(), probs),
    )


def key_findings(runs: Sequence[Run], accuracy: Sequence[float], label: dict[str, str]) -> list[str]:
    """The study's "Key Finding" column: in-domain baselines, and every other run against the
    in-domain baseline of its test domain (the study's "Domain interference (-11.4%)")."""
    baseline = {r.test: a for r, a in zip(runs, accuracy) if r.train == r.test}
    out = []
    for run, acc in zip(runs, accuracy):
        if run.train == run.test:
            out.append("In-domain baseline")
            continue
        ref = baseline.get(run.test)
        if ref is None:
            out.append("–")
            continue
        delta = 100 * (acc - ref)
        if delta == 0:
            kind = "no change"
        elif run.train == "combined":
            kind = "domain interference" if delta < 0 else "complementary data"
        else:
            kind = "transfer drop" if delta < 0 else "transfer gain"
        out.append(f"{kind.capitalize()} ({delta:+.1f}% vs {label[run.test]} → {label[run.test]})")
    return out


def study_table(runs: Sequence[Run], accuracy: Sequence[float], label: dict[str, str]) -> str:
    """The study's results table: ``Training → Testing | Accuracy | Key Finding``."""
    return markdown_table(
        ["Training → Testing", "Accuracy", "Key Finding"],
        (
            [f"{label[run.train]} → {label[run.test]}", f"{100 * acc:.2f}%", finding]
            for run, acc, finding in zip(runs, accuracy, key_findings(runs, accuracy, label))
        ),
    )


def confusion_markdown(experiment: Experiment, names: dict) -> str:
    """Confusion matrix as markdown: rows true identity, columns predicted identity."""
    labels = [names.get(int(x), str(x)) for x in experiment.metrics.labels]
    return markdown_table(
        ["true \\ predicted", *labels],
        ([name, *(int(v) for v in row)] for name, row in zip(labels, experiment.metrics.confusion)),
    )


def plot_confusions(experiments: Sequence[Experiment], names: dict, uri: str) -> None:
    """One PNG with a confusion-matrix panel per experiment (counts annotated)."""
    from matplotlib.figure import Figure

    cols = min(3, len(experiments))
    rows = -(-len(experiments) // cols)
    fig = Figure(figsize=(4 * cols, 3.6 * rows), dpi=100)
    for i, e in enumerate(experiments):
        ax = fig.add_subplot(rows, cols, i + 1)
        conf = e.metrics.confusion
        ax.imshow(conf, cmap="Blues")
        ticks = [names.get(int(x), str(x)) for x in e.metrics.labels]
        ax.set_xticks(range(len(ticks)), ticks, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(ticks)), ticks, fontsize=7)
        for (r, c), v in np.ndenumerate(conf):
            ax.text(c, r, str(int(v)), ha="center", va="center", fontsize=7)
        ax.set_title(f"{e.train} → {e.test}: {100 * e.metrics.accuracy:.1f}%", fontsize=9)
        ax.set_xlabel("predicted", fontsize=8)
        ax.set_ylabel("true", fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    storage.write_bytes(uri, buffer.getvalue())


def metrics_record(experiment: Experiment) -> dict:
    """JSON-ready numbers of one experiment (fractions, not percent)."""
    m = experiment.metrics
    return {
        "name": experiment.name,
        "train": experiment.train,
        "test": experiment.test,
        "n": m.n,
        "accuracy": m.accuracy,
        "macro_f1": m.macro_f1,
        "mean_confidence": m.mean_confidence,
        "labels": m.labels.tolist(),
        "confusion": m.confusion.tolist(),
        "per_person": experiment.per_class,
        "per_prompt": experiment.per_group,
    }


# --- the cross_domain job ----------------------------------------------------------------------

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
    output: OutputUri = Field(description="folder URI: splits/, train/, predictions/, the report")
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
                f"{key}={uri!r}: no shard dataset there (not a facesynth dataset, or nothing committed)"
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
    for part in SPLITS:
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
) -> TrainFRJob:
    """The ``name`` training (real, synthetic or combined) over its train splits, each with its own rows."""
    domains = DOMAINS if name == "combined" else (name,)
    data = {
        **cfg.data.model_dump(),
        "datasets": [{"uri": splits[d], "weight": rows[d]} for d in domains],  # weights: concatenation
    }
    return TrainFRJob(
        output=storage.join(cfg.output, "train", name),
        run_name=name,
        model=cfg.model,
        data=DataConfig.model_validate(data),
        optim=cfg.optim,
        train=cfg.train,
        scaling=cfg.scaling,
        ray=cfg.ray,
    )


def train_once(tc: TrainFRJob) -> dict:
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
    plot_confusions(experiments, names, storage.join(cfg.output, "confusion.png"))
    m, t = cfg.model, cfg.train
    augment = ", ".join(a.name for a in cfg.data.augment) or "none"
    report = (
        Report("Cross-domain face classification")
        .bullets(
            [
                f"{len(names)} identities; split per identity and prompt, test fraction {cfg.test_fraction:g}, "
                f"seed {cfg.seed}",
                f"{m.backbone} ({m.input_size}px), softmax CE, {cfg.optim.name} lr {cfg.optim.lr:g}, "
                f"{t.steps} steps x {t.batch_size} images, augment: {augment}",
            ]
        )
        .table(
            ["domain", "dataset", "train images", "test images"],
            [
                [
                    label[d],
                    f"`{getattr(cfg, d)}`",
                    sum(counts[d]["train"].values()),
                    sum(counts[d]["test"].values()),
                ]
                for d in DOMAINS
            ],
        )
        .section("Results")
        .text(study_table(RUNS, [e.metrics.accuracy for e in experiments], label))
        .text(render_experiments(experiments).replace("### ", "## ", 1))
        .section("Confusion matrices")
        .figure("confusion.png", "confusion matrices")
    )
    for e in experiments:
        report.text(f"### {e.train} → {e.test}").text(confusion_markdown(e, names))
    report.section("Trainings").bullets(
        f"{label[k]}: `{r['output']}/report.md` (final loss {r['final_loss']:.4f})"
        for k, r in results.items()
    )
    return report.write(cfg.output, "cross_domain.md")


def run(cfg: CrossDomainJob) -> CrossDomainResult:
    """Run the study (splits, three trainings, six evaluations); ``cross_domain.json`` holds the result."""
    start = time.perf_counter()
    identities = check_sources(cfg)
    check_output_writable(cfg.output)
    plans = {d: plan_split(getattr(cfg, d), identities, cfg.test_fraction, cfg.seed) for d in DOMAINS}
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
        written = write_split(plans[d], split_base[d], record)
        print(
            f"[cross_domain] {d} split: {written} of {len(plans[d].units)} units written "
            f"({sum(counts[d]['train'].values())} train / {sum(counts[d]['test'].values())} test)",
            flush=True,
        )
    train_uris = {d: split_uris(split_base[d])["train"] for d in DOMAINS}
    train_rows = {d: sum(counts[d]["train"].values()) for d in DOMAINS}

    results = {}
    for name in ("real", "synthetic", "combined"):
        results[name] = train_once(training_config(cfg, name, train_uris, train_rows))

    tests = {d: read_test_rows(split_uris(split_base[d])["test"], cfg.model.input_size) for d in DOMAINS}
    names = {}
    for d in DOMAINS:
        names.update(zip(tests[d]["identity"].tolist(), tests[d]["identity_name"]))
    label = cfg.labels.model_dump()
    experiments, records = [], []
    for i, run in enumerate(RUNS, start=1):
        probs, classes = predict_probs(
            results[run.train]["model_uri"], tests[run.test]["images"], cfg.eval_batch_size
        )
        table = predictions_table(tests[run.test], probs, classes)
        uri = storage.join(cfg.output, "predictions", f"{run.slug}.parquet")
        write_table(table, uri)
        e = experiment_from_predictions(f"({i}) {run.role}", label[run.train], label[run.test], table, names)
        experiments.append(e)
        records.append({**metrics_record(e), "run": run.slug, "predictions": uri})
        print(f"[cross_domain] {e.train} → {e.test}: accuracy {100 * e.metrics.accuracy:.2f}%", flush=True)

    report = write_report(cfg, experiments, results, names, counts)
    save_resolved(cfg, cfg.output)
    out = {
        "report": report,
        "identities": identities,
        "identity_names": {str(k): v for k, v in sorted(names.items())},
        "splits": {
            d: {part: {str(k): v for k, v in counts[d][part].items()} for part in SPLITS} for d in DOMAINS
        },
        "experiments": records,
        "trainings": results,
        "seconds": time.perf_counter() - start,
        "config": cfg.model_dump(mode="json"),
    }
    storage.write_bytes(storage.join(cfg.output, "cross_domain.json"), json.dumps(out, indent=1).encode())
    return CrossDomainResult(cfg.output, out)


@dataclass(frozen=True)
class CrossDomainResult:
    """The study written at ``uri``; ``info`` is ``cross_domain.json``'s content."""

    uri: str
    info: dict

    def summary(self) -> dict:
        return {k: v for k, v in self.info.items() if k != "config"}

    def headline(self) -> str:
        return ", ".join(
            f"{e['train']}→{e['test']} {100 * e['accuracy']:.1f}%" for e in self.info["experiments"]
        )

    def summary_text(self) -> str:
        """One screen: accuracy, F1 and confidence of the six experiments."""
        result = self.info
        lines = [f"{'train → test':<28}{'n':>6}{'accuracy %':>12}{'F1 %':>9}{'conf. %':>9}"]
        for e in result["experiments"]:
            lines.append(
                f"{e['train'] + ' → ' + e['test']:<28}{e['n']:>6}{100 * e['accuracy']:>12.2f}"
                f"{100 * e['macro_f1']:>9.2f}{100 * e['mean_confidence']:>9.2f}"
            )
        lines.append(f"report: {result['report']}")
        return "\n".join(lines)
