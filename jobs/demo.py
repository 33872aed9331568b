"""``python -m jobs.demo`` (``make demo``): the pipeline job with the quickstart chain (``pipeline-quickstart``)."""

from __future__ import annotations

import sys

from facesynth.jobmain import job_main


def main(argv: list[str] | None = None) -> int:
    return job_main("demo", argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
