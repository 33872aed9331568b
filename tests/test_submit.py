"""``facesynth submit|status|logs|stop`` without a cluster: what reaches ``JobSubmissionClient``, what is
refused before it (AWS keys, unknown jobs), and token auth on by default. tests/e2e/test_submit.py runs them
against a real two-node cluster."""

from __future__ import annotations

import asyncio

import pytest

from facesynth import cli, submit
from tests.conftest import ROOT


class FakeClient:
    """Records calls the way ``JobSubmissionClient`` would receive them."""

    def __init__(self, states=("RUNNING", "SUCCEEDED")):
        self.calls = []
        self.states = list(states)

    def submit_job(self, **kw):
        self.calls.append(("submit_job", kw))
        return kw.get("submission_id") or "raysubmit_fake"

    def get_job_status(self, job_id):
        from ray.job_submission import JobStatus

        self.calls.append(("get_job_status", job_id))
        return JobStatus(self.states.pop(0) if len(self.states) > 1 else self.states[0])

    def get_job_info(self, job_id):
        from ray.job_submission import JobStatus

        class Info:
            submission_id = job_id
            status = JobStatus.FAILED
            message = "boom"
            entrypoint = "python -m jobs.render"
            start_time, end_time, driver_exit_code = 1, 2, 1

        return Info()

    def get_job_logs(self, job_id):
        return "line 1\nline 2\n"

    async def tail_job_logs(self, job_id):
        for chunk in ("a\n", "b\n"):
            await asyncio.sleep(0)
            yield chunk

    def stop_job(self, job_id):
        self.calls.append(("stop_job", job_id))
        return True


@pytest.fixture
def fake(monkeypatch):
    client = FakeClient()
    monkeypatch.setattr(submit, "client", lambda address=None: client)
    return client


def test_entrypoint_quotes_the_jobs_own_arguments():
    cmd = submit.entrypoint(
        "render", ["--config", "render-quickstart", "output=s3://b/my run", "x=$(rm -rf /)"]
    )
    assert cmd == "python -m jobs.render --config render-quickstart 'output=s3://b/my run' 'x=$(rm -rf /)'"
    for bad in ("jobs.render", "../render", "Render", "", "render;ls"):
        with pytest.raises(submit.SubmitError, match="job name"):
            submit.entrypoint(bad)


def test_unknown_job_is_refused_naming_the_known_ones(tmp_path):
    submit.check_job("render", ROOT)
    with pytest.raises(submit.SubmitError, match=r"no job 'no_such_job'.*render.*train_fr"):
        submit.check_job("no_such_job", ROOT)
    with pytest.raises(submit.SubmitError, match="repo root"):
        submit.check_job("render", tmp_path)


@pytest.mark.parametrize("key", [*submit.SECRET_ENV, "aws_secret_access_key"])
def test_aws_keys_in_the_runtime_env_are_refused(key):
    with pytest.raises(submit.SubmitError, match="IAM role.*secrets manager"):
        submit.runtime_env(".", {key: "x"})
    with pytest.raises(submit.SubmitError, match=key):  # from a --runtime-env file too
        submit.runtime_env(".", {}, {"env_vars": {key: "x"}, "pip": []})


def test_runtime_env_merges_file_and_flags():
    env = submit.runtime_env(
        "/repo",
        {"AWS_ENDPOINT_URL": "http://127.0.0.1:9000", "A": "flag"},
        {"env_vars": {"A": "file", "AWS_REGION": "us-west-2"}, "excludes": ["big/"], "working_dir": "/other"},
    )
    assert env == {
        "working_dir": "/repo",
        "excludes": ["big/"],
        "env_vars": {"A": "flag", "AWS_REGION": "us-west-2", "AWS_ENDPOINT_URL": "http://127.0.0.1:9000"},
    }
    assert submit.runtime_env(".") == {"working_dir": "."}


def test_cli_submit_passes_everything_after_the_job_through(fake, capsys):
    rc = cli.main(
        [
            "submit",
            "--address",
            "http://127.0.0.1:8265",
            "--working-dir",
            ROOT,
            "--env",
            "AWS_ENDPOINT_URL=http://127.0.0.1:9000",
            "--submission-id",
            "run-1",
            "render",
            "--config",
            "render-quickstart",
            "output=s3://bucket/run",
            "--help",
        ]
    )
    assert rc == 0 and capsys.readouterr().out.strip() == "run-1"
    (name, kw), *_ = fake.calls
    assert name == "submit_job"
    assert (
        kw["entrypoint"] == "python -m jobs.render --config render-quickstart output=s3://bucket/run --help"
    )
    assert kw["runtime_env"] == {
        "working_dir": ROOT,
        "env_vars": {"AWS_ENDPOINT_URL": "http://127.0.0.1:9000"},
    }
    assert kw["submission_id"] == "run-1"


def test_cli_refuses_before_contacting_the_cluster(monkeypatch, capsys):
    def no_cluster(address=None):
        raise AssertionError("the cluster was contacted")

    monkeypatch.setattr(submit, "client", no_cluster)
    assert cli.main(["submit", "--env", "AWS_SESSION_TOKEN=t", "--working-dir", ROOT, "render"]) == 2
    assert cli.main(["submit", "--env", "NOEQUALS", "--working-dir", ROOT, "render"]) == 2
    assert cli.main(["submit", "--working-dir", ROOT, "no_such_job"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and all(line.startswith("error: ") for line in err)
    assert "AWS_SESSION_TOKEN" in err[0] and "KEY=VALUE" in err[1] and "no_such_job" in err[2]


def test_cli_follow_streams_logs_and_exits_by_final_status(fake, capsys):
    assert cli.main(["submit", "--working-dir", ROOT, "--follow", "render"]) == 0
    out = capsys.readouterr()
    assert out.out == "raysubmit_fake\na\nb\n" and "SUCCEEDED" in out.err
    fake.states = ["FAILED"]
    assert cli.main(["logs", "--follow", "raysubmit_fake"]) == 1
    assert cli.main(["logs", "raysubmit_fake"]) == 0
    assert capsys.readouterr().out.endswith("line 1\nline 2\n")


def test_cli_status_and_stop(fake, capsys):
    import json

    assert cli.main(["status", "raysubmit_x"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["status"] == "FAILED" and info["message"] == "boom" and info["driver_exit_code"] == 1
    fake.states = ["STOPPED"]
    assert cli.main(["stop", "--wait", "raysubmit_x"]) == 0
    assert capsys.readouterr().out.strip() == "STOPPED"
    assert ("stop_job", "raysubmit_x") in fake.calls


def test_client_turns_token_auth_on_unless_told_otherwise(monkeypatch):
    import ray.job_submission

    made = []
    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", lambda address: made.append(address))
    for preset, expected in ((None, "token"), ("disabled", "disabled")):
        if preset is None:
            monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
        else:
            monkeypatch.setenv("RAY_AUTH_MODE", preset)
        submit.client.cache_clear()
        submit.client("http://127.0.0.1:1")
        assert submit.os.environ["RAY_AUTH_MODE"] == expected
    submit.client.cache_clear()
    assert made == ["http://127.0.0.1:1"] * 2


def test_unreachable_cluster_is_one_error_line(monkeypatch, capsys):
    from tests.conftest import free_port

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    for var in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    submit.client.cache_clear()
    assert cli.main(["status", "--address", f"http://127.0.0.1:{free_port()}", "raysubmit_x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot reach the Ray job API at http://127.0.0.1:") and err.count("\n") == 1
