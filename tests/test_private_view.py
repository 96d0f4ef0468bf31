"""`tenso_rs._private_view`: private copy-on-write views of shared file mappings (the rule every adapter relies on:
shared bytes are never written after publication; a reader's write reaches nobody else)."""

from __future__ import annotations

import gc
import mmap
import os
import subprocess
import sys
import tempfile
import weakref

import numpy as np
import pytest

tenso = pytest.importorskip("tenso")
rs = tenso.tenso_rs

from tenso import cow  # noqa: E402

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="private views need Linux /proc")


@pytest.fixture(autouse=True)
def _all_routes():
    rs._private_view_routes(None)
    yield
    rs._private_view_routes(None)


@pytest.fixture
def segment():
    shm = tenso.TensoShm(create=True, size=3 * 65536)
    buf = np.frombuffer(shm.buffer, dtype=np.uint8)
    buf[:] = np.arange(buf.size, dtype=np.uint64) % 251
    yield shm, buf
    del buf
    gc.collect()
    shm.close()
    shm.unlink()


class Keep(np.ndarray):
    """A weak-referenceable stand-in for the object that keeps the source alive (Ray's buffer, a pin, a lease)."""


def test_view_shows_the_bytes_and_writes_stay_private(segment):
    _, shared = segment
    src = shared[1000 : 2 * 65536 + 77]  # unaligned start and end, several pages
    before = rs._private_view_stats()["views"]
    view = rs._private_view(src)
    assert view is not None, rs._private_view_stats()["last_failure"]
    assert view.dtype == np.uint8 and view.flags.writeable and view.shape == src.shape
    assert np.array_equal(view, src)
    assert view.ctypes.data != src.ctypes.data
    view[:] = 0xEE
    assert np.array_equal(src, np.arange(1000, 2 * 65536 + 77, dtype=np.uint64) % 251), "a private write reached the shared bytes"
    other = rs._private_view(src, populate=True)
    assert other is not None and np.array_equal(other, src), "a second view saw the first one's writes"
    assert rs._private_view_stats()["views"] == before + 2
    assert type(view.base).__name__ == "_PrivateMap"


