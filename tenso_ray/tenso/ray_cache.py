"""A node-local object cache for Ray: one shared-memory pool per node, keyed by ObjectRef.

``cached_get(ref)`` returns the object behind ``ref`` from this node's :class:`~tenso.TensoCache` pool. The first
process on the node to ask fetches it with ``ray.get`` and encodes it into the pool once; every later task and actor
on the node gets zero-copy views of those bytes (private copy-on-write mappings), in microseconds, where ``ray.get``
asks the object store again and unpickles the object on every call (and copies torch tensors and ml_dtypes arrays each
time). Ray objects never change, so the ObjectRef is a key that can never name stale data.

When it applies (``benchmarks/bench_ray_cache.py``; figures in ``integrations/ray/README.md``):

* Objects that many tasks or actors on one node read again and again (model weights, embedding and lookup
  tables), above all torch tensors and state dicts and ml_dtypes (bfloat16) arrays: Ray copies those on every get,
  so each reader pays tens of milliseconds and keeps a private copy; through the cache they pay microseconds and
  share the node's one copy.
* Builtin-dtype NumPy arrays: Ray already maps them zero-copy, and the cache only trims the per-get cost (about
  4-6 µs instead of 75-100 µs); the first read on each node pays one copy into the pool (about 13 ms for 64 MiB), so
  it pays off only for an object read a hundred times or more per node.
* Not for objects read once, and not for small ones: values under ``min_bytes`` (64 KiB by default; Ray keeps
  objects under 100 KiB in the owner's memory) and values the codec cannot encode (arbitrary Python objects) are
  returned from ``ray.get`` as they are, uncached.

The pool is a :mod:`tenso.nodecache` pool (this module is the Ray adapter over that service). Lifetime and safety:

* Long jobs: a put that needs room evicts the least recently used entries that no live view pins (every value
  ``cached_get`` hands out pins its entries until it is garbage-collected, or its process dies), so a job that
  reads many more objects than the pool holds keeps hitting, and a view handed out is never overwritten. Only
  when pinned entries fill the pool does a value come from ``ray.get`` uncached (a *fallback*). Counters:
  :func:`cache_stats`.
* One pool per job and node (``/dev/shm/tenso_node_ray-<job id>-<hash of the raylet's socket>``). It is removed
  when the job ends, whichever process created it, on every node: when the last of the job's processes on the
  node that used it exits (the driver at exit; workers when Ray ends them), or when the node's raylet dies (a
  removed node, ``ray.shutdown()`` of a local cluster). Processes that have it open keep their mappings until they
  exit; :func:`drop_node_cache` unlinks it at once.
* Its size is fixed when the first process on the node creates it, driver or worker alike: ``max_memory`` of
  :func:`node_cache`, else ``TENSO_RAY_NODE_CACHE`` from the job's runtime_env (``runtime_env(node_cache="2GB")``)
  or the process's environment, else 1 GiB, capped at half of the free space of ``/dev/shm``. All of it is
  reserved at creation, and every process that opens the pool maps all of it.
* Results are writeable and private, with no copy: numpy arrays and torch tensors (``device="torch"``) are
  copy-on-write mappings of the pinned entry (:mod:`tenso.cow`). Reads share the node's one copy; a write copies
  only the pages it touches, into the writing process, and no other task, actor or later reader sees it. A pool
  entry is never written after it is published, and stays pinned while any view of it lives. Where the pool cannot
  be mapped privately, each value is a copy (counted, one ``RuntimeWarning``). ``copy=True`` always copies. Dicts
  come back as plain ``dict`` (a torch ``state_dict``'s ``OrderedDict`` included).
* Linux only (POSIX shared memory in ``/dev/shm``); elsewhere ``cached_get`` is ``ray.get``.
"""

from __future__ import annotations

import hashlib
import os
import threading
import warnings
from typing import Any, Optional

from . import nodecache
from .cache import TensoCache

try:
    import ray
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("tenso.ray requires Ray; install it with: pip install 'tenso-ray[ray]'") from exc

__all__ = ["cached_get", "node_cache", "uncache", "drop_node_cache", "cache_stats", "NODE_CACHE_ENV"]

