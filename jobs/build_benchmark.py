"""``python -m jobs.build_benchmark``: offline verification sets (.bin pairs + IJB-C-style templates)."""

from __future__ import annotations

import sys

from facesynth.jobmain import job_main


def main(argv: list[str] | None = None) -> int:
    return job_main("build_benchmark", argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
