"""The dataset manifest: the commit log that makes shards visible.

``manifest.json`` maps each committed work unit to its shard file, row count, byte size, sha256
and value counts. A shard exists for readers only once its entry is here. Updates are
compare-and-swap: on S3 a conditional PUT (``If-Match`` the ETag read, or ``If-None-Match: *``
on creation), locally an exclusive ``flock`` around read-merge-replace. A lost race re-reads and
merges, so two writers never drop each other's commits; two different hashes for one unit are an
error (the unit is not deterministic).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from facesynth import storage

FORMAT = "facesynth.shards/1"
MANIFEST = "manifest.json"


@dataclass
class Manifest:
    """Committed shards of one dataset, keyed by work-unit index."""

    shards: dict[int, dict] = field(default_factory=dict)
    units_total: int | None = None
    etag: str | None = None  # S3 ETag of the version read, for the conditional update

    def to_json(self) -> bytes:
        body = {
            "format": FORMAT,
            "units_total": self.units_total,
            "complete": self.complete,
            "rows": sum(s["rows"] for s in self.shards.values()),
            "shards": {f"{k:05d}": self.shards[k] for k in sorted(self.shards)},
        }
        return json.dumps(body, indent=1, sort_keys=True).encode()

    @property
    def complete(self) -> bool:
        return self.units_total is not None and len(self.shards) == self.units_total

    @classmethod
    def from_json(cls, data: bytes, *, uri: str, etag: str | None = None) -> Manifest:
        try:
            body = json.loads(data)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{uri}: manifest is not valid JSON ({exc})") from exc
        if body.get("format") != FORMAT:
            raise ValueError(f"{uri}: manifest format {body.get('format')!r}, expected {FORMAT!r}")
        shards = {int(k): v for k, v in body["shards"].items()}
        return cls(shards=shards, units_total=body.get("units_total"), etag=etag)

    def merge(self, records: Iterable[dict], units_total: int | None) -> None:
        """Add shard records; a unit committed twice must have the same sha256."""
        for rec in records:
            unit = int(rec["unit"])
            old = self.shards.get(unit)
            if old is not None and old["sha256"] != rec["sha256"]:
                raise RuntimeError(
                    f"unit {unit}: shard {rec['file']} has sha256 {rec['sha256']} but "
                    f"{old['sha256']} is committed; the generator is not deterministic"
                )
            self.shards[unit] = {k: v for k, v in rec.items() if k != "unit"}
        if units_total is not None:
            self.units_total = units_total


def load(dataset_uri: str) -> Manifest:
    """Read the manifest of a dataset (empty if none has been committed yet)."""
    uri = storage.join(dataset_uri, MANIFEST)
    if storage.parse(uri).scheme == "s3":
        client = storage.boto3_client()
        bucket, key = storage.parse(uri).bucket_key
        try:
            obj = storage.retry(lambda: client.get_object(Bucket=bucket, Key=key), what=f"read {uri}")
        except client.exceptions.NoSuchKey:
            return Manifest()
        return Manifest.from_json(obj["Body"].read(), uri=uri, etag=obj["ETag"])
    try:
        return Manifest.from_json(storage.read_bytes(uri), uri=uri)
    except FileNotFoundError:
        return Manifest()


def commit(
    dataset_uri: str, records: list[dict], *, units_total: int | None = None, attempts: int = 20
) -> Manifest:
    """Atomically add ``records`` to the manifest (compare-and-swap; retried on a lost race)."""
    uri = storage.join(dataset_uri, MANIFEST)
    if storage.parse(uri).scheme != "s3":
        with _local_lock(storage.parse(uri).path + ".lock"):
            manifest = load(dataset_uri)
            manifest.merge(records, units_total)
            storage.write_bytes(uri, manifest.to_json())
            return manifest
    from botocore.exceptions import ClientError

    client = storage.boto3_client()
    bucket, key = storage.parse(uri).bucket_key
    for attempt in range(attempts):
        manifest = load(dataset_uri)
        manifest.merge(records, units_total)
        cond = {"IfMatch": manifest.etag} if manifest.etag else {"IfNoneMatch": "*"}
        body = manifest.to_json()
        try:
            resp = storage.retry(
                lambda b=body, c=cond: client.put_object(Bucket=bucket, Key=key, Body=b, **c),
                what=f"commit {uri}",
            )
            manifest.etag = resp["ETag"]
            return manifest
        except ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status not in (409, 412):
                raise
            time.sleep(0.05 * (attempt + 1))  # another writer committed first: re-read and merge
    raise RuntimeError(f"{uri}: gave up after {attempts} conflicting concurrent manifest updates")


@contextlib.contextmanager
def _local_lock(path: str) -> Iterator[None]:
    import fcntl

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
