"""The dataset's commit log: what makes shards visible, and the plan that owns the folder.

A dataset's state is an append-only log of small immutable records under ``_log/``:

- ``_log/{seq:020d}.json``: one record per change, written with a create-only write
  (:func:`storage.create_only`: ``If-None-Match: *`` on S3, a hard link locally), so two writers can
  never both take one sequence number; the loser reads the winner's record and retries with the next.
  Record 0 is the claim: it pins the run's :class:`Plan` (the number of work units and the settings
  that determine the shards' bytes, with their fingerprint). Every later record adds shard records
  (``add``: unit -> record) or drops units found damaged (``drop``). A commit costs one probe for
  records written by others since plus one small write, the same at 10^3 and 10^6 units.
- ``_log/{seq:020d}.checkpoint.parquet``: the whole state after record ``seq`` (the plan in the file
  metadata, one row per committed unit in unit order), written by the writer of every record whose
  ``seq`` is a multiple of :data:`CHECKPOINT_EVERY` (record 0 too: a migrated dataset's copy is
  checkpointed at once); ``_log/_last_checkpoint`` is a hint naming the newest one. Writing one costs
  O(units) (about 0.3 s at 10^5 units), once every CHECKPOINT_EVERY commits.
- ``manifest.json``: a derived summary for external tools in the layout of the old single-file
  manifest, refreshed at the end of every writer run and with a checkpoint at most every
  :data:`SUMMARY_EVERY_S`. It may lag the log and is never read when a log exists.

A reader loads the hint's checkpoint (a stale or missing hint: the newest checkpoint found by probing
the multiples of :data:`CHECKPOINT_EVERY` from there, or from 0; none: record 0) and then reads
records ``seq+1, seq+2, ...`` until one is missing. Nothing is listed. :func:`iter_committed` streams
the committed records in unit order without holding them all.

A shard exists for readers only once a record adding it is in the log. A run or a concurrent writer
whose plan differs from record 0's is refused with the changed settings named, so a folder never mixes
shards of two plans; one unit committed twice with two hashes is an error (not deterministic). A
folder that holds files but no dataset is not ours and is refused before anything is written.

Everything read is validated first (:class:`ManifestError` names the file, the unit and the problem):
a shard record must name its unit's own file (so no record points outside the dataset), a unit inside
the plan, counts that add up and a sha256 digest.

Migration: a dataset written before the log (only ``manifest.json``) is read from that file; its next
writer copies it into record 0 (pinning its plan). One without a plan cannot be checked, so it is
refused for writing and stays readable.
"""

from __future__ import annotations

import hashlib
import heapq
import io
import json
import random
import re
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from facesynth import storage

FORMAT = "facesynth.shards/1"  # manifest.json: the summary, and the whole state of pre-log datasets
LOG_FORMAT = "facesynth.log/1"
MANIFEST = "manifest.json"
SHARD_DIR = "shards"
LOG_DIR = "_log"
HINT = f"{LOG_DIR}/_last_checkpoint"
CHECKPOINT_EVERY = 100  # records between checkpoints (delta-rs's default)
SUMMARY_EVERY_S = 600.0  # a writer refreshes manifest.json with a checkpoint at most this often
PROBE_WIDTH = 16  # parallel reads once a reader's tail of records proves longer than one
APPEND_ATTEMPTS = 1000
_META_KEY = b"facesynth.log"
_SHA256 = re.compile(r"[0-9a-f]{64}")
_UNIT_KEY = re.compile(r"\d{5,}")
_RECORD_INTS = ("rows", "bytes")
_COUNTS = {"identities": int, "domain": dict, "generator": dict, "per_identity": dict}
_CHECKPOINT_SCHEMA = pa.schema(
    [
        ("unit", pa.int64()),
        ("file", pa.string()),
        ("rows", pa.int64()),
        ("bytes", pa.int64()),
        ("sha256", pa.string()),
        ("counts", pa.string()),  # JSON
    ]
)


class ManifestError(ValueError):
    """A log record, checkpoint or manifest that cannot be trusted: malformed, or naming files outside its dataset."""


class PlanMismatch(ValueError):
    """A run whose plan differs from the one the dataset folder was created with."""


class ForeignFolder(ValueError):
    """An output folder that holds files but no facesynth dataset."""


def shard_file(unit_index: int) -> str:
    """The one file name unit ``unit_index`` may have, relative to the dataset."""
    return f"{SHARD_DIR}/part-{unit_index:05d}.parquet"


