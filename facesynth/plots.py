"""Small PNG plots for job reports (matplotlib, no display needed)."""

from __future__ import annotations

import io
from collections.abc import Sequence

from facesynth import storage


def save_line_plot(
    xs: Sequence[float],
    ys: Sequence[float],
    uri: str,
    *,
    xlabel: str,
    ylabel: str,
    title: str = "",
    logy: bool = False,
) -> str:
    """Write a single-curve line plot (e.g. training loss per step) as a PNG at ``uri``."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    ax.plot(list(xs), list(ys))
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title, yscale="log" if logy else "linear")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    storage.write_bytes(uri, buffer.getvalue())
    return uri
