#!/usr/bin/env python3
"""Generate the hostile-packet corpus under tests/hostile/corpus/ and its manifest.

Run:  .venv/bin/python tests/hostile/make_hostile.py
Needs numpy, lz4 and xxhash (no tenso): packets are built by hand from FORMAT.md.
The output is deterministic; commit the generated files, never edit them by hand.

Manifest entry: {"file", "expected" (exception class name for tenso.loads),
"stream" (class names acceptable from tenso.read_stream over a BytesIO; "None" = returns None),
"category", "description"}.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import struct
import sys

import lz4.frame
import xxhash

HERE = pathlib.Path(__file__).resolve().parent
OUT = HERE / "corpus"

FMT = "TensoFormatError"
INTEG = "TensoIntegrityError"
TRUNC = "TensoTruncatedError"

# flags
ALIGNED, INTEGRITY, COMPRESSION, SPARSE, BUNDLE = 0x1, 0x2, 0x4, 0x8, 0x10
CSR, CSC, CUST_ALIGN, STRING, RAGGED, IPC = 0x20, 0x40, 0x80, 0x100, 0x200, 0x400


def header(version: int, flags: int, dtype: int, count: int, reserved: int = 0, magic: bytes = b"TNSO") -> bytes:
    if version == 4:
        return magic + bytes([4]) + struct.pack("<H", flags) + bytes([dtype, count, reserved])
    return magic + bytes([version, flags & 0xFF, dtype, count])


def hlen(version: int) -> int:
    return 10 if version == 4 else 8


def pad_to(prefix: bytes, align: int) -> bytes:
    return prefix + b"\x00" * ((align - len(prefix) % align) % align)


def dense(version=4, dtype=1, shape=(3,), body=None, itemsize=4, integrity=False, compress=False,
          alignment=64, flags_extra=0, footer=None, raw_shape=None, exponent=None) -> bytes:
    flags = flags_extra
    if alignment == 64 and exponent is None:
        flags |= ALIGNED
    else:
        flags |= CUST_ALIGN
    if integrity:
        flags |= INTEGRITY
    if compress:
        flags |= COMPRESSION
    shape_bytes = raw_shape if raw_shape is not None else b"".join(struct.pack("<I", d) for d in shape)
    ndim = len(shape) if raw_shape is None else len(raw_shape) // 4
    pre = header(version, flags, dtype, ndim) + shape_bytes
    if flags & CUST_ALIGN:
        e = exponent if exponent is not None else alignment.bit_length() - 1
        pre += bytes([e])
        align = (1 << e) if e <= 12 else 1  # hostile exponents: no padding
    else:
        align = 64
    pre = pad_to(pre, align)
    if body is None:
        n = 1
        for d in shape:
            n *= d
        body = bytes(range(256)) * (n * itemsize // 256) + bytes(range((n * itemsize) % 256))
    if compress:
        body = lz4.frame.compress(body) if not isinstance(body, CompressedBody) else body.data
    foot = b""
    if integrity:
        foot = struct.pack("<Q", xxhash.xxh3_64_intdigest(body)) if footer is None else footer
    return pre + body + foot


class CompressedBody:
    def __init__(self, data: bytes):
        self.data = data


def bundle(version=4, entries=(), count=None, flags=BUNDLE) -> bytes:
    out = header(version, flags, 0, len(entries) if count is None else count)
    for k, v in entries:
        kb = k if isinstance(k, bytes) else k.encode()
        out += struct.pack("<I", len(kb)) + kb + struct.pack("<I", len(v)) + v
    return out


def sparse(version=4, flag=CSR, shape=(2, 2), comps=None, ndim=None, raw_ns=None) -> bytes:
    out = header(version, flag, 0, len(shape) if ndim is None else ndim)
    out += b"".join(struct.pack("<I", d) for d in shape)
    for i, c in enumerate(comps):
        n = len(c) if raw_ns is None else raw_ns[i]
        out += struct.pack("<I", n) + c
    return out


def i32(vals, version=4):
    return dense(version, 2, (len(vals),), struct.pack(f"<{len(vals)}i", *vals))


def f32(vals, version=4):
    return dense(version, 1, (len(vals),), struct.pack(f"<{len(vals)}f", *vals))


def f64(vals, version=4):
    return dense(version, 3, (len(vals),), struct.pack(f"<{len(vals)}d", *vals))


def csr_ok(version=4):
    return sparse(version, CSR, (2, 2), [f32([1.5, 2.5], version), i32([1, 0], version), i32([0, 1, 2], version)])


def quant(version=4, qdtype=18, shape=(5,), scheme=0, axis=0, group_size=0, scales=(2 / 15,), zps=(-0.5,),
          codes=b"\xc8\x3f\x07", integrity=False, num_scales=None, flags_extra=0, meta_override=None) -> bytes:
    flags = ALIGNED | flags_extra | (INTEGRITY if integrity else 0)
    pre = header(version, flags, qdtype, len(shape)) + b"".join(struct.pack("<I", d) for d in shape)
    n = len(scales) if num_scales is None else num_scales
    meta = bytes([scheme]) + (bytes([axis]) if version == 4 else b"") + struct.pack("<II", group_size, n)
    meta += struct.pack(f"<{len(scales)}f", *scales) + struct.pack(f"<{len(zps)}f", *zps)
    if meta_override is not None:
        meta = meta_override
    pre = pad_to(pre + meta, 64)
    foot = b""
    if integrity:
        h = xxhash.xxh3_64_intdigest((meta + codes) if version == 4 else codes)
        foot = struct.pack("<Q", h)
    return pre + codes + foot


def strings(items=("hi", "", "wörld"), offsets=None, payload=None, integrity=False, flags_extra=0, dtype=20,
            kind_flag=STRING) -> bytes:
    enc = [s.encode() if isinstance(s, str) else s for s in items]
    if offsets is None:
        offsets = [0]
        for e in enc:
            offsets.append(offsets[-1] + len(e))
    if payload is None:
        payload = b"".join(enc)
    flags = kind_flag | ALIGNED | flags_extra | (INTEGRITY if integrity else 0)
    pre = pad_to(header(4, flags, dtype, 1) + struct.pack("<I", len(offsets) - 1), 64)
    body = struct.pack(f"<{len(offsets)}Q", *offsets) + payload
    foot = struct.pack("<Q", xxhash.xxh3_64_intdigest(body)) if integrity else b""
    return pre + body + foot


# ------------------------------------------------------------------------------------------------------------

ENTRIES: list[dict] = []


def add(name: str, data: bytes, expected: str, category: str, description: str, stream=None) -> None:
    if stream is None:
        stream = sorted({expected, TRUNC}) if expected != TRUNC else [TRUNC]
    fname = f"{name}.tenso"
    assert not (OUT / fname).exists(), name
    (OUT / fname).write_bytes(data)
    ENTRIES.append({"file": fname, "expected": expected, "stream": stream, "category": category,
                    "description": description, "size": len(data)})


def section14() -> None:
    cat = "format14"
    add("short_7_bytes", b"TNSO\x04\x01\x00", FMT, cat, "fewer than 8 bytes")
    add("short_empty", b"", FMT, cat, "empty buffer", stream=["None"])
    add("v4_header_9_bytes", header(4, 1, 1, 1)[:9], FMT, cat, "v4 header cut to 9 bytes")
    add("bad_magic", header(4, 1, 1, 1, magic=b"TNSX") + b"\x03\x00\x00\x00" + b"\x00" * 50 + b"\x00" * 12,
        FMT, cat, "bad magic", stream=[FMT])
    add("bad_magic_zeros", b"\x00" * 80, FMT, cat, "all-zero packet", stream=[FMT])
    good = dense(4, 1, (3,))
    for v in (0, 1, 2, 5, 255):
        pkt = bytearray(good)
        pkt[4] = v
        add(f"version_{v}", bytes(pkt), FMT, cat, f"version byte {v}", stream=[FMT])
    pkt3 = bytearray(dense(3, 1, (3,)))
    pkt3[4] = 2
    add("version_2_v3layout", bytes(pkt3), FMT, cat, "v3 layout with version 2", stream=[FMT])
    for code in (0, 20, 22, 99, 255):
        add(f"dtype_code_{code}", dense(4, code, (3,), b"\x00" * 12), FMT, cat, f"dense with dtype code {code}",
            stream=[FMT])
        add(f"dtype_code_{code}_v3", dense(3, code, (3,), b"\x00" * 12), FMT, cat, f"v3 dense dtype {code}",
            stream=[FMT])
    add("ndim_33", dense(4, 5, (1,) * 33, b"\x00"), FMT, cat, "ndim 33", stream=[FMT])
    add("ndim_255", header(4, ALIGNED, 5, 255) + b"\x01\x00\x00\x00" * 255 + b"\x00" * 64, FMT, cat, "ndim 255",
        stream=[FMT])
    add("elements_over_1e9", dense(4, 5, (1_000_000_001,), b""), FMT, cat, "N = 1e9+1 (uint8), no body",
        stream=[FMT])
    add("elements_2e9_2d", dense(4, 1, (100_000, 20_000), b""), FMT, cat, "N = 2e9 via 2-D shape", stream=[FMT])
    # products that wrap mod 2^64: 2^32-1 ^ 3 ~ 2^96; 2^16 * 2^16 * 2^16 * 2^16 = 2^64 -> 0 mod 2^64
    add("shape_wraps_to_zero", dense(4, 5, (65536, 65536, 65536, 65536), b""), FMT, cat,
        "shape product 2^64 wraps to 0", stream=[FMT])
    add("shape_wraps_to_one", dense(4, 5, (0xFFFFFFFF,) * 3 + (0,) * 0, b""), FMT, cat,
        "shape (2^32-1)^3 overflows u64", stream=[FMT])
    add("shape_wrap_times_itemsize", dense(4, 14, (2**31, 2**31, 4), b""), FMT, cat,
        "N*itemsize overflows u64 (complex128)", stream=[FMT])
    add("shape_truncated", header(4, ALIGNED, 1, 3) + b"\x03\x00\x00\x00\x02\x00", FMT, cat,
        "shape cut inside the second dim")
    full = dense(4, 1, (3,))
    add("body_short_1", full[:-1], FMT, cat, "body one byte short")
    fi = dense(4, 1, (3,), integrity=True)
    add("footer_missing", fi[:-8], FMT, cat, "integrity footer missing")
    add("footer_half", fi[:-4], FMT, cat, "integrity footer 4 bytes")
    add("footer_wrong", fi[:-8] + b"\x00" * 8, INTEG, cat, "integrity footer zeroed")
    bad = bytearray(fi)
    bad[64] ^= 0x01
    add("body_bitflip_integrity", bytes(bad), INTEG, cat, "body bit flipped under integrity")
    fi3 = dense(3, 1, (3,), integrity=True)
    add("footer_wrong_v3", fi3[:-8] + b"\xff" * 8, INTEG, cat, "v3 integrity footer wrong")
    big3 = dense(3, 5, (1_100_000,), bytes(1_100_000), integrity=True, footer=b"\x01" * 8)
    add("footer_wrong_v3_large", big3, INTEG, cat, "v3 >=1MiB body, neither plain nor chunked footer")
    add("exponent_64", dense(4, 5, (4,), b"\x01\x02\x03\x04", exponent=64), FMT, cat, "alignment exponent 64",
        stream=[FMT, TRUNC])
    add("exponent_200", dense(4, 5, (4,), b"\x01\x02\x03\x04", exponent=200), FMT, cat, "alignment exponent 200",
        stream=[FMT, TRUNC])
    add("exponent_missing", header(4, CUST_ALIGN, 5, 1) + b"\x04\x00\x00\x00", FMT, cat,
        "CUST_ALIGN but packet ends before exponent")
    # LZ4
    add("lz4_garbage", dense(4, 1, (3,), body=CompressedBody(b"\xde\xad\xbe\xef" * 4), compress=True), FMT, cat,
        "compressed body is garbage", stream=[FMT])
    add("lz4_empty", dense(4, 1, (3,), body=CompressedBody(b""), compress=True), FMT, cat,
        "compressed body empty", stream=[FMT])
    add("lz4_truncated_frame", dense(4, 1, (256,), body=CompressedBody(lz4.frame.compress(bytes(1024))[:-6]),
                                     compress=True), FMT, cat, "LZ4 frame cut short", stream=[FMT])
    add("lz4_decompressed_short", dense(4, 1, (16,), body=CompressedBody(lz4.frame.compress(bytes(60))),
                                        compress=True), FMT, cat, "decompressed 60 < 64 bytes", stream=[FMT])
    add("lz4_decompressed_long", dense(4, 1, (16,), body=CompressedBody(lz4.frame.compress(bytes(68))),
                                       compress=True), FMT, cat, "decompressed 68 > 64 bytes", stream=[FMT])
    add("lz4_bomb_small_shape", dense(4, 5, (16,), body=CompressedBody(lz4.frame.compress(bytes(64 << 20))),
                                      compress=True), FMT, cat,
        "LZ4 bomb: ~260 KB frame decompresses to 64 MiB for a 16-byte array", stream=[FMT])
    tiny = lz4.frame.compress(bytes(1 << 20), store_size=True)
    hacked = bytearray(tiny)
    # FLG has content size (bit 3); patch the 8-byte content size to 2^60 (then the header checksum is wrong
    # too, which is also a format error)
    hacked[6:14] = struct.pack("<Q", 1 << 60)
    add("lz4_bomb_content_size", dense(4, 5, (1 << 20,), body=CompressedBody(bytes(hacked)), compress=True), FMT,
        cat, "LZ4 frame claiming 2^60 content size", stream=[FMT])
    add("lz4_bomb_huge_shape", dense(4, 3, (999_999_999,), body=CompressedBody(lz4.frame.compress(bytes(64))),
                                     compress=True), FMT, cat,
        "tiny frame for a 999,999,999-element float64 array (8 GB claim)", stream=[FMT])
    add("lz4_integrity_wrong", dense(4, 1, (3,), integrity=True, compress=True, footer=b"\x00" * 8), INTEG, cat,
        "compressed packet with wrong footer", stream=[INTEG, FMT])
    # bundles
    leaf = dense(4, 5, (2,), b"\x01\x02")
    good_b = bundle(4, [("a", leaf)])
    bt = bundle(4, [("a", leaf), ("b", leaf)])
    add("bundle_truncated_in_entry", bt[: len(bt) - 10], FMT, cat, "bundle cut inside the second leaf")
    lying = bytearray(good_b)
    lying[10 + 4 + 1: 10 + 4 + 1 + 4] = struct.pack("<I", len(leaf) + 1000)
    add("bundle_vlen_beyond_end", bytes(lying), FMT, cat, "bundle vlen points past the end")
    lying2 = bytearray(good_b)
    lying2[10 + 4 + 1: 10 + 4 + 1 + 4] = struct.pack("<I", 0xFFFFFFFF)
    add("bundle_vlen_huge", bytes(lying2), FMT, cat, "bundle vlen 2^32-1")
    lying3 = bytearray(good_b)
    lying3[10:14] = struct.pack("<I", 0xFFFFFFF0)
    add("bundle_klen_huge", bytes(lying3), FMT, cat, "bundle klen 2^32-16")
    short_v = bytearray(good_b)
    short_v[10 + 4 + 1: 10 + 4 + 1 + 4] = struct.pack("<I", len(leaf) - 1)
    add("bundle_vlen_short", bytes(short_v), FMT, cat, "bundle vlen one byte shorter than the leaf",
        stream=[FMT])
    add("bundle_vlen_long_inner_trailing", bundle(4, [("a", leaf + b"\x00")]) , FMT, cat,
        "leaf does not fill its vlen slice (trailing byte inside container)", stream=[FMT])
    add("bundle_key_bad_utf8", bundle(4, [(b"\xff\xfe", leaf)]), FMT, cat, "bundle key not UTF-8",
        stream=[FMT])
    add("bundle_key_surrogate", bundle(4, [(b"\xed\xa0\x80", leaf)]), FMT, cat, "bundle key UTF-8 surrogate",
        stream=[FMT])
    add("bundle_count_too_big", bundle(4, [("a", leaf)], count=3), FMT, cat, "count 3 but one entry")
    add("bundle_count_255_empty", bundle(4, [], count=255), FMT, cat, "count 255, no entries")
    add("bundle_empty_leaf", bundle(4, [("a", b"")]), FMT, cat, "bundle leaf of length 0", stream=[FMT])
    add("bundle_leaf_garbage", bundle(4, [("a", b"XXXXXXXXXXXXXXXX")]), FMT, cat, "bundle leaf bad magic",
        stream=[FMT])
    add("bundle_v3_truncated", bundle(3, [("a", dense(3, 5, (2,), b"\x01\x02"))])[:-30], FMT, cat,
        "v3 bundle truncated")
    # nesting
    nested = dense(4, 5, (1,), b"\x07")
    for _ in range(100):
        nested = bundle(4, [("k", nested)])
    add("bundle_nested_100", nested, FMT, cat, "bundle nested 100 levels (limit 64)", stream=[FMT])
    nested = dense(4, 5, (1,), b"\x07")
    for _ in range(65):
        nested = bundle(4, [("k", nested)])
    add("bundle_nested_65", nested, FMT, cat, "bundle nested 65 levels (limit 64)", stream=[FMT])
    # 100 000 levels: build from the inside out with lengths (fast, ~1.6 MB)
    parts_prefix = []
    inner_len = 0
    inner = b""
    depth = 100_000
    # each level: header(10) + klen(4) + 'k'(1) + vlen(4) + inner
    lens = []
    L = 0
    for _ in range(depth):
        lens.append(L)
        L = 19 + L
    chunks = []
    for lvl in range(depth):
        inner_len = lens[depth - 1 - lvl]
        chunks.append(header(4, BUNDLE, 0, 1) + b"\x01\x00\x00\x00k" + struct.pack("<I", inner_len))
    # innermost value is an empty slice -> never reached because depth limit hits first
    add("bundle_nested_100000", b"".join(chunks), FMT, cat, "bundle nested 100000 levels (1.9 MB)",
        stream=[FMT])
    nested_sparse = csr_ok(4)
    for _ in range(70):
        nested_sparse = bundle(4, [("s", nested_sparse)])
    add("bundle_nested_70_sparse", nested_sparse, FMT, cat, "70 bundle levels around a sparse", stream=[FMT])
    # sparse
    add("sparse_two_components", sparse(4, CSR, (2, 2), [f32([1.5, 2.5]), i32([1, 0])]), FMT, cat,
        "sparse with 2 components")
    add("sparse_3d_shape", sparse(4, CSR, (2, 2, 2), [f32([1.5, 2.5]), i32([1, 0]), i32([0, 1, 2])]), FMT, cat,
        "sparse with 3-D shape", stream=[FMT, TRUNC])
    add("sparse_float_indices", sparse(4, CSR, (2, 2), [f32([1.5, 2.5]), f32([1, 0]), i32([0, 1, 2])]), FMT, cat,
        "CSR with float32 indices", stream=[FMT])
    add("sparse_float_indptr", sparse(4, CSR, (2, 2), [f32([1.5, 2.5]), i32([1, 0]), f64([0, 1, 2])]), FMT, cat,
        "CSR with float64 indptr", stream=[FMT])
    add("sparse_coo_float_rows", sparse(4, SPARSE, (2, 2), [f32([1.5]), f32([1.0]), i32([0])]), FMT, cat,
        "COO with float row indices", stream=[FMT])
    add("sparse_csr_nonmonotonic", sparse(4, CSR, (2, 2), [f32([1, 2, 3, 4, 5]), i32([0, 1, 0, 1, 0]),
                                                            i32([0, 5, 2])]), FMT, cat,
        "CSR indptr [0,5,2] (segfaults upstream .toarray())", stream=[FMT])
    add("sparse_csr_indptr_not_zero", sparse(4, CSR, (2, 2), [f32([1.5, 2.5]), i32([1, 0]), i32([1, 1, 2])]), FMT,
        cat, "CSR indptr[0] != 0", stream=[FMT])
    add("sparse_csr_indptr_end", sparse(4, CSR, (2, 2), [f32([1.5, 2.5]), i32([1, 0]), i32([0, 1, 7])]), FMT, cat,
        "CSR indptr[-1] != nnz", stream=[FMT])
    add("sparse_csr_indptr_len", sparse(4, CSR, (2, 2), [f32([1.5, 2.5]), i32([1, 0]), i32([0, 2])]), FMT, cat,
        "CSR len(indptr) != rows+1", stream=[FMT])
    add("sparse_csr_index_oob", sparse(4, CSR, (2, 2), [f32([1.5, 2.5]), i32([1, 5]), i32([0, 1, 2])]), FMT, cat,
        "CSR column index out of range", stream=[FMT])
    add("sparse_csr_index_negative", sparse(4, CSR, (2, 2), [f32([1.5, 2.5]), i32([1, -1]), i32([0, 1, 2])]), FMT,
        cat, "CSR negative column index", stream=[FMT])
    add("sparse_csc_index_oob", sparse(4, CSC, (2, 3), [f32([1.5]), i32([9]), i32([0, 1, 1, 1])]), FMT, cat,
        "CSC row index out of range", stream=[FMT])
    add("sparse_coo_row_oob", sparse(4, SPARSE, (2, 2), [f32([1.5]), i32([2]), i32([0])]), FMT, cat,
        "COO row index out of range", stream=[FMT])
    add("sparse_coo_col_negative", sparse(4, SPARSE, (2, 2), [f32([1.5]), i32([0]), i32([-3])]), FMT, cat,
        "COO negative col index", stream=[FMT])
    add("sparse_coo_len_mismatch", sparse(4, SPARSE, (2, 2), [f32([1.5, 2.0]), i32([0]), i32([0])]), FMT, cat,
        "COO len(data) != len(row)", stream=[FMT])
    add("sparse_two_flags", sparse(4, CSR | CSC, (2, 2), [f32([1.5, 2.5]), i32([1, 0]), i32([0, 1, 2])]), FMT,
        cat, "two sparse flags at once", stream=[FMT])
    add("sparse_n_huge", sparse(4, CSR, (2, 2), [f32([1.5, 2.5]), i32([1, 0]), i32([0, 1, 2])],
                                raw_ns=[0xFFFFFFFF, 72, 76]), FMT, cat, "sparse component length n = 2^32-1")
    comp2d = dense(4, 2, (1, 2), struct.pack("<2i", 1, 0))
    add("sparse_component_2d", sparse(4, CSR, (2, 2), [f32([1.5, 2.5]), comp2d, i32([0, 1, 2])]), FMT, cat,
        "sparse component not 1-D", stream=[FMT])
    add("sparse_component_compressed", sparse(4, CSR, (2, 2), [
        dense(4, 1, (2,), struct.pack("<2f", 1.5, 2.5), compress=True), i32([1, 0]), i32([0, 1, 2])]), FMT, cat,
        "sparse component compressed", stream=[FMT])
    add("sparse_component_bundle", sparse(4, CSR, (2, 2), [bundle(4, []), i32([1, 0]), i32([0, 1, 2])]), FMT,
        cat, "sparse component is a bundle", stream=[FMT])
    # quantized
    add("quant_body_truncated", quant(4)[:-1], FMT, cat, "quantized body one byte short")
    add("quant_num_scales_huge", quant(4, num_scales=0xFFFFFFFF), FMT, cat, "num_scales 2^32-1")
    add("quant_num_scales_mismatch", quant(4, num_scales=2, scales=(0.1, 0.2), zps=(0.0, 0.0)), FMT, cat,
        "per_tensor with 2 scales", stream=[FMT])
    add("quant_per_channel_wrong_count", quant(4, qdtype=16, shape=(2, 3), scheme=1, scales=(0.5,), zps=(0.0,),
                                               codes=bytes(6)), FMT, cat, "per_channel, 1 scale for 2 channels",
        stream=[FMT])
    add("quant_per_channel_axis_oob", quant(4, qdtype=16, shape=(2, 3), scheme=1, axis=5, scales=(0.5, 0.5),
                                            zps=(0.0, 0.0), codes=bytes(6)), FMT, cat, "per_channel axis 5 of 2-D",
        stream=[FMT])
    add("quant_axis_255", quant(4, qdtype=16, shape=(2, 3), scheme=1, axis=255, scales=(0.5, 0.5),
                                zps=(0.0, 0.0), codes=bytes(6)), FMT, cat, "per_channel axis 255 (negative axis)",
        stream=[FMT])
    add("quant_per_group_zero", quant(4, qdtype=16, shape=(4,), scheme=2, group_size=0, codes=bytes(4)), FMT, cat,
        "per_group with group_size 0", stream=[FMT])
    add("quant_per_group_wrong_count", quant(4, qdtype=16, shape=(10,), scheme=2, group_size=4, scales=(1.0,),
                                             zps=(0.0,), codes=bytes(10)), FMT, cat,
        "per_group: ceil(10/4)=3 groups, 1 scale", stream=[FMT])
    add("quant_scheme_9", quant(4, scheme=9), FMT, cat, "quantized scheme 9", stream=[FMT])
    add("quant_scheme_9_v3", quant(3, scheme=9), FMT, cat, "v3 quantized scheme 9", stream=[FMT])
    add("quant_ndim_40", quant(4, shape=(1,) * 40, codes=b"\x00"), FMT, cat, "quantized ndim 40", stream=[FMT])
    add("quant_elements_2e9", quant(4, qdtype=16, shape=(2_000_000_000,), codes=b""), FMT, cat,
        "quantized N = 2e9", stream=[FMT])
    add("quant_compression_flag", quant(4, flags_extra=COMPRESSION), FMT, cat, "quantized with COMPRESSION flag",
        stream=[FMT])
    add("quant_integrity_wrong", quant(4, integrity=True)[:-8] + b"\x00" * 8, INTEG, cat,
        "quantized footer wrong")
    add("quant_integrity_meta_flip", (lambda p: p[:26] + bytes([p[26] ^ 0x10]) + p[27:])(quant(4, integrity=True)),
        INTEG, cat, "v4 quantized: scale bit flipped (meta is hashed)", stream=[INTEG])
    add("quant_v3_integrity_wrong", quant(3, integrity=True)[:-8] + b"\x11" * 8, INTEG, cat,
        "v3 quantized footer wrong")
    add("quant_meta_truncated", header(4, ALIGNED, 16, 1) + b"\x04\x00\x00\x00" + b"\x00\x00\x04", FMT, cat,
        "quantized metadata cut")
    # strings
    add("string_offsets_decreasing", strings(offsets=[0, 5, 2, 8], payload=b"hiw\xc3\xb6rld"), FMT, cat,
        "string offsets decreasing", stream=[FMT])
    add("string_offsets_not_zero", strings(offsets=[1, 2, 2, 8], payload=b"hiw\xc3\xb6rld"), FMT, cat,
        "string offsets[0] != 0", stream=[FMT])
    add("string_payload_short", strings(offsets=[0, 2, 2, 80], payload=b"hiw\xc3\xb6rld"), FMT, cat,
        "string payload shorter than offsets[C]")
    add("string_bad_utf8", strings(items=[b"ok", b"\xff\xfe"]), FMT, cat, "string invalid UTF-8", stream=[FMT])
    add("string_offset_huge", strings(offsets=[0, 2, 2, 2**63], payload=b"hi"), FMT, cat,
        "string offsets[C] = 2^63")
    add("string_count_huge", pad_to(header(4, STRING | ALIGNED, 20, 1) + struct.pack("<I", 0xFFFFFFFF), 64),
        FMT, cat, "string count 2^32-1, no offsets")
    add("string_integrity_wrong", strings(integrity=True)[:-8] + b"\x00" * 8, INTEG, cat, "string footer wrong")
    add("string_v3", (lambda p: p[:4] + b"\x03" + p[5:])(strings()), FMT, cat,
        "string packet with version byte 3 (v3 has no strings)", stream=[FMT, TRUNC])
    # v4-only kinds
    ipc = header(4, IPC, 0, 0, reserved=1) + bytes(64) + struct.pack("<QQ", 0, 16) + bytes(16)
    add("ipc_ref", ipc, FMT, cat, "GPU IPC reference", stream=[FMT])
    add("ragged_flag", strings(kind_flag=RAGGED, dtype=5), FMT, cat, "RAGGED flag (direct ragged framing)",
        stream=[FMT])
    add("string_plus_ragged_flag", strings(flags_extra=RAGGED), FMT, cat, "STRING and RAGGED flags together",
        stream=[FMT])
    add("ragged_flag_plain", dense(4, 1, (3,), flags_extra=RAGGED), FMT, cat, "RAGGED flag on a dense packet",
        stream=[FMT])
    for bit in (0x0800, 0x1000, 0x4000, 0x8000):
        add(f"unknown_flag_{bit:#06x}", dense(4, 1, (3,), flags_extra=bit), FMT, cat, f"unknown flag bit {bit:#x}",
            stream=[FMT])
    add("bundle_with_integrity_flag", bundle(4, [("a", leaf)], flags=BUNDLE | INTEGRITY), FMT, cat,
        "INTEGRITY flag on a bundle header", stream=[FMT])
    add("bundle_with_compress_flag", bundle(4, [("a", leaf)], flags=BUNDLE | COMPRESSION), FMT, cat,
        "COMPRESSION flag on a bundle header", stream=[FMT])
    add("bool_value_2", dense(4, 7, (3,), b"\x00\x01\x02"), FMT, cat, "bool byte value 2", stream=[FMT])


def flipped_header_bits() -> None:
    """Flip every bit of the header of a few valid packets; keep only flips that must be rejected."""
    cat = "bitflip"
    bases = {
        "dense4": dense(4, 1, (3,), integrity=True),
        "dense3": dense(3, 1, (3,), integrity=True),
    }
    for bname, base in bases.items():
        H = hlen(base[4])
        for byte in range(H):
            for bit in range(8):
                pkt = bytearray(base)
                pkt[byte] ^= 1 << bit
                # decide expected class (only positions whose outcome is fully determined)
                if byte < 4:
                    exp, st = FMT, [FMT]
                elif byte == 4:
                    exp, st = FMT, [FMT]  # version 3 <-> 4 toggles and anything else
                    if pkt[4] in (3, 4):
                        continue  # version switch re-interprets layout: outcome depends on layout
                else:
                    continue
                add(f"flip_{bname}_b{byte}_{bit}", bytes(pkt), exp, cat, f"{bname}: header byte {byte} bit {bit}",
                    stream=st)
    # dtype code flipped to invalid values
    base = dense(4, 1, (3,))
    for code in (0x41, 0x81, 0x11, 0x21):  # 65, 129 invalid; 17/33: quantized/invalid
        pkt = bytearray(base)
        pkt[7] = code
        if code == 0x11:
            continue  # becomes quantized qint8 with garbage metadata; see lying lengths below
        add(f"flip_dense4_dtype_{code}", bytes(pkt), FMT, cat, f"dtype code {code}", stream=[FMT])


def lz4_frame_tails() -> None:
    """Compressed bodies whose LZ4 frame is cut before its end (mark or content checksum), or whose content-size
    field disagrees with what its blocks decode to: the blocks present decode to the right values, but a truncated
    or tampered frame must not pass."""
    cat = "lz4frame"
    body = bytes(range(256)) * 4  # 256 float32
    configs = {
        "plain": {},
        "size": {"store_size": True},
        "cksum": {"content_checksum": True, "block_checksum": True},
        "linked": {"block_linked": True, "store_size": True, "content_checksum": True},
    }
    for cname, kw in configs.items():
        frame = lz4.frame.compress(body, **kw)
        tail = 4 + (4 if kw.get("content_checksum") else 0)
        for cut in range(1, tail + 1):
            add(f"lz4_cut_{cname}_{cut}", dense(4, 1, (256,), body=CompressedBody(frame[:-cut]), compress=True),
                FMT, cat, f"LZ4 frame ({cname}) without its last {cut} bytes (end mark/content checksum)",
                stream=[FMT])
    frame = lz4.frame.compress(body)
    add("lz4_cut_v3", dense(3, 1, (256,), body=CompressedBody(frame[:-2]), compress=True), FMT, cat,
        "v3 LZ4 frame without the last 2 bytes of its end mark", stream=[FMT])
    add("lz4_cut_in_bundle_leaf",
        bundle(4, [("a", dense(4, 1, (256,), body=CompressedBody(frame[:-4]), compress=True))]), FMT, cat,
        "bundle leaf whose LZ4 frame has no end mark", stream=[FMT])
    sized = lz4.frame.compress(body, store_size=True)
    for declared in (len(body) - 4, len(body) + 4, 0):
        tampered = bytearray(sized)
        tampered[6:14] = struct.pack("<Q", declared)
        tampered[14] = (xxhash.xxh32_intdigest(bytes(tampered[4:14])) >> 8) & 0xFF
        add(f"lz4_content_size_{declared}", dense(4, 1, (256,), body=CompressedBody(bytes(tampered)), compress=True),
            FMT, cat, f"LZ4 frame whose content-size field says {declared} for {len(body)} decoded bytes",
            stream=[FMT])


TRUNC_BASES = {}


def truncations() -> None:
    cat = "truncation"
    leaf = dense(4, 5, (2,), b"\x01\x02")
    TRUNC_BASES.update({
        "dense_v4": dense(4, 1, (3,)),
        "dense_v3_integrity": dense(3, 3, (2,), itemsize=8, integrity=True),
        "dense_v4_align16": dense(4, 5, (2, 2), b"\x01\x02\x03\x04", alignment=16),
        "bundle_v4": bundle(4, [("a", leaf), ("bb", bundle(4, [("c", dense(4, 4, (1,), bytes(8)))]))]),
        "bundle_v3": bundle(3, [("a", dense(3, 5, (2,), b"\x01\x02"))]),
        "sparse_csr_v4": csr_ok(4),
        "quant_v4_integrity": quant(4, integrity=True),
        "quant_v3": quant(3),
        "string_v4": strings(integrity=True),
    })
    for bname, base in TRUNC_BASES.items():
        (OUT / f"valid_{bname}.tenso").write_bytes(base)
        for n in range(len(base)):
            stream = ["None"] if n == 0 else [TRUNC]
            add(f"trunc_{bname}_{n:04d}", base[:n], FMT, cat, f"{bname} truncated to {n} of {len(base)} bytes",
                stream=stream)


def main() -> int:
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    section14()
    flipped_header_bits()
    lz4_frame_tails()
    truncations()
    manifest = {
        "generator": "tests/hostile/make_hostile.py",
        "note": "expected = exception class of tenso.loads; stream = acceptable outcomes of tenso.read_stream "
                "over io.BytesIO ('None' = returns None, 'ok' = decodes)",
        "valid": {k: f"valid_{k}.tenso" for k in TRUNC_BASES},
        "cases": ENTRIES,
    }
    (HERE / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {len(ENTRIES)} hostile packets to {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
