"""Verification sets: insightface ``.bin`` pair sets and IJB-C-style template set folders.

A ``.bin`` (``lfw.bin``, ``cfp_fp.bin``, ...) is a pickled ``(bins, issame_list)``.

``bins`` holds 2·N encoded images with pairs consecutive (images 2i and 2i+1); ``issame_list`` holds
N booleans. Files are read with a restricted unpickler that builds only bytes, lists, tuples, bools
and numpy arrays/scalars, so a crafted ``.bin`` cannot run code.
"""

from __future__ import annotations

import codecs
import io
import pickle
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq

from facesynth import images, storage

# (module, name) pairs the unpickler may resolve; py2 pickles name builtins ``__builtin__``.
_SAFE_GLOBALS = {
    *(
        (mod, name)
        for mod in ("builtins", "__builtin__")
        for name in ("bytes", "bytearray", "list", "tuple", "bool")
    ),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    *(
        (f"numpy.{core}.multiarray", name)
        for core in ("core", "_core")
        for name in ("_reconstruct", "scalar")
    ),
    *((f"numpy.{core}.numeric", "_frombuffer") for core in ("core", "_core")),
}


class _SafeUnpickler(pickle.Unpickler):
    """Unpickler that refuses every global outside :data:`_SAFE_GLOBALS`."""

    def __init__(self, data: bytes, uri: str, encoding: str):
        super().__init__(io.BytesIO(data), encoding=encoding)
        self.uri = uri

    def _latin1_encode(self, text: str, encoding: str = "utf-8") -> bytes:
        """``_codecs.encode`` limited to latin-1: how Python 3 pickles ``bytes`` with protocol < 3."""
        if encoding.replace("-", "").replace("_", "").lower() != "latin1":
            raise ValueError(f"{self.uri}: refused to unpickle _codecs.encode with encoding {encoding!r}")
        return codecs.encode(text, "latin-1")

    def find_class(self, module: str, name: str):
        if (module, name) == ("_codecs", "encode"):
            return self._latin1_encode
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        raise ValueError(
            f"{self.uri}: refused to unpickle global {module}.{name}: a verification .bin may only hold "
            "bytes, lists, tuples, bools and numpy arrays"
        )


def _unpickle(data: bytes, uri: str):
    """Unpickle like insightface: py3/ASCII first, then the ``encoding='bytes'`` fallback for py2 files."""
    try:
        try:
            return _SafeUnpickler(data, uri, encoding="ASCII").load()
        except UnicodeDecodeError:
            return _SafeUnpickler(data, uri, encoding="bytes").load()
    except (EOFError, pickle.UnpicklingError, IndexError, KeyError, TypeError) as exc:
        raise ValueError(
            f"{uri}: truncated or corrupt verification .bin ({type(exc).__name__}: {exc})"
        ) from exc


def _as_bytes(item: object, index: int, uri: str) -> bytes:
    if isinstance(item, (bytes, bytearray)):
        return bytes(item)
    if isinstance(item, np.ndarray) and item.dtype == np.uint8 and item.ndim == 1:
        return item.tobytes()
    raise ValueError(f"{uri}: image {index} is a {type(item).__name__}, expected encoded image bytes")


def _check_issame(issame: object, uri: str) -> np.ndarray:
    flags = np.asarray(issame)
    if flags.ndim != 1 or (flags.size and flags.dtype != np.bool_):
        raise ValueError(
            f"{uri}: issame must be a flat sequence of bools, got dtype {flags.dtype} with shape {flags.shape}"
        )
    return flags.astype(bool)


def _check_counts(n_images: int, n_pairs: int, uri: str) -> None:
    if n_images != 2 * n_pairs:
        raise ValueError(
            f"{uri}: {n_images} images for {n_pairs} issame flags; expected 2 images per pair ({2 * n_pairs})"
        )


def write_bin(uri: str, images: Sequence[bytes], issame: Sequence[bool]) -> None:
    """Write a verification set as insightface does: ``pickle.dump((bins, issame_list), protocol=4)``."""
    flags = _check_issame(issame, uri)
    _check_counts(len(images), len(flags), uri)
    bins = [_as_bytes(item, i, uri) for i, item in enumerate(images)]
    storage.write_bytes(uri, pickle.dumps((bins, [bool(f) for f in flags]), protocol=4))


def read_bin(uri: str) -> tuple[list[bytes], np.ndarray]:
    """Read a verification ``.bin``: the encoded images and the pair flags as a bool array.

    Images are not decoded here; :func:`decode_images` validates them.
    """
    payload = _unpickle(storage.read_bytes(uri), uri)
    if not isinstance(payload, (tuple, list)) or len(payload) != 2:
        raise ValueError(f"{uri}: expected a pickled (bins, issame_list) pair, got {type(payload).__name__}")
    bins, issame = payload
    if not isinstance(bins, (list, tuple)):
        raise ValueError(f"{uri}: bins is a {type(bins).__name__}, expected a list of encoded images")
    flags = _check_issame(issame, uri)
    _check_counts(len(bins), len(flags), uri)
    return [_as_bytes(item, i, uri) for i, item in enumerate(bins)], flags


def decode_images(bins: Sequence[bytes], size: int = 112) -> np.ndarray:
    """Decode verification images to uint8 RGB ``[N, size, size, 3]`` as insightface does: an image whose
    width is not ``size`` is resized short-side to ``size``; one still not square raises a ValueError."""
    return images.decode_to_size(bins, (size, size), resize="short_side", what="verification image")


@dataclass(frozen=True)
class TemplateSet:
    """An IJB-C-style set as read back: per-image columns and the template pair list."""

    images: list[bytes]
    template_ids: np.ndarray
    media_ids: np.ndarray
    identities: np.ndarray
    template_1: np.ndarray
    template_2: np.ndarray
    issame: np.ndarray


def read_template_set(uri: str) -> TemplateSet:
    """Read a template set folder (as ``synthgen.benchmark_sets`` writes it) (``templates.parquet`` + ``pairs.parquet``)."""
    tables = {}
    for part in ("templates", "pairs"):
        part_uri = storage.join(uri, f"{part}.parquet")
        if not storage.exists(part_uri):
            raise FileNotFoundError(
                f"{part_uri}: a template set folder holds templates.parquet and pairs.parquet"
            )
        tables[part] = pq.read_table(io.BytesIO(storage.read_bytes(part_uri)))
    images, pairs = tables["templates"], tables["pairs"]
    known = set(images["template_id"].to_pylist())
    missing = (set(pairs["template_1"].to_pylist()) | set(pairs["template_2"].to_pylist())) - known
    if missing:
        raise ValueError(
            f"{uri}: pairs.parquet names templates {sorted(missing)[:5]} that templates.parquet lacks"
        )
    return TemplateSet(
        images=images["image"].to_pylist(),
        template_ids=images["template_id"].to_numpy(),
        media_ids=images["media_id"].to_numpy(),
        identities=images["identity"].to_numpy(),
        template_1=pairs["template_1"].to_numpy(),
        template_2=pairs["template_2"].to_numpy(),
        issame=pairs["issame"].to_numpy(),
    )