#: Environment variable with the node cache's size (``"2GB"``, bytes), read by the process that creates it.
NODE_CACHE_ENV = "TENSO_RAY_NODE_CACHE"
#: Values whose packet is smaller than this stay with ``ray.get`` by default: Ray keeps objects under 100 KiB in
#: the owner's memory and inlines them into the task, so its get is already cheap there.
MIN_BYTES = 64 * 1024

_lock = threading.Lock()
_cache: Optional[TensoCache] = None
_cache_scope: Optional[str] = None
_cache_node: Any = None  # the ray Node object of the connection _cache belongs to
_denied_node: Any = None  # a connection whose node pool this process may not open (another user's)
_skip: set[str] = set()  # keys of objects this process found uncacheable (not encodable, or too small)


def _node() -> Any:
    """This process's Ray node, or None (not connected, or a Ray Client session, which has no local node)."""
    return getattr(ray._private.worker.global_worker, "node", None)


def _raylet_pid(node: Any, socket: str) -> Optional[int]:
    """The pid of the raylet serving this process: from the environment (workers), the driver's own child
    processes, or the process table (a driver attached to a running cluster)."""
    env = os.environ.get("RAY_RAYLET_PID")
    if env and env.isdigit():
        return int(env)
    for info in getattr(node, "all_processes", {}).get("raylet", ()):
        pid = getattr(getattr(info, "process", None), "pid", None)
        if pid:
            return int(pid)
    needle = f"--raylet_socket_name={socket}".encode()
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return None
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if needle in f.read().split(b"\0"):
                    return int(pid)
        except OSError:
            continue
    return None


def raylet_pid() -> Optional[int]:
    """The pid of the raylet serving this process (it runs the node's object store), or None (not connected, a
    Ray Client session, or not found)."""
    node = _node()
    if node is None:
        return None
    return _raylet_pid(node, str(node.raylet_socket_name))


def _scope(node: Any) -> str:
    """This job's scope on this node: the job id and a hash of the raylet's socket (unique per node)."""
    socket = str(node.raylet_socket_name)
    digest = hashlib.sha256(socket.encode()).hexdigest()[:16]
    return f"ray-{ray.get_runtime_context().get_job_id()}-{digest}"


def _size_setting() -> Any:
    """``TENSO_RAY_NODE_CACHE`` from the job's runtime_env (``runtime_env(node_cache=)``; the driver's environment
    does not have it, so it is read from the job), else from this process's environment."""
    try:
        env_vars = ray.get_runtime_context().runtime_env.env_vars() or {}
    except Exception:  # no job runtime_env, or an older Ray without it
        env_vars = {}
    return env_vars.get(NODE_CACHE_ENV) or os.environ.get(NODE_CACHE_ENV) or None


def node_cache(max_memory: Any = None) -> Optional[TensoCache]:
    """This node's object-cache pool, opened (or created, sized by ``max_memory``) on first use.

    Returns None where no pool can exist (not Linux, or no local raylet as in a Ray Client session).
    ``max_memory`` only matters to the process that creates the pool; the others open it at whatever size it has.
    """
    global _cache, _cache_scope, _cache_node, _denied_node
    node = _node()
    cache = _cache
    if cache is not None and node is _cache_node:  # the fast path: same connection as last time
        return cache
    if node is None or node is _denied_node or not os.path.isdir(nodecache.SHM_DIR):
        return None
    scope = _scope(node)
    with _lock:
        if _cache is not None and _cache_scope == scope:
            _cache_node = node
            return _cache
        size = nodecache.default_size(max_memory if max_memory is not None else _size_setting())
        raylet = _raylet_pid(node, str(node.raylet_socket_name))
        try:
            # Owner: the raylet (a removed node, or a local cluster shut down, takes its pool along); users: the
            # job's processes on the node (the job's end takes the pool along).
            cache = nodecache.attach(scope, size=size, owner_pid=raylet or 0)
        except PermissionError as exc:
            # Another user's job on this host owns the pool (mode 0600): this process reads through Ray.
            warnings.warn(f"tenso.ray node cache unavailable, using ray.get: {exc}", RuntimeWarning, stacklevel=2)
            _denied_node = node
            return None
        _cache, _cache_scope, _cache_node = cache, scope, node
        _skip.clear()
        return cache


