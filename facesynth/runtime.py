"""Ray for every job: the connection (a cluster address, ``RAY_ADDRESS``, or an embedded local Ray) and the
one Ray Train launcher (:func:`torch_trainer`) that FR training and the UIFace trainer share."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence

from pydantic import Field

from facesynth import storage
from facesynth.config import StrictModel

log = logging.getLogger(__name__)


class RayConfig(StrictModel):
    """Where jobs run. ``address`` empty: ``RAY_ADDRESS`` if set (``ray job submit``), else a local Ray."""

    address: str | None = None
    num_cpus: int | None = Field(None, ge=1, description="local Ray only: CPUs to offer (default: all)")
    num_gpus: int | None = Field(
        None, ge=0, description="local Ray only: GPUs to offer (logical ones test scheduling)"
    )
    object_store_memory: int | None = Field(None, ge=75 * 2**20)


def init_ray(cfg: RayConfig):
    """Connect to (or start) Ray once per process; returns the ``ray`` module."""
    import ray

    if ray.is_initialized():
        return ray
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("connecting to Ray at %s", address)
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(
            num_cpus=cfg.num_cpus,
            num_gpus=cfg.num_gpus,
            object_store_memory=cfg.object_store_memory,
            include_dashboard=True,  # Ray Train's controller polls the state API it serves
            log_to_driver=True,
        )
    quiet(ray.data.DataContext.get_current())
    return ray


def quiet(ctx) -> None:
    """Ray Data prints no per-dataset progress (the jobs print one line per stage) unless
    ``FACESYNTH_PROGRESS=1``; its full logs stay in the Ray session's log folder."""
    verbose = os.environ.get("FACESYNTH_PROGRESS") == "1"
    ctx.enable_progress_bars = verbose
    ctx.print_on_execution_start = verbose


def torch_trainer(
    worker: Callable[[dict], None],
    config: dict,
    *,
    name: str,
    checkpoint_uri: str,
    num_workers: int,
    use_gpu: bool,
    cpus_per_worker: float,
    max_failures: int,
    keep_checkpoints: int,
    datasets: Mapping[str, object],
    preserve_order: bool = False,
    callbacks: Sequence = (),
):
    """A ``TorchTrainer`` whose run ``name`` keeps its checkpoints under ``checkpoint_uri`` (local or S3), so
    a rerun with the same name resumes; NCCL on GPUs, gloo on CPU; failed workers restarted up to
    ``max_failures`` times. Ray Data is quiet inside the workers too (see :func:`quiet`)."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    for ds in datasets.values():
        quiet(ds.context)
    ingest = ray.train.DataConfig.default_ingest_options()
    ingest.preserve_order = preserve_order
    storage.makedirs(checkpoint_uri)
    fs, path = storage.resolve(storage.absolute(checkpoint_uri))
    return TorchTrainer(
        worker,
        train_loop_config=config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=num_workers, use_gpu=use_gpu, resources_per_worker={"CPU": cpus_per_worker}
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=path,
            storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=keep_checkpoints),
            callbacks=list(callbacks),
        ),
        datasets=dict(datasets),
        dataset_config=ray.train.DataConfig(execution_options=ingest),
    )
