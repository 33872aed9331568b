"""Storage URIs: parsing, joining, retries of transient errors only."""

from __future__ import annotations

import os

import pytest

from facesynth import storage


def test_parse_join_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.parse("s3://bucket/a/b/").uri == "s3://bucket/a/b"
    assert storage.parse("s3://bucket/a/b").bucket_key == ("bucket", "a/b")
    assert storage.parse("file:///x/y").path == "/x/y"
    assert storage.absolute("rel/dir") == os.path.join(str(tmp_path), "rel/dir")
    assert storage.absolute("s3://b/k") == "s3://b/k"
    assert storage.join("s3://b/k/", "/shards/", "x.parquet") == "s3://b/k/shards/x.parquet"
    assert storage.join(tmp_path, "a") == f"{tmp_path}/a"
    for bad, why in (("", "empty"), ("gs://b/k", "unsupported scheme"), ("s3:///k", "no bucket")):
        with pytest.raises(ValueError, match=why):
            storage.parse(bad)


def test_write_read_delete_local_is_atomic(tmp_path):
    uri = str(tmp_path / "d" / "f.bin")
    storage.write_bytes(uri, b"abc")
    assert storage.read_bytes(uri) == b"abc" and storage.exists(uri)
    assert os.listdir(tmp_path / "d") == ["f.bin"]  # no temporary file left behind
    assert storage.list_files(str(tmp_path / "d")) == [uri]
    storage.delete(uri)
    assert not storage.exists(uri)
    with pytest.raises(FileNotFoundError, match="no such file"):
        storage.read_bytes(uri)


def test_retry_retries_transient_errors_only(monkeypatch):
    monkeypatch.setattr(storage.time, "sleep", lambda s: None)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise OSError("AWS Error SLOW_DOWN during PutObject operation: 503 SlowDown")
        return "ok"

    assert storage.retry(flaky, what="put") == "ok" and len(calls) == 3
    calls.clear()

    def denied():
        calls.append(1)
        raise PermissionError("AccessDenied")

    with pytest.raises(PermissionError):
        storage.retry(denied, what="put")
    assert len(calls) == 1

    def always_down():
        raise ConnectionError("Connection reset by peer")

    with pytest.raises(ConnectionError):
        storage.retry(always_down, what="get", attempts=4)
