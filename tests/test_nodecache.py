"""tenso.nodecache: the node-local pool service (naming, publication, lifetime, sweeping, reclaim, counters)."""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest

from tenso import nodecache
from tenso.cache import PINS

SHM = "/dev/shm"
CTX = mp.get_context("spawn")


def _entries(scope: str) -> list[str]:
    name = nodecache.pool_name(scope)
    return sorted(e for e in os.listdir(SHM) if e == name or e.startswith(name + "."))


def _wait_gone(scope: str, timeout: float = 20.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = _entries(scope)
        if not left:
            return left
        time.sleep(0.05)
    return _entries(scope)


@pytest.fixture
def scope():
    s = f"t-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    yield s
    nodecache.drop(s)
    assert _wait_gone(s, 5.0) == []


def _run(code: str, *args: str, expect_kill: bool = False) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (argv[1:] = args)."""
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
    if expect_kill:
        assert proc.returncode == -signal.SIGKILL, proc.stderr
    else:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_same_scope_same_pool_in_every_process(scope):
    cache = nodecache.attach(scope, size="4MB")
    assert cache.name == nodecache.pool_name(scope)
    assert nodecache.attach(scope) is cache  # one handle per process
    assert cache.stats["pool_size"] == 4 << 20
    cache.put("x", np.arange(1000))
    code = (
        "import sys, numpy as np; from tenso import nodecache\n"
        "c = nodecache.attach(sys.argv[1], size='64MB')\n"  # the size only matters to a creator
        "assert c.stats['pool_size'] == 4 << 20\n"
        "np.testing.assert_array_equal(c.get('x'), np.arange(1000)); c.put('y', np.ones(10))\n"
    )
    _run(code, scope)
    np.testing.assert_array_equal(cache.get("y"), np.ones(10))
    # The other process left; this one still uses the pool: it stays, with this process's link only.
    assert _entries(scope) == sorted([cache.name, f"{cache.name}.{os.getpid()}.{os.getpid()}"])


def test_scope_names_are_checked():
    for bad in ["", "a/b", "a.b", "x" * 121, "sp ace"]:
        with pytest.raises(ValueError, match="scope"):
            nodecache.attach(bad)


def test_drop_removes_the_pool_and_every_link(scope):
    cache = nodecache.attach(scope, size="2MB")
    cache.put("k", np.arange(10))
    view = cache.get("k")
    nodecache.drop(scope)
    assert _entries(scope) == []
    np.testing.assert_array_equal(view, np.arange(10))  # the mapping outlives the name
    fresh = nodecache.attach(scope, size="2MB")
    assert fresh is not cache and "k" not in fresh


def test_killed_while_creating_leaves_nothing_that_blocks(scope):
    # The fault: the creator used to give the segment its final name before writing its header; killed then, it
    # left a 0-byte segment and every later attach waited 10 s and failed ("the shared memory segment is empty").
    # Now it creates under its own link name and is killed there: a 0-byte segment carrying its dead pid.
    code = (
        "import os, signal, sys; from tenso import nodecache\n"
        "def dying(size, name, create):\n"
        "    open(f'/dev/shm/{name}', 'wb').close()  # shm_open(O_CREAT) done, fallocate and header not yet\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "nodecache.TensoCache = dying\n"
        "nodecache.attach(sys.argv[1], size='2MB')\n"
    )
    _run(code, scope, expect_kill=True)
    left = _entries(scope)
    assert len(left) == 1 and os.path.getsize(f"{SHM}/{left[0]}") == 0  # what the dead creator left
    assert not os.path.exists(f"{SHM}/{nodecache.pool_name(scope)}")  # nothing published
    cache = nodecache.attach(scope, size="2MB")  # at once, no wait, no error
    cache.put("a", np.arange(5))
    assert _entries(scope) == sorted([cache.name, f"{cache.name}.{os.getpid()}.{os.getpid()}"])  # swept


def test_killed_between_creating_and_publishing(scope):
    code = (
        "import os, signal, sys; from tenso import nodecache\n"
        "link = os.link\n"
        "def dying(src, dst):\n"
        "    if '.' not in os.path.basename(dst):  # the publication\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    link(src, dst)\n"
        "nodecache.os.link = dying\n"
        "nodecache.attach(sys.argv[1], size='2MB')\n"
    )
    _run(code, scope, expect_kill=True)
    assert len(_entries(scope)) == 1  # a complete pool, unpublished, under the dead creator's link name
    cache = nodecache.attach(scope, size="2MB")
    assert cache.stats["pool_size"] == 2 << 20
    assert len(_entries(scope)) == 2


def test_the_last_user_to_exit_removes_the_pool(scope):
    code = (
        "import sys, numpy as np; from tenso import nodecache\n"
        "nodecache.attach(sys.argv[1], size='2MB').put('z', np.zeros(100))\n"
    )
    _run(code, scope)
    assert _entries(scope) == []  # removed at exit, not left for a sweep


def test_a_killed_sole_user_is_cleaned_up_by_the_watcher(scope):
    code = (
        "import os, signal, sys; from tenso import nodecache\n"
        "nodecache.attach(sys.argv[1], size='2MB')\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    _run(code, scope, expect_kill=True)
    assert _wait_gone(scope) == []


def test_a_killed_sole_user_is_swept_by_the_next_attach(scope, tmp_path):
    code = (
        "import os, signal, sys; from tenso import nodecache\n"
        "nodecache._spawn_watcher = lambda name: None  # as if the watcher had been killed too\n"
        "nodecache.attach(sys.argv[1], size='2MB')\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    _run(code, scope, expect_kill=True)
    assert len(_entries(scope)) == 2  # the pool and the dead process's link
    other = f"{scope}-other"
    try:
        nodecache.attach(other, size="1MB")  # any attach on the host sweeps
        assert _entries(scope) == []
    finally:
        nodecache.drop(other)


def test_the_pool_goes_with_its_owner(scope):
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        cache = nodecache.attach(scope, size="2MB", owner_pid=owner.pid)
        cache.put("w", np.arange(3))
        assert os.path.exists(f"{SHM}/{cache.name}")
    finally:
        owner.kill()
        owner.wait()
    # This process still uses it, but its owner is gone: the watcher removes it.
    assert _wait_gone(scope) == []
    fresh = nodecache.attach(scope, size="2MB")  # a new pool, owned by this process
    assert "w" not in fresh


def test_entries_dicts_manifest_and_delivery(scope):
    cache = nodecache.attach(scope, size="8MB")
    state = {f"layer{i}": np.full(3000 + i, i, np.float32) for i in range(5)}
    stored = nodecache.encodable(state)
    assert nodecache.nbytes(stored) == sum(v.nbytes for v in state.values())
    got = nodecache.store(cache, "k", stored)
    assert list(got) == list(state)
    for k, v in state.items():
        np.testing.assert_array_equal(got[k], v)
        assert not got[k].flags.writeable
    again = nodecache.lookup(cache, "k")
    assert again is not None and list(again) == list(state)
    assert nodecache.lookup(cache, "missing") is None
    copied = nodecache.deliver(again, None, copy=True)
    assert copied["layer0"].flags.writeable
    assert nodecache.encodable({"a": np.array([object()])}) is None and nodecache.encodable({1: np.ones(2)}) is None
    s = nodecache.stats(cache)
    assert (s["hits"], s["misses"], s["fallbacks"]) == (1, 1, 0)
    assert nodecache.remove(cache, "k") and cache.stats["entries"] == 0


@pytest.mark.skipif(not PINS, reason="the native pool of this build has no pins (tenso-shm pin table)")
def test_a_long_job_keeps_hitting_and_never_invalidates_a_live_view(scope):
    cache = nodecache.attach(scope, size="4MB")
    room = cache.stats["data_region_size"]
    item = 256 << 10  # 16 objects fit at most
    kept = {}  # views a "task" still holds: their entries must survive every later put
    total = 0
    n = 0
    while total < 10 * room:
        value = np.full(item // 8, float(n))
        got = nodecache.store(cache, f"obj{n}", value)
        assert got is not None, f"fell back at object {n} with unpinned entries in the pool"
        assert float(got[0]) == float(n)
        again = nodecache.lookup(cache, f"obj{n}")  # a second reader hits
        assert again is not None and float(again[-1]) == float(n)
        if n % 10 == 0 and len(kept) < 4:
            kept[n] = got
        del got, again
        total += item
        n += 1
        for k, view in kept.items():
            assert float(view[0]) == float(k) and float(view[-1]) == float(k)
    s = nodecache.stats(cache)
    assert s["fallbacks"] == 0 and s["hits"] == n and s["misses"] == 0
    assert s["evictions"] > 0
    assert s["used_bytes"] <= s["data_region_size"] and s["used_bytes"] + s["free_bytes"] == s["data_region_size"]
    for k, view in kept.items():  # the pinned ones are all still there, intact
        np.testing.assert_array_equal(nodecache.lookup(cache, f"obj{k}"), view)
    kept.clear()
    gc.collect()
    assert cache.stats["pinned"] == 0


@pytest.mark.skipif(not PINS, reason="the native pool of this build has no pins (tenso-shm pin table)")
def test_pins_of_a_dead_process_are_freed(scope):
    cache = nodecache.attach(scope, size="2MB")
    nodecache.store(cache, "held", np.ones(64 << 10))
    code = (
        "import os, signal, sys; from tenso import nodecache\n"
        "c = nodecache.attach(sys.argv[1]); v = nodecache.lookup(c, 'held'); assert v is not None\n"
        "assert c.stats['pinned'] == 1\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    _run(code, scope, expect_kill=True)
    # The dead reader's pin no longer holds the entry: a put that needs the whole pool evicts it.
    big = np.ones(cache.stats["data_region_size"] // 8 - 1024)
    assert nodecache.store(cache, "big", big) is not None
    assert nodecache.lookup(cache, "held") is None
