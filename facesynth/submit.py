"""``facesynth submit|status|logs|stop``: a thin wrapper over Ray's ``JobSubmissionClient``.

``facesynth submit render --config render-quickstart output=s3://bucket/run`` is
``ray job submit --working-dir . -- python -m jobs.render --config render-quickstart output=s3://bucket/run``:
the working directory is uploaded (``.rayignore`` keeps venvs, outputs and data out of it) and the job's
own arguments pass through unchanged. The cluster address comes from ``--address`` or, as for ``ray job``,
``RAY_API_SERVER_ADDRESS`` / ``RAY_ADDRESS`` (those two win when set).

Token auth stays on: ``RAY_AUTH_MODE`` defaults to ``token`` here, and the token is Ray's own
(``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``). AWS keys are refused in a job's
runtime env: it is stored in the cluster's job table and shown on the dashboard, so S3 access comes from
the nodes' IAM role (instance profile, IRSA) or a secrets manager instead.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import re
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml

SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
JOB_NAME = re.compile(r"[a-z][a-z0-9_]*")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class SubmitError(ValueError):
    """A submission refused before it reached the cluster, or a job API error, as one clear message."""


def entrypoint(job: str, args: Sequence[str] = ()) -> str:
    """The shell command the cluster runs: ``python -m jobs.NAME ARGS`` (arguments quoted as given)."""
    if not JOB_NAME.fullmatch(job):
        raise SubmitError(f"job name {job!r}: expected a module name from jobs/ such as 'render'")
    return shlex.join(["python", "-m", f"jobs.{job}", *args])


def check_job(job: str, working_dir: str | os.PathLike) -> None:
    """Refuse a job that the uploaded ``working_dir`` does not contain (naming the ones it does)."""
    jobs = Path(working_dir) / "jobs"
    if not (jobs / f"{job}.py").is_file():
        known = sorted(p.stem for p in jobs.glob("*.py") if not p.stem.startswith("_"))
        raise SubmitError(
            f"no job {job!r} in {jobs}: expected one of {', '.join(known) or '(none: is this the repo root?)'}"
        )


def refuse_secrets(env_vars: Mapping[str, str]) -> None:
    """Refuse AWS keys in a job's runtime env (stored in the job table, shown on the dashboard)."""
    found = sorted(k for k in env_vars if k.upper() in SECRET_ENV)
    if found:
        raise SubmitError(
            f"{', '.join(found)} in the job's runtime env: a runtime env is stored in the cluster's job table "
            "and shown on the dashboard. Give the nodes S3 access through an IAM role instead (instance "
            "profile in cluster/aws.yaml, IRSA service account in cluster/kuberay/) or let the job read its "
            "keys from a secrets manager; AWS_REGION and AWS_ENDPOINT_URL may stay"
        )


def parse_env(pairs: Sequence[str]) -> dict[str, str]:
    """``KEY=VALUE`` strings to a dict (error naming a malformed one)."""
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SubmitError(f"--env {pair!r}: expected KEY=VALUE")
        env[key] = value
    return env


def runtime_env(
    working_dir: str | os.PathLike,
    env: Mapping[str, str] | None = None,
    base: Mapping | None = None,
) -> dict:
    """The job's runtime env: ``base`` (a runtime env dict, e.g. from YAML) + ``working_dir`` + ``env``."""
    out = dict(base or {})
    env_vars = {**out.get("env_vars", {}), **(env or {})}
    refuse_secrets(env_vars)
    out["working_dir"] = str(working_dir)
    if env_vars:
        out["env_vars"] = env_vars
    return out


@functools.cache
def client(address: str | None = None):
    """A ``JobSubmissionClient`` (one per address) with token auth on unless ``RAY_AUTH_MODE`` says otherwise."""
    os.environ.setdefault("RAY_AUTH_MODE", "token")  # read by Ray's auth config on first use
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except (OSError, RuntimeError, ValueError) as exc:  # OSError: requests' connection errors
        raise SubmitError(f"cannot reach the Ray job API at {address or '$RAY_ADDRESS'}: {exc}") from exc


def submit(
    job: str,
    args: Sequence[str] = (),
    *,
    address: str | None = None,
    working_dir: str | os.PathLike = ".",
    env: Mapping[str, str] | None = None,
    base_runtime_env: Mapping | None = None,
    submission_id: str | None = None,
) -> str:
    """Submit ``python -m jobs.JOB ARGS`` with ``working_dir`` uploaded; returns the submission id."""
    command = entrypoint(job, args)
    check_job(job, working_dir)
    renv = runtime_env(working_dir, env, base_runtime_env)
    return _call(
        lambda c: c.submit_job(entrypoint=command, runtime_env=renv, submission_id=submission_id), address
    )


def status(job_id: str, address: str | None = None) -> dict:
    """The job's status, message, entrypoint and times (JSON values)."""
    info = _call(lambda c: c.get_job_info(job_id), address)
    keys = ("submission_id", "status", "message", "entrypoint", "start_time", "end_time", "driver_exit_code")
    return {k: _plain(getattr(info, k, None)) for k in keys}


