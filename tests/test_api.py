"""The public API of `tenso` (seed contract /work/shared/seed/tenso-api.txt plus ARCHITECTURE.md)."""

from __future__ import annotations

import asyncio
import io
import mmap
import os
import pickle
import socket
import struct
import subprocess
import sys
import threading

import numpy as np
import pytest

import tensohelp

tenso = pytest.importorskip("tenso")
from tenso import errors  # noqa: E402

DTYPES = ["float32", "int32", "float64", "int64", "uint8", "uint16", "bool", "float16", "int8", "int16", "uint32",
          "uint64", "complex64", "complex128"]


def sample(dtype, shape=(3, 4)):
    n = int(np.prod(shape))
    if dtype == "bool":
        return (np.arange(n) % 3 == 0).reshape(shape)
    return (np.arange(n) * 3 + 1).astype(dtype).reshape(shape)


# ---------------------------------------------------------------- dumps / loads ----------------------------------


@pytest.mark.parametrize("dtype", DTYPES + ["bfloat16"])
def test_dumps_loads_every_dtype(dtype):
    dt = tensohelp.bfloat16() if dtype == "bfloat16" else np.dtype(dtype)
    arr = sample("float32").astype(dt) if dtype == "bfloat16" else sample(dtype)
    out = tenso.dumps(arr)
    assert isinstance(out, memoryview)
    got = tenso.loads(out)
    tensohelp.assert_dense_equal(got, arr)


def test_dumps_default_packet_layout():
    pkt = bytes(tenso.dumps(np.array([1, 2, 3], dtype=np.float32)))
    assert pkt[:10] == bytes.fromhex("544e534f040100010100")
    assert len(pkt) == 76 and pkt[64:] == np.array([1, 2, 3], "<f4").tobytes()
    v3 = bytes(tenso.dumps(np.array([1, 2, 3], dtype=np.float32), protocol=3))
    assert v3[:8] == bytes.fromhex("544e534f03010101") and len(v3) == 76


@pytest.mark.parametrize("protocol", [3, 4])
@pytest.mark.parametrize("alignment", [1, 2, 16, 64, 128, 4096])
def test_alignment_values(alignment, protocol):
    arr = np.arange(5, dtype=np.int16)
    pkt = bytes(tenso.dumps(arr, alignment=alignment, protocol=protocol))
    flags = pkt[5]
    if alignment == 64:
        assert flags & 0x01 and not flags & 0x80
    else:
        assert flags & 0x80 and not flags & 0x01
    body_off = len(pkt) - arr.nbytes
    assert body_off % alignment == 0
    assert tenso.loads(pkt).tolist() == arr.tolist()


@pytest.mark.parametrize("alignment", [0, 3, 48, 100, -64, 2**64])
def test_bad_alignment_rejected(alignment):
    with pytest.raises(ValueError):
        tenso.dumps(np.zeros(3, np.float32), alignment=alignment)


def test_alignment_wrong_type():
    with pytest.raises((TypeError, ValueError)):
        tenso.dumps(np.zeros(3, np.float32), alignment="64")


@pytest.mark.parametrize("protocol", [0, 2, 5])
def test_bad_protocol_rejected(protocol):
    with pytest.raises(ValueError):
        tenso.dumps(np.zeros(3), protocol=protocol)


def test_check_integrity_footer():
    import xxhash

    arr = np.arange(10, dtype=np.int64)
    pkt = bytes(tenso.dumps(arr, check_integrity=True))
    assert pkt[5] & 0x02
    assert struct.unpack("<Q", pkt[-8:])[0] == xxhash.xxh3_64_intdigest(arr.tobytes())
    corrupt = bytearray(pkt)
    corrupt[64] ^= 0xFF
    with pytest.raises(errors.TensoIntegrityError):
        tenso.loads(bytes(corrupt))


def test_compress_round_trip_and_smaller():
    arr = np.zeros(100_000, dtype=np.float64)
    pkt = tenso.dumps(arr, compress=True)
    assert len(pkt) < arr.nbytes // 10
    assert bytes(pkt)[5] & 0x04
    got = tenso.loads(pkt)
    tensohelp.assert_dense_equal(got, arr)
    both = tenso.dumps(arr, compress=True, check_integrity=True)
    tensohelp.assert_dense_equal(tenso.loads(both), arr)


def test_loads_zero_copy_readonly_by_default():
    arr = np.arange(100, dtype=np.float32)
    src = bytearray(tenso.dumps(arr))
    got = tenso.loads(src)
    assert not got.flags.writeable
    assert np.shares_memory(got, np.frombuffer(src, dtype=np.uint8))
    with pytest.raises(ValueError):
        got[0] = 5


