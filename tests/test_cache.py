"""tenso.TensoCache: the whole seed API, TTL and LRU, crash safety with real processes."""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import random
import signal
import stat
import sys
import time
import uuid
import weakref

import numpy as np
import pytest
from tensohelp import is_private_view as _cow

import tenso
import tenso.cow
from tenso import tenso_rs
from tenso.cache import TensoCache
from tenso.errors import TensoCacheFullError, TensoError

CTX = mp.get_context("spawn")


def _name(tag: str = "t") -> str:
    return f"tenso-test-{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def cache():
    c = TensoCache("8MB", name=_name("cache"))
    yield c
    c.close()
    c.unlink()


def checked_value(nbytes: int, seed: int) -> np.ndarray:
    """uint8 array whose first 8 bytes hold the XXH3-64 of the rest."""
    rng = np.random.default_rng(seed)
    value = rng.integers(0, 256, size=nbytes, dtype=np.uint8)
    value[:8] = np.frombuffer(np.uint64(tenso_rs._xxh3_64(value[8:])).tobytes(), dtype=np.uint8)
    return value


def is_whole(value: np.ndarray) -> bool:
    stored = int(np.frombuffer(value[:8].tobytes(), dtype="<u8")[0])
    return stored == tenso_rs._xxh3_64(np.ascontiguousarray(value[8:]))


def assert_invariants(c: TensoCache) -> dict:
    c._check()
    s = c.stats
    assert s["used_bytes"] + s["free_bytes"] == s["data_region_size"]
    assert s["entries"] == len(c.keys())
    assert 0 <= s["entries"] <= s["max_entries"]
    return s


# ---------------------------------------------------------------------------------------------------------------
# API
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        np.arange(12, dtype=np.float32).reshape(3, 4),
        np.array(3.5),
        np.zeros((0, 5), dtype=np.int16),
        np.arange(10, dtype=">i4"),
        np.arange(20, dtype=np.float64)[::2],
        np.array([1 + 2j, 3 - 1j], dtype=np.complex64),
        np.ones((2, 3), dtype=bool),
    ],
    ids=["f32", "0d", "empty", "bigendian", "strided", "c64", "bool"],
)
def test_put_get_roundtrip(cache, value):
    n = cache.put("k", value)
    assert n == len(tenso.dumps(value))
    got = cache.get("k")
    np.testing.assert_array_equal(got, value)
    assert got.dtype == value.dtype.newbyteorder("=")
    assert not got.flags.writeable
    copy = cache.get("k", copy=True)
    np.testing.assert_array_equal(copy, value)
    assert copy.flags.writeable


def test_bundle_and_quantize(cache):
    bundle = {"w": np.ones((4, 4), np.float32), "b": np.arange(4)}
    cache.put("bundle", bundle)
    got = cache.get("bundle")
    assert set(got) == {"w", "b"}
    np.testing.assert_array_equal(got["b"], bundle["b"])
    x = np.linspace(-1, 1, 256, dtype=np.float32)
    cache.put("q", x, quantize="qint8")
    q = cache.get("q")
    assert isinstance(q, tenso.QuantizedTensor)
    np.testing.assert_allclose(q.dequantize(), x, atol=0.01)
    with pytest.raises(ValueError):
        cache.put("q", x, quantize="int3")


def test_zero_copy_view_keeps_mapping_alive(cache):
    cache.put("a", np.arange(1000, dtype=np.int64))
    view = cache.get("a")
    base = view
    while getattr(base, "base", None) is not None:
        base = base.base
    assert type(base).__name__ == "_Mapping"
    ref = weakref.ref(base)
    del base
    cache.close()  # the view keeps its own reference to the mapping
    gc.collect()
    assert ref() is not None
    assert view[999] == 999
    del view
    gc.collect()
    assert ref() is None


def test_copy_is_independent(cache):
    cache.put("a", np.zeros(100, np.float32))
    c = cache.get("a", copy=True)
    c[:] = 7
    assert cache.get("a")[0] == 0


def test_missing_stats_and_hit_rate(cache):
    assert cache.get("nope") is None
    cache.put("a", np.ones(3))
    cache.get("a")
    cache.get("a", copy=True)
    s = assert_invariants(cache)
    assert (s["hits"], s["misses"]) == (2, 1)
    assert s["hit_rate"] == pytest.approx(2 / 3)
    assert s["entries"] == 1
    for key in ("entries", "max_entries", "pool_size", "used_bytes", "free_bytes", "data_region_size", "hits",
                "misses", "hit_rate"):
        assert key in s
    assert s["pool_size"] == 8 * 1024 * 1024


