"""insightface verification .bin files: format, restricted unpickling, validation and decoding."""

from __future__ import annotations

import io
import os
import pickle
import struct

import numpy as np
import pytest
from PIL import Image

from facesynth.binsets import decode_images, read_bin, write_bin


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def pair_set() -> tuple[np.ndarray, list[bytes], list[bool]]:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(4, 112, 112, 3), dtype=np.uint8)
    return images, [_png(im) for im in images], [True, False]


def _py2_pickle(bins: list[bytes], issame: list[bool]) -> bytes:
    """Opcodes a Python 2 ``pickle.dump((bins, issame), protocol=2)`` writes: bytes as py2 ``str``."""
    out = bytearray(b"\x80\x02](")
    for data in bins:
        out += b"T" + struct.pack("<I", len(data)) + data  # BINSTRING
    out += b"e](" + b"".join(b"\x88" if f else b"\x89" for f in issame) + b"e\x86."
    return bytes(out)


def test_round_trip_matches_insightface_pickle(tmp_path, pair_set):
    images, bins, issame = pair_set
    path = str(tmp_path / "set.bin")
    write_bin(path, bins, issame)
    assert (tmp_path / "set.bin").read_bytes() == pickle.dumps((bins, issame), protocol=4)
    got_bins, got_issame = read_bin(path)
    assert got_bins == bins
    assert got_issame.dtype == np.bool_ and got_issame.tolist() == issame
    np.testing.assert_array_equal(decode_images(got_bins), images)


@pytest.mark.parametrize("protocol", [0, 2, 5])
@pytest.mark.parametrize("flags", ["list_np_bool", "np_array"])
def test_numpy_bools_and_other_protocols_accepted(tmp_path, pair_set, protocol, flags):
    _, bins, issame = pair_set
    issame_obj = [np.bool_(f) for f in issame] if flags == "list_np_bool" else np.array(issame)
    path = tmp_path / "set.bin"
    path.write_bytes(pickle.dumps((bins, issame_obj), protocol=protocol))
    got_bins, got_issame = read_bin(str(path))
    assert got_bins == bins and got_issame.tolist() == issame


def test_python2_pickle_read_with_bytes_fallback(tmp_path, pair_set):
    _, bins, issame = pair_set
    path = tmp_path / "py2.bin"
    path.write_bytes(_py2_pickle(bins, issame))
    with pytest.raises(UnicodeDecodeError):
        pickle.loads(path.read_bytes())  # what insightface's first attempt hits
    got_bins, got_issame = read_bin(str(path))
    assert got_bins == bins and got_issame.tolist() == issame


class _Exploit:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_pickle_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps(([_Exploit(str(marker))], []), protocol=4))
    with pytest.raises(ValueError, match=r"evil\.bin: refused to unpickle global (posix|nt)\.system"):
        read_bin(str(path))
    assert not marker.exists()
    pickle.loads(path.read_bytes())  # the same file through a plain unpickler does run the command
    assert marker.exists()


def test_codecs_encode_only_for_latin1(tmp_path):
    path = tmp_path / "rot13.bin"
    path.write_bytes(b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x05\x00\x00\x00rot13\x86R.")
    with pytest.raises(
        ValueError, match=r"rot13\.bin: refused to unpickle _codecs\.encode with encoding 'rot13'"
    ):
        read_bin(str(path))


def test_truncated_file(tmp_path, pair_set):
    _, bins, issame = pair_set
    path = tmp_path / "cut.bin"
    path.write_bytes(pickle.dumps((bins, issame), protocol=4)[:-100])
    with pytest.raises(ValueError, match=r"cut\.bin: truncated or corrupt"):
        read_bin(str(path))


def test_wrong_pair_counts(tmp_path, pair_set):
    _, bins, issame = pair_set
    path = tmp_path / "odd.bin"
    path.write_bytes(pickle.dumps((bins[:3], issame), protocol=4))
    with pytest.raises(
        ValueError, match=r"odd\.bin: 3 images for 2 issame flags; expected 2 images per pair \(4\)"
    ):
        read_bin(str(path))
    with pytest.raises(ValueError, match=r"5 images for 2 issame flags"):
        write_bin(str(tmp_path / "new.bin"), bins + bins[:1], issame)
    assert not (tmp_path / "new.bin").exists()


def test_non_bool_flags_and_non_bytes_images(tmp_path, pair_set):
    _, bins, issame = pair_set
    path = tmp_path / "ints.bin"
    path.write_bytes(pickle.dumps((bins, [1, 0]), protocol=4))
    with pytest.raises(
        ValueError, match=r"ints\.bin: issame must be a flat sequence of bools, got dtype int64"
    ):
        read_bin(str(path))
    path.write_bytes(pickle.dumps(([*bins[:3], (1, 2)], issame), protocol=4))
    with pytest.raises(ValueError, match=r"image 3 is a tuple, expected encoded image bytes"):
        read_bin(str(path))


def test_non_image_bytes_named_on_decode(tmp_path, pair_set):
    _, bins, issame = pair_set
    path = str(tmp_path / "junk.bin")
    write_bin(path, [bins[0], b"definitely not an image", *bins[2:]], issame)
    got_bins, _ = read_bin(path)  # reading stays lazy
    with pytest.raises(ValueError, match=r"verification image 1: not a decodable image"):
        decode_images(got_bins)


def test_decode_resizes_short_side_like_insightface():
    rng = np.random.default_rng(1)
    big = rng.integers(0, 256, size=(224, 224, 3), dtype=np.uint8)
    (got,) = decode_images([_png(big)], size=112)
    block_mean = big.reshape(112, 2, 112, 2, 3).astype(np.float64).mean(axis=(1, 3))
    np.testing.assert_array_equal(got, np.floor(block_mean + 0.5))  # area average, rounded half up
    tall = np.zeros((120, 100, 3), dtype=np.uint8)  # short side 100 -> 112 x 134: not square
    with pytest.raises(ValueError, match=r"verification image 0: shape \(134, 112\) after resizing"):
        decode_images([_png(tall)], size=112)