def test_loads_copy_true_writeable_aligned():
    arr = np.arange(100, dtype=np.float32)
    src = bytes(tenso.dumps(arr))
    got = tenso.loads(src, copy=True)
    assert got.flags.writeable
    assert tenso.is_aligned(got)
    assert got.ctypes.data % 64 == 0
    got[0] = 42
    assert tenso.loads(src)[0] == 0
    b = tenso.loads(bytes(tenso.dumps({"a": arr, "b": {"c": arr[:3]}})), copy=True)
    for leaf in (b["a"], b["b"]["c"]):
        assert leaf.flags.writeable and leaf.ctypes.data % 64 == 0


def test_dumps_result_is_aligned_and_writeable():
    out = tenso.dumps(np.arange(10, dtype=np.float64))
    assert tenso.is_aligned(out)
    assert not out.readonly
    assert np.frombuffer(out, np.uint8).ctypes.data % 64 == 0


def test_strict_non_contiguous_raises():
    arr = np.arange(20, dtype=np.float32).reshape(4, 5)
    for bad in (arr.T, arr[:, ::2], np.asfortranarray(arr), arr[::-1]):
        with pytest.raises(ValueError, match="(?i)contiguous"):
            tenso.dumps(bad, strict=True)
        got = tenso.loads(tenso.dumps(bad))
        tensohelp.assert_dense_equal(got, np.ascontiguousarray(bad))
        assert bytes(tenso.dumps(bad)) == bytes(tenso.dumps(np.ascontiguousarray(bad)))
    # contiguous input is fine under strict
    assert tenso.loads(tenso.dumps(arr, strict=True)).shape == (4, 5)


def test_zero_d_and_empty():
    for arr in (np.array(2.5), np.zeros((0,), np.int16), np.zeros((2, 0, 3), np.uint8), np.array(True)):
        got = tenso.loads(tenso.dumps(arr))
        tensohelp.assert_dense_equal(got, arr)
    # upstream worked example: 0-d float64 2.5 -> 72 bytes
    assert len(tenso.dumps(np.array(2.5))) == 72


def test_numpy_scalar_encodes_as_0d():
    got = tenso.loads(tenso.dumps(np.float32(1.5)))
    assert got.shape == () and got.dtype == np.float32 and float(got) == 1.5


@pytest.mark.parametrize("dtype", [">i4", ">f8", ">u2", ">c8"])
def test_big_endian_input_round_trips_to_values(dtype):
    arr = np.arange(6, dtype=dtype).reshape(2, 3)
    pkt = bytes(tenso.dumps(arr))
    le = arr.astype(arr.dtype.newbyteorder("<"))
    assert pkt.endswith(le.tobytes()), "body must be little-endian (FORMAT.md §4.4)"
    got = tenso.loads(pkt)
    assert got.dtype.byteorder in ("=", "<", "|")
    assert got.tolist() == arr.tolist()


@pytest.mark.parametrize("bad", [np.array(["a", "b"], dtype="<U3"), np.array([object(), 1], dtype=object),
                                 np.array(["2020-01-01"], dtype="datetime64[D]"),
                                 np.zeros(2, dtype=[("a", "<i4"), ("b", "<f4")]),
                                 np.array([1, 2], dtype="timedelta64[s]")])
def test_unsupported_dtypes_raise_clear_error(bad):
    with pytest.raises((ValueError, TypeError)) as info:
        tenso.dumps(bad)
    assert not isinstance(info.value, (errors.TensoIntegrityError,))
    assert "dtype" in str(info.value).lower() or "unsupported" in str(info.value).lower()


@pytest.mark.parametrize("obj", [[1, 2, 3], "string", 3.5, None, object()])
def test_unsupported_objects_type_error(obj):
    with pytest.raises(TypeError):
        tenso.dumps(obj)


def test_bundle_round_trip_order_and_nesting():
    b = {"z": np.arange(3), "a": {"inner": np.ones((2, 2), np.float32), "": np.array(1.0)}, "ü日": np.zeros(0)}
    got = tenso.loads(tenso.dumps(b))
    assert list(got) == ["z", "a", "ü日"]
    assert list(got["a"]) == ["inner", ""]
    tensohelp.assert_dense_equal(got["a"]["inner"], b["a"]["inner"])
    assert tenso.loads(tenso.dumps({})) == {}


def test_bundle_255_ok_256_raises():
    ok = {f"k{i}": np.array([i % 256], np.uint8) for i in range(255)}
    got = tenso.loads(tenso.dumps(ok))
    assert len(got) == 255 and got["k254"].tolist() == [254]
    for n in (256, 300):
        with pytest.raises(ValueError):
            tenso.dumps({f"k{i}": np.array([i % 256], np.uint8) for i in range(n)})
        with pytest.raises(ValueError):
            tenso.dumps({f"k{i}": np.array([i % 256], np.uint8) for i in range(n)}, protocol=3)


@pytest.mark.parametrize("key", [1, b"bytes", None, (1, 2)])
def test_bundle_non_str_keys_type_error(key):
    with pytest.raises(TypeError):
        tenso.dumps({key: np.zeros(1)})


