"""TAR@FMR, IJB-C template pooling, ROC plot and the evaluation report."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_curve

from recog.report import VerificationRow, verification_table, write_report
from recog.roc import FMR_TARGETS, plot_roc, pool_templates, tar_at_fmr, template_pair_scores
from recog.verification import VerificationResult


def reference_tar(scores, labels, targets):
    """insightface eval_ijbc reading: flip the ROC, take the first (distance, index) minimum."""
    fpr, tpr, _ = roc_curve(labels, scores)
    fpr, tpr = np.flipud(fpr), np.flipud(tpr)
    out = {}
    for target in targets:
        _, index = min(zip(abs(fpr - target), range(len(fpr)), strict=True))
        out[target] = tpr[index]
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("decimals", [None, 2])
def test_tar_at_fmr_matches_insightface_reading(seed, decimals):
    rng = np.random.default_rng(seed)
    labels = np.r_[np.ones(3000, bool), np.zeros(60000, bool)]
    scores = np.r_[rng.normal(0.6, 0.15, 3000), rng.normal(0.0, 0.15, 60000)]
    if decimals is not None:  # many tied scores -> repeated FPR values on the curve
        scores = np.round(scores, decimals)
    ours = tar_at_fmr(scores, labels)
    ref = reference_tar(scores, labels, FMR_TARGETS)
    assert list(ours) == list(FMR_TARGETS)
    for target in FMR_TARGETS:
        assert ours[target] == ref[target]
    assert ours[1e-1] > ours[1e-3]


def test_tar_at_fmr_hand_case():
    # genuine 0.9 0.8 0.4, impostor 0.7 0.3 0.2 0.1: at FPR 0 the best TPR is 2/3, at FPR 1/4 it is 1.
    scores = np.array([0.9, 0.8, 0.4, 0.7, 0.3, 0.2, 0.1])
    labels = np.array([1, 1, 1, 0, 0, 0, 0], bool)
    tar = tar_at_fmr(scores, labels, targets=(1e-6, 0.1, 0.2, 0.3))
    assert tar == {1e-6: pytest.approx(2 / 3), 0.1: pytest.approx(2 / 3), 0.2: 1.0, 0.3: 1.0}
    with pytest.raises(ValueError, match="both genuine"):
        tar_at_fmr(scores, np.ones(7, bool))


def test_pool_templates_hand_case():
    emb = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 2.0], [3.0, 4.0], [1.0, 1.0]])
    media = np.array([10, 10, 11, 10, 12])
    templates = np.array([7, 7, 7, 3, 3])
    ids, feats = pool_templates(emb, media, templates)
    np.testing.assert_array_equal(ids, [3, 7])
    # template 7: media 10 -> mean(a, b) = (.5, .5); media 11 -> (0, 2); sum (.5, 2.5)
    np.testing.assert_allclose(feats[1], np.array([0.5, 2.5]) / np.sqrt(6.5))
    # template 3: its media 10 is its own (not template 7's): (3, 4) + (1, 1) = (4, 5)
    np.testing.assert_allclose(feats[0], np.array([4.0, 5.0]) / np.sqrt(41.0))
    scores = template_pair_scores(ids, feats, np.array([7, 3]), np.array([3, 3]))
    np.testing.assert_allclose(scores, [(0.5 * 4 + 2.5 * 5) / np.sqrt(6.5 * 41), 1.0])
    with pytest.raises(ValueError, match="template id 5"):
        template_pair_scores(ids, feats, np.array([5]), np.array([3]))


def _png_size(path):
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return Image.open(io.BytesIO(data)).size


def test_plot_roc_writes_png(tmp_path):
    fpr, tpr, _ = roc_curve([0, 0, 1, 1, 0, 1], [0.1, 0.4, 0.35, 0.8, 0.2, 0.9])
    plot_roc({"model": (fpr, tpr)}, str(tmp_path / "plots" / "roc.png"))
    width, height = _png_size(tmp_path / "plots" / "roc.png")
    assert width > 300 and height > 200


def _result(accuracy, std, val, n_pairs=6000):
    return VerificationResult(
        accuracy=accuracy,
        std=std,
        val=val,
        val_std=0.01,
        far=0.001,
        best_thresholds=np.zeros(10),
        fold_accuracies=np.full(10, accuracy),
        tpr=np.linspace(0, 1, 400),
        fpr=np.linspace(0, 1, 400) ** 2,
        xnorm=20.0,
        n_pairs=n_pairs,
    )


def test_verification_table_format():
    rows = [
        VerificationRow("lfw", _result(0.99533, 0.0031, 0.981), {1e-4: 0.9512, 1e-3: 0.97}),
        VerificationRow("cfp_fp", _result(0.9, 0.02, 0.5, 7000)),
    ]
    assert verification_table(rows).splitlines() == [
        "| Dataset | Pairs | Accuracy (%) | VAL@FAR=1e-3 (%) | TAR@FMR=1e-04 (%) | TAR@FMR=1e-03 (%) |",
        "|---|---|---|---|---|---|",
        "| lfw | 6000 | 99.53 ± 0.31 | 98.10 ± 1.00 | 95.12 | 97.00 |",
        "| cfp_fp | 7000 | 90.00 ± 2.00 | 50.00 ± 1.00 | – | – |",
    ]


def test_write_report(tmp_path):
    rows = [VerificationRow("lfw", _result(0.99, 0.01, 0.9))]
    images = np.random.default_rng(0).integers(0, 256, (5, 8, 6, 3), dtype=np.uint8)
    uri = write_report(
        str(tmp_path / "out"),
        "Eval",
        verification=rows,
        roc_curves={"lfw": (rows[0].result.fpr, rows[0].result.tpr)},
        sample_images=images,
        sections={"Dataset quality": "| metric | value |\n|---|---|\n| fid | 1.5 |"},
    )
    text = open(uri).read()
    assert text.startswith("# Eval\n")
    assert "| lfw | 6000 | 99.00 ± 1.00 | 90.00 ± 1.00 |" in text
    assert "## Dataset quality" in text and "| fid | 1.5 |" in text
    for name in ("accuracy.png", "roc.png", "samples.png"):
        assert f"]({name})" in text
        _png_size(tmp_path / "out" / name)
    grid = np.asarray(Image.open(tmp_path / "out" / "samples.png"))
    assert grid.shape == (8, 5 * 6, 3)  # 5 images fit one row of 8 columns
    np.testing.assert_array_equal(grid[:, 12:18], images[2])
