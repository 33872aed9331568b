"""``python -m jobs.train_fr --config train-fr-quickstart key=value ...``: face-recognition training on Ray Train."""

from __future__ import annotations

import sys

from facesynth.jobmain import job_main


def main(argv: list[str] | None = None) -> int:
    return job_main("train_fr", argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
