"""Pins of the TensoCache pool (`_Pool.get(..., pin=True)`): pinned entries survive eviction while a live process
views them, die with their process, and are given back when the last view is garbage-collected."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator

import numpy as np
import pytest

from tenso import tenso_rs

_Pool = tenso_rs._Pool


def _name(tag: str) -> str:
    return f"tenso-test-pins-{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def pool() -> Iterator[tenso_rs._Pool]:
    p = _Pool.create(_name("pool"), 1 << 20)
    yield p
    p.close()
    p.unlink()


def quarter(pool: tenso_rs._Pool) -> int:
    """Bytes of a uint8 array whose packet takes at most a quarter of the data region."""
    return pool.stats["data_region_size"] // 4 // 64 * 64 - 256


def fill(pool: tenso_rs._Pool, keys: range, n: int) -> None:
    for i in keys:
        pool.put(f"k{i}", np.full(n, i % 251, dtype=np.uint8))


# A child that pins k0, says so, and waits to be killed.
PINNER = """
import sys, time
from tenso import tenso_rs
pool = tenso_rs._Pool.open(sys.argv[1])
view = pool.get("k0", pin=True)
assert view is not None and pool.stats["pinned"] == 1
print("pinned", flush=True)
time.sleep(600)
"""

# A child that puts keys k{start}..k{stop-1} of n bytes (evicting as it goes).
PUTTER = """
import sys
import numpy as np
from tenso import tenso_rs
pool = tenso_rs._Pool.open(sys.argv[1])
start, stop, n = map(int, sys.argv[2:5])
for i in range(start, stop):
    pool.put(f"k{i}", np.full(n, i % 251, dtype=np.uint8))
"""


def test_sigkilled_pinner_frees_its_entry(pool: tenso_rs._Pool) -> None:
    n = quarter(pool)
    fill(pool, range(4), n)
    child = subprocess.Popen([sys.executable, "-c", PINNER, pool.name], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "pinned"
        assert pool.stats["pinned"] == 1
        # The live child's pin keeps k0 through a whole turnover of the pool.
        fill(pool, range(4, 12), n)
        value = pool.get("k0")
        assert value is not None and (value == 0).all()
        del value
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if child.stdout is not None:
            child.stdout.close()
    # Dead now: its pin is cleared and k0 is evicted like any entry.
    fill(pool, range(12, 16), n)
    assert pool.get("k0") is None
    stats = pool.stats
    assert stats["pinned"] == 0
    assert stats["evictions"] >= 12
    pool._check()


def test_live_view_never_changes_while_puts_evict(pool: tenso_rs._Pool) -> None:
    n = quarter(pool)
    fill(pool, range(4), n)
    view = pool.get("k0", pin=True)
    assert isinstance(view, np.ndarray)
    assert not view.flags.writeable
    expected = np.zeros(n, dtype=np.uint8)
    for start in range(4, 20, 4):
        fill(pool, range(start, start + 4), n)
        np.testing.assert_array_equal(view, expected)
    # Puts from another process, too.
    subprocess.run([sys.executable, "-c", PUTTER, pool.name, "20", "32", str(n)], check=True, timeout=120)
    np.testing.assert_array_equal(view, expected)
    # Replacing and deleting the key leaves the view alone.
    pool.put("k0", np.full(n, 9, dtype=np.uint8))
    np.testing.assert_array_equal(view, expected)
    assert pool.delete("k0")
    fill(pool, range(32, 40), n)
    np.testing.assert_array_equal(view, expected)
    stats = pool.stats
    assert stats["pinned"] == 1
    assert stats["evictions"] >= 28
    pool._check()
    del view
    gc.collect()
    assert pool.stats["pinned"] == 0
    pool._check()


def test_pins_released_when_views_die(pool: tenso_rs._Pool) -> None:
    # uint8 leaves: a bundle's leaves sit at arbitrary offsets, and misaligned wider ones are decoded as copies.
    for key in ("a", "b", "c"):
        pool.put(key, {"x": np.arange(100, dtype=np.uint8), "y": np.ones((3, 4), dtype=np.uint8)})
    value = pool.get("a", pin=True)
    assert pool.stats["pinned"] == 1
    x = value["x"]
    del value
    gc.collect()
    assert pool.stats["pinned"] == 1, "a surviving view keeps the pin"
    part = x[10:20]
    del x
    gc.collect()
    assert pool.stats["pinned"] == 1
    del part
    gc.collect()
    assert pool.stats["pinned"] == 0
    values = pool.get_many(["a", "b", "missing", "c"], pin=True)
    assert values[2] is None
    assert pool.stats["pinned"] == 3
    # The values of one get_many share one owner of all their pins (taken together): any view of any of them keeps
    # them all, and the last one gives them all back.
    del values[0]
    gc.collect()
    assert pool.stats["pinned"] == 3
    kept = values[0]["y"]  # b's
    del values
    gc.collect()
    assert pool.stats["pinned"] == 3
    np.testing.assert_array_equal(kept, np.ones((3, 4), dtype=np.uint8))
    del kept
    gc.collect()
    assert pool.stats["pinned"] == 0
    # Unpinned reads and copies take no pin; the counters still count them.
    hits = pool.stats["hits"]
    plain = pool.get("a")
    copied = pool.get("a", copy=True, pin=True)
    assert copied["x"].flags.writeable
    assert pool.stats["pinned"] == 0
    assert pool.stats["hits"] == hits + 2
    assert pool.get("nope", pin=True) is None
    del plain, copied
    pool._check()


def test_pinned_close_keeps_views(pool: tenso_rs._Pool) -> None:
    pool.put("a", np.arange(1000, dtype=np.int64))
    view = pool.get("a", pin=True)
    other = _Pool.open(pool.name)
    pool.close()
    # The view keeps the mapping (and its pin) alive after its handle is closed.
    assert other.stats["pinned"] == 1
    np.testing.assert_array_equal(view, np.arange(1000, dtype=np.int64))
    del view
    gc.collect()
    assert other.stats["pinned"] == 0
    other.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_child_pins_as_itself(pool: tenso_rs._Pool) -> None:
    # The process id behind pins is cached per process: a fork child must pin under its own id, so that its pins
    # die with it (under the parent's id they would outlive the child for as long as the parent lives).
    pool.put("a", np.arange(10, dtype=np.uint8))
    first = pool.get("a", pin=True)  # the parent has used (and cached) its id
    del first
    gc.collect()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            view = pool.get("a", pin=True)
            code = 0 if view is not None and pool.stats["pinned"] == 1 else 2
        finally:
            os._exit(code)  # exits holding the pin
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert pool.stats["pinned"] == 0, "a dead child's pin protects nothing"
    view = pool.get("a", pin=True)
    assert pool.stats["pinned"] == 1
    del view
    gc.collect()
    assert pool.stats["pinned"] == 0
    pool._check()
