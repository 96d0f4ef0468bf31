"""tenso.dask on a real LocalCluster(processes=True, n_workers=2, threads_per_worker=1), started by a module fixture.

Every round trip goes client -> worker A (scatter, direct) -> worker B (a task input fetched from A) -> client
(gather, direct), so each of the three same-host hand-offs runs; the per-process counters of tenso.dask say which
path each message took.
"""

from __future__ import annotations

import gc
import os
import signal
import sys
import time

import numpy as np
import pytest

distributed = pytest.importorskip("distributed")
pytest.importorskip("dask.array")

import dask.array as da  # noqa: E402
from distributed import Client, LocalCluster  # noqa: E402
from distributed.comm.core import Comm  # noqa: E402
from distributed.protocol import deserialize, serialize  # noqa: E402
from distributed.protocol.serialize import dask_deserialize, dask_serialize  # noqa: E402

import tenso.dask as td  # noqa: E402

try:
    import torch
except ImportError:  # pragma: no cover
    torch = None
try:
    import ml_dtypes
except ImportError:  # pragma: no cover
    ml_dtypes = None

pytestmark = [
    pytest.mark.dask,
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:Port .* is already in use:UserWarning"),
    # distributed leaves an unconnected socket to the garbage collector when a cluster closes after a worker was
    # SIGKILLed (not ours: tenso.dask opens no sockets).
    pytest.mark.filterwarnings("ignore:unclosed <socket.socket:ResourceWarning"),
]

POOL = "256MB"
#: Small arrays keep the tests fast; the default (2 MiB) is where a lease starts to pay, not a limit of the path.
MIN = 64 * 1024


def _ident(x):
    return x


def _counts(dask_worker=None):
    import tenso.dask

    return tenso.dask.counts()


def _shm_names() -> set[str]:
    return set(os.listdir("/dev/shm"))


@pytest.fixture(scope="module")
def cluster():
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


def _leases(client):
    """Leases sent by every process of the cluster (the client included)."""
    per = client.run(_counts)
    total = td.counts()["leases_sent"] + sum(c["leases_sent"] for c in per.values())
    frames = td.counts()["frames_sent"] + sum(c["frames_sent"] for c in per.values())
    return total, frames


def _round_trip(client, x):
    a, b = _workers(client)
    fut = client.scatter(x, workers=[a], direct=True)
    out = client.submit(_ident, fut, workers=[b], pure=False)
    y = client.gather(out, direct=True)
    del fut, out
    return y


def _equal(x, y) -> None:
    if torch is not None and isinstance(x, torch.Tensor):
        assert isinstance(y, torch.Tensor)
        assert y.dtype == x.dtype and tuple(y.shape) == tuple(x.shape)
        assert torch.equal(x.detach(), y.detach())
        assert y.requires_grad == x.requires_grad
        return
    if isinstance(x, dict):
        assert isinstance(y, dict) and list(y) == list(x)
        for k in x:
            _equal(x[k], y[k])
        return
    if isinstance(x, np.ndarray):
        assert isinstance(y, np.ndarray)
        assert y.dtype == x.dtype and y.shape == x.shape
        assert x.tobytes() == y.tobytes()
        assert y.flags.writeable == x.flags.writeable
        return
    from tenso import QuantizedTensor, RaggedArray, StringTensor

    assert type(y) is type(x)
    if isinstance(x, QuantizedTensor):
        np.testing.assert_array_equal(x.dequantize(), y.dequantize())
    elif isinstance(x, StringTensor):
        assert x.to_list() == y.to_list()
    elif isinstance(x, RaggedArray):
        assert [r.tolist() for r in x] == [r.tolist() for r in y]


