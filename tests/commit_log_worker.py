"""A writer process of the concurrency test in ``test_commit_log.py`` (a light module: 16 of them are spawned)."""

from __future__ import annotations

from bench.commit_scale import unit_record
from facesynth import manifest

PLAN = manifest.Plan(64, {"test": "log"})


def commit_disjoint(uri: str, units: list[int], barrier) -> None:
    """Commit every unit in its own record, starting together with the other writers."""
    manifest.CHECKPOINT_EVERY = 10
    writer = manifest.open_writer(uri, PLAN)
    barrier.wait()
    for unit in units:
        writer.commit([unit_record(unit)])
