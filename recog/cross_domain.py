"""The cross-domain study (real vs synthetic faces of the same people): splits, predictions, report.

- Split: every (identity, prompt) group of a dataset is cut by sample into train and test; the
  test part is the ``round(test_fraction * n)`` rows (at least 1, at most n - 1; none when n = 1)
  with the smallest ``shards.row_seeds(seed, identity, sample)``, so the split depends only on the
  rows' keys, never on their order or shard layout. It is materialised as two shard datasets
  (``train``, ``test``) whose unit ``k`` holds source unit ``k``'s rows, so a rerun skips committed
  units.
- Predictions: a closed-set classifier exported by ``recog.train`` (``classifier.json`` + TorchScript
  ``model.pt``) gives softmax probabilities; the predicted identity is the arg-max class's identity.
- Report: the study's "Training → Testing | Accuracy | Key Finding" table, then accuracy, F1 and
  confidence per experiment with per-person and per-prompt breakdowns (``recog.classification``)
  and the confusion matrices.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from facesynth import manifest, shards, storage
from facesynth.binsets import decode_rgb
from recog.classification import Experiment, classification_metrics, per_class_table, per_group_table

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
    """Write the ``train``/``test`` shard datasets of ``plan`` under ``base_uri``; committed units are
    skipped. Returns the number of source units written now (0 when the split was already complete)."""
    uris = split_uris(base_uri)
    done = [set(manifest.load(uri).shards) for uri in uris.values()]
    written = 0
    for unit, file, code in zip(plan.units, shards.committed_files(plan.source), plan.codes):
        if all(unit in d for d in done):
            continue
        with storage.open_input(file) as f:
            table = pq.read_table(f)
        for value, uri in enumerate(uris.values(), start=1):
            record = shards.write_shard(uri, unit, table.filter(pa.array(code == value)))
            manifest.commit(uri, [record], units_total=len(plan.units))
        written += 1
    for part, uri in uris.items():
        shards.write_card(uri, {**card, "split": part}, title=f"cross-domain {part} split of {plan.source}")
    return written


def read_test_rows(uri: str, input_size: int) -> dict:
    """A test split's decoded images (uint8 NHWC), identities, names, samples and prompts."""
    table = pa.concat_tables(
        shards.iter_tables(uri, columns=["image", "identity", "identity_name", "sample", "prompt"])
    )
    images = np.empty((len(table), input_size, input_size, 3), np.uint8)
    for i, data in enumerate(table["image"].to_pylist()):
        rgb = decode_rgb(data, f"{uri} row {i}")
        if rgb.shape[:2] != (input_size, input_size):
            raise ValueError(
                f"{uri} row {i}: image is {rgb.shape[0]}x{rgb.shape[1]}, expected {input_size}x{input_size}"
            )
        images[i] = rgb
    prompts = pc.fill_null(table["prompt"], "").to_pylist()
    return {
        "images": images,
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
    lines = ["| Training → Testing | Accuracy | Key Finding |", "|---|---|---|"]
    for run, acc, finding in zip(runs, accuracy, key_findings(runs, accuracy, label)):
        lines.append(f"| {label[run.train]} → {label[run.test]} | {100 * acc:.2f}% | {finding} |")
    return "\n".join(lines)


def confusion_markdown(experiment: Experiment, names: dict) -> str:
    """Confusion matrix as markdown: rows true identity, columns predicted identity."""
    labels = [names.get(int(x), str(x)) for x in experiment.metrics.labels]
    lines = ["| true \\ predicted | " + " | ".join(labels) + " |", "|" + "---|" * (len(labels) + 1)]
    for name, row in zip(labels, experiment.metrics.confusion):
        lines.append(f"| {name} | " + " | ".join(str(int(v)) for v in row) + " |")
    return "\n".join(lines)


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
