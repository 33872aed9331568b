"""Shard datasets: determinism, local vs S3 equality, kill + resume, verify, injected S3 faults."""

from __future__ import annotations

import functools
import hashlib
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from facesynth import manifest, shards, storage
from synthgen.stage import StageConfig, run_plain
from tests.conftest import ROOT, FaultProxy
from tests.gen_fixtures import SETTINGS, make_noise

UNITS = shards.plan_units(24, 3, 2)
CFG = StageConfig(batch_size=4, commit_every_s=0)


def write(uri: str, units=UNITS) -> dict:
    run_plain(units, functools.partial(make_noise, 16), uri, base_seed=7, cfg=CFG, settings=SETTINGS)
    return {k: v["sha256"] for k, v in manifest.load(uri).shards.items()}


def test_plan_units_cover_every_row_once():
    units = shards.plan_units(10, 4, 3, identity_offset=100)
    rows = [(i, s) for u in units for i, s in zip(*u.rows(0)[:2])]
    assert len(rows) == 40 and len(set(rows)) == 40
    assert [u.identity_start for u in units] == [100, 103, 106, 109]
    assert units[-1].identity_stop == 110
    with pytest.raises(ValueError, match="samples_per_identity"):
        shards.plan_units(10, 0, 3)


def test_row_seeds_are_deterministic_distinct_and_batch_independent():
    ids, samples = np.repeat(np.arange(50), 20), np.tile(np.arange(20), 50)
    seeds = shards.row_seeds(3, ids, samples)
    assert len(set(seeds.tolist())) == 1000 and (seeds >= 0).all()
    assert np.array_equal(seeds[7:9], shards.row_seeds(3, ids[7:9], samples[7:9]))
    assert not np.array_equal(seeds, shards.row_seeds(4, ids, samples))


def test_local_dataset_rows_manifest_and_card(tmp_path):
    uri = str(tmp_path / "ds")
    shas = write(uri)
    assert len(shas) == 12
    m = manifest.load(uri)
    assert m.complete and m.units_total == 12
    rows = list(shards.iter_rows(uri))
    assert len(rows) == 72
    assert [(r["identity"], r["sample"]) for r in rows] == [(i, s) for i in range(24) for s in range(3)]
    assert {r["domain"] for r in rows} == {"render"} and {r["t0"] for r in rows} == {-1}
    assert shards.verify(uri) == []
    card = shards.write_card(uri, {"seed": 7})
    text = storage.read_bytes(card).decode()
    assert "rows: 72 in 12 shards" in text and "identities: 24" in text and "| noise | 72 |" in text
    # rerun: everything is committed, nothing is rewritten
    before = {f: os.path.getmtime(f) for f in storage.list_files(os.path.join(uri, "shards"))}
    assert write(uri) == shas
    assert {f: os.path.getmtime(f) for f in storage.list_files(os.path.join(uri, "shards"))} == before


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    a, b = write(str(tmp_path / "a")), write(str(tmp_path / "b"))
    assert a == b
    run_plain(
        UNITS[:1],
        functools.partial(make_noise, 16),
        str(tmp_path / "c"),
        base_seed=8,
        cfg=CFG,
        settings=SETTINGS,
    )
    assert manifest.load(str(tmp_path / "c")).shards[0]["sha256"] != a[0]


def test_s3_and_local_give_the_same_dataset(tmp_path, s3_bucket):
    local = write(str(tmp_path / "ds"))
    remote_uri = f"{s3_bucket}/runs/ds"
    assert write(remote_uri) == local
    assert shards.verify(remote_uri) == []
    assert list(shards.iter_rows(remote_uri)) == list(shards.iter_rows(str(tmp_path / "ds")))


