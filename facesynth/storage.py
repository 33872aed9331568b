"""Storage URIs: ``s3://bucket/key``, ``file:///abs/path`` or a plain path, through ``pyarrow.fs``.

S3 settings come from the standard AWS variables (``AWS_ENDPOINT_URL``/``AWS_ENDPOINT_URL_S3``,
``AWS_REGION``/``AWS_DEFAULT_REGION``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_SESSION_TOKEN``). boto3 is used only where pyarrow cannot: conditional writes and listing.
Transient S3 errors are retried with exponential backoff by both clients and by :func:`retry`.
"""

from __future__ import annotations

import functools
import logging
import os
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import urlparse

import pyarrow.fs as pafs

log = logging.getLogger(__name__)
T = TypeVar("T")

S3_MAX_ATTEMPTS = 8


@dataclass(frozen=True)
class Location:
    """A parsed URI: ``scheme`` is ``s3`` or ``file``; ``path`` is ``bucket/key`` or an absolute path."""

    scheme: str
    path: str

    @property
    def uri(self) -> str:
        return f"s3://{self.path}" if self.scheme == "s3" else self.path

    @property
    def bucket_key(self) -> tuple[str, str]:
        bucket, _, key = self.path.partition("/")
        return bucket, key


def parse(uri: str | os.PathLike) -> Location:
    """Parse a storage URI; plain relative paths are made absolute."""
    uri = os.fspath(uri)
    if not uri:
        raise ValueError("storage URI is empty: expected s3://bucket/prefix, file:///path or a path")
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ValueError(f"storage URI {uri!r} has no bucket: expected s3://bucket/prefix")
        return Location("s3", f"{parsed.netloc}/{parsed.path.lstrip('/')}".rstrip("/"))
    if parsed.scheme == "file":
        return Location("file", os.path.abspath(parsed.path))
    if parsed.scheme and len(parsed.scheme) > 1:
        raise ValueError(
            f"storage URI {uri!r}: unsupported scheme {parsed.scheme!r} (use s3://, file:// or a path)"
        )
    return Location("file", os.path.abspath(uri))


def absolute(uri: str | os.PathLike) -> str:
    """The URI with a relative local path made absolute (for processes with another working directory)."""
    return parse(uri).uri


def s3_settings() -> dict:
    """S3 endpoint/region/credentials from the standard AWS environment variables."""
    env = os.environ
    return {
        "endpoint": env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL"),
        "region": env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1",
        "access_key": env.get("AWS_ACCESS_KEY_ID"),
        "secret_key": env.get("AWS_SECRET_ACCESS_KEY"),
        "session_token": env.get("AWS_SESSION_TOKEN"),
    }


@functools.lru_cache(maxsize=8)
def _s3_filesystem(endpoint, region, access_key, secret_key, session_token) -> pafs.S3FileSystem:
    kwargs = {
        "region": region,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=S3_MAX_ATTEMPTS),
        "connect_timeout": 10,
        "request_timeout": 60,
    }
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs["endpoint_override"] = parsed.netloc or endpoint
        kwargs["scheme"] = parsed.scheme or "https"
    if access_key:
        kwargs.update(access_key=access_key, secret_key=secret_key, session_token=session_token)
    return pafs.S3FileSystem(**kwargs)


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """Map a URI to a ``pyarrow.fs`` filesystem and the path inside it."""
    loc = parse(uri)
    if loc.scheme == "s3":
        return _s3_filesystem(*s3_settings().values()), loc.path
    return pafs.LocalFileSystem(), loc.path


def boto3_client():
    """A boto3 S3 client with the same endpoint/credentials and standard-mode retries."""
    import boto3
    from botocore.config import Config

    s = s3_settings()
    return boto3.client(
        "s3",
        endpoint_url=s["endpoint"],
        region_name=s["region"],
        aws_access_key_id=s["access_key"],
        aws_secret_access_key=s["secret_key"],
        aws_session_token=s["session_token"],
        config=Config(retries={"max_attempts": S3_MAX_ATTEMPTS, "mode": "standard"}),
    )


