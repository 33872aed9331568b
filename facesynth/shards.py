"""Shard datasets: deterministic work units -> parquet shards committed through the commit log.

A dataset is a folder ``shards/part-{k:05d}.parquet`` + ``_log/`` (the commit log, see
:mod:`facesynth.manifest`) + ``manifest.json`` (its derived summary) + ``card.md``. Work unit ``k``
always writes ``shards/part-{k:05d}.parquet`` and, for a fixed seed, the same bytes. A shard file
appears atomically (temporary file + rename locally, a single PUT on S3) and becomes part of the
dataset only when a log record with its rows and sha256 is committed, so a killed job leaves nothing
half-visible and a rerun skips the committed units. Readers stream the committed records in unit
order (:func:`manifest.iter_committed`) and check every shard's sha256 as they read it.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from facesynth import manifest, storage, telemetry
from facesynth.manifest import SHARD_DIR, shard_file

log = logging.getLogger(__name__)
DOMAINS = ("real", "render", "diffusion", "realism")

SCHEMA = pa.schema(
    [
        ("image", pa.binary()),
        ("identity", pa.int64()),
        ("identity_name", pa.string()),
        ("sample", pa.int32()),
        ("domain", pa.string()),
        ("generator", pa.string()),
        ("prompt", pa.string()),
        ("seed", pa.int64()),
        ("t0", pa.int32()),
        ("params", pa.string()),
    ]
)
EMBEDDING_FIELD = pa.field("embedding", pa.list_(pa.float32()))


@dataclass(frozen=True)
class WorkUnit:
    """Identities ``[identity_start, identity_stop)`` x samples ``[sample_start, sample_stop)``."""

    index: int
    identity_start: int
    identity_stop: int
    sample_start: int
    sample_stop: int

    @property
    def size(self) -> int:
        return (self.identity_stop - self.identity_start) * (self.sample_stop - self.sample_start)

    def rows(self, base_seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(identity, sample, seed) arrays for every row, identity-major."""
        ids = np.repeat(
            np.arange(self.identity_start, self.identity_stop, dtype=np.int64),
            self.sample_stop - self.sample_start,
        )
        samples = np.tile(
            np.arange(self.sample_start, self.sample_stop, dtype=np.int64),
            self.identity_stop - self.identity_start,
        )
        return ids, samples, row_seeds(base_seed, ids, samples)

    def to_dict(self) -> dict:
        return asdict(self)


def plan_units(
    num_identities: int, samples_per_identity: int, identities_per_unit: int, identity_offset: int = 0
) -> list[WorkUnit]:
    """Cut identities x samples into deterministic units of ``identities_per_unit`` identities."""
    for name, value in (
        ("num_identities", num_identities),
        ("samples_per_identity", samples_per_identity),
        ("identities_per_unit", identities_per_unit),
    ):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    starts = range(identity_offset, identity_offset + num_identities, identities_per_unit)
    stop_all = identity_offset + num_identities
    return [
        WorkUnit(k, s, min(s + identities_per_unit, stop_all), 0, samples_per_identity)
        for k, s in enumerate(starts)
    ]


def row_seeds(base_seed: int, identities: np.ndarray, samples: np.ndarray) -> np.ndarray:
    """Per-row 63-bit seeds from (base seed, identity, sample): independent of batching and order."""
    ids = np.asarray(identities, np.uint64)
    base = np.full(ids.shape, base_seed, np.uint64)
    x = (
        ids * np.uint64(0x9E3779B97F4A7C15)
        ^ np.asarray(samples, np.uint64) * np.uint64(0xBF58476D1CE4E5B9)
        ^ base * np.uint64(0x94D049BB133111EB)
    )
    # splitmix64 finaliser: a well-mixed, reproducible hash
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return (x >> np.uint64(1)).astype(np.int64)


def to_table(rows: dict[str, Sequence]) -> pa.Table:
    """Build a shard table in the fixed schema (plus ``embedding`` when given); validates domain."""
    unknown = set(rows) - set(SCHEMA.names) - {"embedding"}
    missing = set(SCHEMA.names) - set(rows)
    if unknown or missing:
        raise ValueError(f"shard rows: unknown columns {sorted(unknown)}, missing columns {sorted(missing)}")
    bad = set(rows["domain"]) - set(DOMAINS)
    if bad:
        raise ValueError(f"shard rows: domain {sorted(bad)} not one of {DOMAINS}")
    schema = SCHEMA.append(EMBEDDING_FIELD) if "embedding" in rows else SCHEMA
    return pa.Table.from_pydict({name: rows[name] for name in schema.names}, schema=schema)