def test_bundle_options_apply_to_leaves():
    b = {"a": np.arange(1000, dtype=np.int32), "b": np.zeros(10)}
    pkt = bytes(tenso.dumps(b, check_integrity=True, compress=True, alignment=128))
    assert pkt[5:7] == b"\x10\x00"  # bundle header never carries INTEGRITY/COMPRESSION/alignment
    got = tenso.loads(pkt)
    tensohelp.assert_dense_equal(got["a"], b["a"])


def test_sparse_round_trips():
    sp = pytest.importorskip("scipy.sparse")
    m = sp.random(20, 30, density=0.1, format="csr", dtype=np.float64, random_state=1)
    for fmt in ("coo", "csr", "csc"):
        x = m.asformat(fmt)
        got = tenso.loads(tenso.dumps(x))
        assert got.format == fmt and got.shape == x.shape
        assert np.array_equal(got.toarray(), x.toarray())
    # scipy sparse arrays (not matrices) too
    arr = sp.csr_array(m)
    got = tenso.loads(tenso.dumps(arr))
    assert np.array_equal(got.toarray(), m.toarray())
    big = sp.coo_matrix(([1.0], ([0], [99_999])), shape=(100_000, 100_000))
    got = tenso.loads(tenso.dumps(big))
    assert got.shape == (100_000, 100_000) and got.nnz == 1
    got2 = tenso.read_stream(io.BytesIO(bytes(tenso.dumps(big))))
    assert got2.shape == (100_000, 100_000)


def test_sparse_other_format_raises():
    sp = pytest.importorskip("scipy.sparse")
    with pytest.raises((ValueError, TypeError)):
        tenso.dumps(sp.lil_matrix((3, 3)))


# ---------------------------------------------------------------- files, mmap, iter_dumps -------------------------


def test_dump_load_file(tmp_path):
    arr = np.arange(1000, dtype=np.float64).reshape(10, 100)
    path = tmp_path / "a.tenso"
    with open(path, "wb") as f:
        assert tenso.dump(arr, f) is None
    assert path.read_bytes() == bytes(tenso.dumps(arr))
    with open(path, "rb") as f:
        got = tenso.load(f)
    tensohelp.assert_dense_equal(got, arr)
    with open(path, "rb") as f:
        got = tenso.load(f, copy=True)
    assert got.flags.writeable
    with open(path, "wb") as f:
        tenso.dump(arr, f, check_integrity=True)
    with open(path, "rb") as f:
        tensohelp.assert_dense_equal(tenso.load(f), arr)


def test_dump_to_bytesio_and_strict():
    buf = io.BytesIO()
    tenso.dump(np.arange(3), buf)
    assert buf.getvalue() == bytes(tenso.dumps(np.arange(3)))
    with pytest.raises(ValueError):
        tenso.dump(np.arange(6).reshape(2, 3).T, io.BytesIO(), strict=True)


def test_load_mmap_mode(tmp_path):
    arr = np.arange(1 << 16, dtype=np.float32)
    path = tmp_path / "m.tenso"
    path.write_bytes(bytes(tenso.dumps(arr)))
    class CountingFile(io.FileIO):
        nread = 0

        def read(self, n=-1):
            d = super().read(n)
            self.nread += len(d or b"")
            return d

        def readinto(self, b):
            n = super().readinto(b)
            self.nread += n or 0
            return n

        def readall(self):
            d = super().readall()
            self.nread += len(d)
            return d

    with CountingFile(path, "rb") as f:
        got = tenso.load(f, mmap_mode=True)
        assert f.nread < 4096, f"mmap_mode read {f.nread} bytes of a {arr.nbytes}-byte body through the file"
    tensohelp.assert_dense_equal(got, arr)
    assert not got.flags.writeable
    base = got
    found = False
    for _ in range(20):
        if isinstance(base, mmap.mmap) or isinstance(getattr(base, "obj", None), mmap.mmap):
            found = True
            break
        if isinstance(base, memoryview):
            base = base.obj
            continue
        nxt = getattr(base, "base", None)
        if nxt is None:
            break
        base = nxt
    assert found, "the mmap_mode result's base chain must hold an mmap"
    del got, base


def test_load_multiple_packets_from_one_file(tmp_path):
    path = tmp_path / "many.tenso"
    with open(path, "wb") as f:
        for i in range(3):
            tenso.dump(np.full(4, i, np.int32), f)
    with open(path, "rb") as f:
        for i in range(3):
            assert tenso.read_stream(f).tolist() == [i] * 4
        assert tenso.read_stream(f) is None


@pytest.mark.parametrize("check_integrity", [False, True])
@pytest.mark.parametrize("arr", [np.arange(10, dtype=np.int32), np.arange(12.0).reshape(3, 4).T, np.array(1.5),
                                 np.zeros(0, np.uint8), np.arange(5, dtype=">i8")], ids=str)
def test_iter_dumps_concatenation_equals_dumps(arr, check_integrity):
    parts = list(tenso.iter_dumps(arr, check_integrity=check_integrity))
    assert all(isinstance(p, (bytes, memoryview)) for p in parts)
    assert b"".join(bytes(p) for p in parts) == bytes(tenso.dumps(arr, check_integrity=check_integrity))


