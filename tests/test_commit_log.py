"""The commit log: create-only records, checkpoints + hint, streaming readers, the derived manifest.json,
migration of pre-log datasets, concurrent writers (16 processes), and the commit-scale bench."""

from __future__ import annotations

import functools
import json
import multiprocessing
import os
import shutil
from collections import Counter

import pytest

from bench import commit_scale
from bench.commit_scale import unit_record
from facesynth import manifest, shards, storage
from facesynth.manifest import ForeignFolder, PlanMismatch
from synthgen.stage import StageConfig, run_plain
from tests.commit_log_worker import PLAN, commit_disjoint
from tests.gen_fixtures import SETTINGS, make_noise


def where(kind: str, tmp_path, request) -> str:
    return f"{request.getfixturevalue('s3_bucket')}/ds" if kind == "s3" else str(tmp_path / "ds")


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_create_only_takes_a_name_once(kind, tmp_path, request):
    uri = storage.join(where(kind, tmp_path, request), "_log", "00000000000000000001.json")
    assert storage.create_only(uri, b"first")
    assert not storage.create_only(uri, b"second")  # taken: the loser must read it and move on
    assert storage.create_only(uri, b"first")  # a retry that finds its own bytes landed
    assert storage.read_bytes(uri) == b"first"
    assert storage.list_files(os.path.dirname(uri)) == [uri]  # no temporary file left behind


def test_readers_load_the_hinted_checkpoint_and_probe_the_tail_without_listing(tmp_path, monkeypatch):
    monkeypatch.setattr(manifest, "CHECKPOINT_EVERY", 3)
    uri = str(tmp_path / "ds")
    writer = manifest.claim(uri, PLAN)
    for unit in range(8):
        writer.commit([unit_record(unit)])
    writer.uncommit([5])  # record 9
    names = {manifest.record_file(s) for s in range(10)} | {manifest.checkpoint_file(s) for s in (0, 3, 6, 9)}
    assert {f"_log/{n}" for n in os.listdir(os.path.join(uri, "_log"))} == names | {manifest.HINT}
    assert json.loads(open(os.path.join(uri, manifest.HINT)).read()) == {"seq": 9}
    committed = [0, 1, 2, 3, 4, 6, 7]
    assert [u for u, _ in manifest.iter_committed(uri)] == committed

    reads = []
    for name in ("get_object", "read_bytes"):
        monkeypatch.setattr(storage, name, functools.partial(_logged, getattr(storage, name), reads))
    monkeypatch.setattr(storage, "list_files", None)  # readers never list
    monkeypatch.setattr(storage, "list_entries", None)

    def read() -> list[str]:
        reads.clear()
        assert sorted(manifest.load(uri).shards) == committed
        return [os.path.relpath(r, uri) for r in reads]

    assert read() == [manifest.HINT, manifest.checkpoint_file(9), manifest.record_file(10)]
    for stale in ('{"seq": 3}', '{"seq": 42}', "not json"):  # behind, naming nothing, garbage
        open(os.path.join(uri, manifest.HINT), "w").write(stale)
        assert read() == [manifest.HINT, manifest.checkpoint_file(9), manifest.record_file(10)]
    os.remove(os.path.join(uri, manifest.HINT))
    os.remove(os.path.join(uri, manifest.checkpoint_file(9)))  # its writer died before writing it
    got = read()  # checkpoint 6, then records 7, 8, 9 and 10 (missing) with some read-ahead
    assert got[:2] == [manifest.HINT, manifest.checkpoint_file(6)]
    assert {manifest.record_file(s) for s in range(7, 11)} <= set(got[2:])
    assert set(got[2:]) <= {manifest.record_file(s) for s in range(7, 14)}


def _logged(real, reads: list, uri: str):
    reads.append(uri)
    return real(uri)


def test_records_stream_in_unit_order_across_checkpoint_tail_drops_and_recommits(tmp_path, monkeypatch):
    monkeypatch.setattr(manifest, "CHECKPOINT_EVERY", 4)
    uri = str(tmp_path / "ds")
    writer = manifest.claim(uri, PLAN)
    for units in ([9, 3], [40], [1, 63], [7]):  # records 1-4: checkpoint 4 holds them
        writer.commit([unit_record(u) for u in units])
    writer.uncommit([3, 40])
    writer.commit([unit_record(u) for u in (40, 2, 0)])
    writer.commit([unit_record(9)])  # committed already, same sha256: no record
    expected = [0, 1, 2, 7, 9, 40, 63]
    assert [u for u, _ in manifest.iter_committed(uri)] == expected == sorted(writer.committed)
    assert manifest.snapshot(uri).seq == 6 and manifest.snapshot(uri).checkpoint.seq == 4
    assert dict(manifest.iter_committed(uri))[40] == {k: v for k, v in unit_record(40).items() if k != "unit"}
    other = dict(unit_record(2), sha256="f" * 64)
    with pytest.raises(RuntimeError, match="unit 2: .* not deterministic"):
        manifest.commit(uri, [other], PLAN)


def write(uri: str, units=shards.plan_units(8, 2, 2), seed: int = 3):
    cfg = StageConfig(batch_size=4, commit_every_s=0)
    return run_plain(
        units, functools.partial(make_noise, 16), uri, base_seed=seed, cfg=cfg, settings=SETTINGS
    )


