"""tenso.ray.cached_get: the node-local shared-memory object cache, on a real local Ray cluster."""

from __future__ import annotations

import os

import numpy as np
import pytest

ray = pytest.importorskip("ray")

import tenso.cow  # noqa: E402
import tenso.ray  # noqa: E402
from tenso.ray_cache import NODE_CACHE_ENV  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

try:
    import torch
except ImportError:
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="PyTorch is not installed (pip install 'tenso-ray[torch]')")
POOL = 32 << 20  # the node cache of this module's cluster


@pytest.fixture(scope="module")
def cluster():
    saved = os.environ.get(NODE_CACHE_ENV)
    os.environ[NODE_CACHE_ENV] = str(POOL)  # workers started by this ray.init inherit it
    ray.init(
        num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False, object_store_memory=256 << 20
    )
    try:
        yield
    finally:
        tenso.ray.drop_node_cache()
        ray.shutdown()
        if saved is None:
            os.environ.pop(NODE_CACHE_ENV, None)
        else:
            os.environ[NODE_CACHE_ENV] = saved


@pytest.fixture
def cache(cluster):
    c = tenso.ray.node_cache()
    assert c is not None
    c.clear()
    yield c
    c.clear()


@ray.remote
def _read(refs, device=None):
    """What a task sees through the cache: (checksum, a private view, pid, type name)."""
    import tenso.ray as tr

    value = tr.cached_get(refs[0], device=device)
    if isinstance(value, dict):
        return {k: (float(np.asarray(v, dtype=np.float64).sum()), _private(v)) for k, v in value.items()}
    return float(np.asarray(value, dtype=np.float64).sum()), _private(value), os.getpid(), type(value).__name__


def _private(v) -> bool:
    """Whether ``v`` is a writeable view (not a copy) over a private mapping (tenso.cow), as the pool hands out."""
    if isinstance(v, np.ndarray):
        return bool(v.flags.writeable) and not v.flags.owndata
    return True  # torch tensors: checked through their values in the tests that write


def test_many_tasks_share_one_copy(cache):
    weights = np.arange(1 << 18, dtype=np.float32)  # 1 MiB
    ref = ray.put(weights)
    out = ray.get([_read.remote([ref]) for _ in range(8)])
    assert {o[0] for o in out} == {float(weights.sum(dtype=np.float64))}
    assert all(o[1] for o in out)  # private copy-on-write views, not copies
    stats = cache.stats
    assert stats["entries"] == 1  # materialized once on this node
    assert stats["used_bytes"] >= weights.nbytes
    # The driver reads the same pool entry: a zero-copy view over shared memory, equal to the object.
    local = tenso.ray.cached_get(ref)
    np.testing.assert_array_equal(local, weights)
    assert _private(local)
    assert cache.stats["entries"] == 1


def test_dict_of_arrays_every_array_zero_copy_and_aligned(cache):
    state = {f"layer{i}.weight": np.full(5000 + 7 * i, i, dtype=np.float32) for i in range(40)}
    state["bias"] = np.arange(100_000, dtype=np.int16)
    ref = ray.put(state)
    got = tenso.ray.cached_get(ref)
    assert list(got) == list(state)
    for k, v in state.items():
        np.testing.assert_array_equal(got[k], v)
        assert got[k].dtype == v.dtype
        assert got[k].flags.writeable
        # Arrays of 64 KiB and more are copy-on-write views of their own 64-byte-aligned block; smaller ones are
        # copied (a copy of a few pages costs less than a mapping).
        big = v.nbytes >= tenso.cow.PRIVATE_MIN_BYTES
        assert got[k].flags.owndata is not big
        if big:
            assert got[k].__array_interface__["data"][0] % 64 == 0
    assert cache.stats["entries"] == len(state) + 1  # one entry per array, plus the manifest
    out = ray.get(_read.remote([ref]))
    assert out["layer3.weight"][0] == 3.0 * (5000 + 21) and out["bias"][1]
    assert tenso.ray.uncache(ref)
    assert cache.stats["entries"] == 0
    assert not tenso.ray.uncache(ref)


def test_copy_gives_writeable_private_values(cache):
    a = np.ones((300, 300), np.float64)
    ref = ray.put(a)
    first = tenso.ray.cached_get(ref, copy=True)
    first[0, 0] = 42.0
    again = tenso.ray.cached_get(ref)
    assert again[0, 0] == 1.0  # the write did not reach the shared copy
    d = tenso.ray.cached_get(ray.put({"x": a}), copy=True)
    assert d["x"].flags.writeable


