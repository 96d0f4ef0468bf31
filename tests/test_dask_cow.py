"""tenso.dask's immutable leases on a real LocalCluster(processes=True, n_workers=2): a recipient's array is its own
(a write is seen by its writer only), an array that arrived through the pool goes on by reference (the block counts
its holders), and the block outlives whichever holder lets go or dies first."""

from __future__ import annotations

import gc
import os
import signal
import time

import numpy as np
import pytest

distributed = pytest.importorskip("distributed")

import dask  # noqa: E402
from distributed import Client, LocalCluster  # noqa: E402

import tenso.dask as td  # noqa: E402
from tenso import tenso_rs  # noqa: E402

pytestmark = [
    pytest.mark.dask,
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:Port .* is already in use:UserWarning"),
    pytest.mark.filterwarnings("ignore:unclosed <socket.socket:ResourceWarning"),
    # A machine without a route to private mappings copies (and says so once): still correct.
    pytest.mark.filterwarnings("ignore:tenso. cannot map shared memory copy-on-write:RuntimeWarning"),
]

POOL = "128MB"
MIN = 64 * 1024
HAS_PRIVATE_VIEW = hasattr(tenso_rs, "_private_view")


def _counts(dask_worker=None):
    import tenso.dask

    return tenso.dask.counts()


def _ident(x):
    return x


def _write_first(x, value):
    """A task that writes its input in place and returns what it then reads."""
    x[0] = value
    return float(x[0])


def _first(x):
    return float(x[0])


def _used(dask_worker=None) -> int:
    import tenso.dask

    return tenso.dask._state.cache.stats["used_bytes"]


@pytest.fixture(scope="module")
def cluster():
    # The active memory manager drops replicas it deems extra: a test that writes B's replica in place (what Dask
    # hands a task is its worker's stored object) and then reads A's must keep A's.
    with dask.config.set({"distributed.scheduler.active-memory-manager.start": False}):
        with LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None, memory_limit="2GiB"
        ) as lc:
            yield lc


@pytest.fixture(scope="module")
def client(cluster):
    with Client(cluster) as c:
        td.install(c, pool_size=POOL, min_bytes=MIN)
        try:
            yield c
        finally:
            td.uninstall(c)


def _workers(client):
    return sorted(client.scheduler_info()["workers"])


def _x(seed: int, writeable: bool = True) -> np.ndarray:
    x = np.random.default_rng(seed).random(1 << 15)  # 256 KiB of float64: over MIN
    x.flags.writeable = writeable
    return x


def _wait_restarted(client, pid: int) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        time.sleep(0.2)
        try:
            pids = client.run(os.getpid)
        except (OSError, distributed.comm.core.CommClosedError):
            continue
        if len(pids) == 2 and pid not in pids.values():
            return
    raise AssertionError("the nanny did not restart the killed worker")


def _settle(client, baseline: int) -> int:
    deadline = time.monotonic() + 20
    used = _used()
    while used > baseline and time.monotonic() < deadline:
        gc.collect()
        client.run(gc.collect)
        time.sleep(0.2)
        used = _used()  # stats sweeps the references of dead processes
    return used


def _stored(key, dask_worker=None):
    """The object a worker holds for ``key`` (sent back to the caller: a recipient of the same block)."""
    return dask_worker.data[key]


def test_a_recipients_write_is_seen_by_nobody_else(client):
    """Dask hands a task the very object its worker stores, so a task that writes its input changes that worker's
    replica (as with Dask's own serializers); what must not change is every other process's array."""
    a, b = _workers(client)
    x = _x(1)
    original = x.copy()
    fut = client.scatter(x, workers=[a], direct=True, hash=False)  # the client's one copy into the pool
    # B receives the block (by reference from A) and writes its array in place.
    assert client.submit(_write_first, fut, -1.0, workers=[b], pure=False).result() == -1.0
    # Not the sender, not the holder it came from, not another recipient of the same block, not the next task.
    np.testing.assert_array_equal(x, original)
    assert client.submit(_first, fut, workers=[a], pure=False).result() == original[0]
    y = client.run(_stored, fut.key, workers=[a])[a]  # A -> client: another recipient of the block
    np.testing.assert_array_equal(y, original)
    # A recipient's array is writeable, as the sender's was, and its write is its own.
    assert y.flags.writeable
    y[0] = 5.0
    np.testing.assert_array_equal(client.run(_stored, fut.key, workers=[a])[a], original)
    assert client.submit(_first, fut, workers=[a], pure=False).result() == original[0]
    np.testing.assert_array_equal(x, original)