def test_manifest_json_is_a_derived_summary_in_the_old_layout(tmp_path):
    uri = str(tmp_path / "ds")
    write(uri)
    path = os.path.join(uri, manifest.MANIFEST)
    summary = manifest.Manifest.from_json(open(path, "rb").read(), uri=path)
    state = manifest.load(uri)
    assert summary.shards == state.shards and summary.plan == state.plan and summary.complete
    assert set(json.loads(open(path).read())) == {
        "format",
        "plan",
        "units_total",
        "complete",
        "rows",
        "shards",
    }
    open(path, "w").write("{}")  # not authoritative: readers and writers never read it ...
    assert manifest.load(uri).shards == state.shards and shards.verify(uri) == []
    assert write(uri).committed_before == 4
    assert (
        manifest.Manifest.from_json(open(path, "rb").read(), uri=path).shards == state.shards
    )  # ... refreshed


def test_dataset_from_before_the_log_reads_and_gains_a_log_on_its_next_commit(tmp_path):
    uri = str(tmp_path / "ds")
    write(uri)
    manifest.uncommit(uri, [3], manifest.load(uri).plan).publish()  # 3 of 4 units, as if killed
    state = manifest.load(uri)
    shutil.rmtree(os.path.join(uri, manifest.LOG_DIR))  # what a pre-log writer left: manifest.json only
    legacy = manifest.load(uri)
    assert legacy.shards == state.shards and legacy.plan == state.plan and not legacy.complete
    assert shards.verify(uri) == ["incomplete: 3 of 4 units committed"]
    assert len(list(shards.iter_rows(uri))) == 12
    with pytest.raises(PlanMismatch, match="seed: 3 -> 4"):
        write(uri, seed=4)
    assert not os.path.exists(os.path.join(uri, manifest.LOG_DIR))
    result = write(uri)
    assert (result.committed_before, result.committed_now) == (3, 1)
    first = json.loads(open(os.path.join(uri, manifest.record_file(0))).read())
    assert sorted(first["add"]) == ["00000", "00001", "00002"] and first["plan"] == state.plan.to_json()
    assert manifest.snapshot(uri).checkpoint.seq == 0  # record 0 holds the copy: checkpointed at once
    assert manifest.load(uri).complete and shards.verify(uri) == []


def test_dataset_from_before_plans_stays_readable_and_is_refused_for_writing(tmp_path):
    uri = str(tmp_path / "ds")
    write(uri)
    shutil.rmtree(os.path.join(uri, manifest.LOG_DIR))
    path = os.path.join(uri, manifest.MANIFEST)
    body = json.loads(open(path).read())
    open(path, "w").write(json.dumps({**body, "plan": None}))
    assert shards.verify(uri) == [] and manifest.load(uri).plan is None
    with pytest.raises(PlanMismatch, match="written before plans were recorded"):
        write(uri)
    assert not os.path.exists(os.path.join(uri, manifest.LOG_DIR))


def test_foreign_folder_rule_treats_the_log_and_manifest_files_as_ours(tmp_path):
    uri = tmp_path / "ds"
    (uri / "_log").mkdir(parents=True)
    (uri / "_log" / f"00000000000000000000.json.tmp-{'ab' * 16}").write_bytes(
        b"{"
    )  # a claim killed mid-write
    (uri / "manifest.json.lock").write_bytes(b"")  # left by a pre-log writer
    manifest.claim(str(uri), PLAN)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "_logs").write_bytes(b"a user's file")
    with pytest.raises(ForeignFolder, match=r"holds 1 entries \(_logs\)"):
        manifest.claim(str(tmp_path / "other"), PLAN)


@pytest.mark.slow  # 16 spawned processes on 2 cores: 20-50 s per backend
@pytest.mark.parametrize("kind", ["local", "s3"])
def test_sixteen_processes_commit_every_unit_exactly_once_in_a_contiguous_log(kind, tmp_path, request):
    uri = f"{request.getfixturevalue('s3_atomic_bucket')}/ds" if kind == "s3" else str(tmp_path / "ds")
    manifest.claim(uri, PLAN)
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(16)
    procs = [
        ctx.Process(target=commit_disjoint, args=(uri, list(range(p, 64, 16)), barrier)) for p in range(16)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    assert [p.exitcode for p in procs] == [0] * 16
    names = [f.rsplit("/", 1)[-1] for f in storage.list_files(storage.join(uri, manifest.LOG_DIR))]
    records = sorted(n for n in names if n.endswith(".json"))
    assert records == [manifest.record_file(s)[len("_log/") :] for s in range(65)]  # contiguous, no gap
    added = Counter(
        int(k) for n in records for k in json.loads(storage.read_bytes(storage.join(uri, "_log", n)))["add"]
    )
    assert added == Counter(range(64))  # every unit exactly once
    assert sorted(manifest.load(uri).shards) == list(range(64))
    assert {f"{s:020d}.checkpoint.parquet" for s in range(0, 65, 10)} <= set(names)


def test_commit_scale_bench_quick_runs(capsys):
    result = commit_scale.main(["--quick", "--backends", "local", "--old-commits", "2"])
    rows = result["results"]["local"]
    assert [r["units"] for r in rows] == [100, 1000]
    for row in rows:
        assert row["log"]["record_bytes"] < 1000 < row["old"]["bytes_per_commit"]
        assert row["log"]["checkpoint_bytes"] > 0 and row["log"]["open_reader_s"] > 0
    assert json.loads(capsys.readouterr().out)["cpu_count"] == os.cpu_count()
