"""``python -m jobs.dataset_quality``: judge a shard dataset with an exported face model."""

from __future__ import annotations

import sys

from facesynth.jobmain import job_main


def main(argv: list[str] | None = None) -> int:
    return job_main("dataset_quality", argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