def test_an_array_from_the_pool_goes_on_by_reference(client):
    """A read-only array (a view of the block itself) and, where private mappings work, a writeable one: the
    worker that holds it sends it on with a new reference to its block, and copies nothing."""
    a, b = _workers(client)
    for writeable in (False, True) if HAS_PRIVATE_VIEW else (False,):
        x = _x(2, writeable)
        fut = client.scatter(x, workers=[a], direct=True, hash=False)
        before = sum(c["leases_forwarded"] for c in client.run(_counts).values())
        out = client.submit(_ident, fut, workers=[b], pure=False)  # A -> B
        np.testing.assert_array_equal(client.gather(out, direct=True), x)  # B -> client
        np.testing.assert_array_equal(fut.result(), x)  # A or B -> scheduler -> client
        after = sum(c["leases_forwarded"] for c in client.run(_counts).values())
        assert after >= before + 3, (writeable, before, after)
        del fut, out


@pytest.mark.skipif(not HAS_PRIVATE_VIEW, reason="needs tenso_rs._private_view")
def test_a_written_array_is_copied_not_forwarded(client):
    """A holder that wrote its private view sends its own bytes (a new lease), not the block's."""
    a, b = _workers(client)
    x = _x(3)
    fut = client.scatter(x, workers=[a], direct=True, hash=False)
    out = client.submit(np.negative, fut, out=None, workers=[a], pure=False)  # a fresh array: copied on

    def write_in_place(y):
        y *= 2
        return y

    doubled = client.submit(write_in_place, fut, workers=[b], pure=False)  # B's private view, written
    np.testing.assert_array_equal(client.gather(doubled, direct=True), 2 * x)  # B's own bytes, not the block's
    np.testing.assert_array_equal(client.gather(out, direct=True), -x)
    np.testing.assert_array_equal(client.run(_stored, fut.key, workers=[a])[a], x)  # A's replica: the block


def test_forwarded_block_outlives_its_first_holder(client):
    """A sends its block on to B by reference, then lets go of it (the future is released) and then dies: B's
    array stays right, and once B lets go too the pool is back where it started."""
    a, b = _workers(client)
    gc.collect()
    baseline = _used()
    x = _x(4, writeable=False)
    fut = client.scatter(x, workers=[a], direct=True, hash=False)
    on_b = client.submit(_ident, fut, workers=[b], pure=False)
    on_b.result()
    assert client.run(_counts, workers=[b])[b]["leases_received"] >= 1
    del fut  # A drops its reference; B still holds the block
    time.sleep(0.5)
    np.testing.assert_array_equal(client.gather(on_b, direct=True), x)
    pid = client.run(os.getpid, workers=[a])[a]
    os.kill(pid, signal.SIGKILL)
    _wait_restarted(client, pid)
    np.testing.assert_array_equal(client.gather(on_b, direct=True), x)
    del on_b
    assert _settle(client, baseline) <= baseline


def test_sigkilled_holders_references_are_swept(client):
    """A worker SIGKILLed while it holds references (arrays received, references sent and not yet adopted): the
    pool drops them; blocks others hold stay right, and the pool's bytes and /dev/shm end where they started."""
    a, b = _workers(client)
    gc.collect()
    baseline = _used()
    shm_before = set(os.listdir("/dev/shm"))
    x = _x(5, writeable=False)
    fut = client.scatter(x, workers=[a], direct=True, hash=False)
    on_b = client.submit(_ident, fut, workers=[b], pure=False)
    on_b.result()

    def hold_and_send(dask_worker=None):
        import tenso.dask as t
        from distributed.protocol import serialize

        st = t._state
        ctx = {"recipient": {t.HANDSHAKE_KEY: {"pool": st.pool_name, "peer": st.token}}}
        held = dask_worker.data[on_b_key]
        # References sent and never adopted (their holder is this process until the claim timeout).
        dask_worker._tenso_test_sent = [serialize(held, context=ctx) for _ in range(3)]
        return t.counts()["leases_forwarded"]

    on_b_key = on_b.key
    assert client.run(hold_and_send, workers=[b])[b] >= 3
    pid = client.run(os.getpid, workers=[b])[b]
    os.kill(pid, signal.SIGKILL)
    _wait_restarted(client, pid)
    np.testing.assert_array_equal(client.gather(fut, direct=True), x)  # A's reference is intact
    del fut, on_b
    assert _settle(client, baseline) <= baseline
    # /dev/shm: no new pool, and the killed process's link to the pool is gone (each process that attaches has one
    # link; the restarted worker made its own, and swept the dead one's).
    scope = td.scope_for(client.scheduler.address)
    deadline = time.monotonic() + 10
    while any(n.endswith(f".{pid}") for n in os.listdir("/dev/shm")) and time.monotonic() < deadline:
        time.sleep(0.2)
    names = set(os.listdir("/dev/shm"))
    assert not any(n.endswith(f".{pid}") for n in names)
    assert {n for n in names - shm_before if scope in n and n.count(".") != 2} == set()


