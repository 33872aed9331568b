"""``python -m jobs.render key=value ...``: the generate job with the procedural renderer preset."""

from __future__ import annotations

import sys

from facesynth.jobmain import job_main


def main(argv: list[str] | None = None) -> int:
    return job_main("render", argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
