"""Closed-set classification metrics and study-style markdown (cross-domain train -> test experiments).

Accuracy, macro-F1 (as ``sklearn.metrics.f1_score(average="macro")``: the mean over every label
seen in the targets or predictions of 2·TP / (2·TP + FP + FN)), mean confidence (mean max
softmax probability), the confusion matrix, and breakdowns per class and per group (e.g. prompt).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from facesynth import report


@dataclass(frozen=True)
class ClassificationMetrics:
    """``confusion[i, j]``: samples of ``labels[i]`` predicted as ``labels[j]``."""

    n: int
    accuracy: float
    macro_f1: float
    mean_confidence: float  # nan without probabilities
    labels: np.ndarray
    confusion: np.ndarray


@dataclass(frozen=True)
class Experiment:
    """One train -> test run of the study, with its optional breakdown tables."""

    name: str
    train: str
    test: str
    metrics: ClassificationMetrics
    per_class: list[dict] | None = None
    per_group: list[dict] | None = None


def _as_arrays(y_true, y_pred, probs):
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_true.ndim != 1 or y_true.shape != y_pred.shape or len(y_true) == 0:
        raise ValueError(
            f"y_true {y_true.shape} and y_pred {y_pred.shape}: expected two equal non-empty 1-D arrays"
        )
    if probs is not None:
        probs = np.asarray(probs, dtype=np.float64)
        if probs.ndim != 2 or len(probs) != len(y_true):
            raise ValueError(
                f"probs {probs.shape}: expected ({len(y_true)}, n_classes) softmax probabilities"
            )
    return y_true, y_pred, probs


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Counts ``[i, j]`` of true ``labels[i]`` predicted as ``labels[j]`` (other values are ignored)."""
    labels = np.asarray(labels)
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]

    def index(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pos = np.minimum(np.searchsorted(sorted_labels, values), len(labels) - 1)
        return order[pos], sorted_labels[pos] == values

    (t, t_ok), (p, p_ok) = index(np.asarray(y_true)), index(np.asarray(y_pred))
    out = np.zeros((len(labels), len(labels)), dtype=np.int64)
    np.add.at(out, (t[t_ok & p_ok], p[t_ok & p_ok]), 1)
    return out


def _f1_per_label(confusion: np.ndarray) -> np.ndarray:
    tp = np.diag(confusion).astype(np.float64)
    denominator = 2 * tp + (confusion.sum(0) - tp) + (confusion.sum(1) - tp)
    return np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)


def classification_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, probs: np.ndarray | None = None
) -> ClassificationMetrics:
    """Accuracy, macro-F1, mean confidence and confusion matrix over the labels seen in either array."""
    y_true, y_pred, probs = _as_arrays(y_true, y_pred, probs)
    labels = np.unique(np.concatenate([y_true, y_pred]))
    confusion = confusion_matrix(y_true, y_pred, labels)
    return ClassificationMetrics(
        n=len(y_true),
        accuracy=float(np.mean(y_true == y_pred)),
        macro_f1=float(np.mean(_f1_per_label(confusion))),
        mean_confidence=float(probs.max(axis=1).mean()) if probs is not None else float("nan"),
        labels=labels,
        confusion=confusion,
    )


def per_class_table(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    probs: np.ndarray | None = None,
    class_names: Mapping[int, str] | None = None,
) -> list[dict]:
    """One row per true class: support, accuracy (= recall), precision, F1, mean confidence."""
    y_true, y_pred, probs = _as_arrays(y_true, y_pred, probs)
    metrics = classification_metrics(y_true, y_pred, probs)
    f1 = _f1_per_label(metrics.confusion)
    predicted = metrics.confusion.sum(0)
    rows = []
    for i, label in enumerate(metrics.labels.tolist()):
        mask = y_true == label
        if not mask.any():
            continue
        tp = metrics.confusion[i, i]
        rows.append(
            {
                "class": (class_names or {}).get(label, str(label)),
                "n": int(mask.sum()),
                "accuracy": float(tp / mask.sum()),
                "precision": float(tp / predicted[i]) if predicted[i] else 0.0,
                "f1": float(f1[i]),
                "confidence": float(probs[mask].max(axis=1).mean()) if probs is not None else float("nan"),
            }
        )
    return rows


def per_group_table(
    y_true: np.ndarray, y_pred: np.ndarray, groups: Sequence[str], probs: np.ndarray | None = None
) -> list[dict]:
    """One row per group value (e.g. the generation prompt), in first-seen order: n, accuracy, confidence."""
    y_true, y_pred, probs = _as_arrays(y_true, y_pred, probs)
    groups = np.asarray(groups)
    if groups.shape != y_true.shape:
        raise ValueError(f"groups {groups.shape}: expected one group per sample {y_true.shape}")
    _, first = np.unique(groups, return_index=True)
    rows = []
    for group in groups[np.sort(first)].tolist():
        mask = groups == group
        rows.append(
            {
                "group": group,
                "n": int(mask.sum()),
                "accuracy": float(np.mean(y_true[mask] == y_pred[mask])),
                "confidence": float(probs[mask].max(axis=1).mean()) if probs is not None else float("nan"),
            }
        )
    return rows


PERCENT_COLUMNS = ("accuracy", "precision", "f1", "confidence")


def markdown_table(rows: Sequence[Mapping[str, object]], columns: Sequence[str] | None = None) -> str:
    """Markdown table of dict rows; metric columns (accuracy, precision, f1, confidence) shown as percent."""
    columns = list(columns or (rows[0].keys() if rows else []))

    def cell(key: str, value: object) -> str:
        if key in PERCENT_COLUMNS and isinstance(value, float):
            return "–" if np.isnan(value) else f"{100 * value:.2f}%"
        return str(value)

    return report.markdown_table(columns, ([cell(c, row.get(c, "")) for c in columns] for row in rows))


def render_experiments(experiments: Sequence[Experiment]) -> str:
    """The study's summary table (experiment, train -> test, accuracy, F1, confidence) and breakdowns."""
    summary = [
        {
            "#": i,
            "experiment": e.name,
            "train → test": f"{e.train} → {e.test}",
            "n": e.metrics.n,
            "accuracy": e.metrics.accuracy,
            "f1": e.metrics.macro_f1,
            "confidence": e.metrics.mean_confidence,
        }
        for i, e in enumerate(experiments, start=1)
    ]
    parts = ["### Cross-domain transfer", "", markdown_table(summary)]
    for e in experiments:
        if e.per_class:
            parts += ["", f"### {e.name}: per class ({e.train} → {e.test})", "", markdown_table(e.per_class)]
        if e.per_group:
            parts += ["", f"### {e.name}: per prompt ({e.train} → {e.test})", "", markdown_table(e.per_group)]
    return "\n".join(parts)
