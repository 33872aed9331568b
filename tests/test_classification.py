"""Closed-set classification metrics against sklearn, breakdown tables and the study-style markdown."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

from recog.classification import (
    Experiment,
    classification_metrics,
    confusion_matrix,
    markdown_table,
    per_class_table,
    per_group_table,
    render_experiments,
)


def _softmax(logits):
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("seed", range(5))
def test_metrics_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    n_classes = 3 + seed
    y_true = rng.integers(0, n_classes, 200)
    # some classes never predicted, some predicted but absent from the targets
    y_pred = np.where(rng.random(200) < 0.6, y_true, rng.integers(1, n_classes + 2, 200))
    probs = _softmax(rng.normal(size=(200, n_classes + 2)))
    m = classification_metrics(y_true, y_pred, probs)
    labels = np.unique(np.r_[y_true, y_pred])
    assert m.accuracy == pytest.approx(skm.accuracy_score(y_true, y_pred), abs=1e-12)
    assert m.macro_f1 == pytest.approx(
        skm.f1_score(y_true, y_pred, average="macro", zero_division=0), abs=1e-12
    )
    np.testing.assert_array_equal(m.labels, labels)
    np.testing.assert_array_equal(m.confusion, skm.confusion_matrix(y_true, y_pred, labels=labels))
    assert m.mean_confidence == pytest.approx(np.mean([max(row) for row in probs]), abs=1e-12)
    assert m.n == 200


def test_confusion_matrix_custom_label_order_ignores_unknown():
    cm = confusion_matrix(np.array([2, 0, 1, 5, 0]), np.array([2, 1, 1, 0, 7]), labels=np.array([2, 1, 0]))
    np.testing.assert_array_equal(cm, [[1, 0, 0], [0, 1, 0], [0, 1, 0]])
    np.testing.assert_array_equal(
        cm, skm.confusion_matrix([2, 0, 1, 5, 0], [2, 1, 1, 0, 7], labels=[2, 1, 0])
    )


def test_per_class_table_matches_sklearn_per_label_scores():
    rng = np.random.default_rng(3)
    y_true = rng.integers(0, 3, 90)
    y_pred = np.where(rng.random(90) < 0.7, y_true, rng.integers(0, 3, 90))
    probs = _softmax(rng.normal(size=(90, 3)))
    rows = per_class_table(y_true, y_pred, probs, class_names={0: "Gerardo", 1: "Oliver", 2: "Timothy"})
    precision, recall, f1, support = skm.precision_recall_fscore_support(y_true, y_pred, labels=[0, 1, 2])
    assert [r["class"] for r in rows] == ["Gerardo", "Oliver", "Timothy"]
    for i, row in enumerate(rows):
        assert row["n"] == support[i]
        assert row["accuracy"] == pytest.approx(recall[i])
        assert row["precision"] == pytest.approx(precision[i])
        assert row["f1"] == pytest.approx(f1[i])
        assert row["confidence"] == pytest.approx(probs[y_true == i].max(axis=1).mean())


def test_per_group_table_hand_case():
    y_true = np.array([0, 0, 0, 1, 1])
    y_pred = np.array([0, 1, 0, 1, 1])
    probs = np.array([[0.9, 0.1], [0.4, 0.6], [0.7, 0.3], [0.2, 0.8], [0.5, 0.5]])
    prompts = [
        "a selfie of Gerardo",
        "a selfie of Gerardo",
        "a picture of Gerardo",
        "a selfie of Oliver",
        "a selfie of Oliver",
    ]
    rows = per_group_table(y_true, y_pred, prompts, probs)
    assert rows == [
        {"group": "a selfie of Gerardo", "n": 2, "accuracy": 0.5, "confidence": pytest.approx(0.75)},
        {"group": "a picture of Gerardo", "n": 1, "accuracy": 1.0, "confidence": pytest.approx(0.7)},
        {"group": "a selfie of Oliver", "n": 2, "accuracy": 1.0, "confidence": pytest.approx(0.65)},
    ]
    with pytest.raises(ValueError, match="groups"):
        per_group_table(y_true, y_pred, prompts[:2])


def test_render_experiments_markdown():
    y_true, y_pred = np.array([0, 1, 1, 0]), np.array([0, 1, 0, 0])
    probs = np.array([[0.8, 0.2], [0.3, 0.7], [0.6, 0.4], [0.9, 0.1]])
    m = classification_metrics(y_true, y_pred, probs)
    exp = Experiment(
        "baseline", "real", "real", m, per_class=per_class_table(y_true, y_pred, probs, {0: "A", 1: "B"})
    )
    text = render_experiments(
        [exp, Experiment("forward", "real", "diffusion", classification_metrics([0], [1]))]
    )
    lines = text.splitlines()
    assert lines[2] == "| # | experiment | train → test | n | accuracy | f1 | confidence |"
    # accuracy 3/4; F1: class 0 = 2*2/(4+1) = .8, class 1 = 2/(2+1) = .667 -> macro .7333; confidence .75
    assert lines[4] == "| 1 | baseline | real → real | 4 | 75.00% | 73.33% | 75.00% |"
    assert lines[5] == "| 2 | forward | real → diffusion | 1 | 0.00% | 0.00% | – |"
    assert "### baseline: per class (real → real)" in text
    assert "| A | 2 | 100.00% | 66.67% | 80.00% | 85.00% |" in text


def test_markdown_table_and_bad_input():
    assert markdown_table([{"x": 1, "accuracy": 0.5}]).splitlines() == [
        "| x | accuracy |",
        "|---|---|",
        "| 1 | 50.00% |",
    ]
    with pytest.raises(ValueError, match="y_true"):
        classification_metrics([0, 1], [0])
    with pytest.raises(ValueError, match="probs"):
        classification_metrics([0, 1], [0, 1], np.ones((3, 2)))
