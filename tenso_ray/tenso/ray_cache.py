"""A node-local object cache for Ray: one shared-memory pool per node, keyed by ObjectRef.

``cached_get(ref)`` returns the object behind ``ref`` from this node's :class:`~tenso.TensoCache` pool. The first
process on the node to ask fetches it with ``ray.get`` and encodes it into the pool once; every later task and actor
on the node gets read-only zero-copy views of those bytes, in microseconds, where ``ray.get`` asks the object store
again and unpickles the object on every call (and copies torch tensors and ml_dtypes arrays each time). Ray objects
never change, so the ObjectRef is a key that can never name stale data.

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

Lifetime and safety:

* Entries are never evicted: a put that does not fit into the free space is skipped (the value comes from
  ``ray.get`` instead), so a view handed out stays valid for as long as the pool exists. Free an entry with
  :func:`uncache` once no task still reads it, or the whole pool with :func:`drop_node_cache`.
* The pool is named after the node's raylet (``tenso_ray_<raylet pid>_<hash of its socket>``). The driver unlinks
  its own node's pool when it exits; a pool whose raylet has died is unlinked by the next process that creates a
  node cache on that host. Other processes keep their mappings until they exit, and a worker that had the pool
  open keeps using it after :func:`drop_node_cache` (meant for the end of a job), while new processes get a new one.
* Its size is fixed when the first process on the node creates it: ``max_memory`` of :func:`node_cache`, else the
  ``TENSO_RAY_NODE_CACHE`` environment variable (``runtime_env(node_cache="2GB")`` sets it for workers), else
  1 GiB, capped at half of the free space of ``/dev/shm``. All of it is reserved at creation, and every process
  that opens the pool maps all of it.
* Results are read-only: numpy arrays have ``writeable=False``; torch tensors (``device="torch"``) share the pool's
  memory, so writing to one changes the cached object for every reader on the node. Pass ``copy=True`` for
  values you own. Dicts come back as plain ``dict`` (a torch ``state_dict``'s ``OrderedDict`` included).
* Linux only (POSIX shared memory in ``/dev/shm``); elsewhere ``cached_get`` is ``ray.get``.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import re
import threading
import time
import warnings
from typing import Any, Optional

import numpy as np

from .cache import TensoCache, _parse_size, _to_device, _to_numpy
from .errors import TensoCacheFullError

try:
    import ray
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("tenso.ray requires Ray; install it with: pip install 'tenso-ray[ray]'") from exc

__all__ = ["cached_get", "node_cache", "uncache", "drop_node_cache", "NODE_CACHE_ENV"]

#: Environment variable with the node cache's size (``"2GB"``, bytes), read by the process that creates it.
NODE_CACHE_ENV = "TENSO_RAY_NODE_CACHE"
_DEFAULT_SIZE = 1 << 30
#: Values whose packet is smaller than this stay with ``ray.get`` by default: Ray keeps objects under 100 KiB in
#: the owner's memory and inlines them into the task, so its get is already cheap there.
MIN_BYTES = 64 * 1024
_PREFIX = "tenso_ray_"
_NAME = re.compile(r"^tenso_ray_(\d+)_[0-9a-f]{16}$")
_SHM_DIR = "/dev/shm"

_lock = threading.Lock()
_cache: Optional[TensoCache] = None
_cache_socket: Optional[str] = None
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


def _pool_name(node: Any) -> Optional[tuple[str, str]]:
    socket = str(node.raylet_socket_name)
    pid = _raylet_pid(node, socket)
    if pid is None:
        return None
    digest = hashlib.sha256(socket.encode()).hexdigest()[:16]
    return f"{_PREFIX}{pid}_{digest}", socket


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sweep() -> None:
    """Unlink node caches whose raylet is gone (left by sessions that ended without their driver's atexit)."""
    try:
        names = os.listdir(_SHM_DIR)
    except OSError:
        return
    for entry in names:
        match = _NAME.match(entry)
        if match and not _alive(int(match.group(1))):
            _unlink_name(entry)


def _default_size() -> int:
    setting = os.environ.get(NODE_CACHE_ENV)
    if setting:
        return _parse_size(setting)
    try:
        st = os.statvfs(_SHM_DIR)
        free = st.f_bavail * st.f_frsize
    except OSError:
        return _DEFAULT_SIZE
    return max(min(_DEFAULT_SIZE, free // 2), 1 << 20)


def _open(name: str, deadline: float) -> TensoCache:
    # Another process may be creating it right now (its fallocate of the whole pool takes a moment): retry.
    while True:
        try:
            return TensoCache(name=name, create=False)
        except (FileNotFoundError, PermissionError):
            raise
        except (OSError, ValueError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.005)


def node_cache(max_memory: Any = None) -> Optional[TensoCache]:
    """This node's object-cache pool, opened (or created, sized by ``max_memory``) on first use.

    Returns None where no pool can exist (not Linux, no local raylet as in a Ray Client session, or the raylet's pid
    cannot be found). ``max_memory`` only matters to the process that creates the pool; the others open it at
    whatever size it has.
    """
    global _cache, _cache_socket, _cache_node, _denied_node
    node = _node()
    cache = _cache
    if cache is not None and node is _cache_node:  # the fast path: same connection as last time
        return cache
    if node is None or node is _denied_node or not os.path.isdir(_SHM_DIR):
        return None
    socket = str(node.raylet_socket_name)
    with _lock:
        if _cache is not None and _cache_socket == socket:
            _cache_node = node
            return _cache
        named = _pool_name(node)
        if named is None:
            return None
        name, socket = named
        deadline = time.monotonic() + 10.0
        try:
            try:
                cache = _open(name, deadline)
            except FileNotFoundError:
                _sweep()
                size = _parse_size(max_memory) if max_memory is not None else _default_size()
                try:
                    cache = TensoCache(size, name=name, create=True)
                    if ray._private.worker.global_worker.mode == ray._private.worker.SCRIPT_MODE:
                        atexit.register(_unlink_name, name)
                except FileExistsError:
                    cache = _open(name, deadline)
        except PermissionError as exc:
            # Another user's job on this host owns the pool (mode 0600): this process reads through Ray.
            warnings.warn(f"tenso.ray node cache unavailable, using ray.get: {exc}", RuntimeWarning, stacklevel=2)
            _denied_node = node
            return None
        cache._owns = False  # a `with` block or close() in one process must not unlink everyone's pool
        if _cache is not None:
            _cache.close()
        _cache, _cache_socket, _cache_node = cache, socket, node
        _skip.clear()
        return cache


def _unlink_name(name: str) -> None:
    try:
        os.unlink(os.path.join(_SHM_DIR, name))
    except OSError:
        pass


def _key(ref: Any) -> str:
    return "ray:" + ref.hex()


def _encodable(value: Any) -> Any:
    """The value as the codec stores it (torch/JAX/CuPy tensors as host NumPy, dicts of them too), or None."""
    if isinstance(value, dict):
        if not value or not all(isinstance(k, str) for k in value):
            return None
        arrays = {k: _encodable_array(v) for k, v in value.items()}
        return None if any(a is None for a in arrays.values()) else arrays
    return _encodable_array(value)


def _encodable_array(value: Any) -> Optional[np.ndarray]:
    array = _to_numpy(value)
    return array if isinstance(array, np.ndarray) and not array.dtype.hasobject else None


def _nbytes(value: Any) -> int:
    if isinstance(value, dict):
        return sum(v.nbytes for v in value.values())
    return int(value.nbytes)


def _map(value: Any, fn: Any) -> Any:
    return {k: fn(v) for k, v in value.items()} if isinstance(value, dict) else fn(value)


def _torch_view(array: np.ndarray) -> Any:
    """A torch tensor over ``array``'s memory (bfloat16 and float8 included), as the Ray plug-in builds its own."""
    import torch

    from .ray import _tensor_from

    if not isinstance(getattr(torch, array.dtype.name, None), torch.dtype):
        raise TypeError(f"device='torch' cannot hold dtype {array.dtype}; use device=None")
    # The module docs say that these tensors share the pool's memory: zero-copy, writes included.
    return _tensor_from(array.reshape(-1).view(np.uint8), array.dtype.name, array.shape, "cpu", True)


def _deliver(value: Any, device: Optional[str], copy: bool) -> Any:
    if device is None:
        return _map(value, np.array) if copy else value
    framework, _, spec = device.lower().partition(":")
    if framework == "torch":
        tensors = _map(value, _torch_view)  # zero-copy over the pool
        if spec in ("", "cpu"):
            return _map(tensors, lambda t: t.clone()) if copy else tensors
        return _map(tensors, lambda t: t.to(spec))  # the one host-to-device copy
    return _to_device(value, device)  # JAX and CuPy copy by construction


def cached_get(
    ref: Any,
    *,
    device: Optional[str] = None,
    copy: bool = False,
    timeout: Optional[float] = None,
    min_bytes: int = MIN_BYTES,
) -> Any:
    """``ray.get(ref)`` through this node's shared-memory object cache (a list of refs gives a list).

    Arrays and dicts of arrays (numpy, torch, JAX, CuPy; every dtype the codec knows) come back as read-only
    NumPy views of the node's one copy, or with ``device="torch"`` as torch tensors over that memory, zero-copy;
    ``device="torch:cuda:0"``, ``"jax"``, ``"cupy:0"`` and ``copy=True`` make a copy. Anything else, and values under
    ``min_bytes``, is what ``ray.get`` returns. See the module docs for when this pays and how long entries live.

    Pass the ref inside a list or another container when calling a task, so that Ray does not resolve it before
    the task runs: ``task.remote([ref])``.
    """
    if isinstance(ref, ray.ObjectRef):  # the common case, without the list machinery
        cache = node_cache()
        key = _key(ref)
        if cache is None or key in _skip:
            return ray.get(ref, timeout=timeout)
        hit = _lookup(cache, key)
        if hit is not None:
            return _deliver(hit, device, copy)
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
        hit = None if key in _skip else _lookup(cache, key)
        if hit is None:
            missing.append(i)
        else:
            results[i] = _deliver(hit, device, copy)
    if missing:
        # One batched ray.get for every miss, as ray.get(list) would do.
        values = ray.get([refs[i] for i in missing], timeout=timeout)
        for i, value in zip(missing, values):
            results[i] = _store(cache, _key(refs[i]), value, device, copy, min_bytes)
    return results


# A dict is stored as one entry per array ("<key>/0", "<key>/1", ...) and, written last, a manifest under the key
# itself: a bundle {"keys": JSON list of the dict's keys, as uint8}. One tenso bundle holding the arrays would place
# most of them at unaligned offsets (the format packs keys between entries), and those must be copied on read.
def _lookup(cache: TensoCache, key: str) -> Any:
    hit = cache._pool.get(key, False)
    if not isinstance(hit, dict):
        return hit
    names = json.loads(bytes(hit["keys"]))
    parts = cache._pool.get_many([f"{key}/{i}" for i in range(len(names))], False)
    if any(p is None for p in parts):  # uncached meanwhile
        return None
    return dict(zip(names, parts))


def _store(cache: TensoCache, key: str, value: Any, device: Optional[str], copy: bool, min_bytes: int) -> Any:
    """Put a fetched value into the pool and hand out the pool's copy; the value itself where that cannot be."""
    if key in _skip:
        return value
    stored = _encodable(value)
    if stored is None or _nbytes(stored) < min_bytes:
        _skip.add(key)
        return value
    pool = cache._pool
    try:
        if pool.info(key) is None:  # another process may have stored it while we fetched it
            if isinstance(stored, dict):
                written = 0
                try:
                    for i, array in enumerate(stored.values()):
                        pool.put(f"{key}/{i}", array, None, False)
                        written = i + 1
                    names = np.frombuffer(json.dumps(list(stored)).encode(), np.uint8)
                    pool.put(key, {"keys": names}, None, False)
                except BaseException:
                    for i in range(written):
                        pool.delete(f"{key}/{i}")
                    raise
            else:
                pool.put(key, stored, None, False)
    except TensoCacheFullError:
        return value  # no room without evicting entries that others may be reading: serve it from Ray
    hit = _lookup(cache, key)
    if hit is None:  # dropped meanwhile (uncache or drop_node_cache in another process)
        return value
    return _deliver(hit, device, copy)


def uncache(ref: Any) -> bool:
    """Free this node's cached copy of ``ref``; True if there was one.

    Only call it once no task on the node still holds views of that object: their memory is reused by later
    entries.
    """
    cache = node_cache()
    key = _key(ref)
    _skip.discard(key)
    if cache is None:
        return False
    manifest = cache._pool.get(key, True)
    found = cache.delete(key)
    if isinstance(manifest, dict):
        for i in range(len(json.loads(bytes(manifest["keys"])))):
            cache.delete(f"{key}/{i}")
    return found


def drop_node_cache() -> None:
    """Unlink this node's pool, if there is one (processes that have it open keep their mapping until they exit)."""
    global _cache, _cache_socket, _cache_node
    node = _node()
    with _lock:
        named = _pool_name(node) if node is not None and os.path.isdir(_SHM_DIR) else None
        if named is not None:
            _unlink_name(named[0])
        if _cache is not None:
            _cache.close()
        _cache, _cache_socket, _cache_node = None, None, None
        _skip.clear()