def _cases():
    rng = np.random.default_rng(0)
    big = rng.random((512, 1024), dtype=np.float32)  # 2 MiB
    cases = {
        "float32": (big, True),
        "fortran": (np.asfortranarray(rng.random((300, 500))), True),
        "strided": (rng.random((600, 800))[::2, 1::3], True),
        "negative-strides": (rng.random((400, 400))[::-1], True),
        "int8-small": (np.arange(100, dtype=np.int8), False),
        "zero-d": (np.array(3.5), False),
        "empty": (np.empty((0, 4), np.float32), False),
        "structured": (np.zeros(20000, dtype=[("a", "<i4"), ("b", "<f8")]), True),
        "datetime": (np.arange(20000).astype("datetime64[ns]"), True),
        "complex": (rng.random(20000) + 1j * rng.random(20000), True),
        "readonly": (np.frombuffer(rng.random(20000).tobytes()), True),
        "dict": ({"w": big, "b": np.arange(10.0), "k": rng.random((256, 256))}, True),
    }
    if ml_dtypes is not None:
        cases["bfloat16"] = (big.astype(ml_dtypes.bfloat16), True)
        cases["float8"] = (big.astype(ml_dtypes.float8_e4m3fn), True)
    if torch is not None:
        t = torch.from_numpy(big.copy())
        cases["torch"] = (t, True)
        cases["torch-bfloat16"] = (t.to(torch.bfloat16), True)
        cases["torch-strided"] = (t[:, ::2], True)
        cases["torch-grad"] = (t.clone().requires_grad_(True), True)
        cases["torch-int64-small"] = (torch.arange(10), False)
    from tenso import QuantizedTensor, RaggedArray, StringTensor

    cases["quantized"] = (QuantizedTensor.quantize(big, "qint8"), True)
    cases["strings"] = (StringTensor([f"row {i} " * 50 for i in range(2000)]), True)
    cases["ragged"] = (RaggedArray([np.arange(i * 40, dtype=np.float32) for i in range(60)]), True)
    return cases


CASES = _cases()


@pytest.mark.parametrize("name", list(CASES))
def test_round_trip(client, name):
    x, uses_pool = CASES[name]
    before, frames_before = _leases(client)
    y = _round_trip(client, x)
    _equal(x, y)
    after, frames_after = _leases(client)
    if uses_pool:
        assert after >= before + 3  # client -> A, A -> B, B -> client all went through the pool
    else:
        assert after == before


def test_registered_everywhere(client):
    assert td.is_registered()
    assert all(client.run(td.is_registered).values())
    names = set(client.run(td.pool_name).values())
    assert names == {td.pool_name()}


def test_writeable_result_owns_its_lease(client):
    x = np.arange(1 << 18, dtype=np.float64)
    views = td.counts()["private_views"]
    y = _round_trip(client, x)
    y[0] = -1.0  # writeable, and nobody else's memory
    assert y[0] == -1.0 and x[0] == 0.0
    used = td._state.cache.stats["used_bytes"]
    view = y[1:]
    del y
    gc.collect()
    assert view[0] == 1.0
    if td.counts()["private_views"] > views:
        # A private view of its lease: the reference is held while any view of the array lives.
        assert td._state.cache.stats["used_bytes"] == used
        del view
        gc.collect()
        # Released when the last view went away (and once the workers dropped the values _round_trip released: the
        # block went to this client by reference, so B's replica shares it).
        deadline = time.monotonic() + 10
        while td._state.cache.stats["used_bytes"] >= used and time.monotonic() < deadline:
            time.sleep(0.05)
        assert td._state.cache.stats["used_bytes"] < used


def test_matmul_on_and_off(client):
    x = da.random.RandomState(42).random_sample((2000, 2000), chunks=(500, 500))
    before, _ = _leases(client)
    on = (x @ x.T).sum().compute()
    moved, _ = _leases(client)
    assert moved > before  # chunks moved between the workers through the pool
    td.uninstall(client)
    try:
        assert not any(client.run(td.is_registered).values())
        off = (x @ x.T).sum().compute()
        assert _leases(client)[0] == moved  # nothing went through the pool while off
    finally:
        td.install(client, pool_size=POOL, min_bytes=MIN)
    assert on == off


