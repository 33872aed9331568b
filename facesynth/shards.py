"""Shard datasets: deterministic work units -> parquet shards committed through the manifest.

A dataset is a folder ``shards/part-{k:05d}.parquet`` + ``manifest.json`` + ``card.md``. Work
unit ``k`` always writes ``shards/part-{k:05d}.parquet`` and, for a fixed seed, the same bytes.
A shard file appears atomically (temporary file + rename locally, a single PUT on S3) and becomes
part of the dataset only when its manifest entry (rows, sha256) is committed, so a killed job
leaves nothing half-visible and a rerun skips the committed units.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from facesynth import manifest, storage

DOMAINS = ("real", "render", "diffusion", "realism")
SHARD_DIR = "shards"

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


def shard_file(unit_index: int) -> str:
    return f"{SHARD_DIR}/part-{unit_index:05d}.parquet"


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


def committed_files(dataset_uri: str) -> list[str]:
    """URIs of the committed shards, in unit order; error if the dataset has none."""
    m = manifest.load(dataset_uri)
    if not m.shards:
        raise FileNotFoundError(f"{dataset_uri}: no committed shards (no manifest.json or it is empty)")
    return [storage.join(dataset_uri, m.shards[k]["file"]) for k in sorted(m.shards)]


def read_dataset(dataset_uri: str, columns: list[str] | None = None, **read_kwargs):
    """A Ray Dataset over the committed shards only (never stray or uncommitted files)."""
    import ray.data

    files = committed_files(dataset_uri)
    fs, _ = storage.resolve(dataset_uri)
    paths = [storage.parse(f).path for f in files]
    ds = ray.data.read_parquet(paths, filesystem=fs, **read_kwargs)
    return ds.select_columns(columns) if columns else ds


def iter_tables(dataset_uri: str, columns: list[str] | None = None) -> Iterator[pa.Table]:
    """Committed shards as pyarrow tables, in unit order, without Ray."""
    for uri in committed_files(dataset_uri):
        with storage.open_input(uri) as f:
            yield pq.read_table(f, columns=columns)


def iter_rows(dataset_uri: str, columns: list[str] | None = None) -> Iterator[dict]:
    """Committed rows as dicts, in unit order, without Ray."""
    for table in iter_tables(dataset_uri, columns):
        yield from table.to_pylist()


def verify(dataset_uri: str) -> list[str]:
    """Re-hash every committed shard against the manifest; returns the problems found (empty: OK)."""
    m = manifest.load(dataset_uri)
    if not m.shards:
        return [f"{dataset_uri}: no committed shards"]
    problems = []
    for unit in sorted(m.shards):
        rec = m.shards[unit]
        uri = storage.join(dataset_uri, rec["file"])
        try:
            data = storage.read_bytes(uri)
        except FileNotFoundError:
            problems.append(f"{rec['file']}: missing")
            continue
        digest = hashlib.sha256(data).hexdigest()
        if digest != rec["sha256"]:
            problems.append(f"{rec['file']}: sha256 {digest} != manifest {rec['sha256']}")
            continue
        rows = pq.read_metadata(io.BytesIO(data)).num_rows
        if rows != rec["rows"]:
            problems.append(f"{rec['file']}: {rows} rows != manifest {rec['rows']}")
    if m.units_total is not None and len(m.shards) != m.units_total:
        problems.append(f"incomplete: {len(m.shards)} of {m.units_total} units committed")
    return problems


def remove_uncommitted(dataset_uri: str) -> list[str]:
    """Delete files under ``shards/`` that the manifest does not list (leftovers of killed writers)."""
    m = manifest.load(dataset_uri)
    keep = {storage.join(dataset_uri, rec["file"]) for rec in m.shards.values()}
    stray = [f for f in storage.list_files(storage.join(dataset_uri, SHARD_DIR)) if f not in keep]
    for f in stray:
        storage.delete(f)
    return stray


def summary(dataset_uri: str) -> dict:
    """Counts per domain/generator and images per identity, from the manifest alone."""
    m = manifest.load(dataset_uri)
    domain, generator, per_identity = Counter(), Counter(), Counter()
    for rec in m.shards.values():
        domain.update(rec["counts"]["domain"])
        generator.update(rec["counts"]["generator"])
        per_identity.update({int(k): v for k, v in rec["counts"]["per_identity"].items()})
    per = np.array(list(per_identity.values()) or [0])
    return {
        "uri": dataset_uri,
        "rows": sum(rec["rows"] for rec in m.shards.values()),
        "bytes": sum(rec["bytes"] for rec in m.shards.values()),
        "shards": len(m.shards),
        "units_total": m.units_total,
        "complete": m.complete,
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
