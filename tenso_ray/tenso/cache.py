"""TensoCache: a tensor cache in one shared-memory pool, shared by every process that opens it by name.

Memory layout (one segment; see ``rust/tenso-shm/src/pool/mod.rs`` for offsets)::

    ┌──────────────────────────────────────────────┐
    │ POOL HEADER (4096 bytes)                     │
    │ magic | version | pool_size | max_entries    │
    │ lock word (pid | epoch) | index generation   │
    │ active | used_bytes | pending | hits | misses│
    ├──────────────────────────────────────────────┤
    │ ENTRY INDEX (max_entries × 256 B): seqlock,  │
    │ state, key, block, times; LRU ticks; hash    │
    │ buckets; free-slot stack; free-extent table  │
    ├──────────────────────────────────────────────┤
    │ DATA REGION (rest of pool)                   │
    │ 64-byte aligned tenso packets + free space   │
    └──────────────────────────────────────────────┘

Guarantees across processes:

* ``put`` encodes into free space first and publishes the entry afterwards, so
  no reader ever finds a half-written value, and a writer killed at any point
  loses at most its own entry. The lock word holds the owner's pid; a process
  that dies holding it is detected (within milliseconds) and the next process
  rebuilds the index from the entries instead of clearing the pool.
* ``get(copy=True)`` always returns a whole value (copied under a seqlock, retried
  if the entry changed meanwhile).
* ``get()`` (zero-copy) returns read-only views of the live bytes in the pool.
  They are whole when returned, and stay so until the key's block is rewritten:
  a ``put`` of the same key whose packet needs the same block size (the same
  size, rounded up to 64 bytes) overwrites it in place, and after a ``delete``,
  eviction or expiry the block is reused by a later ``put``. Until then the old
  bytes stay. Use ``copy=True`` for a value that must survive later writes, or
  ``pin=True``: a pinned view's entry is never evicted, and its block is not reused
  after a ``delete``, while the view lives (or until its process dies).
* The views keep the mapping alive: they remain valid memory after ``close()``.
* ``get(private=True)`` returns writeable copy-on-write views of a pinned entry:
  the semantics of ``copy=True`` at the cost of a mapping (see :meth:`TensoCache.get`).
  A pinned entry is never rewritten in place, so those views never change under a reader.

Lifetime: a pool created without a name is removed when its creator exits; a named
one lives until :meth:`TensoCache.unlink` (the rule is in :mod:`tenso.shm`).
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from . import tenso_rs as _rs
from .cow import private_array
from .frameworks import _parse_device, from_host, map_arrays, to_host
from .shm import generated_name, unlink_name

__all__ = ["TensoCache"]

_SUFFIXES = {
    "TB": 1024**4, "GB": 1024**3, "MB": 1024**2, "KB": 1024,
    "T": 1024**4, "G": 1024**3, "M": 1024**2, "K": 1024, "B": 1,
}
_QDTYPES = ("qint8", "quint8", "qint4", "quint4")


def parse_size(size: Any) -> int:
    """``'256MB'``, ``'1.5GB'``, ``'64K'`` or an int, in bytes (binary multiples, as tenso 0.24.0)."""
    if isinstance(size, bool):
        raise TypeError("max_memory must be a size, not a bool")
    if isinstance(size, int):
        return size
    text = str(size).strip().upper()
    for suffix, mult in _SUFFIXES.items():
        if text.endswith(suffix):
            return int(float(text[: -len(suffix)]) * mult)
    return int(text)


_parse_size = parse_size  # the name other modules of the package used before parse_size was public


def _to_numpy(tensor: Any) -> Any:
    """Host NumPy for torch / JAX / CuPy tensors and dicts of them (see :func:`tenso.frameworks.to_host`)."""
    if isinstance(tensor, dict):
        return map_arrays(tensor, to_host, tensors=True)
    return to_host(tensor)


def _to_device(value: Any, device: str, zero_copy: bool = False) -> Any:
    """A host value (ndarray or dict of them) on ``device`` ("torch", "torch:cuda:0", "jax", "jax:1", "cupy:0").

    ``zero_copy=True`` lets CPU targets share ``value``'s memory (for a copy the caller owns).
    """
    if isinstance(value, dict):
        return map_arrays(value, lambda array: from_host(array, device, zero_copy))
    return from_host(value, device, zero_copy)


# The objects at the root of a zero-copy pool view (the pool's mapping; the pins of a pinned read).
_POOL_OWNERS = frozenset({"_Mapping", "_PinnedEntry"})


def private_value(a: np.ndarray) -> np.ndarray:
    """A pool read made private: a copy-on-write view of a view of the pool; a value already in this process's own
    memory (a pinned read copies when the pin table is full; a bundle's arrays are decoded) as it is if writeable,
    else copied: there is nothing to map."""
    if a.flags.writeable:
        return a
    root: Any = a
    while isinstance(root, np.ndarray):
        root = root.base
    if type(root).__name__ in _POOL_OWNERS:
        return private_array(a)
    return a.copy()


class TensoCache:
    """A tensor cache in a single shared-memory pool.

    Mutable entries, zero-copy reads, LRU eviction, TTL, in-place updates and
    metadata without deserialization; any number of processes open the same
    pool by name (``TensoCache(name=..., create=False)``).

    Example::

        import numpy as np
        from tenso import TensoCache

        with TensoCache("64MB") as cache:
            cache.put("weights", np.random.randn(1000, 1000).astype(np.float32))
            arr = cache.get("weights")        # zero-copy view into SHM
            print(cache.info("weights"))       # metadata without deserialization
            print(cache.stats)                 # hit/miss counts, memory usage

    Parameters
    ----------
    max_memory : str or int
        Pool size (``'256MB'``, ``'1GB'`` or bytes); all of it is reserved and
        pre-faulted at creation. Ignored when ``create=False``.
    name : str, optional
        Segment name (``[A-Za-z0-9._-]``, up to 200 characters). Generated if None,
        and then the pool is removed when this process exits (at exit, or after a
        ``SIGKILL`` by the next process that sweeps); a pool you named lives until
        :meth:`unlink`. See :mod:`tenso.shm` for the rule. A ``TensoCache`` pickles by
        name: unpickling opens the same pool (``create=False``).
    create : bool
        Create a new pool (``FileExistsError`` if the name exists) or open one
        (``FileNotFoundError`` if it does not).
    max_entries : int, optional
        Index capacity; default one entry per 16 KiB of pool, 16 to 65536.
    mode : int
        Permission bits of a new pool (default ``0o600``).
    """

    def __init__(
        self,
        max_memory: Any = "256MB",
        name: Optional[str] = None,
        create: bool = True,
        *,
        max_entries: Optional[int] = None,
        mode: int = 0o600,
    ) -> None:
        self._owns = create
        if create:
            if name is None:
                name = generated_name("tenso_cache")
            self._pool = _rs._Pool.create(name, parse_size(max_memory), max_entries, mode)
        else:
            if name is None:
                raise ValueError("name is required to open an existing TensoCache (create=False)")
            self._pool = _rs._Pool.open(name)
        self._closed = False

    @property
    def name(self) -> str:
        return self._pool.name

    def put(
        self,
        key: str,
        tensor: Any,
        ttl: Optional[float] = None,
        quantize: Optional[str] = None,
        *,
        evict: bool = True,
    ) -> int:
        """Store a tensor; returns the bytes written (the packet size).

        ``tensor`` may be an ndarray, a dict of them, a sparse matrix, a
        QuantizedTensor, or a torch / JAX / CuPy tensor (copied to host NumPy).
        ``ttl`` is in seconds (None or 0: no expiry). ``quantize`` is one of
        'qint8', 'quint8', 'qint4', 'quint4'.

        Raises ``ValueError`` if the key exceeds 128 bytes of UTF-8, and
        :class:`tenso.TensoCacheFullError` (a ``MemoryError``) if the pool cannot
        make room even after evicting every other entry. ``evict=False`` never evicts:
        it raises ``TensoCacheFullError`` when the free space does not hold the packet.
        """
        self._check_open()
        if len(key.encode("utf-8")) > 128:
            raise ValueError(f"Key too long: {len(key.encode('utf-8'))} bytes (max 128)")
        tensor = _to_numpy(tensor)
        if quantize is not None:
            if quantize not in _QDTYPES:
                raise ValueError(f"quantize must be one of {_QDTYPES}, got {quantize!r}")
            from .quantize import QuantizedTensor

            tensor = QuantizedTensor.quantize(np.asarray(tensor, dtype=np.float32), quantize)
        return self._pool.put(key, tensor, ttl, evict)

    def get(
        self,
        key: str,
        copy: bool = False,
        device: Optional[str] = None,
        *,
        pin: bool = False,
        private: bool = False,
    ) -> Optional[Any]:
        """Retrieve a tensor; None if the key is missing or expired.

        By default the result is a read-only zero-copy view of the pool (see the
        module docs for how long its bytes stay). ``copy=True`` returns a whole,
        writeable copy. ``device`` ("torch", "torch:cuda:0", "jax", "cupy:0")
        converts the value with that framework into a value this process owns;
        ImportError names the extra to install when the framework is missing.

        ``pin=True`` (zero-copy reads): the entry is pinned until the last view of the
        result is garbage-collected (or its process dies), and eviction passes it over;
        if the pool's pin table is full, the result is a private copy instead.

        ``private=True``: writeable arrays with the semantics of ``copy=True`` at the
        cost of a mapping: copy-on-write views of the pinned entry (reads share the
        pool's pages; a write copies the pages it touches into this process alone).
        The entry stays pinned while any view lives. Small arrays (under 64 KiB), a
        dict's arrays (a bundle is decoded into NumPy memory), values other than
        arrays and dicts of arrays, and systems where the pool
        cannot be mapped privately (counted, one ``RuntimeWarning``; see
        :mod:`tenso.cow`) get a copy instead. ``device="torch"`` (CPU) reads this way
        too, without a copy; other devices read the pinned entry once, by their own
        copy.
        """
        if device is None:
            if private and not copy:
                return self._private_get(key)
            return self._pool.get(key, copy, pin)
        framework, spec = _parse_device(device)
        if framework in ("numpy", "torch") and spec in ("", "cpu"):
            value = self._private_get(key)
            return None if value is None else _to_device(value, device, zero_copy=True)
        value = self._pool.get(key, False, True)  # pinned while the device's own copy reads it
        if isinstance(value, (np.ndarray, dict)):
            return _to_device(value, device)
        value = self._pool.get(key, True) if value is not None else None
        return None if value is None else _to_device(value, device, zero_copy=True)

    def _private_get(self, key: str) -> Optional[Any]:
        """``key``'s value as copy-on-write views of its pinned entry (see :meth:`get`)."""
        value = self._pool.get(key, False, True)
        if isinstance(value, (np.ndarray, dict)):
            return map_arrays(value, private_value)
        return None if value is None else self._pool.get(key, True)

    def get_many(self, keys: list[str], copy: bool = False, *, pin: bool = False) -> list[Optional[Any]]:
        """:meth:`get` of several keys in one call (None for each missing one).

        With ``pin=True`` the entries are pinned together, and the values share one holder of all their pins: they
        stay pinned until the last view of any of them is garbage-collected.
        """
        return self._pool.get_many(list(keys), copy, pin)

    def delete(self, key: str) -> bool:
        """Delete an entry; True if the key was there."""
        self._check_open()
        return self._pool.delete(key)

    def keys(self) -> list:
        """All live (non-expired) keys."""
        self._check_open()
        return self._pool.keys()

    def info(self, key: str) -> Optional[dict]:
        """Metadata from the packet header without decoding: 'shape', 'dtype', 'ndim',
        'size_bytes', 'ttl' (seconds or None), 'age' (seconds); None if not found."""
        self._check_open()
        return self._pool.info(key)

    @property
    def stats(self) -> dict:
        """Counters: entries, max_entries, pool_size, used_bytes, free_bytes,
        data_region_size, hits, misses, hit_rate (plus pending and recoveries).
        ``used_bytes + free_bytes == data_region_size`` always holds."""
        self._check_open()
        return self._pool.stats

    def clear(self) -> None:
        """Remove all entries."""
        self._check_open()
        self._pool.clear()

    def close(self) -> None:
        """Close this handle. Other processes, and arrays already returned, are unaffected."""
        if not self._closed:
            self._closed = True
            self._pool.close()

    def unlink(self) -> None:
        """Remove the pool's name (destroyed once every process has closed it)."""
        try:
            self._pool.unlink()
        except FileNotFoundError:
            pass
        unlink_name(self.name)  # already gone: only forgets the name's exit-time removal

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # By name (same host): the receiver opens the pool; its handle never unlinks it on close or `with` exit.
        return (TensoCache, ("256MB", self.name, False))

    # Same-host hand-offs of raw memory outside the cache's keys.
    def lease(self, nbytes: int) -> tuple:
        """Borrow ``nbytes`` of recycled, pre-faulted pool memory: returns ``(handle, memoryview)``.

        The block has one reference, this process's, until :meth:`release` or :meth:`adopt` by
        another process that received ``handle`` (which then holds it); a holder hands the block on
        without copying it with :meth:`share`. The block is freed with its last reference (the
        references of a dead process are dropped). It counts in ``used_bytes`` but is never evicted.
        Write it before handing ``handle`` on, never after.
        """
        self._check_open()
        return self._pool._lease(nbytes)

    def share(self, handle: tuple) -> tuple:
        """A new reference to the block of ``handle`` (a reference this process holds), for another process to
        :meth:`adopt`: the block is handed on by reference, and lives until its last reference is released."""
        self._check_open()
        return tuple(self._pool._share(tuple(handle)))

    def adopt(self, handle: tuple, writeable: bool = True) -> memoryview:
        """Take over the reference ``handle`` names (handed over by another process); returns the block's memory,
        writeable only when ``writeable`` and this is the block's only reference."""
        self._check_open()
        return self._pool._adopt(tuple(handle), writeable)

    def release(self, handle: tuple) -> None:
        """Drop a reference this process holds (a ``ValueError`` if it was dropped, or adopted by another
        process); the last reference frees the block."""
        self._check_open()
        self._pool._release(tuple(handle))

    def _check(self) -> None:
        """Check the pool's structural invariants (tests)."""
        self._pool._check()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("TensoCache is closed")

    def __len__(self) -> int:
        return int(self.stats["entries"])

    def __contains__(self, key: str) -> bool:
        return self.info(key) is not None

    def __enter__(self) -> "TensoCache":
        return self

    def __exit__(self, exc_type: Any, exc_value: Any, traceback: Any) -> None:
        self.close()
        if self._owns:
            self.unlink()

    def __repr__(self) -> str:
        status = "closed" if self._closed else "open"
        return f"TensoCache(name={self.name!r}, status={status})"