def test_uninstall_restores_exactly(client):
    def tables():
        import numpy
        from distributed.comm.core import Comm
        from distributed.protocol.serialize import dask_deserialize, dask_serialize

        dask_serialize.dispatch(numpy.ndarray)
        return (
            dask_serialize.dispatch(numpy.ndarray).__module__,
            dask_deserialize.dispatch(numpy.ndarray).__module__,
            Comm.handshake_info.__module__,
        )

    for mods in client.run(tables).values():
        assert all(m.split(".")[:2] == ["tenso", "dask"] for m in mods), mods  # the package's modules
    snapshot = (dict(dask_serialize._lookup), dict(dask_deserialize._lookup))
    td.uninstall(client)
    try:
        default = ("distributed.protocol.numpy", "distributed.protocol.numpy", "distributed.comm.core")
        assert set(client.run(tables).values()) == {default}
        assert tables() == default
        restored = (dict(dask_serialize._lookup), dict(dask_deserialize._lookup))
        for table, before in zip(restored, snapshot):
            for cls, fn in table.items():
                assert not fn.__module__.startswith("tenso.dask"), cls
            assert set(table) <= set(before)  # nothing added
        assert Comm.__dict__["handshake_info"].__module__ == "distributed.comm.core"
    finally:
        td.install(client, pool_size=POOL, min_bytes=MIN)
    assert tables()[0].startswith("tenso.dask.")


def test_spilled_data_round_trips(client):
    a, b = _workers(client)
    x = np.random.default_rng(1).random((512, 512))
    fut = client.scatter(x, workers=[a], direct=True)

    def spill(key, dask_worker=None):
        data = dask_worker.data
        while key in data.fast:
            data.evict()
        return key in data.slow

    assert client.run(spill, fut.key, workers=[a])[a]
    out = client.submit(_ident, fut, workers=[b], pure=False)
    np.testing.assert_array_equal(client.gather(out, direct=True), x)
    np.testing.assert_array_equal(client.gather(fut, direct=True), x)


def test_restarted_worker(client):
    a, b = _workers(client)
    pid = client.run(os.getpid, workers=[a])[a]
    client.restart_workers([a])
    a2, b2 = _workers(client)
    new = client.run(os.getpid)
    assert pid not in new.values()
    assert all(client.run(td.is_registered).values())
    before, _ = _leases(client)
    x = np.random.default_rng(2).random((256, 1024))
    _equal(x, _round_trip(client, x))
    assert _leases(client)[0] >= before + 3


def test_other_host_uses_frames(client):
    a, b = _workers(client)
    td.uninstall(client)
    td.install(client, pool_size=POOL, min_bytes=MIN, hosts={b: "elsewhere"})
    try:
        assert client.run(td.pool_name, workers=[b])[b] != td.pool_name()
        before, frames_before = _leases(client)
        x = np.random.default_rng(3).random((256, 1024))
        _equal(x, _round_trip(client, x))
        after, frames_after = _leases(client)
        assert after == before + 1  # only client -> A used the pool; A -> B and B -> client went as frames
        assert frames_after >= frames_before + 2
    finally:
        td.uninstall(client)
        td.install(client, pool_size=POOL, min_bytes=MIN)


