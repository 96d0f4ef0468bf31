"""tenso.TensoShm: one packet in a named POSIX shared-memory segment."""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import stat
import uuid
import weakref

import numpy as np
import pytest

import tenso
from tenso.shm import TensoShm

CTX = mp.get_context("spawn")


def _name(tag: str = "s") -> str:
    return f"tenso-test-{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def name():
    n = _name()
    yield n
    try:
        os.unlink(f"/dev/shm/{n}")
    except FileNotFoundError:
        pass


def test_create_from_and_read_back(name):
    ary = np.random.rand(100, 100)
    with TensoShm.create_from(name, ary) as shm:
        assert shm.name == name
        assert shm.size == len(tenso.dumps(ary))
        with TensoShm(name) as reader:
            got = reader.get()
            np.testing.assert_array_equal(got, ary)
            assert not got.flags.writeable
    mode = stat.S_IMODE(os.stat(f"/dev/shm/{name}").st_mode)
    assert mode & 0o077 == 0


@pytest.mark.parametrize("kwargs", [{}, {"check_integrity": True}, {"compress": True}, {"alignment": 256}])
def test_create_from_options(name, kwargs):
    ary = np.arange(10_000, dtype=np.int32)
    with TensoShm.create_from(name, ary, **kwargs) as shm:
        np.testing.assert_array_equal(shm.get(), ary)
        assert bytes(shm.buffer) == bytes(tenso.dumps(ary, **kwargs))


def test_put_get_buffer(name):
    with TensoShm(name, create=True, size=1 << 16) as shm:
        n = shm.put(np.arange(10.0))
        assert n == len(tenso.dumps(np.arange(10.0)))
        np.testing.assert_array_equal(shm.get(), np.arange(10.0))
        buf = shm.buffer
        assert isinstance(buf, memoryview) and len(buf) == 1 << 16 and not buf.readonly
        assert bytes(buf[:4]) == b"TNSO"
        shm.put({"a": np.ones(3), "b": np.zeros(2, np.int8)})
        assert set(shm.get()) == {"a", "b"}
        with pytest.raises(ValueError):
            shm.put(np.zeros(1 << 17, np.uint8))
        shm.unlink()


def test_views_outlive_close_and_unlink(name):
    shm = TensoShm.create_from(name, np.arange(1000))
    view = shm.get()
    base = view
    while getattr(base, "base", None) is not None:
        base = base.base
    ref = weakref.ref(base)
    del base
    shm.close()
    shm.unlink()
    gc.collect()
    assert view[999] == 999 and ref() is not None
    del view
    gc.collect()
    assert ref() is None
    with pytest.raises(RuntimeError):
        shm.get()


def test_errors(name):
    with pytest.raises(FileNotFoundError):
        TensoShm(name)
    with TensoShm(name, create=True, size=100):
        with pytest.raises(FileExistsError):
            TensoShm(name, create=True, size=100)
        with pytest.raises(FileExistsError):
            TensoShm.create_from(name, np.ones(3))
    with pytest.raises(ValueError):
        TensoShm(_name(), create=True, size=0)
    for bad in ["", "a/b", "..", "x y", "x" * 300]:
        with pytest.raises(ValueError):
            TensoShm(bad, create=True, size=10)


def test_leading_slash_name(name):
    with TensoShm("/" + name, create=True, size=64) as shm:
        assert shm.name == name
        shm.unlink()


def _open_and_exit(name: str) -> None:
    with TensoShm(name) as shm:
        shm.get()


def test_segment_survives_attached_process_exit(name):
    """No resource tracker: a process that opens and exits does not unlink the segment."""
    with TensoShm.create_from(name, np.arange(5)) as shm:
        p = CTX.Process(target=_open_and_exit, args=(name,))
        p.start()
        p.join(60)
        assert p.exitcode == 0
        assert os.path.exists(f"/dev/shm/{name}")
        np.testing.assert_array_equal(TensoShm(name).get(), np.arange(5))
        shm.unlink()


def test_reference_reader_interop(name):
    """Same layout as tenso 0.24.0 (the packet at offset 0), so our loads reads the raw segment too."""
    with TensoShm.create_from(name, np.arange(7, dtype=np.float32)) as shm:
        with open(f"/dev/shm/{name}", "rb") as f:
            np.testing.assert_array_equal(tenso.loads(f.read()), np.arange(7, dtype=np.float32))
        shm.unlink()


def test_full_dev_shm_fails_at_creation_not_later():
    """The size is reserved at creation (fallocate): a segment that cannot fit raises ENOSPC now, leaves no name
    behind, and never SIGBUSes on a later write."""
    import errno

    name = _name("enospc")
    st = os.statvfs("/dev/shm")
    # Larger than the whole file system, so tmpfs refuses up front. (A size just above the free space would make the
    # kernel allocate every free page before it gives up: never do that on a shared machine.)
    too_big = 2 * st.f_blocks * st.f_frsize + (1 << 40)
    with pytest.raises(OSError) as info:
        TensoShm(name, create=True, size=too_big)
    assert info.value.errno == errno.ENOSPC
    assert not os.path.exists(f"/dev/shm/{name}")
    from tenso.cache import TensoCache

    with pytest.raises(OSError):
        TensoCache(too_big, name=name)
    assert not os.path.exists(f"/dev/shm/{name}")
