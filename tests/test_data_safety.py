"""Data safety of shard datasets: a job never writes into a folder that is not its own, never mixes two
plans in one dataset, and readers never trust a shard or a manifest blindly."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
import sys
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import BaseModel

from facesynth import manifest, shards, storage
from facesynth.manifest import ForeignFolder, ManifestError, PlanMismatch
from synthgen.stage import StageConfig, generate_dataset, run_plain
from tests.conftest import ROOT
from tests.gen_fixtures import SETTINGS, make_noise

UNITS = shards.plan_units(8, 2, 2)
CFG = StageConfig(batch_size=4, commit_every_s=0)


class Resolved(BaseModel):
    seed: int


def write(uri, *, units=UNITS, seed=3, cfg=CFG, settings=SETTINGS):
    return run_plain(
        units, functools.partial(make_noise, 16), uri, base_seed=seed, cfg=cfg, settings=settings
    )


def tree(root, *, log: bool = True) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes (``log=False``: but the commit log's history)."""
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            out[os.path.relpath(path, root)] = open(path, "rb").read()
    return {k: v for k, v in out.items() if log or not k.startswith(manifest.LOG_DIR + os.sep)}


# --- the output folder belongs to one plan ----------------------------------------------------


def test_folder_with_user_files_and_no_manifest_is_refused_and_left_untouched(tmp_path):
    out = tmp_path / "mine"
    (out / "shards").mkdir(parents=True)
    (out / "shards" / "part-00003.parquet").write_bytes(b"a user's own file")
    (out / "config.yaml").write_text("my: config\n")
    (out / "card.md").write_text("# my card\n")
    before = tree(out)
    with pytest.raises(ForeignFolder, match=r"holds 3 entries .*card.md, config.yaml, shards.* no facesynth"):
        generate_dataset(
            UNITS,
            functools.partial(make_noise, 16),
            str(out),
            base_seed=3,
            stage=CFG,
            settings=SETTINGS,
            resolved_config=Resolved(seed=3),
            title="t",
            use_ray=False,
        )
    assert tree(out) == before  # nothing deleted, overwritten or added (not even a lock file)


def test_filesystem_root_is_refused_before_anything_is_written():
    plan = manifest.Plan(1, {})
    with pytest.raises(ForeignFolder, match="^/: output folder holds"):
        manifest.claim("/", plan)
    assert not os.path.exists("/manifest.json") and not os.path.exists("/manifest.json.lock")
    assert not os.path.exists("/_log")


@pytest.mark.parametrize(
    "change, named",
    [
        ({"seed": 4}, "seed: 3 -> 4"),
        ({"settings": {"noise": 32}}, "generator.noise: 16 -> 32"),
        ({"units": shards.plan_units(16, 2, 2)}, "units_total: 4 -> 8"),
        ({"units": shards.plan_units(8, 2, 4)}, "units_total: 4 -> 2"),
        ({"units": shards.plan_units(8, 3, 2)}, "units_sha256"),
        ({"cfg": StageConfig(image_format="jpeg")}, "encoding.image_format: 'png' -> 'jpeg'"),
    ],
)
def test_rerun_with_other_settings_is_refused_naming_them(tmp_path, change, named):
    uri = str(tmp_path / "ds")
    write(uri, units=UNITS[:4] if "units" in change else UNITS)  # a partial run with the original settings
    if "units" in change:
        write(uri, units=UNITS)  # the same settings resume; only a different plan is refused
    before = tree(uri)
    with pytest.raises(PlanMismatch, match=named):
        write(uri, **change)
    assert tree(uri) == before
    assert shards.verify(uri) == []


def test_batch_size_and_actor_settings_are_not_part_of_the_plan(tmp_path):
    uri = str(tmp_path / "ds")
    write(uri)
    result = write(uri, cfg=StageConfig(batch_size=3, units_per_call=2, max_actors=4, commit_every_s=5))
    assert (result.committed_before, result.committed_now) == (4, 0)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_concurrent_runs_with_different_plans_one_wins_the_other_is_refused(where, tmp_path, request):
    uri = f"{request.getfixturevalue('s3_atomic_bucket')}/race" if where == "s3" else str(tmp_path / "race")
    plans = [manifest.Plan(n, {"count": n}) for n in (2, 32)]
    outcome, barrier = {}, threading.Barrier(2)

    def run(plan):
        barrier.wait()
        try:
            manifest.claim(uri, plan)
            outcome[plan.units_total] = "ok"
        except PlanMismatch as exc:
            outcome[plan.units_total] = str(exc)

    threads = [threading.Thread(target=run, args=(p,)) for p in plans]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(v == "ok" for v in outcome.values()) == [False, True]
    winner = next(n for n, v in outcome.items() if v == "ok")
    assert manifest.load(uri).units_total == winner
    loser = next(p for p in plans if p.units_total != winner)
    with pytest.raises(PlanMismatch, match="units_total"):  # and its commits are refused too
        manifest.commit(uri, [], loser)


