"""`facesynth submit` against a real two-node Ray cluster on this machine.

cluster/local.sh starts a head that offers no CPUs for work and one worker node with 2 CPUs and 2 logical
GPUs, token auth on, each with its own Prometheus port, in a temp dir of their own (so the suite's embedded
Ray is untouched, and teardown stops only these processes). A moto S3 server plays the bucket: its
credentials are in the nodes' environment (an instance role's place), the endpoint travels in the job's
runtime env. Checked: a render job reaches SUCCEEDED and writes a verified dataset; the nodes' metrics
endpoints show our counters; a job stopped mid-run and resubmitted on the same output completes without
rewriting the shards committed before the stop.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import pytest

from facesynth import shards, storage
from tests.conftest import ROOT, MotoServer, free_port

pytestmark = pytest.mark.slow

LOCAL_SH = os.path.join(ROOT, "cluster", "local.sh")
# one generator actor (fewer processes to start on 2 cores), a 2x2 contact sheet
SMALL = ["stage.max_actors=1", "grid.identities=2", "grid.samples=2"]
TINY = ["--config", "render-quickstart", "identities.count=8", "identities.samples_per_identity=2", *SMALL]
# long enough to stop after its first commits: 50 units of 8 images at 64 px, a commit per shard
LONGER = ["--config", "render-quickstart", "identities.count=200", "identities.samples_per_identity=2"]
LONGER += ["identities.per_unit=4", "stage.commit_every_s=0", *SMALL]


class Cluster:
    """cluster/local.sh on free ports in a temp dir; ``stop`` also kills anything its sessions left behind."""

    def __init__(self, moto: MotoServer):
        self.dir = tempfile.mkdtemp(prefix="fse2e-", dir="/tmp")  # short: Ray's socket paths have a limit
        self.token = secrets.token_hex(32)
        self.dashboard = free_port()
        self.metrics = {"head": free_port(), "worker": free_port()}
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_"))}
        env.update({k: v for k, v in moto.env().items() if k != "AWS_ENDPOINT_URL"})  # the node's "role"
        env.update(
            FACESYNTH_RAY_DIR=self.dir,
            RAY_PORT=str(free_port()),
            DASHBOARD_PORT=str(self.dashboard),
            CLIENT_PORT=str(free_port()),
            HEAD_METRICS_PORT=str(self.metrics["head"]),
            WORKER_METRICS_PORT=str(self.metrics["worker"]),
            HEAD_AGENT_PORT=str(free_port()),
            WORKER_AGENT_PORT=str(free_port()),
            WORKER_CPUS="2",
            WORKER_GPUS="2",
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN=self.token,
            RAY_START_ARGS="--object-store-memory=300000000",
            RAY_metrics_report_interval_ms="1000",  # flush metrics every second, not every 10
            RAY_ENABLE_UV_RUN_RUNTIME_ENV="0",
            FACESYNTH_PROGRESS="0",
            STOP_GRACE_S="2",
        )
        self.env = env
        self.sids: list[int] = []
        self.address = f"http://127.0.0.1:{self.dashboard}"

    def start(self) -> None:
        out = subprocess.run([LOCAL_SH, "start"], env=self.env, capture_output=True, text=True, timeout=240)
        assert out.returncode == 0, out.stdout + out.stderr
        self.sids = [int(open(os.path.join(self.dir, f"{n}.sid")).read()) for n in ("head", "worker")]

    def stop(self) -> None:
        subprocess.run([LOCAL_SH, "stop"], env=self.env, capture_output=True, timeout=120)
        for pid in session_tree(self.sids):  # stragglers
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.dir, ignore_errors=True)

    def facesynth(self, *args: str, timeout: float = 480) -> subprocess.CompletedProcess:
        """The ``facesynth`` CLI in a fresh process, as a user runs it (token auth from the environment)."""
        env = {k: v for k, v in self.env.items() if not k.startswith("AWS_")}  # the laptop has no keys
        return subprocess.run(
            [sys.executable, "-m", "facesynth.cli", *args],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def submit(self, moto: MotoServer, *job: str, follow: bool = False, submission_id: str):
        flags = ["--address", self.address, "--env", f"AWS_ENDPOINT_URL={moto.endpoint}"]
        flags += ["--submission-id", submission_id] + (["--follow"] if follow else [])
        return self.facesynth("submit", *flags, *job)

    def api(self, path: str, token: str | None = "") -> dict:
        token = self.token if token == "" else token
        req = urllib.request.Request(
            self.address + path, headers={"Authorization": f"Bearer {token}"} if token else {}
        )
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    def status(self, job_id: str) -> str:
        return self.api(f"/api/jobs/{job_id}")["status"]

    def logs(self, job_id: str) -> str:
        return self.api(f"/api/jobs/{job_id}/logs")["logs"]

    def scrape(self) -> str:
        text = ""
        for port in self.metrics.values():
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
                text += r.read().decode()
        return text


def session_tree(sids: list[int]) -> list[int]:
    """Live processes in the sessions ``sids`` and all their descendants (as cluster/local.sh stop finds them)."""
    procs = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":  # zombies are dead, only not reaped yet
            procs[int(pid)] = (int(fields[1]), int(fields[3]))  # ppid, session
    mine = {pid for pid, (_, sid) in procs.items() if sid in sids}
    while True:
        more = {pid for pid, (ppid, _) in procs.items() if ppid in mine} - mine
        if not more:
            return sorted(mine)
        mine |= more


@pytest.fixture(scope="module")
def moto():
    server = MotoServer()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def cluster(moto):
    c = Cluster(moto)
    try:
        c.start()
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def bucket(moto):
    """A bucket on the moto server, with this test process's AWS settings pointing at it."""
    import boto3

    with pytest.MonkeyPatch.context() as mp:
        for k, v in moto.env().items():
            mp.setenv(k, v)
        storage._s3_filesystem.cache_clear()
        s3 = boto3.client("s3", endpoint_url=moto.endpoint, region_name="us-east-1")
        s3.create_bucket(Bucket="e2e")
        yield s3
    storage._s3_filesystem.cache_clear()