def test_key_length_limit(cache):
    cache.put("k" * 128, np.ones(1))
    assert cache.get("k" * 128) is not None
    with pytest.raises(ValueError, match="128"):
        cache.put("k" * 129, np.ones(1))
    with pytest.raises(ValueError):
        cache.put("é" * 65, np.ones(1))  # 130 bytes of UTF-8
    cache.put("é" * 64, np.ones(1))
    assert "é" * 64 in cache.keys()


def test_full_error_is_memory_error(cache):
    with pytest.raises(TensoCacheFullError) as info:
        cache.put("huge", np.zeros(16 * 1024 * 1024, np.uint8))
    assert isinstance(info.value, MemoryError) and isinstance(info.value, TensoError)
    assert_invariants(cache)


def test_lru_eviction():
    with TensoCache("2MB", name=_name("lru")) as c:
        block = c.stats["data_region_size"] // 4 - 4096
        for i in range(4):
            c.put(f"k{i}", np.zeros(block, np.uint8))
        assert c.get("k0") is not None  # k1 is now the least recently used
        c.put("k4", np.zeros(block, np.uint8))
        assert c.get("k1") is None
        assert {"k0", "k2", "k3", "k4"} <= set(c.keys())
        # A put larger than any free run evicts as many LRU entries as it needs.
        c.put("big", np.zeros(block * 3, np.uint8))
        assert c.get("big") is not None
        assert_invariants(c)


def test_lru_by_entry_count():
    with TensoCache("1MB", name=_name("slots"), max_entries=4) as c:
        for i in range(4):
            c.put(f"k{i}", np.ones(10))
        c.get("k0")
        c.put("k4", np.ones(10))
        assert sorted(c.keys()) == ["k0", "k2", "k3", "k4"]
        assert c.stats["max_entries"] == 4
        assert_invariants(c)


def test_ttl(cache):
    cache.put("t", np.ones(4), ttl=0.15)
    cache.put("forever", np.ones(4))
    info = cache.info("t")
    assert info["ttl"] == pytest.approx(0.15)
    assert 0 <= info["age"] < 0.15
    assert cache.info("forever")["ttl"] is None
    assert cache.get("t") is not None
    time.sleep(0.2)
    assert cache.get("t") is None
    assert cache.info("t") is None
    assert cache.keys() == ["forever"]
    assert assert_invariants(cache)["entries"] == 1
    with pytest.raises(ValueError):
        cache.put("neg", np.ones(1), ttl=-1)


def test_info_without_decoding(cache):
    value = np.zeros((3, 5, 7), dtype=np.float16)
    n = cache.put("x", value)
    info = cache.info("x")
    assert info["shape"] == (3, 5, 7)
    assert info["dtype"] == np.float16
    assert info["ndim"] == 3
    assert info["size_bytes"] == n
    assert cache.info("missing") is None
    assert cache.stats["hits"] == 0  # info is not a get


def test_in_place_update_and_view_semantics(cache):
    cache.put("k", np.zeros(1000, np.float32))
    old_view = cache.get("k")
    used = cache.stats["used_bytes"]
    # Same packet size: overwritten in place; a zero-copy view shows the new bytes (documented).
    cache.put("k", np.ones(1000, np.float32))
    assert cache.stats["used_bytes"] == used
    assert old_view[0] == 1
    # Different size: a new block; the old view keeps the old bytes until that space is reused.
    cache.put("k", np.full(2000, 2, np.float32))
    assert old_view[0] == 1
    np.testing.assert_array_equal(cache.get("k"), np.full(2000, 2, np.float32))
    assert cache.stats["entries"] == 1
    assert_invariants(cache)


def test_delete_clear_keys_len_contains(cache):
    for i in range(5):
        cache.put(f"k{i}", np.full(10, i))
    assert sorted(cache.keys()) == [f"k{i}" for i in range(5)]
    assert len(cache) == 5 and "k3" in cache and "zz" not in cache
    assert cache.delete("k3") is True
    assert cache.delete("k3") is False
    assert cache.get("k3") is None
    cache.clear()
    assert cache.keys() == []
    s = assert_invariants(cache)
    assert s["used_bytes"] == 0 and s["entries"] == 0


