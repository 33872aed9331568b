"""``python -m jobs.train_fr --config train-fr-quickstart key=value ...``: face-recognition training on Ray Train."""

from __future__ import annotations

import json
import sys

from facesynth.config import parse_job_args
from recog.train.config import TrainConfig
from recog.train.trainer import train_fr


def main(argv: list[str] | None = None) -> None:
    cfg = parse_job_args(TrainConfig, argv, __doc__, default="train-fr-quickstart")
    result = train_fr(cfg)
    print(json.dumps(result.summary(), indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
