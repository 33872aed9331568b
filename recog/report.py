"""Evaluation report: ``report.md`` plus PNGs (accuracy bars, ROC curves, sample grid) at an output URI."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from facesynth import storage
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
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        r = row.result
        cells = [
            row.dataset,
            str(r.n_pairs),
            f"{_pct(r.accuracy)} ± {_pct(r.std)}",
            f"{_pct(r.val)} ± {_pct(r.val_std)}",
            *(_pct(row.tar_at_fmr.get(f, float("nan"))) for f in fmrs),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


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


def save_sample_grid(images: np.ndarray, uri: str, ncols: int = 8) -> None:
    """Write uint8 (N, H, W, 3) images as one PNG grid, ``ncols`` per row, to ``uri``."""
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 or len(images) == 0:
        raise ValueError(
            f"images: got {getattr(images, 'shape', None)}, expected a non-empty uint8 (N, H, W, 3) array"
        )
    n, h, w, c = images.shape
    ncols = min(ncols, n)
    nrows = -(-n // ncols)
    grid = np.full((nrows * h, ncols * w, c), 255, dtype=np.uint8)
    for i, image in enumerate(images):
        row, col = divmod(i, ncols)
        grid[row * h : (row + 1) * h, col * w : (col + 1) * w] = image
    buffer = io.BytesIO()
    Image.fromarray(grid).save(buffer, format="PNG")
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
    parts = [f"# {title}", ""]
    if verification:
        plot_accuracy_bars(verification, storage.join(out_uri, "accuracy.png"))
        parts += [
            "## Verification",
            "",
            verification_table(verification),
            "",
            "![accuracy](accuracy.png)",
            "",
        ]
    if roc_curves:
        plot_roc(roc_curves, storage.join(out_uri, "roc.png"))
        parts += ["## ROC", "", "![ROC](roc.png)", ""]
    for heading, body in (sections or {}).items():
        parts += [f"## {heading}", "", body.strip(), ""]
    if sample_images is not None:
        save_sample_grid(sample_images, storage.join(out_uri, "samples.png"))
        parts += ["## Samples", "", "![samples](samples.png)", ""]
    report_uri = storage.join(out_uri, "report.md")
    storage.write_bytes(report_uri, "\n".join(parts).encode())
    return report_uri
