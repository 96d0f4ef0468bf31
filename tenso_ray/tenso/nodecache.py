"""The node-local pool service: one shared-memory :class:`~tenso.TensoCache` per scope and host.

Ray's ``cached_get``, the Dask plug-in and the DataLoader each want the same thing: every process of a job on one
host reads the same objects through one pool, zero-copy, and the pool goes away with the job. This module is that
service; the adapters only choose a scope and a key.

``attach(scope)`` returns this host's pool for ``scope`` (a short ``[A-Za-z0-9_-]`` string such as
``"ray-<job>-<node>"``, ``"dask-<id>"``, ``"torch-<main pid>"``): opened by name if it exists, else created.

Naming and lifetime (all in ``/dev/shm``)::

    tenso_node_<scope>                 the pool, published only once complete
    tenso_node_<scope>.<owner>.<pid>   one hard link per process that attached it (no extra memory)

* **Published complete.** A creator builds the pool under its own link name and publishes it with ``link(2)``,
  which fails if the name exists: a process killed while creating leaves only a link carrying its dead pid, which
  the next ``attach`` sweeps, and never a half-made pool under the published name.
* **Removed with its owner, or with its last user.** ``owner_pid`` (default: the creating process; ``0``: no owner)
  must be alive and at least one process that attached the pool must be alive; otherwise the pool is garbage. A
  process removes its own link at exit; the last one out unlinks the pool. After a ``SIGKILL`` (or when a Ray job's
  workers are killed at its end, or a node goes away) a small watcher process that the creator starts (it polls
  twice a second, and exits once the pool is gone) and every later ``attach`` on the host remove the garbage.
* Processes that still have the pool mapped keep their mapping after it is unlinked; new ones get a new pool.
* An ``attach`` that finds a live process creating the pool waits for its publication (up to a minute) rather
  than reserving a second copy of the memory.
* The size is fixed by the process that creates it: ``size`` if given, else 1 GiB, capped at half of the free
  space of ``/dev/shm`` (:func:`default_size`). All of it is reserved at creation.

Entries (:func:`lookup`, :func:`store`, :func:`remove`): an array, or a dict of arrays stored as one entry per array
(``<key>/0``, ``<key>/1``, ...) plus a manifest written last under the key itself. An entry is never written after it
is published (a put of a key never rewrites a pinned entry in place: the pool gives it a new block). Reads are
zero-copy views that **pin** their entries until the views are garbage-collected, and :func:`deliver` hands them out
as private copy-on-write mappings (:mod:`tenso.cow`) that hold those pins: a reader's write copies the pages it
touches into its own memory and reaches nobody else. Pins keep the bytes: a put that needs room evicts the least
recently used entries that no live view pins, so a long job keeps hitting instead of filling the pool, and a view
handed out is never overwritten. A process that dies holding pins frees them. The pool's size is the bound: only when
pinned entries fill it does :func:`store` give up (a *fallback*: the caller serves its own value). :func:`stats` adds
the counters hits, misses and fallbacks (this process) to the pool's own (evictions, pinned, usage).
"""

from __future__ import annotations

import atexit
import json
import os
import re
import subprocess
import sys
import threading
import time
from typing import Any, Optional

import numpy as np

from .cache import TensoCache, parse_size, private_value
from .errors import TensoCacheFullError
from .frameworks import _parse_device, from_host, map_arrays, to_host
from .shm import SHM_DIR, process_alive, sweep, unlink_name

__all__ = ["attach", "attached", "drop", "lookup", "store", "remove", "deliver", "stats", "default_size", "pool_name"]

PREFIX = "tenso_node_"
DEFAULT_SIZE = 1 << 30
_SCOPE = re.compile(r"^[A-Za-z0-9_-]{1,120}$")
_LINK = re.compile(r"^(tenso_node_[A-Za-z0-9_-]{1,120})\.(\d+)\.(\d+)$")
_WATCH_INTERVAL = 0.5
_CREATOR_WAIT = 60.0  # longest wait for another process's creation before creating a pool of our own
_MAX_RETRIES = 1000