def test_iter_dumps_strict():
    with pytest.raises(ValueError):
        list(tenso.iter_dumps(np.arange(6).reshape(2, 3).T, strict=True))


# ---------------------------------------------------------------- streams ----------------------------------------

STREAM_OBJS = [
    np.arange(12, dtype=np.float32).reshape(3, 4),
    np.array(7, np.int64),
    np.zeros((0, 3), np.uint16),
    {"a": np.arange(3), "b": {"c": np.ones(2, np.bool_)}},
]


def _eq(a, b):
    if isinstance(b, dict):
        assert isinstance(a, dict) and list(a) == list(b)
        for k in b:
            _eq(a[k], b[k])
    else:
        tensohelp.assert_dense_equal(a, np.asarray(b))


def test_write_read_stream_bytesio_back_to_back():
    buf = io.BytesIO()
    total = 0
    for obj in STREAM_OBJS:
        n = tenso.write_stream(obj, buf)
        assert isinstance(n, int) and n > 0
        total += n
    tenso.write_stream(STREAM_OBJS[0], buf, check_integrity=True)
    assert total + len(tenso.dumps(STREAM_OBJS[0], check_integrity=True)) == len(buf.getvalue())
    buf.seek(0)
    for obj in STREAM_OBJS:
        _eq(tenso.read_stream(buf), obj)
    _eq(tenso.read_stream(buf), STREAM_OBJS[0])
    assert tenso.read_stream(buf) is None
    assert tenso.read_stream(buf) is None
    assert tenso.read_stream(io.BytesIO(b"")) is None


def test_read_stream_framed_kinds():
    sp = pytest.importorskip("scipy.sparse")
    buf = io.BytesIO()
    csr = sp.csr_matrix(np.eye(4, dtype=np.float32))
    q = tenso.QuantizedTensor.quantize(np.linspace(-1, 1, 10, dtype=np.float32), "qint4")
    st = tenso.StringTensor(["a", "bé", ""])
    comp_bundle = {"x": np.zeros(1000)}
    buf.write(bytes(tenso.dumps(csr)))
    buf.write(bytes(tenso.dumps(q)))
    buf.write(bytes(tenso.dumps(st)))
    buf.write(bytes(tenso.dumps(comp_bundle, compress=True)))  # bundles with compressed leaves frame
    buf.seek(0)
    assert np.array_equal(tenso.read_stream(buf).toarray(), csr.toarray())
    assert tenso.read_stream(buf).dtype_name == "qint4"
    assert tenso.read_stream(buf).to_list() == ["a", "bé", ""]
    tensohelp.assert_dense_equal(tenso.read_stream(buf)["x"], comp_bundle["x"])
    assert tenso.read_stream(buf) is None


def test_read_stream_refuses_top_level_compressed():
    with pytest.raises(errors.TensoFormatError):
        tenso.read_stream(io.BytesIO(bytes(tenso.dumps(np.zeros(100), compress=True))))


def test_read_stream_truncated_is_eoferror():
    pkt = bytes(tenso.dumps(np.arange(100)))
    for cut in (1, 9, 40, len(pkt) - 1):
        with pytest.raises(EOFError) as info:
            tenso.read_stream(io.BytesIO(pkt[:cut]))
        assert isinstance(info.value, errors.TensoTruncatedError)


def test_stream_over_socketpair_threads():
    a, b = socket.socketpair()
    big = np.random.default_rng(0).standard_normal((512, 512)).astype(np.float32)  # 1 MiB > socket buffer
    objs = STREAM_OBJS + [big]
    errs = []

    def writer():
        try:
            for o in objs:
                tenso.write_stream(o, a, check_integrity=True)
        except BaseException as e:  # pragma: no cover - reported below
            errs.append(e)
        finally:
            a.shutdown(socket.SHUT_WR)

    t = threading.Thread(target=writer)
    t.start()
    try:
        for o in objs:
            _eq(tenso.read_stream(b), o)
        assert tenso.read_stream(b) is None
    finally:
        t.join(30)
        a.close()
        b.close()
    assert not errs


def test_stream_over_pipe():
    r, w = os.pipe()
    rf = os.fdopen(r, "rb")
    wf = os.fdopen(w, "wb")
    big = np.arange(300_000, dtype=np.int64)  # larger than a pipe buffer

    def writer():
        try:
            tenso.write_stream(big, wf)
            tenso.write_stream(STREAM_OBJS[3], wf)
        finally:
            wf.close()

    t = threading.Thread(target=writer)
    t.start()
    try:
        _eq(tenso.read_stream(rf), big)
        _eq(tenso.read_stream(rf), STREAM_OBJS[3])
        assert tenso.read_stream(rf) is None
    finally:
        t.join(30)
        rf.close()


