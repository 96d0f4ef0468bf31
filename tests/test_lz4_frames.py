"""Strict LZ4 frames (FORMAT.md §6.3): every frame a real writer produces reads, a cut or tampered one does not.

Writers: python-lz4 (the `lz4` package, a test dependency), the `lz4` command line (Debian's `lz4` package; those
tests skip when it is not installed) and tenso 0.24.0 (the reference venv, .refvenvs/tenso-0.24.0; skips without
it). Each frame goes into a v4 dense packet with the COMPRESSION flag, whose body is the frame as written.
"""

from __future__ import annotations

import itertools
import pickle
import shutil
import struct
import subprocess

import numpy as np
import pytest

import tensohelp

lz4_frame = pytest.importorskip("lz4.frame")

# A compressible body (many LZ4 blocks at 64 KiB) and a tiny one (one block, stored uncompressed).
BIG = (np.arange(300_000, dtype=np.float32) % 1000).astype(np.float32)
SMALL = np.array([1.0, 2.0, 3.0], dtype=np.float32)


def packet(arr: np.ndarray, frame: bytes) -> bytes:
    """A v4 dense compressed packet of `arr`'s dtype and shape whose body is `frame`."""
    import tenso

    prefix = bytes(tenso.dumps(arr, compress=True))
    # 1-D: 10-byte header + 4-byte shape, padded to 64; the body (the frame) starts there.
    assert prefix[64:68] == b"\x04\x22\x4d\x18"
    return prefix[:64] + frame


def check_reads(arr: np.ndarray, frame: bytes) -> None:
    import tenso

    got = tenso.loads(packet(arr, frame))
    np.testing.assert_array_equal(got, arr)
    again = tenso.loads(bytearray(packet(arr, frame)), copy=True)
    np.testing.assert_array_equal(again, arr)


PY_LZ4 = [
    dict(zip(("block_linked", "content_checksum", "block_checksum", "store_size"), flags))
    for flags in itertools.product((False, True), repeat=4)
]


@pytest.mark.parametrize("arr", [BIG, SMALL], ids=["big", "small"])
@pytest.mark.parametrize("kw", PY_LZ4, ids=lambda kw: "-".join(k for k, v in kw.items() if v) or "plain")
def test_python_lz4_frames_read(arr, kw):
    check_reads(arr, lz4_frame.compress(arr.tobytes(), **kw))


@pytest.mark.parametrize("block_size", [lz4_frame.BLOCKSIZE_MAX256KB, lz4_frame.BLOCKSIZE_MAX4MB])
def test_python_lz4_block_sizes_read(block_size):
    check_reads(BIG, lz4_frame.compress(BIG.tobytes(), block_size=block_size, store_size=True))


LZ4_CLI = shutil.which("lz4")
CLI_FLAGS = [
    [],  # lz4's defaults: linked blocks, content checksum, no content size, 4 MB blocks
    ["--content-size"],
    ["-BD", "-B4"],  # linked 64 KB blocks
    ["-BI", "-B4", "-BX"],  # independent 64 KB blocks with block checksums
    ["--no-frame-crc", "-B5"],
    ["-BX", "--content-size", "-B6", "-9"],
]


@pytest.mark.skipif(LZ4_CLI is None, reason="the lz4 command line (Debian package lz4) is not installed")
@pytest.mark.parametrize("flags", CLI_FLAGS, ids=lambda f: " ".join(f) or "defaults")
@pytest.mark.parametrize("arr", [BIG, SMALL], ids=["big", "small"])
def test_lz4_command_line_frames_read(arr, flags):
    frame = subprocess.run(
        [LZ4_CLI, "-c", "-q", *flags], input=arr.tobytes(), capture_output=True, check=True
    ).stdout
    assert frame[:4] == b"\x04\x22\x4d\x18"
    check_reads(arr, frame)


REF_WRITER = """
import sys, numpy as np, tenso
n = int(sys.argv[1])
arr = (np.arange(n, dtype=np.float32) % 1000).astype(np.float32)
sys.stdout.buffer.write(tenso.dumps(arr, compress=True))
"""


@pytest.mark.parametrize("n", [3, 300_000, 3_000_000])
def test_tenso_0_24_0_frames_read(n):
    import tenso

    py = tensohelp.REFVENVS / "tenso-0.24.0" / "bin" / "python"
    if not py.exists():
        pytest.skip(f"{py} missing: run scripts/refvenvs.sh")
    data = subprocess.run([str(py), "-c", REF_WRITER, str(n)], capture_output=True, check=True, timeout=120).stdout
    expected = (np.arange(n, dtype=np.float32) % 1000).astype(np.float32)
    np.testing.assert_array_equal(tenso.loads(data), expected)
    np.testing.assert_array_equal(tenso.loads(bytearray(data), copy=True), expected)


# ---- what must not pass -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [{}, {"content_checksum": True}, {"block_linked": True, "store_size": True}],
                         ids=["plain", "content-checksum", "linked-sized"])
def test_frame_cut_before_its_end_is_rejected(kw):
    import tenso

    frame = lz4_frame.compress(BIG.tobytes(), **kw)
    tail = 8 if kw.get("content_checksum") else 4
    for cut in range(1, tail + 1):
        with pytest.raises(tenso.TensoFormatError, match="end mark") as info:
            tenso.loads(packet(BIG, frame[:-cut]))
        assert type(info.value) is tenso.TensoFormatError
    # Bytes after a complete frame are still ignored (trailing zeros of a shared-memory segment).
    check_reads(BIG, frame + bytes(16))


@pytest.mark.parametrize("delta", [-4, 4, -len(SMALL.tobytes())])
def test_content_size_that_disagrees_is_rejected(delta):
    import tenso

    frame = bytearray(lz4_frame.compress(SMALL.tobytes(), store_size=True))
    declared = len(SMALL.tobytes()) + delta
    frame[6:14] = struct.pack("<Q", declared)
    xxhash = pytest.importorskip("xxhash")
    frame[14] = (xxhash.xxh32_intdigest(bytes(frame[4:14])) >> 8) & 0xFF
    with pytest.raises(tenso.TensoFormatError, match=f"content size field says {declared} bytes") as info:
        tenso.loads(packet(SMALL, bytes(frame)))
    # The message names both numbers, and the error pickles as Ray sends it.
    assert "decode to 12" in str(info.value)
    back = pickle.loads(pickle.dumps(info.value))
    assert type(back) is tenso.TensoFormatError and str(back) == str(info.value)


def test_content_checksum_mismatch_is_rejected():
    import tenso

    frame = bytearray(lz4_frame.compress(BIG.tobytes(), content_checksum=True))
    frame[-1] ^= 0x55
    with pytest.raises(tenso.TensoFormatError, match="content checksum"):
        tenso.loads(packet(BIG, bytes(frame)))
