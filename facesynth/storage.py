"""Storage URIs: ``s3://bucket/key``, ``file:///abs/path`` or a plain path, through ``pyarrow.fs``.

S3 settings come from the standard AWS variables (``AWS_ENDPOINT_URL``/``AWS_ENDPOINT_URL_S3``,
``AWS_REGION``/``AWS_DEFAULT_REGION``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_SESSION_TOKEN``). boto3 is used only where pyarrow cannot: create-only writes (the commit
log's records) and one-request reads and existence checks of small objects that often miss.
Transient S3 errors are retried with exponential backoff by both clients and by :func:`retry`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
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
    """A boto3 S3 client with the same endpoint/credentials and standard-mode retries (one per process)."""
    with _BOTO3_LOCK:  # clients are thread-safe, creating one is not
        return _boto3_client(*s3_settings().values())


_BOTO3_LOCK = threading.Lock()


@functools.lru_cache(maxsize=8)
def _boto3_client(endpoint, region, access_key, secret_key, session_token):
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=region,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        aws_session_token=session_token,
        config=Config(retries={"max_attempts": S3_MAX_ATTEMPTS, "mode": "standard"}),
    )


def http_status(exc: BaseException) -> int | None:
    """The HTTP status of a botocore ``ClientError`` (None for other errors)."""
    response = getattr(exc, "response", None)
    return response.get("ResponseMetadata", {}).get("HTTPStatusCode") if isinstance(response, dict) else None


def is_transient(exc: BaseException) -> bool:
    """True for errors worth retrying: 5xx/throttling answers and dropped connections."""
    code = http_status(exc)
    if code is not None:
        return code >= 500 or code == 429
    text = str(exc)
    markers = (
        "SlowDown",
        "InternalError",
        "INTERNAL_FAILURE",  # AWS C++ SDK (pyarrow): a response stream cut off mid-read
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


def get_object(uri: str) -> bytes | None:
    """A whole object in one request (a GET on S3, without pyarrow's HEAD first), or None if there is none.

    For small reads that often miss, like commit-log records and their probes; :func:`read_bytes`
    is for data, where a missing object is an error.
    """
    loc = parse(uri)
    if loc.scheme != "s3":
        try:
            with open(loc.path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None
    client = boto3_client()
    bucket, key = loc.bucket_key
    try:
        return retry(lambda: client.get_object(Bucket=bucket, Key=key)["Body"].read(), what=f"read {uri}")
    except client.exceptions.NoSuchKey:
        return None


def has_object(uri: str) -> bool:
    """Whether the object ``uri`` exists: one HEAD on S3 (:func:`exists` also lists, to find folders)."""
    loc = parse(uri)
    if loc.scheme != "s3":
        return os.path.isfile(loc.path)
    from botocore.exceptions import ClientError

    bucket, key = loc.bucket_key
    try:
        retry(lambda: boto3_client().head_object(Bucket=bucket, Key=key), what=f"stat {uri}")
        return True
    except ClientError as exc:
        if http_status(exc) == 404:
            return False
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
    with _temp_copy(path, data) as tmp:
        os.replace(tmp, path)


@contextlib.contextmanager
def _temp_copy(path: str, data: bytes) -> Iterator[str]:
    """A synced temporary file holding ``data`` next to ``path``; removed afterwards unless renamed."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        yield tmp
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def create_only(uri: str, data: bytes) -> bool:
    """Create ``uri`` with ``data`` unless it exists: True if this call created it, False if it was there.

    Two writers can never both create one name, and a reader sees the whole object or none. On S3 a
    ``PUT`` with ``If-None-Match: *`` (412 when the key exists, 409 on a concurrent conditional write:
    both mean taken). Locally the bytes go to a temporary file first that is then hard-linked to the
    name (``link`` fails if the name exists). A retried write that finds its own bytes there (its first
    attempt landed but the answer was lost) counts as created.
    """
    loc = parse(uri)
    if loc.scheme == "s3":
        created = _s3_create_only(loc, data)
    else:
        created = _local_create_only(loc.path, data)
    return created or _holds(uri, data)


def _s3_create_only(loc: Location, data: bytes) -> bool:
    from botocore.exceptions import ClientError

    bucket, key = loc.bucket_key
    client = boto3_client()
    try:
        retry(
            lambda: client.put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*"),
            what=f"create {loc.uri}",
        )
        return True
    except ClientError as exc:
        if http_status(exc) in (409, 412):
            return False
        raise


def _local_create_only(path: str, data: bytes) -> bool:
    with _temp_copy(path, data) as tmp:
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False


def _holds(uri: str, data: bytes) -> bool:
    return get_object(uri) == data  # None: a 409 race whose winner failed, the name is still free


def delete(uri: str) -> None:
    """Delete an object if it exists."""
    fs, path = resolve(uri)
    try:
        retry(lambda: fs.delete_file(path), what=f"delete {uri}")
    except FileNotFoundError:
        pass


def _list(uri: str) -> list[pafs.FileInfo]:
    fs, path = resolve(uri)
    selector = pafs.FileSelector(path, allow_not_found=True, recursive=False)
    return retry(lambda: fs.get_file_info(selector), what=f"list {uri}")


def list_files(uri: str) -> list[str]:
    """URIs of the files directly under the folder ``uri`` (sorted); empty if it does not exist."""
    base = uri.rstrip("/")
    return sorted(f"{base}/{i.base_name}" for i in _list(uri) if i.type == pafs.FileType.File)


def file_sizes(uri: str) -> dict[str, int]:
    """``{name: bytes}`` of the files directly under the folder ``uri`` (one listing)."""
    return {i.base_name: i.size for i in _list(uri) if i.type == pafs.FileType.File}


def list_entries(uri: str) -> list[str]:
    """Names of everything (files and folders) directly under ``uri``; empty if it does not exist."""
    return sorted(i.base_name for i in _list(uri))
