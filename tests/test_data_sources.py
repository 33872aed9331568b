"""Image folders and insightface RecordIO (train.rec/.idx) written and read without mxnet."""

from __future__ import annotations

import io
import pickle
import struct

import numpy as np
import pytest
from PIL import Image

from facesynth import storage
from recog.data_sources import RecordIOReader, iter_image_folder, list_image_folder, write_recordio

MAGIC = struct.pack("<I", 0xCED7230A)


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _whole_record(payload: bytes) -> bytes:
    """One unsplit record (payload without the magic inside), padded to 4 bytes."""
    return MAGIC + struct.pack("<I", len(payload)) + payload + b"\0" * (-len(payload) % 4)


def _write_raw(tmp_path, payloads: list[bytes]) -> tuple[str, str]:
    rec, idx, lines, data = tmp_path / "raw.rec", tmp_path / "raw.idx", [], b""
    for key, payload in enumerate(payloads):
        lines.append(f"{key}\t{len(data)}\n")
        data += _whole_record(payload)
    rec.write_bytes(data)
    idx.write_text("".join(lines))
    return str(rec), str(idx)


@pytest.fixture
def items() -> list[tuple[bytes, int]]:
    rng = np.random.default_rng(0)
    images = [_png(rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)) for _ in range(4)]
    # an "image" holding the magic at 4-aligned payload offsets 24 and 32 (split there into a 3-part
    # record) and at the unaligned offset 38 (kept)
    tricky = MAGIC + b"abcd" + MAGIC + b"xy" + MAGIC
    return [(images[0], 0), (images[1], 0), (tricky, 1), (images[2], 2), (images[3], 2)]


def test_write_then_read_round_trip(tmp_path, items):
    rec, idx = str(tmp_path / "train.rec"), str(tmp_path / "train.idx")
    assert write_recordio(rec, idx, iter(items)) == 5
    data = (tmp_path / "train.rec").read_bytes()
    # record 0: magic, cflag 0 / length 32, IRHeader(flag=2, 0.0, 0, 0), labels [n+1, n+1]
    header = struct.pack("<IfQQ", 2, 0.0, 0, 0) + struct.pack("<2f", 6, 6)
    assert data[:40] == MAGIC + struct.pack("<I", 32) + header
    offsets = [int(line.split("\t")[1]) for line in (tmp_path / "train.idx").read_text().splitlines()]
    assert offsets[:2] == [0, 40] and len(offsets) == 6
    head = struct.pack("<IfQQ", 0, 1.0, 0, 0)  # tricky item: split at both magics (dmlc-core cflags 1, 2, 3)
    expected = (
        MAGIC + struct.pack("<I", 1 << 29 | 24) + head
        + MAGIC + struct.pack("<I", 2 << 29 | 4) + b"abcd"
        + MAGIC + struct.pack("<I", 3 << 29 | 6) + b"xy" + MAGIC + b"\0\0"
    )  # fmt: skip
    assert data[offsets[3] : offsets[4]] == expected
    with RecordIOReader(rec, idx) as reader:
        assert len(reader) == 5
        assert [reader[i] for i in range(5)] == items
        assert reader[-1] == items[-1]
        assert reader.labels().tolist() == [0, 0, 1, 2, 2] and reader.labels().dtype == np.int64
        clone = pickle.loads(pickle.dumps(reader))
        assert clone[2] == items[2]
        with pytest.raises(IndexError):
            reader[5]


def test_records_without_header_and_with_label_lists(tmp_path):
    head = struct.pack("<IfQQ", 0, 3.0, 0, 0)
    listed = struct.pack("<IfQQ", 2, 0.0, 0, 0) + struct.pack("<2f", 7.0, 1.0)
    rec, idx = _write_raw(tmp_path, [head + b"img0", listed + b"img1"])
    reader = RecordIOReader(rec, idx)  # record 0 has flag 0: every indexed record is an image
    assert len(reader) == 2 and reader[0] == (b"img0", 3) and reader[1] == (b"img1", 7)
    assert reader.labels().tolist() == [3, 7]