def record_file(seq: int) -> str:
    return f"{LOG_DIR}/{seq:020d}.json"


def checkpoint_file(seq: int) -> str:
    return f"{LOG_DIR}/{seq:020d}.checkpoint.parquet"


@dataclass(frozen=True)
class Plan:
    """What a dataset is: ``units_total`` work units made with ``settings`` (JSON values)."""

    units_total: int
    settings: dict

    @property
    def fingerprint(self) -> str:
        body = json.dumps({"units_total": self.units_total, "settings": self.settings}, sort_keys=True)
        return hashlib.sha256(body.encode()).hexdigest()

    def to_json(self) -> dict:
        return {"units_total": self.units_total, "settings": self.settings, "fingerprint": self.fingerprint}

    def changes(self, new: Plan) -> list[str]:
        """``key: old -> new`` for every dotted setting that differs between this plan and ``new``."""
        old_flat = _flatten({"units_total": self.units_total, **self.settings})
        new_flat = _flatten({"units_total": new.units_total, **new.settings})
        missing = object()
        return [
            f"{key}: {old_flat.get(key, missing)!r} -> {new_flat.get(key, missing)!r}".replace(
                repr(missing), "(unset)"
            )
            for key in sorted(set(old_flat) | set(new_flat))
            if old_flat.get(key, missing) != new_flat.get(key, missing)
        ]


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


def check_plan(pinned: Plan | None, plan: Plan, committed: int, uri: str) -> None:
    """Refuse ``plan`` unless it is ``pinned``, the plan the dataset was created with (None: not recorded)."""
    if pinned is None:
        if committed:
            raise PlanMismatch(
                f"{uri}: written before plans were recorded ({committed} shards, no fingerprint); "
                "its settings cannot be checked, so write to a new output folder"
            )
    elif pinned.fingerprint != plan.fingerprint:
        changed = pinned.changes(plan)
        raise PlanMismatch(
            f"{uri}: was created with other settings ({committed} of {pinned.units_total} "
            f"units committed); changed: {'; '.join(changed[:8])}"
            f"{' ...' if len(changed) > 8 else ''}. Rerun with the original settings to resume, "
            "or write to a new output folder"
        )


def _parse_plan(raw, uri: str) -> Plan:
    if not isinstance(raw, dict) or not isinstance(raw.get("settings"), dict):
        raise ManifestError(f"{uri}: 'plan' must be an object with 'settings'")
    total = raw.get("units_total")
    if not isinstance(total, int) or isinstance(total, bool) or total < 1:
        raise ManifestError(f"{uri}: plan units_total {total!r} is not a positive count")
    plan = Plan(total, raw["settings"])
    if raw.get("fingerprint") != plan.fingerprint:
        raise ManifestError(f"{uri}: the plan's fingerprint does not match its settings (edited by hand?)")
    return plan


def _check_record(unit: int, rec, plan: Plan | None, uri: str) -> None:
    """A shard record names its unit's own file, non-negative counts that agree, and a sha256."""

    def bad(what: str) -> ManifestError:
        return ManifestError(f"{uri}: unit {unit}: {what}")

    if not isinstance(rec, dict):
        raise bad("record is not an object")
    if plan is not None and not 0 <= unit < plan.units_total:
        raise bad(f"outside the plan's {plan.units_total} units")
    if rec.get("file") != shard_file(unit):
        raise bad(f"file {rec.get('file')!r} is not {shard_file(unit)!r}")
    for key in _RECORD_INTS:
        value = rec.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise bad(f"{key} {value!r} is not a non-negative integer")
    if not isinstance(rec.get("sha256"), str) or not _SHA256.fullmatch(rec["sha256"]):
        raise bad(f"sha256 {rec.get('sha256')!r} is not a hex digest")
    counts = rec.get("counts")
    if not isinstance(counts, dict) or any(not isinstance(counts.get(k), t) for k, t in _COUNTS.items()):
        raise bad(f"counts must hold {sorted(_COUNTS)}")
    for name in ("per_identity", "domain", "generator"):
        values = counts[name].values()
        if any(not isinstance(v, int) or v < 0 for v in values) or sum(values) != rec["rows"]:
            raise bad(f"counts.{name} do not add up to its {rec['rows']} rows")
    if counts["identities"] != len(counts["per_identity"]):
        raise bad("counts.identities disagrees with counts.per_identity")