def write_shard(dataset_uri: str, unit_index: int, table: pa.Table) -> dict:
    """Write one unit's shard (deterministic bytes) and return its manifest record (not yet committed)."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", row_group_size=max(1, min(len(table), 4096)))
    data = buf.getvalue()
    rel = shard_file(unit_index)
    storage.write_bytes(storage.join(dataset_uri, rel), data)
    return {
        "unit": unit_index,
        "file": rel,
        "rows": table.num_rows,
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "counts": _counts(table),
    }


def _counts(table: pa.Table) -> dict:
    cols = {c: table.column(c).to_pylist() for c in ("identity", "domain", "generator")}
    return {
        "identities": len(set(cols["identity"])),
        "domain": dict(Counter(cols["domain"])),
        "generator": dict(Counter(cols["generator"])),
        "per_identity": {str(k): v for k, v in sorted(Counter(cols["identity"]).items())},
    }


class CorruptShard(ValueError):
    """A committed shard whose bytes are not the ones its manifest record hashed."""


@dataclass(frozen=True)
class ShardRef:
    """One committed shard: where it is and the sha256 and row count its manifest record pins."""

    uri: str
    unit: int
    rows: int
    sha256: str

    def read_bytes(self) -> bytes:
        """The shard's bytes, checked against the manifest's sha256 (:class:`CorruptShard` otherwise)."""
        try:
            data = storage.read_bytes(self.uri)
        except FileNotFoundError as exc:
            raise CorruptShard(f"{self.uri}: committed shard is missing; {_REPAIR}") from exc
        digest = hashlib.sha256(data).hexdigest()
        if digest != self.sha256:
            raise CorruptShard(
                f"{self.uri}: sha256 {digest[:12]}... does not match the manifest's {self.sha256[:12]}... "
                f"(damaged or replaced after it was committed); {_REPAIR}"
            )
        return data

    def read(self, columns: Sequence[str] | None = None) -> pa.Table:
        """The verified shard as a table (only ``columns`` when given)."""
        return pq.read_table(io.BytesIO(self.read_bytes()), columns=list(columns) if columns else None)


_REPAIR = "rerun the job that wrote the dataset with stage.verify_committed=true to rewrite it"


def shard_ref(dataset_uri: str, unit: int, rec: dict) -> ShardRef:
    """The :class:`ShardRef` of a committed ``(unit, record)``."""
    return ShardRef(storage.join(dataset_uri, rec["file"]), unit, rec["rows"], rec["sha256"])


def iter_shards(dataset_uri: str) -> Iterator[ShardRef]:
    """The committed shards, in unit order, streamed from the commit log; error if the dataset has none."""
    found = False
    for unit, rec in manifest.iter_committed(dataset_uri):
        found = True
        yield shard_ref(dataset_uri, unit, rec)
    if not found:
        raise FileNotFoundError(f"{dataset_uri}: no committed shards (no commit log, or nothing committed)")


def committed_shards(dataset_uri: str) -> list[ShardRef]:
    """The committed shards, in unit order, as a list; error if the dataset has none."""
    return list(iter_shards(dataset_uri))


def read_dataset(dataset_uri: str, columns: list[str] | None = None):
    """A Ray Dataset over the committed shards only, one block per shard, each verified against its sha256."""
    import ray.data

    refs = committed_shards(dataset_uri)
    return ray.data.from_items([asdict(ref) for ref in refs], override_num_blocks=len(refs)).map_batches(
        _read_refs, fn_kwargs={"columns": columns}, batch_size=1, batch_format="pyarrow"
    )


def _read_refs(batch: pa.Table, columns: list[str] | None) -> pa.Table:
    return pa.concat_tables([ShardRef(**row).read(columns) for row in batch.to_pylist()])


def iter_tables(dataset_uri: str, columns: list[str] | None = None) -> Iterator[pa.Table]:
    """Committed shards as verified pyarrow tables, in unit order, without Ray."""
    for ref in iter_shards(dataset_uri):
        yield ref.read(columns)


def iter_rows(dataset_uri: str, columns: list[str] | None = None) -> Iterator[dict]:
    """Committed rows as dicts, in unit order, without Ray."""
    for table in iter_tables(dataset_uri, columns):
        yield from table.to_pylist()


def verify(dataset_uri: str) -> list[str]:
    """Re-hash every committed shard and recount its rows against its log record; returns the problems found."""
    snap = manifest.snapshot(dataset_uri, missing_ok=False)
    problems, count = [], 0
    for _, rec in snap.records():
        count += 1
        problems += _shard_problems(dataset_uri, rec)
    if not count:
        return [f"{dataset_uri}: no committed shards"]
    if snap.units_total is not None and count != snap.units_total:
        problems.append(f"incomplete: {count} of {snap.units_total} units committed")
    return problems


def _shard_problems(dataset_uri: str, rec: dict) -> list[str]:
    """What differs between one committed shard's file and its record (empty: nothing)."""
    try:
        data = storage.read_bytes(storage.join(dataset_uri, rec["file"]))
    except FileNotFoundError:
        return [f"{rec['file']}: missing"]
    digest = hashlib.sha256(data).hexdigest()
    if digest != rec["sha256"]:
        return [f"{rec['file']}: sha256 {digest} != manifest {rec['sha256']}"]
    problems = []
    table = pq.read_table(io.BytesIO(data), columns=["identity", "domain", "generator"])
    if table.num_rows != rec["rows"]:
        problems.append(f"{rec['file']}: {table.num_rows} rows != manifest {rec['rows']}")
    elif _counts(table) != rec["counts"]:
        problems.append(f"{rec['file']}: identity/domain/generator counts differ from the manifest's")
    if len(data) != rec["bytes"]:
        problems.append(f"{rec['file']}: {len(data)} bytes != manifest {rec['bytes']}")
    return problems