def test_corrupted_shard_is_reported_by_verify_and_cli(tmp_path):
    uri = str(tmp_path / "ds")
    write(uri)
    path = os.path.join(uri, shards.shard_file(3))
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(path, "wb").write(bytes(data))
    os.remove(os.path.join(uri, shards.shard_file(5)))
    problems = shards.verify(uri)
    assert len(problems) == 2
    assert "part-00003.parquet: sha256" in problems[0] and "part-00005.parquet: missing" in problems[1]
    cli = subprocess.run(
        [sys.executable, "-m", "facesynth.cli", "dataset", "verify", uri],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert cli.returncode == 1 and "part-00003.parquet" in cli.stdout


def test_sigkill_mid_run_then_rerun_equals_uninterrupted(tmp_path):
    reference = write(str(tmp_path / "ref"))
    uri = str(tmp_path / "killed")
    job = [sys.executable, "-m", "tests.gen_fixtures", uri, "plain", "0.15"]
    proc = subprocess.Popen(job, cwd=ROOT, start_new_session=True)
    deadline = time.time() + 60
    while len(manifest.load(uri).shards) < 4 and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = manifest.load(uri).shards
    assert 4 <= len(partial) < 12, "the kill must land mid-run"
    assert all(reference[k] == v["sha256"] for k, v in partial.items())
    assert subprocess.run(job[:-1] + ["0"], cwd=ROOT).returncode == 0
    m = manifest.load(uri)
    assert {k: v["sha256"] for k, v in m.shards.items()} == reference
    rows = list(shards.iter_rows(uri, columns=["identity", "sample"]))
    assert len(rows) == 72 and len({(r["identity"], r["sample"]) for r in rows}) == 72
    assert sorted(os.listdir(os.path.join(uri, "shards"))) == [f"part-{k:05d}.parquet" for k in range(12)]
    assert shards.verify(uri) == []


def test_injected_s3_5xx_are_retried_and_nothing_partial_is_committed(
    tmp_path, s3_bucket, moto_server, monkeypatch
):
    reference = write(str(tmp_path / "ref"))
    proxy = FaultProxy(moto_server.port, fail_rate=0.2, seed=1)
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        storage._s3_filesystem.cache_clear()
        uri = f"{s3_bucket}/flaky"
        assert write(uri) == reference
        assert proxy.failed >= 10, f"too few injected failures to mean anything: {proxy.failed}"
        assert shards.verify(uri) == []
        assert len(list(shards.iter_rows(uri))) == 72
    finally:
        proxy.stop()
        storage._s3_filesystem.cache_clear()


@pytest.mark.parametrize("where", ["local", "s3"])
def test_concurrent_manifest_commits_keep_every_unit(where, tmp_path, request):
    from concurrent.futures import ThreadPoolExecutor

    uri = f"{request.getfixturevalue('s3_atomic_bucket')}/race" if where == "s3" else str(tmp_path / "race")

    plan = manifest.Plan(16, {"test": "race"})

    def rec(unit, text):
        counts = {
            "identities": 1,
            "domain": {"render": 1},
            "generator": {"x": 1},
            "per_identity": {str(unit): 1},
        }
        sha = hashlib.sha256(text.encode()).hexdigest()
        return {
            "unit": unit,
            "file": shards.shard_file(unit),
            "rows": 1,
            "bytes": 1,
            "sha256": sha,
            "counts": counts,
        }

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda u: manifest.commit(uri, [rec(u, f"h{u}")], plan), range(16)))
    m = manifest.load(uri)
    assert sorted(m.shards) == list(range(16)) and m.complete
    with pytest.raises(RuntimeError, match="not deterministic"):
        manifest.commit(uri, [rec(1, "other")], plan)


def test_uncommitted_leftovers_are_removed(tmp_path):
    uri = str(tmp_path / "ds")
    write(uri, UNITS[:2])
    stray = os.path.join(uri, "shards", f"part-00009.parquet.tmp-{'ab' * 16}")
    uncommitted = os.path.join(uri, "shards", "part-00004.parquet")
    users = [
        os.path.join(uri, "shards", name)
        for name in ("notes.txt", "part-1.parquet", "part-00001.parquet.bak")
    ]
    for path in (stray, uncommitted, *users):
        open(path, "wb").write(b"partial")
    assert shards.remove_uncommitted(uri) == sorted([uncommitted, stray])
    assert all(os.path.exists(p) for p in users)  # not our names: never deleted
    assert len(list(shards.iter_rows(uri))) == 12


def test_bad_rows_are_refused():
    with pytest.raises(ValueError, match="domain"):
        shards.to_table({**{n: ["x"] for n in shards.SCHEMA.names}, "domain": ["cartoon"]})
    with pytest.raises(ValueError, match="missing columns"):
        shards.to_table({"image": [b""]})