def test_open_by_name_and_lifecycle():
    name = _name("life")
    with TensoCache("4MB", name=name) as owner:
        assert owner.name == name
        mode = stat.S_IMODE(os.stat(f"/dev/shm/{name}").st_mode)
        assert mode & 0o077 == 0, oct(mode)
        owner.put("a", np.arange(5))
        other = TensoCache(name=name, create=False)
        np.testing.assert_array_equal(other.get("a"), np.arange(5))
        other.put("b", np.arange(3))
        assert sorted(owner.keys()) == ["a", "b"]
        other.close()
        with pytest.raises(RuntimeError):
            other.put("c", np.ones(1))
        with pytest.raises(RuntimeError):
            other.get("a")
        other.close()  # idempotent
        with pytest.raises(FileExistsError):
            TensoCache("4MB", name=name)
    assert not os.path.exists(f"/dev/shm/{name}")  # the creator's context manager unlinks
    with pytest.raises(FileNotFoundError):
        TensoCache(name=name, create=False)


@pytest.mark.parametrize("bad", ["", "a/b", "../x", "sp ace", "x" * 201, "ü"])
def test_bad_names(bad):
    with pytest.raises(ValueError):
        TensoCache("1MB", name=bad)


def test_default_name_and_too_small():
    with TensoCache("1MB") as c:
        assert c.name.startswith("tenso_cache_")
    with pytest.raises(ValueError):
        TensoCache(1000, name=_name("small"))


def test_device_conversion(cache):
    cache.put("a", np.arange(6, dtype=np.float32))
    torch = pytest.importorskip("torch")
    t = cache.get("a", device="torch")
    assert isinstance(t, torch.Tensor) and t.tolist() == list(range(6))
    t.add_(1)  # a copy: the pool is untouched
    assert cache.get("a")[0] == 0
    cache.put("t", torch.arange(4))
    np.testing.assert_array_equal(cache.get("t"), np.arange(4))
    with pytest.raises(ValueError):
        cache.get("a", device="tensorflow")
    assert cache.get("missing", device="torch") is None


def test_device_missing_framework_names_extra(cache, monkeypatch):
    cache.put("a", np.ones(2))
    monkeypatch.setitem(sys.modules, "jax", None)
    with pytest.raises(ImportError, match=r"tenso-ray\[jax\]"):
        cache.get("a", device="jax")


def test_lease_roundtrip(cache):
    handle, mem = cache.lease(1000)
    assert len(mem) == 1000 and not mem.readonly
    mem[:4] = b"abcd"
    assert cache.stats["used_bytes"] == 1024
    cache.release(handle)
    assert cache.stats["used_bytes"] == 0
    with pytest.raises(ValueError):
        cache.release(handle)


# ---------------------------------------------------------------------------------------------------------------
# Multi-process
# ---------------------------------------------------------------------------------------------------------------


def _writer(name: str, keys: int, rounds: int, seed: int) -> None:
    c = TensoCache(name=name, create=False)
    rng = random.Random(seed)
    for i in range(rounds):
        size = rng.choice([1024, 4096, 65536, 300_000])
        c.put(f"k{rng.randrange(keys)}", checked_value(size, seed * 100_000 + i))
    c.close()


def _reader(name: str, keys: int, rounds: int, out) -> None:
    c = TensoCache(name=name, create=False)
    bad = seen = 0
    for i in range(rounds):
        v = c.get(f"k{i % keys}", copy=True)
        if v is not None:
            seen += 1
            bad += not is_whole(v)
    c.close()
    out.put((seen, bad))


def test_writers_and_readers_in_processes():
    name = _name("mp")
    with TensoCache("32MB", name=name) as c:
        out = CTX.Queue()
        procs = [CTX.Process(target=_writer, args=(name, 8, 200, s)) for s in (1, 2)]
        procs += [CTX.Process(target=_reader, args=(name, 8, 2000, out)) for _ in range(2)]
        for p in procs:
            p.start()
        results = [out.get(timeout=120) for _ in range(2)]
        for p in procs:
            p.join(timeout=120)
            assert p.exitcode == 0
        assert sum(bad for _, bad in results) == 0
        for key in c.keys():
            assert is_whole(c.get(key, copy=True))
        s = assert_invariants(c)
        assert s["pending"] == 0