# --- readers verify what they read ------------------------------------------------------------


def flip_byte(path: str, offset: int | None = None) -> None:
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2 if offset is None else offset] ^= 0xFF
    open(path, "wb").write(bytes(data))


def test_readers_refuse_a_damaged_shard_naming_it(tmp_path):
    uri = str(tmp_path / "ds")
    write(uri)
    flip_byte(os.path.join(uri, shards.shard_file(2)))
    with pytest.raises(shards.CorruptShard, match=r"part-00002.parquet: sha256 .* does not match"):
        list(shards.iter_rows(uri))
    with pytest.raises(shards.CorruptShard, match="part-00002.parquet"):
        shards.committed_shards(uri)[2].read(["identity"])
    os.remove(os.path.join(uri, shards.shard_file(3)))
    with pytest.raises(shards.CorruptShard, match="part-00003.parquet: committed shard is missing"):
        shards.committed_shards(uri)[3].read()


def test_rerun_rewrites_missing_and_truncated_shards_and_rehashes_on_request(tmp_path):
    uri = str(tmp_path / "ds")
    write(uri)
    reference, committed = tree(uri, log=False), manifest.load(uri).shards
    os.remove(os.path.join(uri, shards.shard_file(0)))
    with open(os.path.join(uri, shards.shard_file(1)), "r+b") as f:
        f.truncate(100)
    result = write(uri)
    assert (result.rewritten, result.committed_now) == ([0, 1], 2)
    flip_byte(os.path.join(uri, shards.shard_file(3)))  # same size: only a re-hash finds it
    assert write(uri).rewritten == []
    result = write(uri, cfg=CFG.model_copy(update={"verify_committed": True}))
    assert (result.rewritten, result.committed_now) == ([3], 1)
    assert tree(uri, log=False) == reference and shards.verify(uri) == []
    assert manifest.load(uri).shards == committed  # the log gained drop + add records, same state


# --- the commit log is checked, not trusted -----------------------------------------------------


def record_with(uri: str, unit: int) -> str:
    """The log record that added ``unit`` (it is not in a checkpoint yet: the authoritative copy)."""
    for name in sorted(os.listdir(os.path.join(uri, manifest.LOG_DIR))):
        path = os.path.join(uri, manifest.LOG_DIR, name)
        if name.endswith(".json") and f"{unit:05d}" in json.loads(open(path).read())["add"]:
            return path
    raise AssertionError(f"no log record adds unit {unit}")


def edit_json(path: str, edit) -> None:
    body = json.loads(open(path).read())
    edit(body)
    open(path, "w").write(json.dumps(body))


def in_record(unit: int, edit):
    """Tamper with the log record that added ``unit``: ``edit(body)``."""
    return lambda uri: edit_json(record_with(uri, unit), edit)


def edit_checkpoint(uri: str, seq: int, edit) -> None:
    """Rewrite checkpoint ``seq`` after ``edit({"meta": metadata, "rows": [row, ...]})``."""
    path = os.path.join(uri, manifest.checkpoint_file(seq))
    table = pq.read_table(path)
    body = {"meta": json.loads(table.schema.metadata[b"facesynth.log"]), "rows": table.to_pylist()}
    edit(body)
    schema = table.schema.remove_metadata()
    out = pa.Table.from_pylist(body["rows"], schema=schema)
    pq.write_table(out.replace_schema_metadata({b"facesynth.log": json.dumps(body["meta"])}), path)


@pytest.mark.parametrize(
    "tamper, message",
    [
        (
            in_record(1, lambda b: b["add"]["00001"].update(file="../../../etc/passwd")),
            "unit 1: file '../../../etc/passwd'",
        ),
        (in_record(1, lambda b: b["add"]["00001"].update(file="shards/part-00002.parquet")), "unit 1: file"),
        (
            in_record(1, lambda b: b["add"]["00001"].update(rows=3)),
            r"unit 1: counts.per_identity do not add up",
        ),
        (in_record(1, lambda b: b.update(rows=999)), "'rows' is 999"),
        (
            in_record(1, lambda b: b["add"].update({"00009": b["add"]["00001"]})),
            "unit 9: outside the plan's 4 units",
        ),
        (
            lambda uri: edit_checkpoint(uri, 0, lambda c: c["meta"]["plan"]["settings"].update(seed=5)),
            "fingerprint does not match",
        ),
        (in_record(1, lambda b: b.update(add=[])), "'add' must be an object"),
        (in_record(1, lambda b: b["add"]["00001"].pop("sha256")), "unit 1: sha256 None"),
        (in_record(1, lambda b: b["add"]["00001"].update(counts=None)), "unit 1: counts must hold"),
        (in_record(1, lambda b: b.update(format="other/2")), "format 'other/2'"),
        (in_record(1, lambda b: b.update(seq=7)), "'seq' is 7, expected 2"),
    ],
)
def test_tampered_or_malformed_log_is_a_clear_error(tmp_path, tamper, message):
    uri = str(tmp_path / "ds")
    write(uri)
    tamper(uri)
    for read in (manifest.load, shards.verify, shards.committed_shards, lambda u: write(u)):
        with pytest.raises(ManifestError, match=message):
            read(uri)