def _key(ref: Any) -> str:
    return "ray:" + ref.hex()


def cached_get(
    ref: Any,
    *,
    device: Optional[str] = None,
    copy: bool = False,
    timeout: Optional[float] = None,
    min_bytes: int = MIN_BYTES,
) -> Any:
    """``ray.get(ref)`` through this node's shared-memory object cache (a list of refs gives a list).

    Arrays and dicts of arrays (numpy, torch, JAX, CuPy; every dtype the codec knows) come back as writeable
    NumPy arrays, or with ``device="torch"`` as torch tensors, that are private copy-on-write views of the node's
    one copy: zero-copy, and a write stays in this process. ``device="torch:cuda:0"``, ``"jax"``, ``"cupy:0"`` and
    ``copy=True`` make a copy. Anything else, and values under
    ``min_bytes``, is what ``ray.get`` returns. See the module docs for when this pays and how long entries live.

    Pass the ref inside a list or another container when calling a task, so that Ray does not resolve it before
    the task runs: ``task.remote([ref])``.
    """
    if isinstance(ref, ray.ObjectRef):  # the common case, without the list machinery
        cache = node_cache()
        key = _key(ref)
        if cache is None or key in _skip:
            return ray.get(ref, timeout=timeout)
        hit = nodecache.lookup(cache, key)
        if hit is not None:
            return nodecache.deliver(hit, device, copy)
        return _store(cache, key, ray.get(ref, timeout=timeout), device, copy, min_bytes)
    if not isinstance(ref, (list, tuple)):
        raise TypeError(f"cached_get expects a ray.ObjectRef or a list of them, got {type(ref).__name__}")
    refs = list(ref)
    for r in refs:
        if not isinstance(r, ray.ObjectRef):
            raise TypeError(f"cached_get expects a ray.ObjectRef or a list of them, got {type(r).__name__}")
    cache = node_cache()
    if cache is None:
        return ray.get(refs, timeout=timeout)
    results: list[Any] = [None] * len(refs)
    missing: list[int] = []
    for i, r in enumerate(refs):
        key = _key(r)
        hit = None if key in _skip else nodecache.lookup(cache, key)
        if hit is None:
            missing.append(i)
        else:
            results[i] = nodecache.deliver(hit, device, copy)
    if missing:
        # One batched ray.get for every miss, as ray.get(list) would do.
        values = ray.get([refs[i] for i in missing], timeout=timeout)
        for i, value in zip(missing, values):
            results[i] = _store(cache, _key(refs[i]), value, device, copy, min_bytes)
    return results


def _store(cache: TensoCache, key: str, value: Any, device: Optional[str], copy: bool, min_bytes: int) -> Any:
    """Put a fetched value into the pool and hand out the pool's copy; the value itself where that cannot be."""
    if key in _skip:
        return value
    stored = nodecache.encodable(value)
    if stored is None or nodecache.nbytes(stored) < min_bytes:
        _skip.add(key)
        return value
    hit = nodecache.store(cache, key, stored)
    if hit is None:  # no room (pinned entries fill the pool), or dropped meanwhile: serve it from Ray
        return value
    return nodecache.deliver(hit, device, copy)


def uncache(ref: Any) -> bool:
    """Free this node's cached copy of ``ref``; True if there was one.

    Views that tasks still hold keep their bytes: their pins hold the blocks until the views are dropped.
    """
    cache = node_cache()
    key = _key(ref)
    _skip.discard(key)
    if cache is None:
        return False
    return nodecache.remove(cache, key)


def cache_stats() -> dict[str, Any]:
    """This node's pool counters (see :func:`tenso.nodecache.stats`): entries, usage and evictions for the whole
    pool; hits, misses and fallbacks of this process. Empty where there is no pool."""
    cache = node_cache()
    return {} if cache is None else nodecache.stats(cache)


def drop_node_cache() -> None:
    """Unlink this node's pool, if there is one (processes that have it open keep their mapping until they exit)."""
    global _cache, _cache_scope, _cache_node
    node = _node()
    with _lock:
        if node is not None and os.path.isdir(nodecache.SHM_DIR):
            nodecache.drop(_scope(node))
        _cache, _cache_scope, _cache_node = None, None, None
        _skip.clear()