def test_stream_over_unbuffered_pipe_raw():
    r, w = os.pipe()
    rf = os.fdopen(r, "rb", buffering=0)
    with os.fdopen(w, "wb") as wf:
        tenso.write_stream(np.arange(10), wf)
    try:
        assert tenso.read_stream(rf).tolist() == list(range(10))
        assert tenso.read_stream(rf) is None
    finally:
        rf.close()


def test_write_stream_strict():
    with pytest.raises(ValueError):
        tenso.write_stream(np.arange(6).reshape(2, 3).T, io.BytesIO(), strict=True)


def test_async_stream_over_loopback_server():
    async def main():
        received = []
        done = asyncio.Event()

        async def handle(reader, writer):
            while True:
                obj = await tenso.aread_stream(reader)
                if obj is None:
                    break
                received.append(obj)
                await tenso.awrite_stream(obj, writer)  # echo
            writer.close()
            await writer.wait_closed()
            done.set()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            objs = [np.arange(10, dtype=np.float32), np.array(3), np.zeros((256, 1024), np.float32)]
            for o in objs:
                await tenso.awrite_stream(o, writer, check_integrity=True)
            echoed = [await tenso.aread_stream(reader) for _ in objs]
            writer.write_eof()
            assert await tenso.aread_stream(reader) is None
            writer.close()
            await writer.wait_closed()
            await asyncio.wait_for(done.wait(), 30)
            return objs, received, echoed
        finally:
            server.close()
            await server.wait_closed()

    objs, received, echoed = asyncio.run(main())
    assert len(received) == len(objs) == len(echoed)
    for o, r, e in zip(objs, received, echoed):
        tensohelp.assert_dense_equal(r, o)
        tensohelp.assert_dense_equal(e, o)


def test_aread_stream_truncated_and_bad_magic():
    async def main():
        pkt = bytes(tenso.dumps(np.arange(10)))
        for cut in (4, 30, len(pkt) - 1):
            r = asyncio.StreamReader()
            r.feed_data(pkt[:cut])
            r.feed_eof()
            # Both tenso's class and asyncio's: code written for either (or for EOFError) keeps working.
            with pytest.raises(asyncio.IncompleteReadError) as info:
                await tenso.aread_stream(r)
            err = info.value
            assert isinstance(err, errors.TensoTruncatedError) and isinstance(err, EOFError)
            assert type(err) is errors.TensoIncompleteReadError is tenso.TensoIncompleteReadError
            assert err.partial == pkt[:cut] and err.expected > cut
            assert str(err).startswith("Stream ended during ")
            back = pickle.loads(pickle.dumps(err))
            assert type(back) is type(err) and str(back) == str(err)
            assert (back.partial, back.expected) == (err.partial, err.expected)
        r2 = asyncio.StreamReader()
        r2.feed_data(b"XXXX" + b"\x00" * 100)
        r2.feed_eof()
        with pytest.raises(errors.TensoFormatError):
            await tenso.aread_stream(r2)
        return True

    assert asyncio.run(main())


# ---------------------------------------------------------------- get_packet_info / is_aligned --------------------


def test_get_packet_info_dense():
    arr = np.zeros((3, 4), np.float32)
    info = tenso.get_packet_info(bytes(tenso.dumps(arr, check_integrity=True)))
    assert info["version"] == 4 and info["ndim"] == 2 and tuple(info["shape"]) == (3, 4)
    assert info["dtype"] == np.dtype(np.float32)
    assert info["total_elements"] == 12 and info["data_size_bytes"] == 48
    assert info["aligned"] is True and info["integrity_protected"] is True
    assert info["flags"] == 0x03
    info = tenso.get_packet_info(bytes(tenso.dumps(arr, alignment=128, protocol=3)))
    assert info["version"] == 3 and info["aligned"] is False  # only the ALIGNED bit counts (Appendix A)
    info = tenso.get_packet_info(bytes(tenso.dumps(np.zeros(100), compress=True)))
    assert info["data_size_bytes"] == 800


def test_get_packet_info_other_kinds():
    sp = pytest.importorskip("scipy.sparse")
    info = tenso.get_packet_info(bytes(tenso.dumps({"a": np.zeros(1), "b": np.zeros(2)})))
    assert info["entry_count"] == 2 and tuple(info["shape"]) == () and info["total_elements"] == 0
    info = tenso.get_packet_info(bytes(tenso.dumps(sp.csr_matrix(np.eye(3)))))
    assert info["flags"] & 0x20 and tuple(info["shape"]) == (3, 3)
    q = tenso.QuantizedTensor.quantize(np.linspace(0, 1, 11, dtype=np.float32), "quint4")
    info = tenso.get_packet_info(bytes(tenso.dumps(q)))
    assert info["dtype"] == "quint4" and info["quantized"] is True and info["data_size_bytes"] == 6
    info = tenso.get_packet_info(bytes(tenso.dumps(tenso.StringTensor(["a", "b"]))))
    assert info["flags"] & 0x100 and info["version"] == 4
    with pytest.raises(ValueError):
        tenso.get_packet_info(b"TNS")
    with pytest.raises(ValueError):
        tenso.get_packet_info(b"XXXX\x04\x00\x00\x01\x00\x00")


