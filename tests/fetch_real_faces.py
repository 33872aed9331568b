"""Fetch a few real face photos for smoke tests: the test images inside the ``face_recognition`` sdist.

The sdist comes from PyPI through ``pip download``; its ``tests/test_images/*.jpg`` photos of real
people (Joe Biden, Barack Obama) are cached in ``$FACESYNTH_TEST_CACHE`` or
``~/.cache/facesynth-test``, never in the repository. Run ``python -m tests.fetch_real_faces`` to
prefetch them.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path, PurePosixPath

PACKAGE = "face_recognition==1.3.0"
CACHE_ENV = "FACESYNTH_TEST_CACHE"
# person name then an optional number: partial-face photos (obama_partial_face.jpg) are left out
PHOTO_NAME = re.compile(r"([a-z]+)\d*\.jpg")


class PhotosUnavailable(RuntimeError):
    """The package registry could not be reached or the sdist did not hold the photos."""


def default_cache() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "facesynth-test")


def _download_sdist(dest: Path) -> Path:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-binary",
        ":all:",
        "--no-deps",
        PACKAGE,
        "-d",
        str(dest),
        "--quiet",
        "--disable-pip-version-check",
        "--timeout",
        "20",
        "--retries",
        "1",
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as exc:
        raise PhotosUnavailable(f"pip download {PACKAGE} timed out after {exc.timeout}s") from exc
    archives = sorted(dest.glob("face_recognition-*.tar.gz"))
    if proc.returncode != 0 or not archives:
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        raise PhotosUnavailable(f"pip download {PACKAGE} failed (exit {proc.returncode}): {tail}")
    return archives[0]


def _extract_photos(archive: Path, dest: Path) -> None:
    """Copy the sdist's ``tests/test_images/<person><n>.jpg`` files, by base name only, into ``dest``."""
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            path = PurePosixPath(member.name)
            if member.isfile() and path.parent.name == "test_images" and PHOTO_NAME.fullmatch(path.name):
                (dest / path.name).write_bytes(tar.extractfile(member).read())


def fetch_real_faces(cache: Path | None = None) -> dict[str, list[Path]]:
    """Photos by person name (``{"biden": [...], "obama": [...]}``), downloading them once into ``cache``."""
    folder = (cache or default_cache()) / PACKAGE.replace("==", "-")
    if not folder.is_dir():
        folder.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
            staging = Path(tmp) / "photos"
            staging.mkdir()
            _extract_photos(_download_sdist(Path(tmp)), staging)
            if not any(staging.iterdir()):
                raise PhotosUnavailable(f"{PACKAGE} sdist holds no tests/test_images/*.jpg photos")
            try:
                staging.rename(folder)  # atomic: a folder in the cache is always complete
            except OSError:
                if not folder.is_dir():  # lost a race with a concurrent fetch otherwise
                    raise
    people: dict[str, list[Path]] = {}
    for photo in sorted(folder.glob("*.jpg")):
        people.setdefault(PHOTO_NAME.fullmatch(photo.name).group(1), []).append(photo)
    return people


if __name__ == "__main__":
    try:
        for name, photos in fetch_real_faces().items():
            print(name, *photos)
    except PhotosUnavailable as exc:
        sys.exit(f"unavailable: {exc}")
