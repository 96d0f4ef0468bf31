"""Zero-copy results keep their source alive and let it go afterwards; no leaks over many calls."""

from __future__ import annotations

import gc
import io
import sys
import tracemalloc
import weakref

import numpy as np
import pytest

tenso = pytest.importorskip("tenso")


class Owner(bytearray):
    """A bytearray subclass so that it can be weak-referenced."""


def _packet(arr=None, **kw):
    if arr is None:
        arr = np.arange(1000, dtype=np.float64)
    return bytes(tenso.dumps(arr, **kw))


def test_view_keeps_source_alive_then_releases():
    src = Owner(_packet())
    ref = weakref.ref(src)
    before = sys.getrefcount(src)
    view = tenso.loads(src)
    assert sys.getrefcount(src) > before, "the view must hold a reference to its source"
    del src
    gc.collect()
    assert ref() is not None, "source freed while a zero-copy view is alive"
    assert view[999] == 999.0  # memory still valid
    del view
    gc.collect()
    assert ref() is None, "source not released after the view was dropped"


def test_bundle_leaves_keep_source_alive():
    src = Owner(_packet({"a": np.arange(10), "b": {"c": np.ones(5)}}))
    ref = weakref.ref(src)
    got = tenso.loads(src)
    leaf = got["b"]["c"]
    # Leaves may be zero-copy views or aligned copies (FORMAT.md §15.17); a view must keep its source alive.
    is_view = np.shares_memory(leaf, np.frombuffer(src, np.uint8))
    del got, src
    gc.collect()
    if is_view:
        assert ref() is not None
    assert leaf.tolist() == [1.0] * 5
    del leaf
    gc.collect()
    assert ref() is None


def test_copy_true_does_not_hold_source():
    src = Owner(_packet())
    ref = weakref.ref(src)
    before = sys.getrefcount(src)
    got = tenso.loads(src, copy=True)
    assert sys.getrefcount(src) == before
    del src
    gc.collect()
    assert ref() is None
    assert got[5] == 5.0


def test_refcount_restored_after_errors():
    src = Owner(b"TNSO\x04\x01\x00\x01\x01\x00\x05\x00\x00\x00")  # truncated
    before = sys.getrefcount(src)
    for _ in range(50):
        with pytest.raises(ValueError):
            tenso.loads(src)
    assert sys.getrefcount(src) == before
    # a bytearray with no exported buffers can be resized again
    src.extend(b"\x00")


def test_source_buffer_export_released():
    src = bytearray(_packet())
    v = tenso.loads(src)
    with pytest.raises(BufferError):
        src.extend(b"x")  # exported while the view is alive
    del v
    gc.collect()
    src.extend(b"x")  # released


def test_large_packet_is_zero_copy():
    arr = np.ones(64 << 20, dtype=np.uint8)  # 64 MiB
    pkt = tenso.dumps(arr)
    src = np.frombuffer(pkt, dtype=np.uint8)
    got = tenso.loads(src)
    assert got.nbytes == 64 << 20
    assert np.shares_memory(got, src), "loads of a 64 MiB packet must not copy"
    got_b = tenso.loads(pkt)
    assert np.shares_memory(got_b, src)
    del got, got_b, src, pkt


def _growth(fn, n=1000):
    for _ in range(50):
        fn()
    gc.collect()
    tracemalloc.start()
    try:
        snap0 = tracemalloc.get_traced_memory()[0]
        for _ in range(n):
            fn()
        gc.collect()
        snap1 = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    return snap1 - snap0


ARR = np.arange(4096, dtype=np.float32)
_PK = {}


def PKT():
    if "p" not in _PK:
        _PK["p"] = bytes(tenso.dumps(ARR, check_integrity=True))
        _PK["b"] = bytes(tenso.dumps({"a": ARR, "b": {"c": ARR[:10]}}, compress=True))
    return _PK["p"]


def BUNDLE_PKT():
    PKT()
    return _PK["b"]


@pytest.mark.parametrize("name,fn", [
    ("dumps", lambda: tenso.dumps(ARR, check_integrity=True)),
    ("loads", lambda: tenso.loads(PKT())),
    ("loads_copy", lambda: tenso.loads(PKT(), copy=True)),
    ("loads_bundle_compressed", lambda: tenso.loads(BUNDLE_PKT())),
    ("read_stream", lambda: tenso.read_stream(io.BytesIO(PKT()))),
    ("get_packet_info", lambda: tenso.get_packet_info(PKT())),
    ("errors", lambda: _swallow(lambda: tenso.loads(PKT()[:-3]))),
])
def test_no_memory_growth(name, fn):
    grew = _growth(fn)
    # tracemalloc sees numpy data allocations; 1000 leaked 16 KiB packets would be ~16 MB.
    assert grew < 1 << 20, f"{name}: traced memory grew by {grew} bytes over 1000 calls"


def _swallow(fn):
    try:
        fn()
    except ValueError:
        pass


def test_no_rss_growth_native():
    """Native allocations are invisible to tracemalloc: bound RSS growth generously."""
    import resource

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()

    big = np.arange(1 << 15, dtype=np.float64)  # 256 KiB
    pkt = bytes(tenso.dumps(big, compress=True, check_integrity=True))

    def once():
        tenso.loads(pkt)
        tenso.dumps(big, compress=True)
        tenso.get_packet_info(pkt)

    for _ in range(30):
        once()
    gc.collect()
    r0 = rss()
    for _ in range(1000):
        once()
    gc.collect()
    grew = rss() - r0
    assert grew < 64 << 20, f"RSS grew by {grew >> 20} MiB over 1000 iterations (256 KiB payloads)"