_OURS = re.compile(r"part-(\d{5,})\.parquet(\.tmp-[0-9a-f]{32})?")


def damaged_units(dataset_uri: str, *, rehash: bool = False) -> list[int]:
    """Committed units whose shard is missing or has another size (one listing); ``rehash``: or another sha256."""
    sizes = storage.file_sizes(storage.join(dataset_uri, SHARD_DIR))
    bad = []
    for unit, rec in manifest.iter_committed(dataset_uri):
        name = rec["file"].rsplit("/", 1)[-1]
        if sizes.get(name) != rec["bytes"]:
            bad.append(unit)
        elif rehash:
            try:
                shard_ref(dataset_uri, unit, rec).read_bytes()
            except CorruptShard:
                bad.append(unit)
    return bad


def remove_uncommitted(dataset_uri: str) -> list[str]:
    """Delete our own leftovers under ``shards/``: uncommitted ``part-*`` shards and their temporary files.

    Files with any other name are never touched (they are not ours).
    """
    keep = {storage.join(dataset_uri, rec["file"]) for _, rec in manifest.iter_committed(dataset_uri)}
    stray = [
        f
        for f in storage.list_files(storage.join(dataset_uri, SHARD_DIR))
        if f not in keep and _OURS.fullmatch(f.rsplit("/", 1)[-1])
    ]
    for f in stray:
        storage.delete(f)
    return stray


def summary(dataset_uri: str) -> dict:
    """Counts per domain/generator and images per identity, from the commit log alone (streamed)."""
    snap = manifest.snapshot(dataset_uri, missing_ok=False)
    domain, generator, per_identity = Counter(), Counter(), Counter()
    rows = nbytes = count = 0
    for _, rec in snap.records():
        domain.update(rec["counts"]["domain"])
        generator.update(rec["counts"]["generator"])
        per_identity.update({int(k): v for k, v in rec["counts"]["per_identity"].items()})
        rows, nbytes, count = rows + rec["rows"], nbytes + rec["bytes"], count + 1
    per = np.array(list(per_identity.values()) or [0])
    return {
        "uri": dataset_uri,
        "rows": rows,
        "bytes": nbytes,
        "shards": count,
        "units_total": snap.units_total,
        "complete": count == snap.units_total,
        "identities": len(per_identity),
        "images_per_identity": {"min": int(per.min()), "mean": float(per.mean()), "max": int(per.max())},
        "domain": dict(domain),
        "generator": dict(generator),
    }