def _put_forever(name: str, seed: int, ready) -> None:
    c = TensoCache(name=name, create=False)
    ready.set()
    i = 0
    while True:
        size = (1024, 1 << 20, 4 << 20)[(i // 8) % 3]  # each key is rewritten with the same size: in place
        c.put(f"w{i % 4}", checked_value(size, seed + i))
        i += 1


def test_writer_killed_mid_put_in_a_loop():
    """SIGKILL a writer at random points of its put loop: others are never blocked for long, no value is torn,
    and the pool's invariants hold after each kill."""
    name = _name("kill")
    rng = random.Random(1234)
    with TensoCache("32MB", name=name) as c:
        c.put("survivor", checked_value(50_000, 7))
        for round_ in range(12):
            ready = CTX.Event()
            p = CTX.Process(target=_put_forever, args=(name, round_ * 1000, ready))
            p.start()
            assert ready.wait(60)
            time.sleep(rng.uniform(0.0, 0.15))
            os.kill(p.pid, signal.SIGKILL)
            p.join(10)
            start = time.monotonic()
            c.put("after", np.full(1000, round_, np.uint8))
            assert c.get("after")[0] == round_
            assert time.monotonic() - start < 2.0, "a dead writer blocked the pool"
            for key in c.keys():
                v = c.get(key, copy=True)
                if key.startswith("w"):
                    assert is_whole(v), key
            assert is_whole(c.get("survivor", copy=True))
            s = assert_invariants(c)
            assert s["pending"] == 0
        s = c.stats
        assert s["hits"] + s["misses"] > 0


def _hold_lease(name: str, q) -> None:
    c = TensoCache(name=name, create=False)
    handle, mem = c.lease(4096)
    mem[:3] = b"xyz"
    q.put(handle)
    time.sleep(60)


def test_lease_of_dead_process_is_reclaimed_and_adoptable():
    name = _name("lease")
    with TensoCache("4MB", name=name) as c:
        q = CTX.Queue()
        p = CTX.Process(target=_hold_lease, args=(name, q))
        p.start()
        handle = q.get(timeout=60)
        mem = c.adopt(handle)  # now ours: survives the child
        assert bytes(mem[:3]) == b"xyz"
        p.kill()
        p.join(10)
        assert c.stats["used_bytes"] == 4096
        c.release(handle)
        assert c.stats["used_bytes"] == 0
        # A lease whose holder dies without handing it off is freed. (A fresh queue: the killed child may have
        # left the first one's locks taken.)
        q = CTX.Queue()
        p = CTX.Process(target=_hold_lease, args=(name, q))
        p.start()
        q.get(timeout=60)
        p.kill()
        p.join(10)
        assert assert_invariants(c)["used_bytes"] == 0


def test_threads_in_place_writer_and_readers_do_not_deadlock(cache):
    """A put writing in place with NumPy's gathering copy (which releases and retakes the GIL) while other threads
    read the same key: readers wait for the in-place write with the GIL released, so both make progress."""
    import threading

    n = 1 << 20
    base = np.arange(2 * n, dtype=np.float32)
    cache.put("k", base[::2])
    stop = time.monotonic() + 1.5
    errors = []

    def writer():
        i = 0
        while time.monotonic() < stop:
            cache.put("k", (base + i)[::2])  # non-contiguous: gathered into the pool; same size: in place
            i += 1

    def reader(copy):
        while time.monotonic() < stop:
            v = cache.get("k", copy=copy)
            if copy and not np.all(np.diff(v) == 2):
                errors.append("torn copy")

    threads = [threading.Thread(target=writer, daemon=True)]
    threads += [threading.Thread(target=reader, args=(c,), daemon=True) for c in (True, False)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
        assert not t.is_alive(), "deadlock"
    assert errors == []
    assert_invariants(cache)


def test_lock_holder_dying_mid_change_is_recovered():
    """Simulate a process SIGKILLed inside the pool lock, halfway through a change: its pid in the lock word, the
    index generation odd (mid-relink) and a counter half-updated. The next operation takes the lock over within
    milliseconds and rebuilds the derived structures from the entries; no other entry is lost."""
    import mmap
    import struct
    import subprocess

    name = _name("dead")
    with TensoCache("4MB", name=name) as c:
        for i in range(10):
            c.put(f"k{i}", checked_value(10_000 + i, i))
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        with open(f"/dev/shm/{name}", "r+b") as f, mmap.mmap(f.fileno(), 4096) as m:
            (lock,) = struct.unpack_from("<Q", m, 64)
            struct.pack_into("<Q", m, 64, (dead.pid << 32) | ((lock & 0xFFFFFFFF) + 1))  # the lock word
            (gen,) = struct.unpack_from("<Q", m, 128)
            struct.pack_into("<Q", m, 128, gen | 1)  # index generation: mid-change
            struct.pack_into("<Q", m, 152, 123456789)  # used_bytes: garbage
        start = time.monotonic()
        for i in range(10):
            assert is_whole(c.get(f"k{i}", copy=True))
        c.put("new", np.ones(10))
        assert time.monotonic() - start < 2.0
        s = assert_invariants(c)
        assert s["recoveries"] == 1
        assert s["entries"] == 11


# ---------------------------------------------------------------------------------------------------------------
# Copy-on-write reads (issue #17): get(private=True) and get(device="torch")
# ---------------------------------------------------------------------------------------------------------------


def test_private_get_is_a_writeable_view_that_nobody_else_sees(cache):
    value = np.arange(1 << 18, dtype=np.float32)  # 1 MiB: mapped copy-on-write, not copied
    cache.put("w", value)
    assert not cache.get("w").flags.writeable  # the default keeps the seed's read-only views
    a = cache.get("w", private=True)
    b = cache.get("w", private=True)
    assert a.flags.writeable and _cow(a) and _cow(b)
    a[0] = -1.0
    assert float(a[0]) == -1.0  # its writer reads its write ...
    assert float(b[0]) == 0.0 and float(cache.get("w")[0]) == 0.0  # ... nobody else does
    code = (
        "import sys\nfrom tenso.cache import TensoCache\n"
        "c = TensoCache(name=sys.argv[1], create=False)\n"
        "v = c.get('w', private=True); assert float(v[0]) == 0.0; v[1] = -2.0\n"
    )
    import subprocess

    done = subprocess.run([sys.executable, "-c", code, cache.name], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert float(a[1]) == 1.0 and float(cache.get("w")[1]) == 1.0  # another process's write stayed there
    np.testing.assert_array_equal(cache.get("w"), value)


def test_private_views_pin_their_entry_while_they_live(cache):
    room = cache.stats["data_region_size"]
    cache.put("held", np.full(room // 3 // 8, 3.0))
    view = cache.get("held", private=True)
    ref = weakref.ref(view.base) if view.base is not None else None
    for i in range(6):  # puts that need room: the pinned entry is never evicted, nor its block reused
        try:
            cache.put(f"other{i}", np.full(room // 3 // 8, float(i)))
        except TensoCacheFullError:
            pass
    assert "held" in cache and bool((view == 3.0).all())
    assert cache.stats["pinned"] >= 1
    del view
    gc.collect()
    assert ref is None or ref() is None
    assert cache.stats["pinned"] == 0


def test_private_get_of_dicts_small_values_and_missing_keys(cache):
    cache.put("d", {"big": np.ones(1 << 17, np.float64), "small": np.arange(4)})
    d = cache.get("d", private=True)
    # A dict is one bundle entry whose arrays are decoded into NumPy memory: private copies, writeable.
    assert d["big"].flags.writeable and d["small"].flags.writeable
    d["big"][0] = 5.0
    assert float(cache.get("d")["big"][0]) == 1.0
    assert cache.get("missing", private=True) is None


def test_device_torch_reads_through_a_private_view(cache):
    torch = pytest.importorskip("torch")
    cache.put("t", torch.arange(1 << 18, dtype=torch.float32))
    views = tenso.cow.stats()["views"]
    t = cache.get("t", device="torch")
    assert tenso.cow.stats()["views"] == views + 1  # a mapping, not a copy
    t[0] = -1.0
    assert float(cache.get("t", device="torch")[0]) == 0.0 and float(cache.get("t")[0]) == 0.0


def test_private_get_falls_back_to_a_counted_copy(cache, monkeypatch):
    cache.put("w", np.ones(1 << 18, np.float32))
    monkeypatch.setattr(tenso.cow, "_warned", False)
    before = tenso.cow.stats()["copies"]
    tenso_rs._private_view_routes([])
    try:
        with pytest.warns(RuntimeWarning, match="copy-on-write"):
            a = cache.get("w", private=True)
    finally:
        tenso_rs._private_view_routes(None)
    assert tenso.cow.stats()["copies"] == before + 1 and not _cow(a) and a.flags.writeable
    a[0] = 0.0
    assert float(cache.get("w")[0]) == 1.0