def is_transient(exc: BaseException) -> bool:
    """True for errors worth retrying: 5xx/throttling answers and dropped connections."""
    response = getattr(exc, "response", None)  # botocore ClientError
    code = response.get("ResponseMetadata", {}).get("HTTPStatusCode") if isinstance(response, dict) else None
    if code is not None:
        return code >= 500 or code == 429
    text = str(exc)
    markers = (
        "SlowDown",
        "InternalError",
        "ServiceUnavailable",
        "503",
        "500",
        "502",
        "504",
        "Connection reset",
        "Broken pipe",
        "timed out",
        "Couldn't connect",
        "RequestTimeout",
    )
    return isinstance(exc, (ConnectionError, TimeoutError)) or any(m in text for m in markers)


def retry(fn: Callable[[], T], *, what: str, attempts: int = S3_MAX_ATTEMPTS, base_delay: float = 0.1) -> T:
    """Call ``fn`` and retry transient storage errors with jittered exponential backoff."""
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - filtered by is_transient
            if attempt == attempts or not is_transient(exc):
                raise
            delay = base_delay * 2 ** (attempt - 1) * (0.5 + random.random())
            log.warning("%s failed (%s); retry %d/%d in %.2fs", what, exc, attempt, attempts - 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def join(uri: str | os.PathLike, *parts: str) -> str:
    """Join path parts onto a URI (or a ``pathlib`` path) with ``/``."""
    out = os.fspath(uri).rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    info = retry(lambda: fs.get_file_info(path), what=f"stat {uri}")
    return info.type != pafs.FileType.NotFound


def makedirs(uri: str) -> None:
    fs, path = resolve(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        os.makedirs(path, exist_ok=True)


def read_bytes(uri: str) -> bytes:
    """Read a whole object; a missing one raises FileNotFoundError naming the URI."""
    fs, path = resolve(uri)

    def read() -> bytes:
        with fs.open_input_stream(path) as f:
            return f.read()

    try:
        return retry(read, what=f"read {uri}")
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{uri}: no such file or object") from exc
    except OSError as exc:
        if "NoSuchKey" in str(exc) or "does not exist" in str(exc) or "Path does not exist" in str(exc):
            raise FileNotFoundError(f"{uri}: no such file or object") from exc
        raise


def open_input(uri: str):
    """A readable, seekable binary file object for ``uri`` (a context manager)."""
    fs, path = resolve(uri)
    return retry(lambda: fs.open_input_file(path), what=f"open {uri}")


def write_bytes(uri: str, data: bytes) -> None:
    """Write an object atomically: a reader sees the old object or the whole new one, never a part.

    Locally the bytes go to a unique temporary file that is renamed over the target; on S3 a
    single PUT (or a multipart upload completed on close) is already atomic.
    """
    loc = parse(uri)
    fs, path = resolve(uri)
    if loc.scheme == "s3":

        def put() -> None:
            with fs.open_output_stream(path) as f:
                f.write(data)

        retry(put, what=f"write {uri}")
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def delete(uri: str) -> None:
    """Delete an object if it exists."""
    fs, path = resolve(uri)
    try:
        retry(lambda: fs.delete_file(path), what=f"delete {uri}")
    except FileNotFoundError:
        pass


def list_files(uri: str) -> list[str]:
    """URIs of the files directly under the folder ``uri`` (sorted); empty if it does not exist."""
    fs, path = resolve(uri)
    selector = pafs.FileSelector(path, allow_not_found=True, recursive=False)
    infos = retry(lambda: fs.get_file_info(selector), what=f"list {uri}")
    base = uri.rstrip("/")
    return sorted(f"{base}/{i.base_name}" for i in infos if i.type == pafs.FileType.File)