def test_list_of_refs_batches_misses_and_keeps_order(cache):
    arrays = [np.full(40_000, i, np.float32) for i in range(5)]
    refs = [ray.put(a) for a in arrays]
    tenso.ray.cached_get(refs[2])  # one hit among misses
    got = tenso.ray.cached_get(refs)
    assert isinstance(got, list) and len(got) == 5
    for a, g in zip(arrays, got):
        np.testing.assert_array_equal(a, g)
    assert cache.stats["entries"] == 5


def test_values_the_cache_does_not_take_come_from_ray(cache):
    small = np.arange(10)  # under min_bytes: Ray already serves it from the worker's memory
    text = {"not": "arrays"}
    objs = np.array([object(), 1], dtype=object)
    refs = [ray.put(small), ray.put(text), ray.put("a string"), ray.put(objs)]
    got = tenso.ray.cached_get(refs)
    np.testing.assert_array_equal(got[0], small)
    assert got[1] == text and got[2] == "a string" and got[3][1] == 1
    assert cache.stats["entries"] == 0
    # min_bytes=0 takes the small array.
    np.testing.assert_array_equal(tenso.ray.cached_get(ray.put(small), min_bytes=0), small)
    assert cache.stats["entries"] == 1
    with pytest.raises(TypeError, match="ObjectRef"):
        tenso.ray.cached_get("not a ref")


