"""``python -m jobs.cross_domain --config cross-domain-quickstart key=value ...``: the cross-domain study."""

from __future__ import annotations

import sys

from facesynth.jobmain import job_main


def main(argv: list[str] | None = None) -> int:
    return job_main("cross_domain", argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