def _parse_json(data: bytes, uri: str, fmt: str) -> dict:
    try:
        body = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{uri}: not valid JSON ({exc})") from exc
    if not isinstance(body, dict) or body.get("format") != fmt:
        got = body.get("format") if isinstance(body, dict) else type(body).__name__
        raise ManifestError(f"{uri}: format {got!r}, expected {fmt!r}")
    return body


def _parse_shards(raw, name: str, plan: Plan | None, uri: str) -> dict[int, dict]:
    """``{"00005": record, ...}`` -> ``{5: record}``, every record checked."""
    if not isinstance(raw, dict):
        raise ManifestError(f"{uri}: '{name}' must be an object of unit -> record")
    out = {}
    for key, rec in raw.items():
        if not _UNIT_KEY.fullmatch(key):
            raise ManifestError(f"{uri}: shard key {key!r} is not a unit number")
        _check_record(int(key), rec, plan, uri)
        out[int(key)] = rec
    return out


def _check_rows(rows, shards: dict[int, dict], uri: str) -> None:
    if rows is not None and rows != sum(r["rows"] for r in shards.values()):
        raise ManifestError(f"{uri}: 'rows' is {rows} but the shard records add up to another count")


# --- log records ------------------------------------------------------------------------------


@dataclass(frozen=True)
class LogRecord:
    """One immutable change: record 0 pins ``plan``; later ones ``drop`` units, then ``add`` shard records."""

    seq: int
    add: dict[int, dict]
    drop: tuple[int, ...] = ()
    plan: Plan | None = None

    def to_json(self) -> bytes:
        body = {
            "format": LOG_FORMAT,
            "seq": self.seq,
            "rows": sum(r["rows"] for r in self.add.values()),
            "add": {f"{k:05d}": self.add[k] for k in sorted(self.add)},
            "drop": sorted(self.drop),
        }
        if self.plan is not None:
            body["plan"] = self.plan.to_json()
        return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes, *, seq: int, plan: Plan | None, uri: str) -> LogRecord:
        """Parse and validate record ``seq`` (record 0 carries the plan; later ones are checked against ``plan``)."""
        body = _parse_json(data, uri, LOG_FORMAT)
        if body.get("seq") != seq:
            raise ManifestError(f"{uri}: 'seq' is {body.get('seq')!r}, expected {seq} (copied or renamed?)")
        if (seq == 0) != ("plan" in body):
            raise ManifestError(f"{uri}: record 0 and only record 0 pins the plan")
        if seq == 0:
            plan = _parse_plan(body["plan"], uri)
        add = _parse_shards(body.get("add"), "add", plan, uri)
        _check_rows(body.get("rows"), add, uri)
        drop = body.get("drop")
        if not isinstance(drop, list) or any(not isinstance(u, int) or isinstance(u, bool) for u in drop):
            raise ManifestError(f"{uri}: 'drop' must be a list of unit numbers")
        return cls(seq, add, tuple(drop), plan if seq == 0 else None)


def _read_record(dataset_uri: str, seq: int, plan: Plan | None) -> LogRecord | None:
    uri = storage.join(dataset_uri, record_file(seq))
    data = storage.get_object(uri)
    return None if data is None else LogRecord.from_json(data, seq=seq, plan=plan, uri=uri)


def _probe(dataset_uri: str, first: int, plan: Plan) -> Iterator[LogRecord]:
    """Records ``first, first + 1, ...`` until one is missing; a long tail is read ahead in parallel."""
    seq, width = first, 1
    with ThreadPoolExecutor(PROBE_WIDTH) as pool:
        while True:
            mapper = map if width == 1 else pool.map
            for rec in mapper(lambda s: _read_record(dataset_uri, s, plan), range(seq, seq + width)):
                if rec is None:
                    return
                yield rec
            seq, width = seq + width, min(2 * width, PROBE_WIDTH)


# --- checkpoints ------------------------------------------------------------------------------


def _read_hint(dataset_uri: str) -> int | None:
    """The checkpoint ``_last_checkpoint`` names; None when missing or unreadable (it is only a hint)."""
    try:
        seq = json.loads(storage.get_object(storage.join(dataset_uri, HINT)) or "{}").get("seq")
    except (ValueError, AttributeError):
        return None
    return seq if isinstance(seq, int) and seq >= 0 else None