def _counter(scrape: str, name: str) -> float:
    """Sum of a counter over every series (workers, nodes) in a Prometheus text scrape."""
    pattern = re.compile(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+-]+)$", re.M)
    return sum(float(v) for v in pattern.findall(scrape))


def test_token_auth_is_on(cluster):
    assert cluster.api("/api/jobs/") == []
    for token, code in ((None, 401), ("wrong", 403)):
        with pytest.raises(urllib.error.HTTPError) as err:
            cluster.api("/api/jobs/", token=token)
        assert err.value.code == code


def test_submitted_render_succeeds_and_emits_metrics(cluster, moto, bucket):
    uri = "s3://e2e/run"
    t0 = time.monotonic()
    out = cluster.submit(moto, "render", *TINY, f"output={uri}", follow=True, submission_id="e2e-render")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert out.stdout.startswith("e2e-render\n") and '"generated_now": 16' in out.stdout
    print(f"tiny render job: {time.monotonic() - t0:.1f} s")
    assert cluster.status("e2e-render") == "SUCCEEDED"
    assert shards.verify(uri) == []
    summary = shards.summary(uri)
    assert summary["complete"] and summary["rows"] == 16 and summary["identities"] == 8

    status = json.loads(cluster.facesynth("status", "--address", cluster.address, "e2e-render").stdout)
    assert status["status"] == "SUCCEEDED" and status["entrypoint"].startswith("python -m jobs.render")

    # Ray exports our Counters as ray_<name>_total; they reach the endpoint within a few report intervals
    deadline, scrape = time.monotonic() + 60, ""
    while time.monotonic() < deadline:
        scrape = cluster.scrape()
        images = _counter(scrape, "ray_facesynth_images_generated_total")
        committed = _counter(scrape, "ray_facesynth_shards_committed_total")
        if images >= 16 and committed >= 1:
            break
        time.sleep(1)
    found = sorted(set(re.findall(r"^(ray_facesynth_\w+?)(?:{|\s)", scrape, re.M)))
    assert images >= 16 and committed >= 1, f"facesynth metrics on the endpoints: {found}"


def _objects(s3, prefix: str) -> dict[str, tuple]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket="e2e", Prefix=prefix)
    return {o["Key"]: (o["ETag"], o["LastModified"]) for p in pages for o in p.get("Contents", [])}


def test_stopped_job_resumes_without_rewriting_committed_shards(cluster, moto, bucket):
    uri = "s3://e2e/resume"
    t0 = time.monotonic()
    out = cluster.submit(moto, "render", *LONGER, f"output={uri}", submission_id="e2e-resume-1")
    assert out.returncode == 0, out.stderr
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # stop as soon as the first shards are committed
        try:
            if shards.summary(uri)["shards"] >= 1:
                break
        except FileNotFoundError:
            pass
        info = cluster.api("/api/jobs/e2e-resume-1")
        assert info["status"] in ("PENDING", "RUNNING"), (
            info["message"],
            cluster.logs("e2e-resume-1")[-3000:],
        )
        time.sleep(0.3)
    t1 = time.monotonic()
    stopped = cluster.facesynth("stop", "--address", cluster.address, "--wait", "e2e-resume-1")
    assert stopped.returncode == 0 and stopped.stdout.strip() == "STOPPED", stopped.stdout + stopped.stderr

    before = shards.summary(uri)
    assert 1 <= before["shards"] < before["units_total"] == 50, f"not stopped mid-run: {before}"
    committed = {ref.uri.removeprefix("s3://e2e/") for ref in shards.committed_shards(uri)}
    objects = _objects(bucket, "resume/shards/")
    kept = {k: objects[k] for k in committed}
    time.sleep(1.1)  # S3 LastModified has 1 s resolution: a rewrite would show

    t2 = time.monotonic()
    out = cluster.submit(moto, "render", *LONGER, f"output={uri}", follow=True, submission_id="e2e-resume-2")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    print(
        f"first commit after {t1 - t0:.1f} s, stopped with {before['shards']}/50 shards after {t2 - t1:.1f} s, "
        f"resumed run {time.monotonic() - t2:.1f} s"
    )
    assert f'"generated_now": {400 - before["rows"]}' in out.stdout, (
        "the rerun generated committed units again"
    )
    assert shards.verify(uri) == []
    after = _objects(bucket, "resume/shards/")
    assert {k: after[k] for k in committed} == kept, "committed shards were rewritten"
    assert len(after) == 50 and all(re.fullmatch(r"resume/shards/part-\d{5}\.parquet", k) for k in after)


def test_local_sh_stop_leaves_no_process(cluster):
    assert session_tree(cluster.sids), "the cluster's processes are not in the sessions local.sh recorded"
    subprocess.run([LOCAL_SH, "stop"], env=cluster.env, check=True, timeout=60)
    assert session_tree(cluster.sids) == []
    with pytest.raises(urllib.error.URLError):
        cluster.api("/api/jobs/")
