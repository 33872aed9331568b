"""``python -m jobs.uiface_train data=... judge=... output=...``: train a UIFace model on Ray Train."""

from __future__ import annotations

import sys

from facesynth.jobmain import job_main


def main(argv: list[str] | None = None) -> int:
    return job_main("uiface_train", argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
