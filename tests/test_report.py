"""facesynth.report: the one report.md builder."""

from __future__ import annotations

import pytest

from facesynth.report import Report, markdown_table


def test_report_blocks_in_order_and_written_once(tmp_path):
    uri = (
        Report("Run 1")
        .bullets(["a: 1", "b: 2"])
        .section("Counts")
        .table(["t0", "images"], [[-1, 3], [400, 5]])
        .figure("grid.png", "identities x samples")
        .text("  closing words \n")
        .write(str(tmp_path / "out"))
    )
    assert open(uri).read() == (
        "# Run 1\n\n- a: 1\n- b: 2\n\n## Counts\n\n| t0 | images |\n|---|---|\n| -1 | 3 |\n| 400 | 5 |\n\n"
        "![identities x samples](grid.png)\n\nclosing words\n"
    )


def test_table_rows_must_match_the_header():
    with pytest.raises(ValueError, match=r"table row \[1\]: 1 cells for 2 columns"):
        markdown_table(["a", "b"], [[1]])