def write_card(dataset_uri: str, resolved_config: dict, title: str = "facesynth dataset") -> str:
    """Write ``card.md``: counts per identity/domain/generator and the resolved config."""
    import yaml

    s = summary(dataset_uri)
    ipi = s["images_per_identity"]
    lines = [
        f"# {title}",
        "",
        f"- URI: `{dataset_uri}`",
        f"- rows: {s['rows']} in {s['shards']} shards ({s['bytes'] / 1e6:.1f} MB), complete: {s['complete']}",
        f"- identities: {s['identities']} (images per identity: min {ipi['min']}, "
        f"mean {ipi['mean']:.1f}, max {ipi['max']})",
        "",
        "| domain | images |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in sorted(s["domain"].items())],
        "",
        "| generator | images |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in sorted(s["generator"].items())],
        "",
        "## Resolved config",
        "",
        "```yaml",
        yaml.safe_dump(resolved_config, sort_keys=False).rstrip(),
        "```",
        "",
        "Rows follow the facesynth shard schema: " + ", ".join(SCHEMA.names) + " (+ optional embedding).",
        "",
    ]
    uri = storage.join(dataset_uri, "card.md")
    storage.write_bytes(uri, "\n".join(lines).encode())
    return uri


def params_json(params: dict) -> str:
    """Canonical JSON for the ``params`` column (sorted keys, so bytes are reproducible)."""
    return json.dumps(params, sort_keys=True, separators=(",", ":"), default=_json_default)


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"params value of type {type(o).__name__} is not JSON-serialisable")


@dataclass
class WriteResult:
    """What one :func:`write_units` call did."""

    committed_before: int
    committed_now: int
    units_total: int
    images: int
    seconds: float
    rewritten: list[int]  # committed units found damaged and written again

    @property
    def images_per_s(self) -> float:
        return self.images / max(self.seconds, 1e-9)


def write_units(
    dataset_uri: str,
    plan: manifest.Plan,
    units: Sequence[int],
    produce: Callable[[list[int]], Iterable[dict]],
    *,
    commit_every_s: float = 2.0,
    rehash_committed: bool = False,
    desc: str = "write",
) -> WriteResult:
    """The skip/commit loop every dataset writer shares.

    Claims ``dataset_uri`` for ``plan`` (refusing another plan or a foreign folder), drops committed
    units whose shard is missing, resized or (``rehash_committed``) rehashed differently, hands the
    uncommitted ``units`` to ``produce``, commits the shard records it yields in batches at most every
    ``commit_every_s`` (one log record each; a kill loses at most those), removes our own uncommitted
    leftovers and refreshes the ``manifest.json`` summary.
    """
    from tqdm import tqdm

    if len(units) != plan.units_total:
        raise ValueError(f"{dataset_uri}: {len(units)} units given for a plan of {plan.units_total}")
    writer = manifest.claim(dataset_uri, plan)
    rewritten = damaged_units(dataset_uri, rehash=rehash_committed) if writer.committed else []
    if rewritten:
        log.warning("%s: units %s damaged, writing them again", dataset_uri, rewritten[:20])
        writer.uncommit(rewritten)
    committed = len(writer.committed)
    pending = [u for u in units if u not in writer.committed]
    log.info("%s: %d units committed, %d to write", dataset_uri, committed, len(pending))
    batch: list[dict] = []
    done = images = 0
    last = start = time.monotonic()
    with tqdm(total=len(pending), unit="shard", desc=f"{desc} -> {dataset_uri}", mininterval=2) as bar:
        for record in produce(pending) if pending else ():
            batch.append(record)
            images += record["rows"]
            bar.update(1)
            if time.monotonic() - last >= commit_every_s:
                done += _commit(writer, batch)
                batch, last = [], time.monotonic()
        done += _commit(writer, batch)
    stray = remove_uncommitted(dataset_uri)
    if stray:
        log.info("%s: removed %d uncommitted leftovers of earlier runs", dataset_uri, len(stray))
    writer.publish()
    return WriteResult(committed, done, len(units), images, time.monotonic() - start, rewritten)


def _commit(writer: manifest.LogWriter, records: list[dict]) -> int:
    if records:
        writer.commit(records)
        telemetry.inc("facesynth_shards_committed", len(records), "shards committed to the commit log")
    return len(records)
