"""Ray connection shared by every job: a cluster address, ``RAY_ADDRESS``, or an embedded local Ray."""

from __future__ import annotations

import logging
import os

from pydantic import Field

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
            include_dashboard=False,
            log_to_driver=True,
        )
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = os.environ.get("FACESYNTH_PROGRESS", "1") != "0"
    return ray