def test_tampered_checkpoint_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(manifest, "CHECKPOINT_EVERY", 2)
    uri = str(tmp_path / "ds")
    write(uri)  # records 0-4: units 0-3 are all in checkpoint 4, no record after it
    assert json.loads(open(os.path.join(uri, manifest.HINT)).read()) == {"seq": 4}

    def row(index, **change):
        return lambda c: c["rows"][index].update(change)

    cases = [
        (row(1, file="/etc/passwd"), "00000000000000000004.checkpoint.parquet: unit 1: file '/etc/passwd'"),
        (row(2, counts="{not json"), "unit 2: counts must hold"),
        (row(2, unit=0), "unit 0: out of order or repeated"),
        (lambda c: c["meta"].update(rows=5), "'rows' is 5"),
        (lambda c: c["meta"].update(seq=2), "metadata names seq 2"),
    ]
    pristine = open(os.path.join(uri, manifest.checkpoint_file(4)), "rb").read()
    for edit, message in cases:
        edit_checkpoint(uri, 4, edit)
        for read in (manifest.load, shards.verify, lambda u: write(u)):
            with pytest.raises(ManifestError, match=message):
                read(uri)
        open(os.path.join(uri, manifest.checkpoint_file(4)), "wb").write(pristine)
    assert shards.verify(uri) == []


def test_consistently_tampered_counts_are_caught_by_verify(tmp_path):
    uri = str(tmp_path / "ds")
    write(uri)

    def recount(body):
        rec = body["add"]["00001"]
        rec["rows"] = 5
        rec["counts"] = {
            "identities": 1,
            "domain": {"render": 5},
            "generator": {"noise": 5},
            "per_identity": {"2": 5},
        }
        body["rows"] = 5

    in_record(1, recount)(uri)
    assert shards.verify(uri) == ["shards/part-00001.parquet: 4 rows != manifest 5"]


def test_s3_dataset_is_claimed_and_guarded_the_same(tmp_path, s3_bucket):
    uri = f"{s3_bucket}/guarded"
    write(uri)
    with pytest.raises(PlanMismatch, match="seed: 3 -> 9"):
        write(uri, seed=9)
    storage.write_bytes(f"{s3_bucket}/foreign/photo.jpg", b"jpeg")
    with pytest.raises(ForeignFolder, match="photo.jpg"):
        write(f"{s3_bucket}/foreign")
    assert storage.list_files(f"{s3_bucket}/foreign") == [f"{s3_bucket}/foreign/photo.jpg"]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "facesynth.cli", "dataset", *args], capture_output=True, text=True, cwd=ROOT
    )


def test_cli_on_a_missing_or_malformed_dataset_exits_2_with_one_line(tmp_path):
    missing = cli("info", str(tmp_path / "nothing"))
    assert missing.returncode == 2 and missing.stdout == ""
    assert missing.stderr.startswith("error: ") and missing.stderr.count("\n") == 1
    assert "not a facesynth dataset" in missing.stderr
    uri = str(tmp_path / "ds")
    write(uri)
    in_record(0, lambda b: b["add"]["00000"].update(file="/etc/passwd"))(uri)
    bad = cli("verify", uri)
    assert (
        bad.returncode == 2 and "unit 0: file '/etc/passwd'" in bad.stderr and "Traceback" not in bad.stderr
    )


def test_plan_fingerprint_is_stable_and_covers_every_setting():
    a = manifest.Plan(4, {"seed": 1, "generator": {"style": "render"}})
    assert a.fingerprint == manifest.Plan(4, {"generator": {"style": "render"}, "seed": 1}).fingerprint
    assert (
        a.fingerprint
        == hashlib.sha256(
            json.dumps({"units_total": 4, "settings": a.settings}, sort_keys=True).encode()
        ).hexdigest()
    )
    b = manifest.Plan(4, {"seed": 1, "generator": {"style": "photo", "size": 32}})
    assert a.changes(b) == ["generator.size: (unset) -> 32", "generator.style: 'render' -> 'photo'"]
