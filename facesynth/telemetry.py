"""Ray metrics (shown on the Ray dashboard / Prometheus) and a throughput meter for job logs."""

from __future__ import annotations

import functools
import time


@functools.cache
def counter(name: str, description: str):
    """A process-wide Ray ``Counter`` (``None`` outside a Ray process)."""
    import ray
    from ray.util.metrics import Counter

    return Counter(name, description=description) if ray.is_initialized() else None


@functools.cache
def gauge(name: str, description: str):
    """A process-wide Ray ``Gauge`` (``None`` outside a Ray process)."""
    import ray
    from ray.util.metrics import Gauge

    return Gauge(name, description=description) if ray.is_initialized() else None


def inc(name: str, value: float, description: str = "") -> None:
    c = counter(name, description or name)
    if c is not None and value:
        c.inc(value)


def set_gauge(name: str, value: float, description: str = "") -> None:
    g = gauge(name, description or name)
    if g is not None:
        g.set(value)


class Meter:
    """Counts items and reports the rate since start: ``Meter().add(n)``, ``.rate``."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.count = 0

    def add(self, n: int) -> None:
        self.count += n

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    @property
    def rate(self) -> float:
        return self.count / max(self.elapsed, 1e-9)