def _big(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((512, 256))  # 1 MiB: over MIN


def test_results_through_the_scheduler_use_the_pool(client):
    """future.result() / client.gather() (through the scheduler) and client.run: worker -> scheduler -> client as a
    lease the client adopts; the scheduler forwards the header undecoded."""
    a, b = _workers(client)
    x = _big(7)
    fut = client.scatter(x, workers=[a], direct=True)
    sent_before = client.run(_counts, workers=[a])[a]["leases_sent"]
    received_before = td.counts()["leases_received"]
    y = fut.result()
    z = client.gather(client.submit(np.negative, fut, workers=[b], pure=False))
    np.testing.assert_array_equal(y, x)
    np.testing.assert_array_equal(z, -x)
    assert client.run(_counts, workers=[a])[a]["leases_sent"] >= sent_before + 2  # to the client, to B
    assert td.counts()["leases_received"] >= received_before + 2
    ran = client.run(_big, 8, workers=[b])[b]
    np.testing.assert_array_equal(ran, _big(8))


_OUTSIDE_CLIENT = """
import sys, numpy as np
from distributed import Client
with Client(sys.argv[1], timeout=30) as c:
    y = c.get_dataset("tenso-test-x").result()          # gathered through the scheduler
    ran = c.run(lambda: np.full((512, 256), 3.0))         # a broadcast through the scheduler
    ok = np.array_equal(y, np.random.default_rng(9).random((512, 256)))
    ok = ok and all(np.array_equal(v, np.full((512, 256), 3.0)) for v in ran.values())
    print("OK" if ok else "WRONG")
"""


def test_scheduler_materializes_for_a_requester_outside_the_pool(client, tmp_path):
    """A client that does not map the pool (here: one without tenso.dask) gets Dask's frames: the scheduler adopts
    the lease the worker sent it and serializes the object again."""
    import subprocess

    a, _ = _workers(client)
    fut = client.scatter(_big(9), workers=[a], direct=True)
    client.publish_dataset(fut, name="tenso-test-x")
    sent_before = client.run(_counts, workers=[a])[a]["leases_sent"]
    gc.collect()
    used_before = td._state.cache.stats["used_bytes"]
    try:
        script = tmp_path / "outside.py"
        script.write_text(_OUTSIDE_CLIENT)
        out = subprocess.run(
            [sys.executable, str(script), client.scheduler.address], capture_output=True, text=True, timeout=120
        )
        assert out.stdout.strip().endswith("OK"), out.stdout + out.stderr
    finally:
        client.unpublish_dataset("tenso-test-x")
    assert client.run(_counts, workers=[a])[a]["leases_sent"] >= sent_before + 2  # the worker still sent leases
    # The scheduler adopted them and frees each once the re-serialized object is gone.
    deadline = time.monotonic() + 10
    while td._state.cache.stats["used_bytes"] > used_before and time.monotonic() < deadline:
        gc.collect()
        time.sleep(0.1)
    assert td._state.cache.stats["used_bytes"] <= used_before


def _slow_adoption(seconds: float, dask_worker=None) -> None:
    """Make this worker's next adoption late: it sleeps past the sender's claim timeout first."""
    import tenso.dask as t

    original = t.leases._lease_receive

    def late(lease, **kwargs):
        t.leases._lease_receive = original
        time.sleep(seconds)
        return original(lease, **kwargs)

    t.leases._lease_receive = late


def test_a_lease_lost_before_delivery_is_fetched_again(client):
    """The sender reclaims a lease its recipient adopts too late: the recipient's error must read as a broken
    connection (EOFError), so Dask fetches the data again; any other error left the dependent task waiting forever."""
    a, b = _workers(client)
    td.install(client, pool_size=POOL, min_bytes=MIN, claim_timeout=0.2)
    try:
        x = _big(10)
        fut = client.scatter(x, workers=[a], direct=True)
        client.run(_slow_adoption, 1.0, workers=[b])
        total = client.submit(np.sum, fut, workers=[b], pure=False)
        assert total.result(timeout=60) == x.sum()
        assert issubclass(td.LeaseLostError, EOFError) and issubclass(td.LeaseLostError, td.TensoError)
    finally:
        td.install(client, pool_size=POOL, min_bytes=MIN)


def test_sigkilled_worker_frees_its_leases(client):
    a, b = _workers(client)
    cache = td._state.cache
    gc.collect()
    baseline = cache.stats["used_bytes"]

    def hold(dask_worker=None):
        import numpy as np

        import tenso.dask as t

        st = t._state
        ctx = {"recipient": {t.HANDSHAKE_KEY: {"pool": st.pool_name, "peer": st.token}}}
        # Leases sent and never delivered (held by this process), and leases received and still in use.
        sent = [serialize(np.ones(1 << 17), context=ctx) for _ in range(4)]
        kept = [deserialize(*serialize(np.ones(1 << 17), context=ctx)) for _ in range(4)]
        dask_worker._tenso_test_hold = (sent, kept)
        return st.cache.stats["used_bytes"]

    # The four sent are held by this worker until adopted; the four kept too where they are private views of their
    # leases (copied out of them, and released, where this machine has no route to a private mapping).
    assert client.run(hold, workers=[a])[a] >= baseline + 4 * (1 << 20)
    pid = client.run(os.getpid, workers=[a])[a]
    os.kill(pid, signal.SIGKILL)
    _wait_restarted(client, pid)
    # The pool frees a dead holder's leases at its next allocation.
    handle, _ = cache.lease(64)
    cache.release(handle)
    assert cache.stats["used_bytes"] <= baseline
    x = np.random.default_rng(4).random((256, 1024))
    _equal(x, _round_trip(client, x))


def _wait_restarted(client, pid: int) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        time.sleep(0.2)
        try:
            pids = client.run(os.getpid)
        except (OSError, distributed.comm.core.CommClosedError):
            continue  # a broadcast that reached the dying worker
        if len(pids) == 2 and pid not in pids.values():
            return
    raise AssertionError("the nanny did not restart the killed worker")


def test_drops_and_late_claims_free_every_lease():
    """10,000 hand-offs in one process with random drops: every lease is freed, every delivered value is right."""
    td.register("tenso-dask-test-drops", pool_size="64MB", claim_timeout=0.2, min_bytes=MIN)
    try:
        st = td._state
        ctx = {"recipient": {td.HANDSHAKE_KEY: {"pool": st.pool_name, "peer": st.token}}}
        gc.collect()
        baseline = st.cache.stats["used_bytes"]
        rng = np.random.default_rng(5)
        late = []
        wrong = leased = 0
        for i in range(10_000):
            x = np.full(1 << 14, i, dtype=np.int32)  # 64 KiB
            header, frames = serialize(x, context=ctx)
            if frames:  # the pool was full of unclaimed leases: Dask's frames, as designed
                wrong += int(not (deserialize(header, frames) == i).all())
                continue
            leased += 1
            roll = rng.random()
            if roll < 0.2:
                continue  # dropped before delivery
            if roll < 0.22:
                late.append(header)  # delivered after the sender reclaimed it
                continue
            wrong += int(not (deserialize(header, frames) == i).all())  # the array dies here: lease released
        assert wrong == 0
        assert leased > 5000
        time.sleep(0.5)
        st.sweep(force=True)
        for header in late:
            with pytest.raises(td.TensoError):
                deserialize(header, [])
        gc.collect()
        assert not st.pending
        assert st.cache.stats["used_bytes"] == baseline
    finally:
        td.unregister()
        from tenso.nodecache import drop

        drop("tenso-dask-test-drops")


def test_no_context_uses_dask_frames():
    td.register("tenso-dask-test-ctx", pool_size="16MB")
    try:
        header, frames = serialize(np.ones(1 << 18))
        assert frames and "tenso" not in header["sub-header"]
    finally:
        td.unregister()
        from tenso.nodecache import drop

        drop("tenso-dask-test-ctx")
    assert Comm.__dict__["handshake_info"].__module__ == "distributed.comm.core"


def test_dev_shm_back_to_start_after_sigkill():
    """A cluster of its own: transfers, a SIGKILLed worker, then close: none of its /dev/shm names is left."""
    start = _shm_names()
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as lc:
        with Client(lc) as c:
            scope = td.scope_for(c.scheduler.address)
            a, b = sorted(c.scheduler_info()["workers"])
            x = np.random.default_rng(6).random((256, 512))
            # Connections opened before install (as every real client has): install must still take effect on them.
            np.testing.assert_array_equal(c.gather(c.scatter(x, workers=[a], direct=True), direct=True), x)
            sent = td.counts()["leases_sent"]
            td.install(c, pool_size="64MB", min_bytes=MIN)
            fut = c.scatter(x, workers=[a], direct=True)
            assert td.counts()["leases_sent"] == sent + 1, "install() left the client's open connections on frames"
            out = c.submit(_ident, fut, workers=[b], pure=False)
            np.testing.assert_array_equal(c.gather(out, direct=True), x)
            assert any(scope in n for n in _shm_names())
            pid = c.run(os.getpid, workers=[b])[b]
            os.kill(pid, signal.SIGKILL)
            _wait_restarted(c, pid)
            td.uninstall(c)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(scope in n for n in _shm_names()):
        time.sleep(0.25)
    assert not any(scope in n for n in _shm_names() - start), sorted(_shm_names() - start)