def _find_checkpoint(dataset_uri: str) -> int | None:
    """The newest checkpoint: the hint's, then any newer one at the next multiples of CHECKPOINT_EVERY."""

    def exists(seq: int) -> bool:
        return storage.has_object(storage.join(dataset_uri, checkpoint_file(seq)))

    hint = _read_hint(dataset_uri)
    found = hint if hint is not None and exists(hint) else None
    seq = 0 if found is None else (found // CHECKPOINT_EVERY + 1) * CHECKPOINT_EVERY
    while exists(seq):
        found, seq = seq, seq + CHECKPOINT_EVERY
    return found


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint file, read whole: its bytes and the plan and row total its metadata records."""

    seq: int
    uri: str
    data: bytes
    plan: Plan
    rows: int

    @classmethod
    def read(cls, dataset_uri: str, seq: int) -> Checkpoint:
        uri = storage.join(dataset_uri, checkpoint_file(seq))
        return cls.parse(storage.read_bytes(uri), seq=seq, uri=uri)

    @classmethod
    def parse(cls, data: bytes, *, seq: int, uri: str) -> Checkpoint:
        try:
            schema = pq.read_schema(io.BytesIO(data))
        except (OSError, pa.ArrowInvalid) as exc:
            raise ManifestError(f"{uri}: not a readable parquet checkpoint ({exc})") from exc
        if not schema.remove_metadata().equals(_CHECKPOINT_SCHEMA) or _META_KEY not in (
            schema.metadata or {}
        ):
            raise ManifestError(
                f"{uri}: columns {schema.names}, expected {_CHECKPOINT_SCHEMA.names} and metadata"
            )
        meta = _parse_json(schema.metadata[_META_KEY], uri, LOG_FORMAT)
        if meta.get("seq") != seq or not isinstance(meta.get("rows"), int):
            raise ManifestError(
                f"{uri}: metadata names seq {meta.get('seq')!r} and rows {meta.get('rows')!r}, expected {seq}"
            )
        return cls(seq, uri, data, _parse_plan(meta.get("plan"), uri), meta["rows"])

    def table(self) -> pa.Table:
        return pq.read_table(io.BytesIO(self.data)).replace_schema_metadata(None)

    def records(self) -> Iterator[tuple[int, dict]]:
        """The records in unit order, decoded in row batches and checked one by one."""
        last, total = -1, 0
        for batch in pq.ParquetFile(io.BytesIO(self.data)).iter_batches(batch_size=4096):
            for row in batch.to_pylist():
                unit = row.pop("unit")
                if unit is None or unit <= last:
                    raise ManifestError(f"{self.uri}: unit {unit}: out of order or repeated")
                row["counts"] = _loads_counts(row["counts"])
                _check_record(unit, row, self.plan, self.uri)
                last, total = unit, total + row["rows"]
                yield unit, row
        if total != self.rows:
            raise ManifestError(
                f"{self.uri}: 'rows' is {self.rows} but the shard records add up to another count"
            )


def _loads_counts(text):
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        return None  # reported by _check_record as malformed counts


def _records_table(records: Iterable[tuple[int, dict]]) -> pa.Table:
    cols: dict[str, list] = {name: [] for name in _CHECKPOINT_SCHEMA.names}
    for unit, rec in records:
        cols["unit"].append(unit)
        for key in ("file", "rows", "bytes", "sha256"):
            cols[key].append(rec[key])
        cols["counts"].append(json.dumps(rec["counts"], sort_keys=True, separators=(",", ":")))
    return pa.table(cols, schema=_CHECKPOINT_SCHEMA)


# --- reading ----------------------------------------------------------------------------------


@dataclass
class Manifest:
    """All committed shards of one dataset, keyed by work-unit index, and the plan they belong to."""

    shards: dict[int, dict] = field(default_factory=dict)
    plan: Plan | None = None  # None: nothing claimed yet, or a dataset written before plans were recorded
    units_total: int | None = None
    exists: bool = False  # False: no dataset was found

    @property
    def complete(self) -> bool:
        return self.units_total is not None and len(self.shards) == self.units_total

    @classmethod
    def from_json(cls, data: bytes, *, uri: str) -> Manifest:
        """Parse and validate a ``manifest.json`` (:class:`ManifestError` naming ``uri`` and the problem)."""
        body = _parse_json(data, uri, FORMAT)
        units_total = body.get("units_total")
        if units_total is not None and (not isinstance(units_total, int) or units_total < 1):
            raise ManifestError(f"{uri}: 'units_total' {units_total!r} is not a positive count")
        plan = None if body.get("plan") is None else _parse_plan(body["plan"], uri)
        if plan is not None and plan.units_total != units_total:
            raise ManifestError(f"{uri}: plan units_total {plan.units_total} is not 'units_total'")
        shards = _parse_shards(body.get("shards"), "shards", plan, uri)
        _check_rows(body.get("rows"), shards, uri)
        if units_total is not None and any(unit >= units_total for unit in shards):
            raise ManifestError(f"{uri}: a shard's unit is outside the dataset's {units_total} units")
        return cls(shards=shards, plan=plan, units_total=units_total, exists=True)


@dataclass
class Snapshot:
    """A dataset as one reader found it: the plan, a checkpoint and the records after it (the tail).

    ``legacy``: a dataset written before the log, whose whole state is its ``manifest.json``.
    """

    uri: str
    plan: Plan | None = None
    seq: int = -1  # the newest record read; -1: no log
    checkpoint: Checkpoint | None = None
    tail: dict[int, dict | None] = field(default_factory=dict)  # unit -> record added (None: dropped)
    legacy: Manifest | None = None

    @property
    def exists(self) -> bool:
        return self.seq >= 0 or self.legacy is not None

    @property
    def units_total(self) -> int | None:
        if self.legacy is not None:
            return self.legacy.units_total
        return self.plan.units_total if self.plan is not None else None

    def apply(self, rec: LogRecord) -> None:
        self.tail.update(dict.fromkeys(rec.drop))
        self.tail.update(rec.add)
        self.seq = rec.seq

    def catch_up(self) -> None:
        """Read the records written since (by any writer)."""
        for rec in _probe(self.uri, self.seq + 1, self.plan):
            self.apply(rec)

    def records(self) -> Iterator[tuple[int, dict]]:
        """The committed ``(unit, record)`` pairs in unit order: checkpoint rows merged with the tail."""
        if self.legacy is not None:
            yield from sorted(self.legacy.shards.items())
            return
        base = self.checkpoint.records() if self.checkpoint is not None else ()
        kept = ((unit, rec) for unit, rec in base if unit not in self.tail)
        added = sorted((unit, rec) for unit, rec in self.tail.items() if rec is not None)
        yield from heapq.merge(kept, added, key=lambda item: item[0])


def snapshot(dataset_uri: str, *, missing_ok: bool = True) -> Snapshot:
    """Find a dataset's state (checkpoint + tail, or a pre-log ``manifest.json``) without reading the records."""
    snap = Snapshot(dataset_uri)
    seq = _find_checkpoint(dataset_uri)
    if seq is not None:
        snap.checkpoint = Checkpoint.read(dataset_uri, seq)
        snap.plan, snap.seq = snap.checkpoint.plan, seq
    else:
        first = _read_record(dataset_uri, 0, None)
        if first is None:
            snap.legacy = _load_legacy(dataset_uri)
            if snap.legacy is None and not missing_ok:
                raise FileNotFoundError(
                    f"{dataset_uri}: no {LOG_DIR}/ or {MANIFEST}: not a facesynth dataset (or nothing committed yet)"
                )
            return snap
        snap.plan = first.plan
        snap.apply(first)
    snap.catch_up()
    return snap


def _load_legacy(dataset_uri: str) -> Manifest | None:
    uri = storage.join(dataset_uri, MANIFEST)
    try:
        return Manifest.from_json(storage.read_bytes(uri), uri=uri)
    except FileNotFoundError:
        return None


def iter_committed(dataset_uri: str) -> Iterator[tuple[int, dict]]:
    """The committed ``(unit, record)`` pairs in unit order, streamed (nothing if there is no dataset)."""
    yield from snapshot(dataset_uri).records()


def load(dataset_uri: str, *, missing_ok: bool = True) -> Manifest:
    """All committed records in one :class:`Manifest` (empty, ``exists=False``, if there is no dataset)."""
    snap = snapshot(dataset_uri, missing_ok=missing_ok)
    if snap.legacy is not None:
        return snap.legacy
    return Manifest(dict(snap.records()), snap.plan, snap.units_total, snap.exists)


# --- writing ----------------------------------------------------------------------------------


class LogWriter:
    """One writer's handle on a dataset's log: appends records of its plan, writes checkpoints.

    ``committed`` maps every committed unit to its sha256, kept current with the records other writers
    append; the writer keeps full records only for its tail (the records since its newest checkpoint).
    """

    def __init__(self, snap: Snapshot, plan: Plan):
        self.snap, self.plan, self.uri = snap, plan, snap.uri
        self.summary_time = -float("inf")  # time.monotonic() of this writer's last manifest.json
        self.committed = {unit: rec["sha256"] for unit, rec in snap.records()}
        check_plan(snap.plan, plan, len(self.committed), self.uri)

    def commit(self, records: Iterable[dict]) -> None:
        """Append the shard ``records`` (dicts with ``unit``); already committed identical ones are skipped."""
        add = {}
        for rec in records:
            unit = int(rec["unit"])
            add[unit] = {k: v for k, v in rec.items() if k != "unit"}
            _check_record(unit, add[unit], self.plan, "commit")
        self._append(add, set())

    def uncommit(self, units: Iterable[int]) -> None:
        """Drop ``units`` (shards found damaged, to be rewritten)."""
        self._append({}, set(units))

    def _append(self, add: dict[int, dict], drop: set[int]) -> None:
        """Write the next record: catch up, take the next seq with a create-only write, retry on a lost race."""
        for attempt in range(APPEND_ATTEMPTS):
            if attempt:  # another writer took the number: let the crowd thin out (jittered backoff)
                time.sleep(random.uniform(0, min(0.1, 0.002 * 2**attempt)))
            self.snap.catch_up()
            rec = LogRecord(self.snap.seq + 1, self._new(add), tuple(sorted(drop & self.committed.keys())))
            if not rec.add and not rec.drop:
                return
            if storage.create_only(storage.join(self.uri, record_file(rec.seq)), rec.to_json()):
                self._apply(rec)
                if rec.seq % CHECKPOINT_EVERY == 0:
                    self._checkpoint(summary=time.monotonic() - self.summary_time >= SUMMARY_EVERY_S)
                return
        raise RuntimeError(f"{self.uri}: gave up after {APPEND_ATTEMPTS} lost races for the next log record")

    def _new(self, add: dict[int, dict]) -> dict[int, dict]:
        """The records of ``add`` not committed yet; a unit committed with another hash is an error."""
        for unit, rec in add.items():
            old = self.committed.get(unit)
            if old is not None and old != rec["sha256"]:
                raise RuntimeError(
                    f"unit {unit}: shard {rec['file']} has sha256 {rec['sha256']} but "
                    f"{old} is committed; the generator is not deterministic"
                )
        return {unit: rec for unit, rec in add.items() if unit not in self.committed}

    def _apply(self, rec: LogRecord) -> None:
        self.snap.apply(rec)
        for unit in rec.drop:
            self.committed.pop(unit, None)
        self.committed.update((unit, r["sha256"]) for unit, r in rec.add.items())

    def state(self) -> pa.Table:
        """The whole committed state as a checkpoint table (base checkpoint + tail, in unit order)."""
        snap = self.snap
        base = snap.checkpoint.table() if snap.checkpoint is not None else _CHECKPOINT_SCHEMA.empty_table()
        changed = pa.array(list(snap.tail), pa.int64())
        kept = base.filter(pc.invert(pc.is_in(base["unit"], value_set=changed)))
        added = _records_table(sorted((u, r) for u, r in snap.tail.items() if r is not None))
        table = pa.concat_tables([kept, added])
        units = table["unit"]
        if len(units) > 1 and not pc.all(pc.less(units[:-1], units[1:])).as_py():
            table = table.sort_by("unit")  # new units interleave with old ones (usually they follow them)
        return table

    def publish(self) -> None:
        """End of a writer run: catch up, checkpoint if the newest record is a checkpoint's, refresh ``manifest.json``."""
        self.snap.catch_up()
        self._checkpoint(summary=True)

    def _checkpoint(self, *, summary: bool) -> None:
        """Write the checkpoint of the newest record if its seq is a multiple of CHECKPOINT_EVERY; the summary if asked."""
        table, seq = self.state(), self.snap.seq
        if seq % CHECKPOINT_EVERY == 0:
            self._write_checkpoint(table, seq)
        if summary:
            storage.write_bytes(storage.join(self.uri, MANIFEST), _summary(table, self.plan))
            self.summary_time = time.monotonic()

    def _write_checkpoint(self, table: pa.Table, seq: int) -> None:
        rows = pc.sum(table["rows"]).as_py() or 0
        meta = {"format": LOG_FORMAT, "seq": seq, "plan": self.plan.to_json(), "rows": rows}
        buf = io.BytesIO()
        pq.write_table(
            table.replace_schema_metadata({_META_KEY: json.dumps(meta, sort_keys=True)}),
            buf,
            compression="zstd",
            row_group_size=16384,
        )
        uri = storage.join(self.uri, checkpoint_file(seq))
        storage.write_bytes(uri, buf.getvalue())
        storage.write_bytes(storage.join(self.uri, HINT), json.dumps({"seq": seq}).encode())
        self.snap.checkpoint, self.snap.tail = Checkpoint(seq, uri, buf.getvalue(), self.plan, rows), {}


def _summary(table: pa.Table, plan: Plan) -> bytes:
    """``manifest.json`` in the old single-file layout, built from a checkpoint table."""
    cols = table.to_pydict()
    rows = sum(cols["rows"])
    head = {
        "format": FORMAT,
        "plan": plan.to_json(),
        "units_total": plan.units_total,
        "complete": table.num_rows == plan.units_total,
        "rows": rows,
    }
    shards = ",".join(
        f'"{unit:05d}":{{"bytes":{nbytes},"counts":{counts},"file":{json.dumps(file)},'
        f'"rows":{nrows},"sha256":"{sha}"}}'
        for unit, file, nrows, nbytes, sha, counts in zip(
            cols["unit"],
            cols["file"],
            cols["rows"],
            cols["bytes"],
            cols["sha256"],
            cols["counts"],
            strict=True,
        )
    )
    return f'{json.dumps(head, sort_keys=True)[:-1]},"shards":{{{shards}}}}}'.encode()


def open_writer(dataset_uri: str, plan: Plan, *, refuse_foreign: bool = True) -> LogWriter:
    """A :class:`LogWriter` for ``plan``, claiming the dataset (writing record 0) if it has no log yet.

    A different plan raises :class:`PlanMismatch`; with ``refuse_foreign``, a folder holding files but no
    dataset :class:`ForeignFolder`. Both are checked before anything is written; a concurrent claim is
    decided by the create-only write of record 0 and checked again after it.
    """
    snap = snapshot(dataset_uri)
    if snap.seq < 0:
        legacy = snap.legacy or Manifest()
        if snap.legacy is None and refuse_foreign:
            _refuse_foreign(dataset_uri)
        check_plan(legacy.plan, plan, len(legacy.shards), dataset_uri)
        first = LogRecord(0, legacy.shards, plan=plan)
        if storage.create_only(storage.join(dataset_uri, record_file(0)), first.to_json()):
            snap = Snapshot(dataset_uri, plan)
            snap.apply(first)
            writer = LogWriter(snap, plan)
            writer._checkpoint(summary=False)
            return writer
        snap = snapshot(dataset_uri)  # another writer claimed it first
    return LogWriter(snap, plan)


def _refuse_foreign(dataset_uri: str) -> None:
    # our own names may appear meanwhile (a concurrent writer won: the create-only record 0 decides)
    entries = [e for e in storage.list_entries(dataset_uri) if e != LOG_DIR and not e.startswith(MANIFEST)]
    if entries:
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise ForeignFolder(
            f"{dataset_uri}: output folder holds {len(entries)} entries ({shown}) but no facesynth "
            f"dataset ({LOG_DIR}/ or {MANIFEST}), so it is not ours; write to a new or empty folder"
        )


def claim(dataset_uri: str, plan: Plan) -> LogWriter:
    """Make ``dataset_uri`` this plan's dataset before anything else is written to it (see :func:`open_writer`)."""
    return open_writer(dataset_uri, plan)


def commit(dataset_uri: str, records: list[dict], plan: Plan) -> LogWriter:
    """Append ``records`` of ``plan`` (pinning the plan in a new folder); reads the whole log first."""
    writer = open_writer(dataset_uri, plan, refuse_foreign=False)
    writer.commit(records)
    return writer


def uncommit(dataset_uri: str, units: Iterable[int], plan: Plan) -> LogWriter:
    """Drop ``units`` (shards found damaged, to be rewritten); reads the whole log first."""
    writer = open_writer(dataset_uri, plan)
    writer.uncommit(units)
    return writer
