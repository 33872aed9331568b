"""Checks every job runs before Ray starts, so a run that cannot write its output fails in seconds.

``check_output_writable`` looks at where the output goes: an S3 bucket must exist and answer
(``HeadBucket`` with the job's credentials), a local folder's nearest existing parent must be a
writable directory. Problems raise :class:`PreflightError` with the URI in the message.
"""

from __future__ import annotations

import os

from facesynth import storage


class PreflightError(RuntimeError):
    """An output location the job cannot write to; the message names the URI."""


def check_output_writable(uri: str) -> None:
    """Raise :class:`PreflightError` unless the output at ``uri`` can be written."""
    loc = storage.parse(uri)
    if loc.scheme == "s3":
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, _ = loc.bucket_key
        try:
            storage.boto3_client().head_bucket(Bucket=bucket)
        except (BotoCoreError, ClientError) as exc:
            raise PreflightError(f"s3://{bucket}: bucket does not exist or is not reachable ({exc})") from exc
        return
    existing = loc.path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise PreflightError(
            f"{uri}: {existing} is a file, expected a folder (or a path that does not exist)"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PreflightError(f"{uri}: {existing} is not writable by this user")