def test_another_process_never_sees_a_private_write(segment):
    shm, shared = segment
    view = rs._private_view(shared)
    assert view is not None
    view[12345] = 1 if shared[12345] != 1 else 2
    code = (
        "import numpy as np, tenso, sys\n"
        f"s = tenso.TensoShm({shm.name!r})\n"
        "b = np.frombuffer(s.buffer, dtype=np.uint8)\n"
        "print(int(b[12345]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(out.stdout) == 12345 % 251


def test_the_view_holds_keep_until_it_dies(segment):
    _, shared = segment
    keep = shared[:4096].view(Keep)
    ref = weakref.ref(keep)
    view = rs._private_view(shared[64:4096], keep=keep)
    assert view is not None and view.base.source is keep
    del keep
    gc.collect()
    assert ref() is not None, "the source holder went while a view lived"
    part = view[10:20]  # a slice of the view keeps the mapping, too
    del view
    gc.collect()
    assert ref() is not None
    assert part[0] == 74 % 251
    del part
    gc.collect()
    assert ref() is None, "the source holder outlived every view"


def test_view_survives_fork_and_each_side_writes_its_own_copy(segment):
    _, shared = segment
    view = rs._private_view(shared[:8192])
    assert view is not None
    view[0] = 200
    pid = os.fork()
    if pid == 0:  # child: sees the parent's private write (inherited), its own write stays its own
        ok = view[0] == 200 and shared[0] == 0
        view[1] = 201
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
    assert view[1] == 1 and shared[1] == 1


def test_anonymous_memory_and_bytes_fall_back():
    heap = np.arange(1 << 20, dtype=np.uint8)
    before = rs._private_view_stats()["fallbacks"]
    assert rs._private_view(heap) is None
    assert rs._private_view(b"x" * 100000) is None
    stats = rs._private_view_stats()
    assert stats["fallbacks"] == before + 2
    assert "not in a shared file mapping" in stats["last_failure"]
    assert rs._private_view(b"") is None  # empty: nothing to map


def test_forced_fallback_and_route_names(segment):
    _, shared = segment
    rs._private_view_routes([])
    assert rs._private_view(shared) is None
    assert "every route is disabled" in rs._private_view_stats()["last_failure"]
    rs._private_view_routes(["path"])
    assert rs._private_view(shared) is not None
    with pytest.raises(ValueError, match="unknown route"):
        rs._private_view_routes(["nope"])


def test_a_regular_file_mapped_shared():
    with tempfile.TemporaryFile() as f:
        f.write(bytes(range(256)) * 64)
        f.flush()
        m = mmap.mmap(f.fileno(), 0, mmap.MAP_SHARED)
        src = np.frombuffer(m, dtype=np.uint8)[300:9000]
        view = rs._private_view(src)
        # A deleted temp file: reachable by map_files (root) only; otherwise the caller copies.
        if view is None:
            assert "reopened" in rs._private_view_stats()["last_failure"]
        else:
            assert np.array_equal(view, src)
            view[:] = 0
            assert src[0] == 300 % 256
        del src, view
        gc.collect()
        m.close()


def test_a_deleted_file_through_a_process_that_holds_it():
    shm = tenso.TensoShm(create=True, size=65536)
    shared = np.frombuffer(shm.buffer, dtype=np.uint8)
    shared[:] = 7
    holder = os.open(f"/dev/shm/{shm.name}", os.O_RDONLY)  # the way Ray's raylet keeps its (deleted) store open
    try:
        shm.unlink()
        rs._private_view_routes(["path"])
        assert rs._private_view(shared) is None, "a deleted file has no path"
        rs._private_view_routes(["proc_fd"])
        assert rs._private_view(shared) is None, "no process to look in"
        view = rs._private_view(shared, hint_pids=[os.getpid()])
        assert view is not None and np.array_equal(view, shared)
        assert rs._private_view_stats()["resolved"]["proc_fd"] >= 1
        del view
    finally:
        os.close(holder)
        del shared
        gc.collect()
        shm.close()


def test_written_pages_of_a_private_mapping_are_seen():
    """`tenso.cow.never_written` (what keeps a written array from going on by reference or serving as its own
    source): a page written through a MAP_PRIVATE mapping of a shared file is this process's own; a page only read
    is the file's."""
    path = f"/dev/shm/tenso-dask-cow-test-{os.getpid()}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        size = 16 * mmap.PAGESIZE
        os.ftruncate(fd, size)
        os.pwrite(fd, b"\1" * size, 0)
        m = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        a = np.frombuffer(m, dtype=np.uint8)
        start = a.__array_interface__["data"][0]
        assert cow.never_written(start, size)
        assert int(a.sum()) == size  # read every page
        assert cow.never_written(start, size)
        a[5 * mmap.PAGESIZE + 3] = 9
        assert not cow.never_written(start, size)
        assert not cow.never_written(start + 5 * mmap.PAGESIZE, 1)
        assert cow.never_written(start, 5 * mmap.PAGESIZE)
        assert cow.never_written(start + 6 * mmap.PAGESIZE, 10 * mmap.PAGESIZE)
        del a
        m.close()
    finally:
        os.close(fd)
        os.unlink(path)


def test_shared_source_of_an_unwritten_view(segment):
    _, shared = segment
    view = cow.private_view(shared[64 : 3 * 65536 - 64])
    assert view is not None
    part = view[4096 : 8192 + 5]
    src = cow.shared_source(part)
    assert src is not None and np.array_equal(src, part)
    assert src.ctypes.data == shared[64 + 4096 :].ctypes.data, "not the shared bytes themselves"
    view[5000] ^= 1  # a page inside `part` is now this process's own
    assert cow.shared_source(part) is None
    assert cow.shared_source(view[65536 : 65536 + 10]) is not None, "other pages are still the file's"
    assert cow.shared_source(np.zeros(10)) is None
    start = view.ctypes.data
    del view, part, src
    gc.collect()
    assert start not in cow._views, "a dead view stays registered"