def test_header_naming_missing_images(tmp_path):
    header = struct.pack("<IfQQ", 2, 0.0, 0, 0) + struct.pack("<2f", 4.0, 4.0)  # claims images 1..3
    rec, idx = _write_raw(tmp_path, [header, struct.pack("<IfQQ", 0, 0.0, 0, 0) + b"a"])
    with pytest.raises(
        ValueError, match=r"raw\.idx: header record says images 1\.\.3, but 2 keys \(first 2\)"
    ):
        RecordIOReader(rec, idx)


def test_corrupted_magic_and_truncation(tmp_path, items):
    rec, idx = str(tmp_path / "train.rec"), str(tmp_path / "train.idx")
    write_recordio(rec, idx, items)
    offset = int((tmp_path / "train.idx").read_text().splitlines()[2].split("\t")[1])
    data = (tmp_path / "train.rec").read_bytes()
    (tmp_path / "train.rec").write_bytes(data[:offset] + b"\xde\xad\xbe\xef" + data[offset + 4 :])
    reader = RecordIOReader(rec, idx)
    assert reader[0] == items[0]
    with pytest.raises(ValueError, match=rf"train\.rec: bad RecordIO magic 0xefbeadde at offset {offset}"):
        reader[1]
    (tmp_path / "train.rec").write_bytes(data[: offset + 10])
    reader = RecordIOReader(rec, idx)
    assert reader[0] == items[0]
    with pytest.raises(ValueError, match=rf"train\.rec: truncated RecordIO record at offset {offset + 8}"):
        reader[1]


def test_bad_index_and_labels(tmp_path, items):
    (tmp_path / "bad.idx").write_text("0\t0\nnot a line\n")
    with pytest.raises(ValueError, match=r"bad\.idx: line 2 is 'not a line', expected 'key<TAB>offset'"):
        RecordIOReader(str(tmp_path / "x.rec"), str(tmp_path / "bad.idx"))
    rec, idx = str(tmp_path / "neg.rec"), str(tmp_path / "neg.idx")
    with pytest.raises(ValueError, match=r"neg\.rec: item 1 label -1, expected an int in \[0, 2\*\*24\)"):
        write_recordio(rec, idx, [(b"a", 0), (b"b", -1)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.idx"]  # nothing partial left behind


@pytest.fixture
def folder(tmp_path) -> tuple[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    files = {"b_id/1.png": None, "b_id/2.PNG": None, "a_id/x.png": None, "c_id/sub/y.png": None}
    for rel in files:
        files[rel] = rng.integers(0, 256, size=(6, 5, 3), dtype=np.uint8)
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(_png(files[rel]))
    (tmp_path / "notes.txt").write_text("top-level files are not identities")
    (tmp_path / "a_id" / "readme.txt").write_text("not an image")
    return str(tmp_path), files


def test_image_folder_labels_follow_sorted_folders(folder):
    root, files = folder
    listed = list_image_folder(root)
    assert listed == [
        (storage.join(root, "a_id/x.png"), 0),
        (storage.join(root, "b_id/1.png"), 1),
        (storage.join(root, "b_id/2.PNG"), 1),
        (storage.join(root, "c_id/sub/y.png"), 2),
    ]
    decoded = list(iter_image_folder(root))
    assert [label for _, label in decoded] == [0, 1, 1, 2]
    for (image, _), rel in zip(
        decoded, ["a_id/x.png", "b_id/1.png", "b_id/2.PNG", "c_id/sub/y.png"], strict=True
    ):
        np.testing.assert_array_equal(image, files[rel])


def test_pack_folder_into_recordio(folder, tmp_path_factory):
    root, _ = folder
    out = tmp_path_factory.mktemp("rec")
    listed = list_image_folder(root)
    write_recordio(
        str(out / "t.rec"), str(out / "t.idx"), ((storage.read_bytes(u), label) for u, label in listed)
    )
    reader = RecordIOReader(str(out / "t.rec"), str(out / "t.idx"))
    assert [reader[i] for i in range(len(reader))] == [(storage.read_bytes(u), label) for u, label in listed]


def test_image_folder_errors(tmp_path):
    with pytest.raises(ValueError, match=r"missing: image folder does not exist"):
        list_image_folder(str(tmp_path / "missing"))
    (tmp_path / "flat.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"no identity folders"):
        list_image_folder(str(tmp_path))
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "1.png").write_bytes(b"x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"identity folders without images \['empty'\]"):
        list_image_folder(str(tmp_path))