def _routes(routes, dask_worker=None):
    from tenso import tenso_rs as rs

    rs._private_view_routes(routes)


@pytest.mark.skipif(not HAS_PRIVATE_VIEW, reason="needs tenso_rs._private_view")
def test_without_a_route_arrays_are_copied_and_right(client):
    a, b = _workers(client)
    client.run(_routes, [])
    _routes([])
    try:
        x = _x(6)
        before = _counts()["received_copies"]
        fut = client.scatter(x, workers=[a], direct=True, hash=False)
        out = client.submit(_write_first, fut, -2.0, workers=[b], pure=False)
        assert out.result() == -2.0
        y = client.run(_stored, fut.key, workers=[a])[a]
        assert y.flags.writeable
        np.testing.assert_array_equal(y, x)
        y[0] = 7.0
        np.testing.assert_array_equal(client.run(_stored, fut.key, workers=[a])[a], x)
        assert client.submit(_first, fut, workers=[a], pure=False).result() == x[0]
        assert _counts()["received_copies"] > before
        assert client.run(_counts, workers=[b])[b]["received_copies"] >= 1
    finally:
        client.run(_routes, None)
        _routes(None)


def test_scatter_through_the_scheduler_reaches_the_worker_as_a_lease(client):
    """The client's scatter without direct=True reaches the scheduler as Dask's frames; the scheduler hands each
    large value to the worker as a lease (it keeps none), and the result comes back by reference."""
    a, _ = _workers(client)
    x = _x(7)
    received = client.run(_counts, workers=[a])[a]["leases_received"]
    fut = client.scatter(x, workers=[a], hash=False)
    assert client.run(_counts, workers=[a])[a]["leases_received"] == received + 1
    np.testing.assert_array_equal(client.run(_stored, fut.key, workers=[a])[a], x)
    np.testing.assert_array_equal(fut.result(), x)
    small = np.arange(10.0)
    np.testing.assert_array_equal(client.scatter(small, workers=[a]).result(), small)  # frames, as before


def test_pool_lease_references_from_python():
    """The _Pool lease methods tenso.dask builds on: a block counts its references; a writeable view of an adopted
    block only for its sole reference; the last release frees it."""
    from tenso import TensoCache

    cache = TensoCache(4 << 20, name=f"tenso-dask-cow-refs-{os.getpid()}", create=True)
    try:
        base = cache.stats["used_bytes"]
        first, mem = cache.lease(1000)
        np.frombuffer(mem, dtype=np.uint8)[:] = 7  # the maker's one write, before the handle goes out
        del mem
        second = cache.share(first)
        assert cache._pool._references(first) == 2
        shared = cache.adopt(second)  # another holder exists: read-only
        assert shared.readonly and bytes(shared[:3]) == b"\7\7\7"
        cache.release(first)
        assert cache._pool._references(second) == 1
        with pytest.raises(ValueError):
            cache.release(first)
        third = cache.share(second)
        cache.release(second)
        assert cache.adopt(third, writeable=False).readonly
        assert not cache.adopt(third).readonly  # the sole reference may write
        cache.release(third)
        assert cache._pool._references(third) == 0
        assert cache.stats["used_bytes"] == base
        del shared
    finally:
        cache.close()
        cache.unlink()