def test_full_pool_never_evicts_views_in_use(cache):
    room = cache.stats["data_region_size"]
    big = np.full(room // 2 // 8, 7.0)  # two of these do not both fit
    first = tenso.ray.cached_get(ray.put(big))
    assert cache.stats["entries"] == 1
    other = big * 2
    second = tenso.ray.cached_get(ray.put(other))
    np.testing.assert_array_equal(second, other)  # served by ray.get instead
    assert cache.stats["entries"] == 1  # nothing evicted ...
    assert float(first[0]) == 7.0 and float(first[-1]) == 7.0  # ... so the view handed out is intact
    stats = cache.stats
    assert stats["used_bytes"] + stats["free_bytes"] == stats["data_region_size"]


def test_a_long_job_reads_ten_times_the_pool_and_keeps_hitting(cache):
    from tenso import ray_cache

    before = ray_cache.cache_stats()
    room = cache.stats["data_region_size"]
    item = 1 << 20
    held = {}  # views still in use: never invalidated by the evictions around them
    n = 0
    while n * item < 10 * room:
        value = np.full(item // 8, float(n))
        ref = ray.put(value)
        got = tenso.ray.cached_get(ref)  # miss: stored (evicting unpinned entries)
        assert float(got[0]) == float(n)
        assert float(tenso.ray.cached_get(ref)[-1]) == float(n)  # hit
        if n % 25 == 0:
            held[n] = got
        del got, ref
        for k, view in held.items():
            assert float(view[0]) == float(k) and float(view[-1]) == float(k)
        n += 1
    after = ray_cache.cache_stats()
    assert after["fallbacks"] == before["fallbacks"]  # unpinned space was always there: never fell back
    assert after["hits"] - before["hits"] == n and after["misses"] - before["misses"] == n
    assert after["evictions"] > before["evictions"]
    assert after["used_bytes"] <= after["data_region_size"]
    assert after["used_bytes"] + after["free_bytes"] == after["data_region_size"]


@needs_torch
def test_torch_tensors_and_state_dicts(cache):
    t = torch.arange(100_000, dtype=torch.float32)
    state = {"w": torch.ones(50_000, dtype=torch.bfloat16), "b": torch.zeros(30_000, dtype=torch.int64)}
    rt, rs = ray.put(t), ray.put(state)
    got = tenso.ray.cached_get(rt, device="torch")
    assert isinstance(got, torch.Tensor) and torch.equal(got, t)
    got_state = tenso.ray.cached_get(rs, device="torch")
    assert set(got_state) == {"w", "b"}
    assert got_state["w"].dtype == torch.bfloat16 and torch.equal(got_state["w"], state["w"])
    assert torch.equal(got_state["b"], state["b"])
    # Without a device the same entries come back as NumPy (bfloat16 through ml_dtypes).
    plain = tenso.ray.cached_get(rs)
    assert isinstance(plain["b"], np.ndarray) and plain["w"].dtype.name == "bfloat16"
    owned = tenso.ray.cached_get(rt, device="torch", copy=True)
    owned[0] = -1.0
    assert float(tenso.ray.cached_get(rt, device="torch")[0]) == 0.0
    got[1] = -2.0  # a copy-on-write view: the write stays in this tensor
    assert float(got[1]) == -2.0 and float(tenso.ray.cached_get(rt, device="torch")[1]) == 1.0
    out = ray.get(_read.remote([rt], "torch"))
    assert out[0] == float(t.double().sum()) and out[3] == "Tensor"


@ray.remote
def _write_through(refs, device=None):
    """A task that reads an object through the cache, writes to its view, and reports what it saw before and
    after its own write."""
    import tenso.ray as tr

    value = tr.cached_get(refs[0], device=device)
    before = float(value[0])
    value[0] = -7.0
    return before, float(value[0])


@pytest.mark.parametrize("device", [None, "torch"])
def test_a_write_through_a_cached_view_reaches_nobody_else(cache, device):
    if device == "torch" and torch is None:
        pytest.skip("PyTorch is not installed")
    original = np.arange(1 << 18, dtype=np.float32) + 1.0  # 1 MiB: a copy-on-write view, not a copy
    ref = ray.put(original)
    copies = tenso.cow.stats()["copies"]
    mine = tenso.ray.cached_get(ref, device=device)
    mine[0] = 99.0  # the driver writes to its view
    assert float(mine[0]) == 99.0  # ... and reads its own write
    # Tasks one after the other: each sees the published bytes, its own write, and never another's.
    for _ in range(3):
        assert ray.get(_write_through.remote([ref], device)) == (1.0, -7.0)
    # Two concurrent readers.
    assert ray.get([_write_through.remote([ref], device) for _ in range(2)]) == [(1.0, -7.0)] * 2
    assert float(mine[0]) == 99.0  # the tasks' writes did not reach the driver's view
    assert float(tenso.ray.cached_get(ref, device=device)[0]) == 1.0  # a new view: the published bytes
    assert float(ray.get(ref)[0]) == 1.0  # the owner's object
    assert cache.stats["entries"] == 1 and tenso.cow.stats()["copies"] == copies  # no fallback copy


def test_pools_of_dead_sessions_are_swept(cluster):
    stale = "/dev/shm/tenso_ray_999999999_0123456789abcdef"  # tenso-ray 0.x's naming; pid above pid_max: never alive
    with open(stale, "wb") as f:
        f.write(b"left by a session whose raylet died")
    current = f"/dev/shm/{tenso.ray.node_cache().name}"
    tenso.ray.drop_node_cache()  # the next use creates the pool again, and sweeps first
    assert not os.path.exists(current)
    tenso.ray.drop_node_cache()  # nothing left to drop: creates nothing either
    assert not os.path.exists(current)
    try:
        assert tenso.ray.node_cache() is not None
        assert not os.path.exists(stale)
    finally:
        if os.path.exists(stale):
            os.unlink(stale)


def test_one_pool_per_job_and_node(cluster):
    cache = tenso.ray.node_cache()
    assert cache is tenso.ray.node_cache()  # one handle per process
    name = cache.name
    job = ray.get_runtime_context().get_job_id()
    assert name.startswith(f"tenso_node_ray-{job}-") and os.path.exists(f"/dev/shm/{name}")
    assert oct(os.stat(f"/dev/shm/{name}").st_mode & 0o777) == "0o600"

    @ray.remote
    def pool_name():
        return tenso.ray.node_cache().name

    assert set(ray.get([pool_name.remote() for _ in range(4)])) == {name}
    env = tenso.ray.runtime_env(node_cache="2GB")
    assert env["env_vars"][NODE_CACHE_ENV] == "2GB"


def test_a_pool_owned_by_another_user_falls_back_to_ray_get(cluster, monkeypatch):
    import tenso.ray_cache as rc

    assert tenso.ray.node_cache() is not None  # the pool exists; this process now pretends it may not open it

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", "tenso_ray_x")

    monkeypatch.setattr(rc.nodecache, "attach", denied)
    monkeypatch.setattr(rc, "_cache", None)
    monkeypatch.setattr(rc, "_cache_node", None)
    monkeypatch.setattr(rc, "_denied_node", None)
    a = np.arange(100_000, dtype=np.float32)
    with pytest.warns(RuntimeWarning, match="node cache unavailable"):
        got = tenso.ray.cached_get(ray.put(a))
    np.testing.assert_array_equal(got, a)
    assert got.flags.c_contiguous
    # Decided once per connection: no second warning, no second attempt.
    np.testing.assert_array_equal(tenso.ray.cached_get(ray.put(a)), a)
    assert tenso.ray.node_cache() is None


# ---------------------------------------------------------------------------------------------------------------
# Pool lifetime on a two-node cluster (one machine): scripts in their own interpreter, each with its own cluster.
# ---------------------------------------------------------------------------------------------------------------
_JOB = r"""
import json, os, sys
import numpy as np
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
import tenso.ray

ray.init(address=sys.argv[1], runtime_env=tenso.ray.runtime_env(node_cache="8MB"), logging_level="ERROR",
         log_to_driver=False)
first = sys.argv[2] == "driver-first"
if first:  # the driver creates its node's pool: the runtime_env's size applies to it as well
    assert tenso.ray.node_cache().stats["pool_size"] == 8 << 20

@ray.remote(num_cpus=0.1)
def read(refs):
    import tenso.ray as tr
    v = tr.cached_get(refs[0])
    c = tr.node_cache()
    return c.name, c.stats["pool_size"], float(v.sum()), tr.cached_get(refs[0]).flags.writeable

ref = ray.put(np.arange(1 << 17, dtype=np.float64))
nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
out = ray.get([read.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote([ref])
               for n in nodes])
print(json.dumps({"job": ray.get_runtime_context().get_job_id(), "reads": out}), flush=True)
"""

_CLUSTER = r"""
import json, os, subprocess, sys, time
import numpy as np
import ray
from ray.cluster_utils import Cluster
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

def entries(names):  # these pools and the links of the processes using them
    return sorted(e for e in os.listdir("/dev/shm") if e.split(".")[0] in names)

def pools(names):
    return [e for e in entries(names) if "." not in e]

def wait_until(cond, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.2)
    return cond()

result = {}
cluster = Cluster()
cluster.add_node(num_cpus=1, object_store_memory=80 << 20)
worker = cluster.add_node(num_cpus=1, object_store_memory=80 << 20)
cluster.wait_for_nodes()
try:
    # Job 1, its own driver process: tasks create the pools (worker-first on both nodes); then the job ends.
    job = subprocess.run([sys.executable, "-c", sys.argv[1], cluster.address, "workers-first"],
                         capture_output=True, text=True, timeout=240)
    assert job.returncode == 0, job.stderr[-3000:]
    first = json.loads(job.stdout.strip().splitlines()[-1])
    result["job1_reads"] = first["reads"]
    job1 = {read[0] for read in first["reads"]}
    result["job1_left"] = entries(job1) if not wait_until(lambda: not entries(job1)) else []

    # Job 2, driver in this process and first on its node.
    job = subprocess.run([sys.executable, "-c", sys.argv[1], cluster.address, "driver-first"],
                         capture_output=True, text=True, timeout=240)
    assert job.returncode == 0, job.stderr[-3000:]
    result["job2_reads"] = json.loads(job.stdout.strip().splitlines()[-1])["reads"]

    # Job 3 keeps running while a node goes away.
    import tenso.ray
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)

    @ray.remote(num_cpus=0.1)
    def read(refs):
        import tenso.ray as tr
        tr.cached_get(refs[0])
        return tr.node_cache().name

    ref = ray.put(np.ones(1 << 17))
    nodes = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}
    names = ray.get([read.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote([ref])
                     for n in sorted(nodes)])
    result["job3_names"] = names
    job3 = set(names)
    result["job3_before"] = pools(job3)
    worker_id = worker.node_id
    worker_pool = names[sorted(nodes).index(worker_id)]
    cluster.remove_node(worker)
    result["removed_gone"] = wait_until(lambda: not entries({worker_pool}))
    result["job3_after_remove"] = pools(job3)
    ray.shutdown()
finally:
    cluster.shutdown()
job3 = set(result.get("job3_names", ()))
result["job3_after_shutdown"] = entries(job3) if not wait_until(lambda: not entries(job3)) else []
print(json.dumps(result), flush=True)
"""


@pytest.mark.slow
def test_two_nodes_each_reads_through_its_own_pool_and_nothing_is_left():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _CLUSTER, _JOB], capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stderr[-4000:]
    r = __import__("json").loads(done.stdout.strip().splitlines()[-1])
    expected = float(np.arange(1 << 17, dtype=np.float64).sum())
    for job in ("job1_reads", "job2_reads"):
        names = [read[0] for read in r[job]]
        assert len(r[job]) == 2 and len(set(names)) == 2, r  # one pool per node
        assert all(read[1] == 8 << 20 for read in r[job]), r  # runtime_env(node_cache=) sized each, whoever came first
        assert all(read[2] == expected and read[3] is True for read in r[job]), r  # private views
    assert r["job1_left"] == []  # the job ended: its pools went, on both nodes, though workers created them
    assert len(set(r["job3_names"])) == 2 and sorted(r["job3_names"]) == r["job3_before"]
    assert r["removed_gone"] and len(r["job3_after_remove"]) == 1  # the removed node's pool went with it
    assert r["job3_after_shutdown"] == []
