"""Cost of one commit and of opening a dataset as it grows: the commit log vs the old rewritten manifest.

For every size (work units, each 20 identities x 10 images with per-identity counts, as in the
quickstart) and every backend (a local folder, a moto S3 server on 127.0.0.1):

- log: the dataset is fast-forwarded to ``units - 100`` committed units by writing the checkpoint the
  log would hold there (the bytes a writer writes), then the last 100 commits run for real, one unit
  each; the 100th writes the next checkpoint and refreshes ``manifest.json``. Reported: the median and
  mean commit time (the mean includes that checkpoint), the checkpoint's time and size, the bytes one
  record writes, and the time to open the dataset as a reader (all records, validated) and as a writer.
- old: today's scheme before the log, reconstructed: one pretty-printed ``manifest.json`` that every
  commit reads, validates, merges and rewrites whole (``--old-commits`` commits; sizes up to 10^5).

Prints one JSON object with the machine (``bench/host.py``).

    .venv/bin/python -m bench.commit_scale            # 10^3, 10^4, 10^5 units
    .venv/bin/python -m bench.commit_scale --quick    # 10^2, 10^3 (the test)
    .venv/bin/python -m bench.commit_scale --full     # + 10^6 units (log only)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

from bench.host import host_info
from facesynth import manifest, storage

TAIL = 100  # commits timed at the end of the run (one checkpoint interval)
OLD_MAX_UNITS = 100_000  # the old scheme holds every record in one dict: 10^6 would need ~5 GB


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sizes = parser.add_mutually_exclusive_group()
    sizes.add_argument("--quick", action="store_true", help="10^2 and 10^3 units")
    sizes.add_argument("--full", action="store_true", help="also 10^6 units")
    parser.add_argument("--backends", default="local,s3", help="comma-separated: local, s3")
    parser.add_argument("--old-commits", type=int, default=3, help="timed commits of the old scheme")
    args = parser.parse_args(argv)
    args.sizes = [100, 1000] if args.quick else [1000, 10_000, 100_000] + ([1_000_000] if args.full else [])
    return args


def unit_record(unit: int, identities: int = 20, images: int = 10) -> dict:
    """A realistic shard record: ``identities`` x ``images`` rows with per-identity counts."""
    rows = identities * images
    return {
        "unit": unit,
        "file": manifest.shard_file(unit),
        "rows": rows,
        "bytes": 1_200_000 + unit % 9973,
        "sha256": hashlib.sha256(str(unit).encode()).hexdigest(),
        "counts": {
            "identities": identities,
            "domain": {"render": rows},
            "generator": {"procedural": rows},
            "per_identity": {str(unit * identities + i): images for i in range(identities)},
        },
    }


def _entry(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if k != "unit"}


def _timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def _size(uri: str) -> int:
    return len(storage.read_bytes(uri))


def bench_log(uri: str, units: int) -> dict:
    """Fast-forward to ``units - TAIL`` units, then time the last TAIL commits and the opens."""
    plan = manifest.Plan(units, {"bench": "commit_scale"})
    writer = manifest.claim(uri, plan)
    base = units - TAIL
    writer.snap.tail.update((u, _entry(unit_record(u))) for u in range(base))
    writer.committed.update((u, writer.snap.tail[u]["sha256"]) for u in range(base))
    writer.snap.seq = manifest.CHECKPOINT_EVERY * (base // manifest.CHECKPOINT_EVERY + 1)
    writer.publish()  # the checkpoint the log holds after those commits (and its manifest.json)
    os.sync()  # flush those ~50 MB now, so they do not slow the fsyncs of the timed commits
    times = [_timed(lambda u=u: writer.commit([unit_record(u)]))[0] for u in range(base, units)]
    last = writer.snap.seq
    assert last % manifest.CHECKPOINT_EVERY == 0, "the timed commits must end on a checkpoint"
    open_s, loaded = _timed(lambda: manifest.load(uri))
    writer_open_s, _ = _timed(lambda: manifest.claim(uri, plan))
    assert len(loaded.shards) == units and loaded.complete
    return {
        "commit_median_s": round(statistics.median(times[:-1]), 5),
        "commit_mean_s": round(statistics.mean(times), 5),  # incl. the checkpoint of the last one
        "checkpoint_commit_s": round(times[-1], 4),
        "record_bytes": _size(storage.join(uri, manifest.record_file(last - 1))),
        "checkpoint_bytes": _size(storage.join(uri, manifest.checkpoint_file(last))),
        "summary_bytes": _size(storage.join(uri, manifest.MANIFEST)),
        "open_reader_s": round(open_s, 3),
        "open_writer_s": round(writer_open_s, 3),
    }


def old_manifest_bytes(shards: dict[int, dict], plan: manifest.Plan) -> bytes:
    """``manifest.json`` as the pre-log code serialised it on every commit (pretty-printed, sorted)."""
    body = {
        "format": manifest.FORMAT,
        "plan": plan.to_json(),
        "units_total": plan.units_total,
        "complete": len(shards) == plan.units_total,
        "rows": sum(s["rows"] for s in shards.values()),
        "shards": {f"{k:05d}": shards[k] for k in sorted(shards)},
    }
    return json.dumps(body, indent=1, sort_keys=True).encode()


def old_commit(uri: str, rec: dict, plan: manifest.Plan) -> int:
    """One commit of the old scheme: read + validate the manifest, merge, rewrite it whole; its bytes."""
    m = manifest.Manifest.from_json(storage.read_bytes(uri), uri=uri)
    m.shards[rec["unit"]] = _entry(rec)
    data = old_manifest_bytes(m.shards, plan)
    storage.write_bytes(uri, data)
    return len(data)


def bench_old(uri: str, units: int, commits: int) -> dict:
    plan = manifest.Plan(units, {"bench": "commit_scale"})
    path = storage.join(uri, manifest.MANIFEST)
    base = units - commits
    storage.write_bytes(path, old_manifest_bytes({u: _entry(unit_record(u)) for u in range(base)}, plan))
    timed = [_timed(lambda u=u: old_commit(path, unit_record(u), plan)) for u in range(base, units)]
    open_s, _ = _timed(lambda: manifest.Manifest.from_json(storage.read_bytes(path), uri=path))
    return {
        "commit_median_s": round(statistics.median(t for t, _ in timed), 4),
        "bytes_per_commit": timed[-1][1],
        "open_reader_s": round(open_s, 3),
    }


def run_backend(root: str, sizes: list[int], old_commits: int) -> list[dict]:
    out = []
    for units in sizes:
        row = {
            "units": units,
            "images": units * 200,
            "log": bench_log(storage.join(root, f"log-{units}"), units),
        }
        if units <= OLD_MAX_UNITS:
            row["old"] = bench_old(storage.join(root, f"old-{units}"), units, old_commits)
        out.append(row)
        print(json.dumps({"progress": root.split(":")[0], **row}), file=sys.stderr, flush=True)
    return out


def _s3_root() -> tuple[str, Callable[[], None]]:
    """A bucket on a fresh moto server on 127.0.0.1 (as the tests start one), and how to stop it."""
    from tests.conftest import MotoServer

    server = MotoServer()
    os.environ.update(server.env())
    storage.boto3_client().create_bucket(Bucket="commit-scale")
    return "s3://commit-scale", server.stop


def flatness(rows: list[dict]) -> float:
    """Median log commit time at the largest size over the smallest."""
    return round(rows[-1]["log"]["commit_median_s"] / rows[0]["log"]["commit_median_s"], 2)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    results = {}
    for backend in args.backends.split(","):
        if backend == "local":
            with tempfile.TemporaryDirectory() as root:
                results["local"] = run_backend(root, args.sizes, args.old_commits)
        else:
            root, stop = _s3_root()
            try:
                results["s3"] = run_backend(root, args.sizes, args.old_commits)
            finally:
                stop()
    result = {
        "sizes": args.sizes,
        "checkpoint_every": manifest.CHECKPOINT_EVERY,
        "results": results,
        "log_commit_growth": {backend: flatness(rows) for backend, rows in results.items()},
        **host_info("pyarrow", "boto3", "moto"),
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