_lock = threading.RLock()
# scope -> (pool handle, this process's link name); one handle per scope per process.
_attached: dict[str, tuple[TensoCache, str]] = {}
_exit_pid: Optional[int] = None
# Per pool name: this process's lookups that hit, that missed, and stores that fell back (did not fit).
_counters: dict[str, dict[str, int]] = {}


def pool_name(scope: str) -> str:
    """The ``/dev/shm`` name of ``scope``'s pool."""
    if not isinstance(scope, str) or not _SCOPE.match(scope):
        raise ValueError(f"scope must be 1-120 characters of [A-Za-z0-9_-], got {scope!r}")
    return PREFIX + scope


def default_size(setting: Any = None) -> int:
    """``setting`` (``"2GB"``, bytes) if given, else 1 GiB capped at half of the free space of ``/dev/shm``."""
    if setting is not None and setting != "":
        return parse_size(setting)
    try:
        st = os.statvfs(SHM_DIR)
        free = st.f_bavail * st.f_frsize
    except OSError:
        return DEFAULT_SIZE
    return max(min(DEFAULT_SIZE, free // 2), 1 << 20)


def _path(name: str) -> str:
    return os.path.join(SHM_DIR, name)


def _inode(name: str) -> Optional[int]:
    try:
        return os.stat(_path(name)).st_ino
    except OSError:
        return None


def attach(scope: str, *, size: int | str | None = None, owner_pid: int | None = None) -> TensoCache:
    """This host's pool for ``scope``, opened if it exists, else created with ``size`` bytes (see the module docs).

    ``owner_pid``: the pool is removed when that process exits (default: the creating process; ``0``: no owner, the
    pool lives while any process that attached it lives). Calling it again in one process returns the same handle
    while the pool exists. Raises ``PermissionError`` if another user's pool holds the name, ``ValueError`` for a
    bad scope or an owner that is not running.
    """
    name = pool_name(scope)
    if owner_pid and not process_alive(owner_pid):
        raise ValueError(f"owner_pid {owner_pid} is not a running process on this host")
    with _lock:
        _at_exit()
        held = _attached.get(scope)
        if held is not None:
            cache, link = held
            ino = _inode(name)
            if ino is not None and ino == _inode(link):
                return cache
            _detach(scope)  # dropped or replaced meanwhile: this process's handle maps a pool nobody else finds
        sweep()
        _sweep_pools()
        me = os.getpid()
        wait_until = time.monotonic() + _CREATOR_WAIT
        retries = 0
        while True:
            link = f"{name}.{owner_pid or 0}.{me}"
            opened: Optional[TensoCache]
            try:
                opened = _open(name, link)
            except FileNotFoundError:
                if _creating(name, me) and time.monotonic() < wait_until:
                    # Another live process is creating it (a large pool takes a while to reserve and pre-fault):
                    # wait for its publication rather than reserving a second copy of the memory.
                    time.sleep(0.01)
                    continue
                opened, link = _create(name, me, owner_pid, size)
            if opened is not None:
                _attached[scope] = (opened, link)
                return opened
            retries += 1  # lost a race (published, dropped or replaced meanwhile): look again
            if retries > _MAX_RETRIES:
                raise TimeoutError(f"could not attach the node cache {name!r}: it kept changing")
            time.sleep(0.005)


def attached(scope: str) -> Optional[TensoCache]:
    """This process's handle on ``scope``'s pool if :func:`attach` gave it one (None otherwise; attaches nothing)."""
    with _lock:
        if _exit_pid != os.getpid():  # handles inherited through fork() are the parent's
            return None
        held = _attached.get(scope)
    return None if held is None else held[0]


def _creating(name: str, me: int) -> bool:
    """Whether a live process other than this one holds an unpublished link of ``name`` (it is creating it)."""
    try:
        entries = os.listdir(SHM_DIR)
    except OSError:
        return False
    for entry in entries:
        match = _LINK.match(entry)
        if match and match.group(1) == name and int(match.group(3)) != me and process_alive(int(match.group(3))):
            return True
    return False


def _open(name: str, link: str) -> Optional[TensoCache]:
    """Open the published pool ``name`` and record this process as its user through ``link``; None to retry.

    Raises FileNotFoundError if no pool is published."""
    unlink_name(link)  # a link left by an earlier attach of this process
    os.link(_path(name), _path(link))  # FileNotFoundError: none; PermissionError: another user's
    try:
        cache = TensoCache(name=name, create=False)
    except FileNotFoundError:
        unlink_name(link)  # dropped between the link and the open
        return None
    except BaseException:
        unlink_name(link)
        raise
    if _inode(name) != _inode(link):  # replaced between the link and the open: we may have mapped the old one
        cache.close()
        unlink_name(link)
        return None
    return cache


def _create(name: str, me: int, owner_pid: Optional[int], size: Any) -> tuple[Optional[TensoCache], str]:
    """Create the pool under this process's link name, then publish it as ``name``; (None, link) if another
    process published first."""
    owner = me if owner_pid is None else owner_pid
    link = f"{name}.{owner}.{me}"
    unlink_name(link)
    made = TensoCache(default_size(size), name=link, create=True)
    made.close()  # this handle's name is the link; the process's handle is opened below by the published name
    try:
        os.link(_path(link), _path(name))
    except FileExistsError:
        unlink_name(link)
        return None, link
    except BaseException:
        unlink_name(link)
        raise
    _spawn_watcher(name)
    try:
        cache = TensoCache(name=name, create=False)
    except FileNotFoundError:  # swept or dropped at once (its owner is dead, say): start again
        unlink_name(link)
        return None, link
    if _inode(name) != _inode(link):
        cache.close()
        unlink_name(link)
        return None, link
    return cache, link


def drop(scope: str) -> None:
    """Unlink ``scope``'s pool now, and every process's link to it (mappings stay valid until they close)."""
    name = pool_name(scope)
    with _lock:
        _detach(scope)
        _remove_all(name)


def _detach(scope: str) -> None:
    held = _attached.pop(scope, None)
    if held is not None:
        cache, link = held
        cache.close()
        unlink_name(link)


def _remove_all(name: str) -> None:
    unlink_name(name)
    try:
        entries = os.listdir(SHM_DIR)
    except OSError:
        return
    for entry in entries:
        match = _LINK.match(entry)
        if match and match.group(1) == name:
            unlink_name(entry)


def _sweep_pools(only: Optional[str] = None) -> bool:
    """Remove garbage pools and stale links (see the module docs); with ``only``, just that pool. True if
    ``only`` is gone (removed now or before)."""
    try:
        entries = os.listdir(SHM_DIR)
    except OSError:
        return False
    links: dict[str, list[tuple[str, int, int]]] = {}
    pools = set()
    for entry in entries:
        match = _LINK.match(entry)
        if match:
            links.setdefault(match.group(1), []).append((entry, int(match.group(2)), int(match.group(3))))
        elif entry.startswith(PREFIX) and "." not in entry:
            pools.add(entry)
    names = {only} if only is not None else pools | set(links)
    gone = only is not None and only not in pools
    for name in names:
        ino = _inode(name) if name in pools else None
        live_users = 0
        owner_dead = False
        for entry, owner, pid in links.get(name, ()):
            alive = process_alive(pid)
            if _inode(entry) != ino or ino is None:
                # Not (or no longer) a link to the published pool: an unfinished creation, or a user of a pool
                # that was dropped. Garbage once its process is dead; a live one is creating or still reading.
                if not alive:
                    unlink_name(entry)
                continue
            if owner and not process_alive(owner):
                owner_dead = True
            if alive:
                live_users += 1
            else:
                unlink_name(entry)
        if ino is not None and (owner_dead or live_users == 0):
            # Unlink the name first: a process attaching now then fails its open (or its inode check) and retries.
            unlink_name(name)
            for entry, _, _ in links.get(name, ()):
                unlink_name(entry)
            if name == only:
                gone = True
    return gone


def _at_exit() -> None:
    global _exit_pid
    if _exit_pid != os.getpid():
        _exit_pid = os.getpid()
        _attached.clear()  # handles inherited through fork() are the parent's: it owns their links
        atexit.register(_leave_all, _exit_pid)


def _leave_all(pid: int) -> None:
    """At exit: remove this process's links, and every pool it was the last live user of."""
    if os.getpid() != pid:
        return
    with _lock:
        scopes = list(_attached)
        for scope in scopes:
            _detach(scope)
            _sweep_pools(pool_name(scope))


def _spawn_watcher(name: str) -> None:
    """Start the process that removes ``name`` once it is garbage (detached: outlives its creator by design)."""
    code = f"from tenso.nodecache import _watch; _watch({name!r})"
    try:
        # sh starts the watcher in the background and exits at once, so the watcher is nobody's child: Ray (and
        # others) kill the children of a worker that exits, and this one must outlive the worker that created the
        # pool.
        subprocess.Popen(
            ["/bin/sh", "-c", 'exec "$0" -c "$1" </dev/null >/dev/null 2>&1 &', sys.executable, code],
            start_new_session=True,
            close_fds=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        ).wait()
    except OSError:  # pragma: no cover - no shell: the next attach on the host sweeps instead
        pass


def _watch(name: str) -> None:
    """The watcher's loop: sweep ``name`` until it is gone."""
    while not _sweep_pools(name):
        time.sleep(_WATCH_INTERVAL)


# ---------------------------------------------------------------------------------------------------------------
# Entries
# ---------------------------------------------------------------------------------------------------------------
def _count(cache: TensoCache, what: str) -> None:
    counters = _counters.get(cache.name)
    if counters is None:
        counters = _counters[cache.name] = {"hits": 0, "misses": 0, "fallbacks": 0}
    counters[what] += 1


def encodable(value: Any) -> Any:
    """``value`` as the pool stores it (framework tensors as host NumPy, dicts of them too), or None."""
    if isinstance(value, dict):
        if not value or not all(isinstance(k, str) for k in value):
            return None
        arrays = {k: _encodable_array(v) for k, v in value.items()}
        return None if any(a is None for a in arrays.values()) else arrays
    return _encodable_array(value)


def _encodable_array(value: Any) -> Optional[np.ndarray]:
    array = to_host(value)
    return array if isinstance(array, np.ndarray) and not array.dtype.hasobject else None


def nbytes(value: Any) -> int:
    """Bytes of an :func:`encodable` value."""
    if isinstance(value, dict):
        return sum(int(v.nbytes) for v in value.values())
    return int(value.nbytes)


# A dict is stored as one entry per array ("<key>/0", "<key>/1", ...) and, written last, a manifest under the key
# itself: a bundle {"keys": JSON list of the dict's keys, as uint8}. One tenso bundle holding the arrays would place
# most of them at unaligned offsets (the format packs keys between entries), and those must be copied on read.
#
# Manifests already parsed, by key and bytes: (the dict's keys, its parts' pool keys). A dict read over and over (the
# weights every task reads) parses its manifest and formats its parts' keys once.
_manifests: dict[tuple[str, bytes], tuple[list[str], list[str]]] = {}
_MANIFESTS_KEPT = 256


def _parts_of(key: str, manifest: bytes) -> tuple[list[str], list[str]]:
    parsed = _manifests.get((key, manifest))
    if parsed is None:
        names = json.loads(manifest)
        parsed = (names, [f"{key}/{i}" for i in range(len(names))])
        if len(_manifests) >= _MANIFESTS_KEPT:
            _manifests.clear()
        _manifests[(key, manifest)] = parsed
    return parsed


def _find(cache: TensoCache, key: str) -> Any:
    hit = cache.get(key, pin=True)
    if not isinstance(hit, dict):
        return hit
    names, part_keys = _parts_of(key, bytes(hit["keys"]))
    parts = cache.get_many(part_keys, pin=True)
    if any(p is None for p in parts):  # removed or evicted meanwhile
        return None
    return dict(zip(names, parts))


def lookup(cache: TensoCache, key: str) -> Any:
    """The pool's value for ``key`` as read-only zero-copy views that pin their entries, or None (counted)."""
    hit = _find(cache, key)
    _count(cache, "misses" if hit is None else "hits")
    return hit


def store(cache: TensoCache, key: str, value: Any) -> Any:
    """Put an :func:`encodable` value under ``key`` (unless some process already has) and return the pool's pinned
    views of it; None if it does not fit (counted as a fallback: serve ``value`` itself)."""
    hit = _find(cache, key)  # another process may have stored it meanwhile
    if hit is not None:
        return hit
    try:
        if isinstance(value, dict):
            for i, array in enumerate(value.values()):
                part = f"{key}/{i}"
                if cache.info(part) is None:  # a part left by an earlier, partly evicted copy is the same bytes
                    cache.put(part, array)
            names = np.frombuffer(json.dumps(list(value)).encode(), np.uint8)
            cache.put(key, {"keys": names})
        else:
            cache.put(key, value)
    except TensoCacheFullError:
        _count(cache, "fallbacks")
        return None
    hit = _find(cache, key)
    if hit is None:  # removed or evicted meanwhile (another process's put or remove)
        _count(cache, "fallbacks")
    return hit


def remove(cache: TensoCache, key: str) -> bool:
    """Delete ``key`` (and a dict's parts); True if it was there. Views still in use keep their bytes (their pins
    hold the blocks) until they are dropped."""
    manifest = cache.get(key, copy=True)
    found = cache.delete(key)
    if isinstance(manifest, dict):
        for i in range(len(json.loads(bytes(manifest["keys"])))):
            cache.delete(f"{key}/{i}")
    return found


def deliver(value: Any, device: Optional[str] = None, copy: bool = False) -> Any:
    """Pinned pool views as the caller asked: writeable NumPy arrays private to this process (copy-on-write views
    of the pinned entries; ``copy=True``: copies), or ``device`` ("torch", "torch:cuda:0", "jax", "cupy:0") through
    :func:`tenso.frameworks.from_host` (CPU torch over the same private views unless ``copy``). Dicts come back as
    plain ``dict``.

    A view holds the pinned pool view it was made from, so the entry stays pinned -- never evicted, never rewritten
    -- while any view lives; a write through it copies the touched pages into this process only."""
    if device is None:
        return map_arrays(value, np.array if copy else private_value)
    framework, spec = _parse_device(device)
    if not copy and framework == "torch" and spec in ("", "cpu"):
        return map_arrays(value, lambda a: from_host(private_value(a), device, zero_copy=True))
    # Other devices read the pinned bytes once, by their own copy (JAX arrays are immutable: a CPU JAX array may
    # alias the pinned entry itself).
    return map_arrays(value, lambda a: from_host(a, device, zero_copy=not copy and framework == "jax"))


def stats(cache: TensoCache) -> dict[str, Any]:
    """The pool's stats (pool-wide: entries, usage, evictions, pinned, ...) with this process's ``hits``,
    ``misses`` and ``hit_rate`` (one per :func:`lookup`) and ``fallbacks`` (values :func:`store` could not place)."""
    out: dict[str, Any] = dict(cache.stats)
    counters = _counters.get(cache.name, {"hits": 0, "misses": 0, "fallbacks": 0})
    out.update(counters)
    lookups = counters["hits"] + counters["misses"]
    out["hit_rate"] = counters["hits"] / lookups if lookups else 0.0
    return out
