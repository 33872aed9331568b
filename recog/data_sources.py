"""Training data besides shard datasets: image folders and insightface MXNet RecordIO, without mxnet.

RecordIO (dmlc-core): each record is ``uint32 magic 0xced7230a``, ``uint32 lrecord = cflag << 29 |
length``, ``length`` bytes, zero padding to 4 bytes. A payload holding the magic at a 4-aligned
offset is split there into parts (cflag 1 = first, 2 = middle, 3 = last; 0 = whole record) and the
reader puts the magic back between them. A payload is an ``IRHeader`` (``<IfQQ``: flag, label, id,
id2), then ``flag`` float32 labels when ``flag > 0``, then the encoded image. insightface's record 0
is a header with ``flag > 0`` whose ``label[0]`` ends the image range: images are keys
``1 .. label[0]-1``. The ``.idx`` file has text lines ``key\\toffset``.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Iterator

import numpy as np
import pyarrow.fs as pafs

from facesynth import images, storage
from facesynth.image_folder import list_image_folder

RECORDIO_MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", RECORDIO_MAGIC)
_LENGTH_MASK = (1 << 29) - 1
_IR_HEADER = struct.Struct("<IfQQ")
_FLOAT32_EXACT = 1 << 24  # larger integers do not survive insightface's float32 labels


def _encode_record(payload: bytes) -> bytes:
    """A RecordIO record for ``payload``, split at 4-aligned magic occurrences as dmlc-core does."""
    parts, start, i = [], 0, payload.find(_MAGIC_BYTES)
    while i != -1:
        if i % 4 == 0:
            parts.append(payload[start:i])
            start = i + 4
        i = payload.find(_MAGIC_BYTES, max(start, i + 1))
    parts.append(payload[start:])
    cflags = [0] if len(parts) == 1 else [1, *[2] * (len(parts) - 2), 3]
    out = b"".join(
        _MAGIC_BYTES + struct.pack("<I", f << 29 | len(p)) + p for f, p in zip(cflags, parts, strict=True)
    )
    return out + b"\0" * (-len(parts[-1]) % 4)


def _pack_payload(label: float | list[float], image: bytes) -> bytes:
    """``mx.recordio.pack``: a scalar label goes in the header (flag 0), a list after it (flag = count)."""
    if isinstance(label, list):
        return _IR_HEADER.pack(len(label), 0.0, 0, 0) + np.asarray(label, dtype="<f4").tobytes() + image
    return _IR_HEADER.pack(0, label, 0, 0) + image


def write_recordio(rec_path: str, idx_path: str, items: Iterable[tuple[bytes, int]]) -> int:
    """Pack ``(encoded image, label)`` items into an insightface ``train.rec`` + ``train.idx`` (local paths).

    Record 0 is the header ``[n + 1, n + 1]`` (images 1..n, no identity-range records). Files appear
    only once complete. Returns the number of images.
    """
    tmp = f"{rec_path}.tmp-{os.getpid()}"
    offsets: list[int] = []
    try:
        with open(tmp, "wb") as f:
            header = _encode_record(_pack_payload([0.0, 0.0], b""))
            f.write(header)  # label patched below once the image count is known
            for key, (image, label) in enumerate(items, start=1):
                if not (isinstance(label, (int, np.integer)) and 0 <= label < _FLOAT32_EXACT):
                    raise ValueError(
                        f"{rec_path}: item {key - 1} label {label!r}, expected an int in [0, 2**24)"
                    )
                offsets.append(f.tell())
                f.write(_encode_record(_pack_payload(float(label), bytes(image))))
            end = len(offsets) + 1
            if end >= _FLOAT32_EXACT:
                raise ValueError(
                    f"{rec_path}: {len(offsets)} images; the float32 header holds at most 2**24 - 2"
                )
            f.seek(8 + _IR_HEADER.size)
            f.write(np.asarray([end, end], dtype="<f4").tobytes())
        index = "".join(f"{key}\t{offset}\n" for key, offset in enumerate([0, *offsets]))
        storage.write_bytes(idx_path, index.encode())
        os.replace(tmp, rec_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return len(offsets)


def _parse_index(text: str, idx_path: str) -> dict[int, int]:
    offsets: dict[int, int] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 2 or not parts[0].strip().isdigit() or not parts[1].strip().isdigit():
            raise ValueError(f"{idx_path}: line {lineno} is {line!r}, expected 'key<TAB>offset'")
        offsets[int(parts[0])] = int(parts[1])
    if not offsets:
        raise ValueError(f"{idx_path}: empty RecordIO index")
    return offsets


class RecordIOReader:
    """Random access to an insightface ``train.rec`` through its ``train.idx`` (any storage URI).

    ``reader[i]`` is ``(encoded image bytes, int label)`` of the i-th image record. Picklable: each
    process reopens the file lazily.
    """

    def __init__(self, rec_path: str, idx_path: str):
        self.rec_path, self.idx_path = rec_path, idx_path
        self._file: pafs.NativeFile | None = None
        self._offsets = _parse_index(storage.read_bytes(idx_path).decode("ascii", "replace"), idx_path)
        keys = list(self._offsets)
        if 0 in self._offsets:
            flag, label, _ = self._unpack(self._read_record(self._offsets[0]), 0)
            if flag > 0:
                keys = list(range(1, int(label)))
                missing = [k for k in keys if k not in self._offsets]
                if missing:
                    raise ValueError(
                        f"{idx_path}: header record says images 1..{len(keys)}, but {len(missing)} keys "
                        f"(first {missing[0]}) are not in the index"
                    )
        self._keys = keys

    def __len__(self) -> int:
        return len(self._keys)

    def __getitem__(self, i: int) -> tuple[bytes, int]:
        key = self._keys[i]
        _, label, image = self._unpack(self._read_record(self._offsets[key]), key)
        return image, int(label)

    def labels(self) -> np.ndarray:
        """int64 label of every image, reading only the record headers."""
        return np.array(
            [
                int(self._unpack(self._read_record(self._offsets[k], _IR_HEADER.size + 4), k)[1])
                for k in self._keys
            ],
            dtype=np.int64,
        )

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> RecordIOReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_file": None}

    def _read_at(self, offset: int, size: int) -> bytes:
        if self._file is None:
            self._file = storage.open_input(self.rec_path)
        data = self._file.read_at(size, offset)
        if len(data) != size:
            raise ValueError(f"{self.rec_path}: truncated RecordIO record at offset {offset}")
        return data

    def _read_record(self, offset: int, limit: int | None = None) -> bytes:
        """The payload of the record at ``offset`` (parts joined), or its first ``>= limit`` bytes."""
        payload = bytearray()
        while True:
            magic, lrecord = struct.unpack("<II", self._read_at(offset, 8))
            if magic != RECORDIO_MAGIC:
                raise ValueError(
                    f"{self.rec_path}: bad RecordIO magic 0x{magic:08x} at offset {offset}, expected "
                    f"0x{RECORDIO_MAGIC:08x} (corrupt .rec or an .idx from another file)"
                )
            cflag, length = lrecord >> 29, lrecord & _LENGTH_MASK
            payload += self._read_at(offset + 8, length)
            offset += 8 + length + (-length % 4)
            if cflag in (0, 3) or (limit is not None and len(payload) >= limit):
                return bytes(payload)
            payload += _MAGIC_BYTES

    def _unpack(self, payload: bytes, key: int) -> tuple[int, float, bytes]:
        """``(flag, label, image)``; the label is ``label[0]`` when the record holds a label list."""
        if len(payload) < _IR_HEADER.size:
            raise ValueError(
                f"{self.rec_path}: record {key} is {len(payload)} bytes, shorter than its IRHeader"
            )
        flag, label, _, _ = _IR_HEADER.unpack_from(payload)
        body = payload[_IR_HEADER.size :]
        if flag > 0:
            if len(body) < 4:
                raise ValueError(f"{self.rec_path}: record {key} has flag {flag} but no label floats")
            label = struct.unpack_from("<f", body)[0]
            body = body[4 * flag :]
        return flag, label, body


def iter_image_folder(root: str) -> Iterator[tuple[np.ndarray, int]]:
    """Decoded uint8 RGB images ``[H, W, 3]`` and labels of an image folder (see :func:`list_image_folder`)."""
    for uri, label in list_image_folder(root):
        yield images.decode(storage.read_bytes(uri), uri), label
