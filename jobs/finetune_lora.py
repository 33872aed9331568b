"""``python -m jobs.finetune_lora --config sd21-lora key=value ...``: LoRA fine-tuning of Stable Diffusion."""

from __future__ import annotations

import sys

from facesynth.jobmain import job_main


def main(argv: list[str] | None = None) -> int:
    return job_main("finetune_lora", argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
