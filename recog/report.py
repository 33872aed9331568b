"""Evaluation report: ``report.md`` plus PNGs (accuracy bars, ROC curves, sample grid) at an output URI."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from facesynth import images, storage
from facesynth.report import Report, markdown_table
from recog.roc import plot_roc
from recog.verification import VerificationResult


@dataclass(frozen=True)
class VerificationRow:
    """One verification set's results; ``tar_at_fmr`` maps target FMR -> TAR (fractions)."""

    dataset: str
    result: VerificationResult
    tar_at_fmr: Mapping[float, float] = field(default_factory=dict)


def _pct(value: float) -> str:
    return "–" if np.isnan(value) else f"{100 * value:.2f}"


def verification_table(rows: Sequence[VerificationRow]) -> str:
    """Markdown table: dataset, accuracy ± std, VAL@FAR=1e-3 and one column per TAR@FMR target (percent)."""
    fmrs = sorted({fmr for row in rows for fmr in row.tar_at_fmr})
    header = ["Dataset", "Pairs", "Accuracy (%)", "VAL@FAR=1e-3 (%)", *(f"TAR@FMR={f:.0e} (%)" for f in fmrs)]
    return markdown_table(
        header,
        (
            [
                row.dataset,
                row.result.n_pairs,
                f"{_pct(row.result.accuracy)} ± {_pct(row.result.std)}",
                f"{_pct(row.result.val)} ± {_pct(row.result.val_std)}",
                *(_pct(row.tar_at_fmr.get(f, float("nan"))) for f in fmrs),
            ]
            for row in rows
        ),
    )


def plot_accuracy_bars(rows: Sequence[VerificationRow], uri: str) -> None:
    """Write a PNG bar chart of verification accuracy (± std, percent) per dataset to ``uri``."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(4.0, 1.2 * len(rows) + 2), 3.5), dpi=100)
    ax = fig.add_subplot()
    acc = [100 * r.result.accuracy for r in rows]
    ax.bar(
        [r.dataset for r in rows], acc, yerr=[100 * r.result.std for r in rows], capsize=4, color="#4C72B0"
    )
    for x, value in enumerate(acc):
        ax.annotate(f"{value:.2f}", (x, value), ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("Verification accuracy (%)")
    ax.set_ylim(max(0.0, min(acc, default=50.0) - 10), 100.5)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    storage.write_bytes(uri, buffer.getvalue())


def write_report(
    out_uri: str,
    title: str,
    *,
    verification: Sequence[VerificationRow] = (),
    roc_curves: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
    sample_images: np.ndarray | None = None,
    sections: Mapping[str, str] | None = None,
) -> str:
    """Write ``report.md`` and its PNGs under ``out_uri``; returns the report's URI.

    ``sections`` maps heading -> markdown body (e.g. classification or dataset-quality tables).
    """
    report = Report(title)
    if verification:
        plot_accuracy_bars(verification, storage.join(out_uri, "accuracy.png"))
        report.section("Verification").text(verification_table(verification)).figure(
            "accuracy.png", "accuracy"
        )
    if roc_curves:
        plot_roc(roc_curves, storage.join(out_uri, "roc.png"))
        report.section("ROC").figure("roc.png", "ROC")
    for heading, body in (sections or {}).items():
        report.section(heading).text(body)
    if sample_images is not None:
        images.save_grid(sample_images, storage.join(out_uri, "samples.png"), cols=8)
        report.section("Samples").figure("samples.png", "samples")
    return report.write(out_uri)