def follow(job_id: str, address: str | None = None, out=None) -> str:
    """Stream the job's logs to ``out`` (stdout) until it ends; returns its final status."""
    c = client(address)
    out = out or sys.stdout

    async def tail() -> None:
        async for chunk in c.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(tail())
    except RuntimeError as exc:  # the log socket closed before the job ended: report the status anyway
        print(f"log stream ended: {exc}", file=sys.stderr)
    return wait(job_id, address, timeout_s=30)


def wait(job_id: str, address: str | None = None, timeout_s: float = 3600, poll_s: float = 1.0) -> str:
    """Poll until the job reaches a terminal status (or ``timeout_s``); returns the last status."""
    deadline = time.monotonic() + timeout_s
    while True:
        state = _call(lambda c: c.get_job_status(job_id), address).value
        if state in TERMINAL or time.monotonic() > deadline:
            return state
        time.sleep(poll_s)


def stop(job_id: str, address: str | None = None) -> bool:
    """Ask the job to stop (SIGTERM, then SIGKILL after Ray's grace period); False if it had already ended."""
    return _call(lambda c: c.stop_job(job_id), address)


def _call(fn, address: str | None):
    c = client(address)
    try:
        return fn(c)
    except (RuntimeError, OSError) as exc:  # the SDK's HTTP errors (unknown job, 401, bad runtime env), drops
        raise SubmitError(str(exc)) from exc


def _plain(value):
    return getattr(value, "value", value)


# ---- command line (hooked into ``facesynth`` by facesynth/cli.py) ----


def _cmd_submit(a: argparse.Namespace) -> int:
    base = None
    if a.runtime_env:
        base = yaml.safe_load(Path(a.runtime_env).read_text()) or {}
        if not isinstance(base, dict):
            raise SubmitError(f"--runtime-env {a.runtime_env}: expected a YAML mapping (a Ray runtime env)")
    job_id = submit(
        a.job,
        a.args,
        address=a.address,
        working_dir=a.working_dir,
        env=parse_env(a.env),
        base_runtime_env=base,
        submission_id=a.submission_id,
    )
    print(job_id, flush=True)
    if not a.follow:
        print(f"follow with: facesynth logs --follow {job_id}", file=sys.stderr)
        return 0
    return _report(job_id, follow(job_id, a.address))


def _cmd_status(a: argparse.Namespace) -> int:
    print(json.dumps(status(a.job_id, a.address), indent=2))
    return 0


def _cmd_logs(a: argparse.Namespace) -> int:
    if a.follow:
        return _report(a.job_id, follow(a.job_id, a.address))
    sys.stdout.write(_call(lambda c: c.get_job_logs(a.job_id), a.address))
    return 0


def _cmd_stop(a: argparse.Namespace) -> int:
    if not stop(a.job_id, a.address):
        print(f"{a.job_id} had already ended", file=sys.stderr)
    if a.wait:
        print(wait(a.job_id, a.address, timeout_s=120))
    return 0


def _report(job_id: str, state: str) -> int:
    print(f"{job_id}: {state}", file=sys.stderr)
    return 0 if state == "SUCCEEDED" else 1


def add_commands(sub) -> None:
    """Add ``submit``, ``status``, ``logs`` and ``stop`` to the ``facesynth`` subcommands."""
    addr = argparse.ArgumentParser(add_help=False)
    addr.add_argument(
        "--address",
        help="Ray job API, e.g. http://127.0.0.1:8265 (default: $RAY_API_SERVER_ADDRESS or $RAY_ADDRESS)",
    )
    p = sub.add_parser(
        "submit",
        parents=[addr],
        help="submit `python -m jobs.JOB ARGS` to a Ray cluster (working dir uploaded)",
        description="Everything after JOB is passed to the job: "
        "facesynth submit render --config render-quickstart output=s3://bucket/run",
    )
    p.add_argument("--working-dir", default=".", help="uploaded as the job's working dir (default: .)")
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment variable for the job (repeatable); AWS keys are refused: use IAM roles",
    )
    p.add_argument("--runtime-env", help="YAML file with a Ray runtime env to start from")
    p.add_argument("--submission-id", help="job id to use (default: generated by Ray)")
    p.add_argument("--follow", action="store_true", help="stream the logs; exit 0 only if the job succeeds")
    p.add_argument("job", help="job module in jobs/, e.g. render, generate, train_fr")
    p.add_argument("args", nargs=argparse.REMAINDER, help="the job's own arguments (--config, key=value)")
    p.set_defaults(func=_cmd_submit)

    p = sub.add_parser("status", parents=[addr], help="a submitted job's status as JSON")
    p.add_argument("job_id")
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser("logs", parents=[addr], help="a submitted job's logs")
    p.add_argument("job_id")
    p.add_argument("--follow", action="store_true", help="stream until the job ends; exit 0 only on success")
    p.set_defaults(func=_cmd_logs)

    p = sub.add_parser("stop", parents=[addr], help="stop a submitted job")
    p.add_argument("job_id")
    p.add_argument("--wait", action="store_true", help="wait for it to end and print its final status")
    p.set_defaults(func=_cmd_stop)
