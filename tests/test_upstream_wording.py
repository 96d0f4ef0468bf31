"""Error messages start with upstream tenso's words and keep our detail after them.

Code written against tenso 0.19.4 / 0.24.0 matches on these messages (``pytest.raises(match=...)`` is case- and
word-sensitive); scripts/upstream-tests.sh runs upstream's own suites. Here each wording is pinned with the class
it comes with, including the cases whose upstream test cannot run against our package (see
tests/upstream/expected-failures.txt).
"""

from __future__ import annotations

import io
import os
import struct

import numpy as np
import pytest

import tenso
from tenso.config import MAX_ELEMENTS, MAX_NDIM


def _v4_header(flags: int, dtype: int, ndim: int) -> bytes:
    return struct.pack("<4sBHBBB", b"TNSO", 4, flags, dtype, ndim, 0)


def test_packet_too_short_and_invalid_packet():
    with pytest.raises(tenso.TensoFormatError, match=r"^Packet too short: needs at least 8 bytes, 5 available$"):
        tenso.get_packet_info(b"short")
    with pytest.raises(tenso.TensoFormatError, match=r"^Invalid tenso packet: magic is 4a 55 4e 4b"):
        tenso.get_packet_info(b"JUNK____")
    with pytest.raises(tenso.TensoFormatError, match="^Invalid tenso packet"):
        tenso.loads(b"JUNK____" + b"\x00" * 100)


def test_limits():
    packet = _v4_header(1, 1, MAX_NDIM + 1) + b"\x00" * 200
    with pytest.raises(tenso.TensoFormatError, match=rf"^Packet exceeds maximum dimensions: {MAX_NDIM + 1} dimensions"):
        tenso.loads(packet)
    packet = _v4_header(1, 1, 1) + struct.pack("<I", MAX_ELEMENTS + 1) + b"\x00" * 200
    with pytest.raises(tenso.TensoFormatError, match=r"^Packet exceeds maximum elements: \d+ elements"):
        tenso.loads(packet)


def test_integrity_keeps_the_digests():
    packet = bytearray(tenso.dumps(np.arange(16, dtype=np.int32), check_integrity=True))
    packet[70] ^= 0xFF
    with pytest.raises(
        tenso.TensoIntegrityError, match=r"^Integrity check failed: xxh3 mismatch \(footer 0x[0-9a-f]{16}, computed"
    ):
        tenso.loads(bytes(packet))


def test_oversized_dimension_mentions_32_bit():
    huge = np.broadcast_to(np.zeros(1, dtype=np.uint8), (0x100000003,))
    with pytest.raises(ValueError, match="32-bit"):
        tenso.dumps(huge)


def test_stream_ends():
    with pytest.raises(tenso.TensoTruncatedError, match="^Stream ended during header read: got 3 bytes"):
        tenso.read_stream(io.BytesIO(b"TNS"))
    packet = bytes(tenso.dumps(np.zeros((10, 10), dtype=np.float32)))
    with pytest.raises(tenso.TensoTruncatedError, match="^Stream ended during body read"):
        tenso.read_stream(io.BytesIO(packet[:-1]))


def test_not_a_string_tensor_packet():
    with pytest.raises(ValueError, match="^Not a StringTensor packet"):
        tenso.StringTensor.loads(tenso.dumps(np.zeros(3)))


def test_invalid_cache_magic_is_a_format_error():
    name = f"tenso_wording_{os.getpid()}"
    path = f"/dev/shm/{name}"
    with open(path, "wb") as f:
        f.write(b"XXXX" + b"\x00" * (1 << 20))
    try:
        with pytest.raises(tenso.TensoFormatError, match="^Invalid TensoCache magic"):
            tenso.TensoCache(name=name, create=False)
    finally:
        os.unlink(path)
    small = f"{name}_small"
    with open(f"/dev/shm/{small}", "wb") as f:
        f.write(b"XXXX" + b"\x00" * 60)
    try:
        with pytest.raises(tenso.TensoFormatError, match="^Invalid TensoCache magic"):
            tenso.TensoCache(name=small, create=False)
    finally:
        os.unlink(f"/dev/shm/{small}")


def test_upstream_int4_helpers_use_the_wire_packing():
    from tenso.quantize import _pack_int4, _unpack_int4

    packed = _pack_int4(np.array([-8, -4, -1, 3, 7], dtype=np.int8).view(np.uint8))
    assert packed.tobytes() == bytes.fromhex("c83f07")  # FORMAT.md §9.5
    np.testing.assert_array_equal(_unpack_int4(packed, 5, signed=True), [-8, -4, -1, 3, 7])
    assert _unpack_int4(packed, 5, signed=False).dtype == np.uint8
    with pytest.raises(ValueError):
        _unpack_int4(packed, 7, signed=True)


@pytest.mark.parametrize("alignment", [64, 128, 4096])
def test_copied_bodies_keep_the_packet_alignment(alignment):
    # A body misaligned for its dtype (the packet starts at an odd address) is copied: into memory aligned like the
    # packet's body, as upstream 0.24.0 does (its test_loads_custom_alignment_honored).
    x = np.arange(50, dtype=np.float32)
    raw = b"\x00" + bytes(tenso.dumps(x, alignment=alignment))
    out = tenso.loads(memoryview(raw)[1:])
    assert out.ctypes.data % alignment == 0
    np.testing.assert_array_equal(out, x)
    fresh = tenso.loads(tenso.dumps(x, alignment=alignment), copy=True)
    assert fresh.ctypes.data % alignment == 0 and fresh.flags.writeable


def test_copies_cap_large_alignments_at_a_page():
    # A packet may claim any power of two up to 2^63; a copy honours at most 4096 (more buys nothing, and the slack
    # would be memory the packet makes us allocate).
    x = np.arange(5, dtype=np.float32)
    raw = b"\x00" + bytes(tenso.dumps(x, alignment=1 << 16))
    out = tenso.loads(memoryview(raw)[1:])
    assert out.ctypes.data % 4096 == 0
    assert out.base is not None and out.base.nbytes < out.nbytes + 4096  # the slack, not 64 KiB of it
    np.testing.assert_array_equal(out, x)
