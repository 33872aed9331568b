"""The shared body of every job's ``main``: expected errors are one ``error: ...`` line, not a traceback.

Config problems, unwritable outputs, missing inputs and refused data (``ValueError``) print
``error: <message>`` to stderr and give exit code 2. Anything else is a bug and keeps its traceback;
``FACESYNTH_TRACEBACK=1`` shows the traceback of the expected errors too. The job's full log (every
INFO record of the driver) goes to ``<output>/logs/<job>.log``; the terminal shows warnings and the
jobs' own progress lines.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator

from facesynth import storage
from facesynth.config import ConfigError
from facesynth.preflight import PreflightError

USER_ERRORS = (ConfigError, PreflightError, ValueError, FileNotFoundError, PermissionError)


def run_main(body: Callable[[], object]) -> int:
    """Run a job's work; returns 0, or 2 after printing ``error: <message>`` for a :data:`USER_ERRORS`."""
    try:
        body()
    except USER_ERRORS as exc:
        if os.environ.get("FACESYNTH_TRACEBACK") == "1":
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def job_main(name: str, argv: list[str] | None = None) -> int:
    """The whole ``main`` of ``jobs/NAME.py``: parse the registered job's config (its default preset,
    ``key=value`` overrides), call its library ``run`` and print the result's one-screen summary
    (its ``summary_text()`` where it has one, else ``summary()`` as JSON)."""
    import json

    from facesynth.config import parse_job_args
    from facesynth.registry import job

    spec = job(name)
    cfg = parse_job_args(
        spec.config_class(), argv, f"python -m jobs.{name}: {spec.description}", default=spec.preset
    )

    def body() -> None:
        with log_file(storage.join(cfg.output, "logs", f"{name}.log")):
            result = spec.run_function()(cfg)
        text = getattr(result, "summary_text", None)
        print(text() if text else json.dumps(result.summary(), indent=2))

    return run_main(body)


@contextlib.contextmanager
def log_file(uri: str) -> Iterator[None]:
    """Send every INFO record of this process to ``uri``, written when the block ends: after success or a
    crash, not after an expected error (bad input leaves nothing behind, not even a log)."""
    handler = logging.FileHandler(tempfile.NamedTemporaryFile(suffix=".log", delete=False).name)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    for stream in root.handlers:
        if isinstance(stream, logging.StreamHandler) and not isinstance(stream, logging.FileHandler):
            stream.setLevel(max(stream.level, logging.WARNING))
    start, keep = time.time(), True
    try:
        yield
    except USER_ERRORS:
        keep = False
        raise
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        handler.close()
        if keep:
            with contextlib.suppress(OSError):  # a crash may have left the output unwritable
                data = open(handler.baseFilename, "rb").read()
                storage.write_bytes(uri, data + f"# {time.time() - start:.1f} s\n".encode())
        os.remove(handler.baseFilename)
