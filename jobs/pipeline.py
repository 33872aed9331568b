"""``python -m jobs.pipeline --config pipeline-quickstart``: registered jobs chained in one YAML (make demo)."""

from __future__ import annotations

import sys

from facesynth.jobmain import job_main


def main(argv: list[str] | None = None) -> int:
    return job_main("pipeline", argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
