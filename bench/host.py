"""What a benchmark ran on, for the JSON it prints: CPU model, clock, vector width, cores, load, versions.

CPU figures differ between 2-core boxes by up to 3x (same code, same load), so every result carries
enough to tell two machines apart, plus ``python_loop_ns``: the time of one iteration of a fixed pure
Python loop, a quick per-core speed reference that scales results from different boxes.
"""

from __future__ import annotations

import os
import platform
import time
from importlib import metadata
from pathlib import Path

SIMD_LEVELS = ("avx512f", "avx2", "avx", "sse4_2", "asimd")  # widest first; asimd = aarch64 NEON


def cpu_from_cpuinfo(text: str) -> dict:
    """Model name, clock (MHz) and widest vector extension from the text of ``/proc/cpuinfo``."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() not in fields:
            fields[key.strip()] = value.strip()
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    mhz = fields.get("cpu MHz")
    return {
        "cpu_model": fields.get("model name"),
        "cpu_mhz": round(float(mhz)) if mhz else None,
        "simd": next((level for level in SIMD_LEVELS if level in flags), None),
    }


def python_loop_ns(iterations: int = 2_000_000) -> float:
    """Nanoseconds per iteration of a fixed pure-Python loop (best of three)."""
    best = float("inf")
    for _ in range(3):
        start, total = time.perf_counter(), 0
        for i in range(iterations):
            total += i
        best = min(best, time.perf_counter() - start)
    return round(best / iterations * 1e9, 2)


def host_info(*packages: str) -> dict:
    """The machine, and under ``versions`` those of ``packages`` (None where not installed), as JSON-ready fields."""
    cpuinfo = Path("/proc/cpuinfo")
    cpu = cpu_from_cpuinfo(cpuinfo.read_text() if cpuinfo.exists() else "")
    versions = {}
    for package in packages:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        **cpu,
        "cpu_model": cpu["cpu_model"] or platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "python_loop_ns": python_loop_ns(),
        "python": platform.python_version(),
        "versions": versions,  # nested: a package name must not clobber a bench's own field ("ray")
    }
