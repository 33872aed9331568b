"""``python -m jobs.generate --config uiface-tiny key=value ...``: a synthetic face dataset from any generator."""

from __future__ import annotations

import sys

from facesynth.jobmain import job_main


def main(argv: list[str] | None = None) -> int:
    return job_main("generate", argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
