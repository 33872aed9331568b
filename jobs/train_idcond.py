"""Train a UIFace identity-conditioned diffusion model on Ray Train.

    python -m jobs.train_idcond data=/tmp/faces judge=/tmp/judge-model output=/tmp/uiface-run train.steps=2000

``data`` is a shard dataset of face images; identity embeddings come from the ``judge`` model folder
(``model.json`` + TorchScript) or, with ``judge: null``, from the shards' ``embedding`` column. Rerunning
with the same ``output`` and ``run_name`` resumes from the latest checkpoint. Writes ``<output>/model``
(load with ``synthgen.uiface.train.load_uiface``), ``config.yaml``, ``loss.png`` and ``report.md``.
"""

from __future__ import annotations

import json
import sys

from pydantic import Field

from facesynth import storage
from facesynth.config import StrictModel, parse_job_args, save_resolved
from facesynth.plots import save_line_plot
from facesynth.runtime import RayConfig, init_ray
from synthgen.uiface.train import TrainResult, UIFaceModelSource, UIFaceTrainConfig, train_uiface


class TrainIdCondConfig(StrictModel):
    """The ``jobs.train_idcond`` config."""

    ray: RayConfig = Field(default_factory=RayConfig)
    data: str = Field(min_length=1, description="shard dataset URI of training faces")
    judge: str | None = Field(
        None, description="exported FR model folder URI; null: use the 'embedding' column"
    )
    output: str = Field(min_length=1, description="run folder URI: checkpoints/, model/, report.md")
    run_name: str = Field(
        "uiface", pattern=r"^[A-Za-z0-9_.-]+$", description="rerun with the same name resumes"
    )
    model: UIFaceModelSource = Field(default_factory=UIFaceModelSource)
    train: UIFaceTrainConfig = Field(default_factory=UIFaceTrainConfig)


def write_report(cfg: TrainIdCondConfig, result: TrainResult) -> str:
    """``report.md`` with the loss curve (``loss.png``) at the output URI."""
    log = result.loss_log
    save_line_plot(
        [r["step"] for r in log],
        [r["loss"] for r in log],
        storage.join(cfg.output, "loss.png"),
        xlabel="step",
        ylabel=f"{cfg.model.architecture().prediction_type} MSE",
        title=f"UIFace {cfg.run_name}",
        logy=True,
    )
    first, last = result.loss_log[0], result.loss_log[-1]
    lines = [
        f"# UIFace training: {cfg.run_name}",
        "",
        f"- data: `{cfg.data}`; identity embeddings: {'judge `' + cfg.judge + '`' if cfg.judge else 'shard column'}",
        f"- model: `{result.model_uri}` (EMA weights), from `{cfg.model.describe()}`",
        f"- steps {result.start_step} -> {result.steps} in {result.seconds:.1f} s, "
        f"{cfg.train.num_workers} worker(s) x batch {cfg.train.batch_size}",
        f"- loss {first['loss']:.4f} (step {first['step']}) -> {last['loss']:.4f} (step {last['step']})",
        "",
        "![loss](loss.png)",
        "",
    ]
    uri = storage.join(cfg.output, "report.md")
    storage.write_bytes(uri, "\n".join(lines).encode())
    return uri


def train(cfg: TrainIdCondConfig) -> TrainResult:
    """Run (or resume) the training job; callable from a Ray Tune trial."""
    init_ray(cfg.ray)
    result = train_uiface(
        cfg.data, cfg.output, cfg.model, cfg.train, judge_uri=cfg.judge, run_name=cfg.run_name
    )
    save_resolved(cfg, cfg.output)
    write_report(cfg, result)
    return result


def main(argv: list[str] | None = None) -> int:
    cfg = parse_job_args(
        TrainIdCondConfig,
        argv,
        "Train a UIFace identity-conditioned diffusion model on Ray Train.",
        default="uiface-train-quickstart",
    )
    result = train(cfg)
    print(
        json.dumps(
            {
                "model": result.model_uri,
                "steps": result.steps,
                "resumed_from": result.start_step,
                "seconds": round(result.seconds, 1),
                "first_loss": result.loss_log[0]["loss"],
                "last_loss": result.loss_log[-1]["loss"],
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
