"""Image folders of labelled identities: ``<root>/<identity>/<image>`` (any storage URI).

Shared by FR training (``recog``) and LoRA fine-tuning (``synthgen``), which may not import each other.
"""

from __future__ import annotations

import pyarrow.fs as pafs

from facesynth import storage

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def list_image_folder(root: str) -> list[tuple[str, int]]:
    """``(image URI, label)`` for a folder with one sub-folder per identity; label = sorted folder index.

    Images are the files with extensions in :data:`IMAGE_EXTENSIONS` (any depth inside an identity
    folder), in sorted order. An identity folder without images is an error naming it.
    """
    fs, path = storage.resolve(root)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        raise ValueError(f"{root}: image folder does not exist")
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    base = path.rstrip("/") + "/"
    rel = [(i.path[len(base) :], i.type) for i in infos]
    folders = {r.split("/")[0] for r, t in rel if "/" in r or t == pafs.FileType.Directory}
    files = sorted(
        r for r, t in rel if t == pafs.FileType.File and "/" in r and r.lower().endswith(IMAGE_EXTENSIONS)
    )
    if not folders:
        raise ValueError(f"{root}: no identity folders (expected {root}/<identity>/<image>)")
    with_images = {r.split("/")[0] for r in files}
    empty = sorted(folders - with_images)
    if empty:
        raise ValueError(
            f"{root}: identity folders without images {empty[:5]} (extensions {IMAGE_EXTENSIONS})"
        )
    label_of = {name: k for k, name in enumerate(sorted(folders))}
    return [(storage.join(root, r), label_of[r.split("/")[0]]) for r in files]


def identity_name(root: str, image_uri: str) -> str:
    """The identity folder name of an image listed by :func:`list_image_folder` under ``root``."""
    return image_uri[len(storage.join(root, "")) :].split("/")[0]
