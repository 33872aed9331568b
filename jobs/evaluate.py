"""``python -m jobs.evaluate``: verify an exported face model on insightface ``.bin`` sets and template lists."""

from __future__ import annotations

import sys

from facesynth.jobmain import job_main


def main(argv: list[str] | None = None) -> int:
    return job_main("evaluate", argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
