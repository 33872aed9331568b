"""The one report builder: a title, sections of text, bullet lists, tables and figures -> ``report.md``.

Every job writes its report through :class:`Report`; figures are PNGs the caller writes next to
``report.md`` (``facesynth.plots``, ``facesynth.images.save_grid``) and the report links by file name.

    Report("UIFace generation").bullets([...]).table(["t0", "images"], rows).figure("grid.png").write(uri)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from facesynth import storage


def markdown_table(header: Sequence[str], rows: Iterable[Sequence]) -> str:
    """A markdown table; cells are written with ``str`` (format numbers before passing them)."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = list(row)
        if len(cells) != len(header):
            raise ValueError(f"table row {cells!r}: {len(cells)} cells for {len(header)} columns")
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


@dataclass
class Report:
    """A ``report.md`` under construction; each method appends a block and returns the report."""

    title: str
    blocks: list[str] = field(default_factory=list)

    def section(self, heading: str) -> Report:
        return self._add(f"## {heading}")

    def text(self, markdown: str) -> Report:
        return self._add(markdown.strip())

    def bullets(self, items: Iterable[str]) -> Report:
        return self._add("\n".join(f"- {item}" for item in items))

    def table(self, header: Sequence[str], rows: Iterable[Sequence]) -> Report:
        return self._add(markdown_table(header, rows))

    def figure(self, file: str, caption: str = "") -> Report:
        """Link a PNG written next to ``report.md`` (``file`` relative to the report's folder)."""
        return self._add(f"![{caption or file}]({file})")

    def markdown(self) -> str:
        return "\n\n".join([f"# {self.title}", *self.blocks]) + "\n"

    def write(self, out_uri: str, name: str = "report.md") -> str:
        """Write ``<out_uri>/<name>``; returns its URI."""
        uri = storage.join(out_uri, name)
        storage.write_bytes(uri, self.markdown().encode())
        return uri

    def _add(self, block: str) -> Report:
        self.blocks.append(block)
        return self