def test_is_aligned():
    raw = np.zeros(256, np.uint8)
    base = raw.ctypes.data
    off = (-base) % 64
    assert tenso.is_aligned(raw[off:]) is True
    assert tenso.is_aligned(raw[off + 1:]) is False
    assert tenso.is_aligned(raw[off + 16:], alignment=16) is True
    assert tenso.is_aligned(raw[off + 16:], alignment=32) is False
    assert tenso.is_aligned(tenso.dumps(np.zeros(3)))


# ---------------------------------------------------------------- QuantizedTensor --------------------------------

QDTYPES = {"qint8": (-128, 127), "quint8": (0, 255), "qint4": (-8, 7), "quint4": (0, 15)}


@pytest.mark.parametrize("qdtype", list(QDTYPES))
@pytest.mark.parametrize("scheme,kw", [("per_tensor", {}), ("per_channel", {"axis": 0}),
                                       ("per_channel", {"axis": 1}), ("per_channel", {"axis": -1}),
                                       ("per_group", {"group_size": 4}), ("per_group", {"group_size": 7})])
def test_quantize_dequantize_error_bound(qdtype, scheme, kw):
    rng = np.random.default_rng(3)
    x = rng.uniform(-3, 5, size=(6, 5)).astype(np.float32)
    q = tenso.QuantizedTensor.quantize(x, qdtype, scheme=scheme, **kw)
    assert q.dtype_name == qdtype and tuple(q.shape) == (6, 5)
    assert q.is_4bit == qdtype.endswith("4") and q.is_signed == qdtype.startswith("qint")
    qmin, qmax = QDTYPES[qdtype]
    if scheme == "per_tensor":
        assert len(q.scales) == 1
    elif scheme == "per_channel":
        ax = kw["axis"] % 2
        assert len(q.scales) == x.shape[ax]
        assert q.axis == ax, "negative axis must be normalised (FORMAT.md §16.12)"
    else:
        assert len(q.scales) == -(-x.size // kw["group_size"])
    d = q.dequantize()
    assert d.dtype == np.float32 and d.shape == x.shape
    max_scale = float(np.max(q.scales))
    assert np.max(np.abs(d - x)) <= max_scale * 0.5 + 1e-5 + 1e-6 * np.abs(x).max()
    # wire round trip, both protocols where representable
    for proto in (3, 4):
        if proto == 3 and scheme == "per_channel" and q.axis != 0:
            continue  # v3 has no axis byte
        got = tenso.loads(tenso.dumps(q, protocol=proto))
        assert np.array_equal(np.asarray(got.scales), np.asarray(q.scales))
        assert np.array_equal(got.dequantize(), d)


@pytest.mark.parametrize("qdtype", ["qint4", "quint4"])
@pytest.mark.parametrize("n", [1, 3, 5, 7, 9, 11])
def test_4bit_packing_odd_n(qdtype, n):
    x = np.linspace(-1, 1, n, dtype=np.float32)
    q = tenso.QuantizedTensor.quantize(x, qdtype)
    packed = np.frombuffer(bytes(memoryview(np.ascontiguousarray(q.data)).cast("B")), np.uint8)
    assert packed.size == (n + 1) // 2
    assert q.nbytes >= packed.size
    assert packed[-1] >> 4 == 0, "high nibble of the last byte must be 0 for odd N"
    codes = tensohelp.unpack_nibbles(packed, n, qdtype == "qint4")
    qmin, qmax = QDTYPES[qdtype]
    assert codes.min() >= qmin and codes.max() <= qmax
    got = tenso.loads(tenso.dumps(q))
    assert np.array_equal(got.dequantize(), q.dequantize())


def test_quantized_constant_tensor_and_bad_args():
    q = tenso.QuantizedTensor.quantize(np.full((4,), 2.0, np.float32), "qint8")
    assert np.allclose(q.dequantize(), 2.0, atol=1.0)
    with pytest.raises(ValueError):
        tenso.QuantizedTensor.quantize(np.zeros(4, np.float32), "qint3")
    with pytest.raises(ValueError):
        tenso.QuantizedTensor.quantize(np.zeros(4, np.float32), "qint8", scheme="per_row")
    with pytest.raises(ValueError):
        tenso.QuantizedTensor.quantize(np.zeros(4, np.float32), "qint8", scheme="per_group", group_size=0)
    with pytest.raises(ValueError):
        tenso.QuantizedTensor.quantize(np.zeros((2, 2), np.float32), "qint8", scheme="per_channel", axis=2)


def test_quantized_short_data_rejected_on_write():
    # FORMAT.md §16.19: data shorter than the body must be refused (at construction or at dumps), never written
    with pytest.raises(ValueError):
        q = tenso.QuantizedTensor(np.zeros(2, np.uint8), np.ones(1, np.float32), np.zeros(1, np.float32), (5,), 16)
        tenso.dumps(q)


# ---------------------------------------------------------------- StringTensor / RaggedArray ---------------------


def test_string_tensor_round_trip():
    items = ["hello", "", "wörld", "日本語", "emoji 😀"]
    st = tenso.StringTensor(items)
    assert len(st) == 5 and st[2] == "wörld" and st.to_list() == items
    for pkt in (st.dumps(), tenso.dumps(st), st.dumps(check_integrity=True)):
        got = tenso.loads(pkt)
        assert isinstance(got, tenso.StringTensor) and got.to_list() == items
        assert tenso.StringTensor.loads(pkt).to_list() == items
    assert bytes(tenso.StringTensor(["hi", "", "wörld"]).dumps()) == bytes.fromhex(
        "544e534f04010114010003000000" + "00" * 50 + "0000000000000000" + "0200000000000000"
        + "0200000000000000" + "0800000000000000" + "6869" + "77c3b6726c64"
    )
    with pytest.raises(ValueError):
        tenso.dumps(st, protocol=3)


def test_ragged_round_trip():
    rows = [np.array([1, 2, 3], np.int32), np.array([], np.int32), np.array([4], np.int32)]
    ra = tenso.RaggedArray(rows)
    assert len(ra) == 3
    pkt = ra.dumps()
    plain = tenso.loads(pkt)
    assert list(plain) == ["__ragged_offsets__", "__ragged_flat__", "__ragged_count__"]
    assert plain["__ragged_offsets__"].tolist() == [0, 3, 3, 4]
    back = tenso.RaggedArray.loads(pkt)
    assert [r.tolist() for r in back.to_list()] == [[1, 2, 3], [], [4]]
    assert [r.tolist() for r in tenso.RaggedArray.loads(plain).to_list()] == [[1, 2, 3], [], [4]]
    empty = tenso.RaggedArray([])
    assert len(tenso.RaggedArray.loads(empty.dumps())) == 0


# ---------------------------------------------------------------- config, errors, imports -----------------------


def test_config_constants_match_native_and_spec():
    from tenso import config, tenso_rs

    spec = dict(FLAG_ALIGNED=1, FLAG_INTEGRITY=2, FLAG_COMPRESSION=4, FLAG_SPARSE=8, FLAG_BUNDLE=16,
                FLAG_SPARSE_CSR=32, FLAG_SPARSE_CSC=64, FLAG_CUST_ALIGN=128, FLAG_STRING=0x100, FLAG_RAGGED=0x200,
                FLAG_GPU_IPC_REF=0x400, MAX_NDIM=32, MAX_ELEMENTS=1_000_000_000, MAX_DEPTH=64, QDTYPE_QINT8=16,
                QDTYPE_QUINT8=17, QDTYPE_QINT4=18, QDTYPE_QUINT4=19, QUANT_PER_TENSOR=0, QUANT_PER_CHANNEL=1,
                QUANT_PER_GROUP=2, DEFAULT_ALIGNMENT=64, PROTOCOL_VERSION=4, HEADER_SIZE_V3=8, HEADER_SIZE_V4=10,
                MAGIC=b"TNSO")
    for name, value in spec.items():
        assert getattr(tenso_rs, name) == value, name
        if hasattr(config, name):
            assert getattr(config, name) == getattr(tenso_rs, name), name
    for name in ("FLAG_ALIGNED", "FLAG_BUNDLE", "FLAG_COMPRESSION", "FLAG_CUST_ALIGN", "FLAG_INTEGRITY",
                 "FLAG_SPARSE", "FLAG_SPARSE_CSC", "FLAG_SPARSE_CSR", "MAX_ELEMENTS", "MAX_NDIM", "QDTYPE_QINT4",
                 "QDTYPE_QINT8", "QDTYPE_QUINT4", "QDTYPE_QUINT8", "QUANT_PER_CHANNEL", "QUANT_PER_GROUP",
                 "QUANT_PER_TENSOR"):
        assert getattr(config, name) == spec[name], f"seed constant tenso.config.{name}"


def test_exception_hierarchy_and_pickle():
    E = errors
    assert issubclass(E.TensoError, Exception)
    assert issubclass(E.TensoFormatError, E.TensoError) and issubclass(E.TensoFormatError, ValueError)
    assert issubclass(E.TensoIntegrityError, E.TensoFormatError)
    assert issubclass(E.TensoTruncatedError, E.TensoError) and issubclass(E.TensoTruncatedError, EOFError)
    assert issubclass(E.TensoCacheFullError, E.TensoError) and issubclass(E.TensoCacheFullError, MemoryError)
    assert not issubclass(E.TensoTruncatedError, ValueError)
    assert issubclass(E.TensoUnknownNameError, E.TensoError)
    assert issubclass(E.TensoUnknownNameError, ValueError) and issubclass(E.TensoUnknownNameError, KeyError)
    assert issubclass(E.TensoIncompleteReadError, E.TensoTruncatedError)
    assert issubclass(E.TensoIncompleteReadError, asyncio.IncompleteReadError)
    for cls in (E.TensoError, E.TensoFormatError, E.TensoIntegrityError, E.TensoTruncatedError,
                E.TensoCacheFullError, E.TensoUnknownNameError, E.TensoIncompleteReadError):
        mod = __import__(cls.__module__, fromlist=[cls.__name__])
        assert getattr(mod, cls.__name__) is cls
        e = cls("boom 42")
        e2 = pickle.loads(pickle.dumps(e))
        assert type(e2) is cls and str(e2) == str(e)
    # a real error raised by the native code round-trips too
    try:
        tenso.loads(b"XXXXXXXXXXXXXXXX")
    except errors.TensoFormatError as err:
        err2 = pickle.loads(pickle.dumps(err))
        assert type(err2) is type(err) and str(err2) == str(err)
    else:
        pytest.fail("bad magic accepted")


def test_exceptions_pickle_through_tblib():
    """Dask installs tblib's exception pickling in every process; our errors must survive it (a subprocess, so that
    the global install stays out of this one)."""
    pytest.importorskip("tblib")
    code = (
        "import pickle, tblib.pickling_support\n"
        "from tenso import errors as E\n"
        "tblib.pickling_support.install()\n"
        "for cls in (E.TensoError, E.TensoFormatError, E.TensoIntegrityError, E.TensoTruncatedError,\n"
        "            E.TensoCacheFullError, E.TensoUnknownNameError, E.TensoIncompleteReadError):\n"
        "    tblib.pickling_support.install(cls)\n"
        "    e = pickle.loads(pickle.dumps(cls('boom 42')))\n"
        "    assert type(e) is cls and str(e) == 'boom 42', (cls, e)\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_import_tenso_is_light():
    code = (
        "import sys, json; import tenso; "
        "print(json.dumps(sorted(m for m in ('scipy','torch','ray','fastapi','ml_dtypes','starlette','jax','cupy')"
        " if m in sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd="/")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"`import tenso` imported heavy modules: {out.stdout}"


def test_seed_names_exported():
    # TensoShm / TensoCache are in the seed but not in ARCHITECTURE.md's package layout: not required here.
    for name in ("dumps", "loads", "dump", "load", "iter_dumps", "read_stream", "write_stream", "aread_stream",
                 "get_packet_info", "is_aligned", "QuantizedTensor", "StringTensor", "RaggedArray",
                 "read_to_device"):
        assert hasattr(tenso, name), name
    from tenso import async_core, config, core, quantize, utils  # noqa: F401
    from tenso import tenso_rs

    for name in ("dumps_rs", "loads_rs", "dump_to_buffer_rs", "dump_to_fd_rs", "get_packet_info_rs"):
        assert callable(getattr(tenso_rs, name)), name
    assert callable(async_core.awrite_stream)


def test_native_seed_functions(tmp_path):
    from tenso import tenso_rs

    arr = np.arange(10, dtype=np.float32)
    mv = tenso_rs.dumps_rs(arr)
    assert bytes(mv) == bytes(tenso.dumps(arr))
    tensohelp.assert_dense_equal(tenso_rs.loads_rs(mv), arr)
    buf = bytearray(len(mv) + 100)
    n = tenso_rs.dump_to_buffer_rs(arr, buf)
    assert n == len(mv) and bytes(buf[:n]) == bytes(mv)
    with pytest.raises(ValueError):
        tenso_rs.dump_to_buffer_rs(arr, bytearray(10))
    path = tmp_path / "fd.tenso"
    with open(path, "wb") as f:
        n = tenso_rs.dump_to_fd_rs(arr, f.fileno(), check_integrity=True)
    assert path.read_bytes() == bytes(tenso.dumps(arr, check_integrity=True)) and n == path.stat().st_size
    assert tenso_rs.get_packet_info_rs(bytes(mv))["shape"] in ((10,), [10])


@pytest.mark.parametrize("kw", [{"dtype": "qint3"}, {"scheme": "invalid"}], ids=["dtype", "scheme"])
def test_unknown_quantization_name_is_value_and_key_error(kw):
    arr = np.ones((4, 8), dtype=np.float32)
    dtype = kw.get("dtype", "qint8")
    scheme = kw.get("scheme", "per_tensor")
    for cls in (ValueError, KeyError, errors.TensoUnknownNameError):
        with pytest.raises(cls) as info:
            tenso.QuantizedTensor.quantize(arr, dtype, scheme=scheme)
    err = info.value
    bad = next(iter(kw.values()))
    # The message is shown as it is (KeyError alone would quote it) and names the valid names.
    assert str(err).startswith("unknown quantiz") and repr(bad) in str(err) and "valid names" in str(err)
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is errors.TensoUnknownNameError and str(back) == str(err)


def test_lazy_error_class_keeps_import_light():
    code = "import sys, tenso; print('asyncio' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd="/")
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stdout + out.stderr
