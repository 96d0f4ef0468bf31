"""Copy-on-write views of shared memory: how every adapter hands out bytes it did not write.

The rule (``docs/ARCHITECTURE.md``, "Shared bytes are immutable"): bytes published in shared memory -- an object in
Ray's object store, an entry of a node pool -- are never written again, and a reader that may write gets a
*private* mapping of the same pages (``MAP_PRIVATE``). Reading touches the shared page cache; the first write to a
page copies that page alone, into the writer's own memory, where nobody else sees it. The reader gets the semantics
of a private copy at the cost of a mapping.

:func:`private_bytes` and :func:`private_array` are the only two ways the adapters (``tenso.ray``, ``tenso.cache``,
``tenso.nodecache``) make such a view. Both take a ``keep`` object that holds the source bytes unchanged (Ray's
buffer: the object stays pinned; a pool view: its entry stays pinned) and keep it alive for as long as any view of
the result lives.

When no route to the file works (another user's store, no ``/proc``, memory that is not a shared file mapping,
not Linux), the result is a copy instead: never wrong, only slower. Each such copy is counted
(:func:`stats`), and the first one in a process raises one ``RuntimeWarning`` that says why. Buffers under
:data:`PRIVATE_MIN_BYTES` are always copied, uncounted: a copy of a few pages costs less than a mapping, and Ray
keeps objects that small in the owner's heap, not in the store.
"""

from __future__ import annotations

import mmap
import os
import threading
import warnings
import weakref
from typing import Any, Iterable, Optional

import numpy as np

from . import tenso_rs as _rs
from .tenso_rs import _owned_copy

__all__ = ["private_view", "private_bytes", "private_array", "shared_source", "never_written", "stats", "PRIVATE_MIN_BYTES"]

#: Buffers smaller than this are copied rather than mapped (a mapping and its unmapping cost more than a copy).
PRIVATE_MIN_BYTES = 64 * 1024

_lock = threading.Lock()
_copies = 0  # buffers this process copied because no route worked
_copied_bytes = 0
_warned = False


def _as_bytes(buf: Any) -> np.ndarray:
    if isinstance(buf, np.ndarray) and buf.dtype == np.uint8 and buf.ndim == 1:
        return buf
    return np.frombuffer(buf, dtype=np.uint8)


def private_view(buf: Any, *, keep: Any = None, hint_pids: Iterable[int] = ()) -> Optional[np.ndarray]:
    """A writeable, flat ``uint8`` copy-on-write view of the pages behind ``buf``, or None where there is no route to
    the file (counted in :func:`stats` as a copy the caller makes instead; one ``RuntimeWarning`` per process).

    ``keep`` (default: ``buf``) is held until the last view of the result dies; the caller guarantees that the bytes
    of ``buf`` do not change while it is held. ``hint_pids``: processes that keep the file open (Ray's raylet for its
    object store), a route when the file is already unlinked and ``/proc/self/map_files`` is not readable.
    """
    raw = _as_bytes(buf)
    try:
        view: Optional[np.ndarray] = _rs._private_view(raw, buf if keep is None else keep, tuple(hint_pids))
    except BufferError:
        view = None  # not one contiguous range after all: no mapping to make
    if view is None:
        _fell_back(raw.nbytes)
    else:
        _remember(view, raw)
    return view


# The private views this process handed out that are still alive: start address -> (length, the source bytes they
# map). The source bytes are a view of the shared mapping itself (Ray's object store, the pool), which the process
# has read or written through before, so its page tables are filled; a fresh private mapping's are not.
_views: dict[int, tuple[int, np.ndarray]] = {}


def _address(x: np.ndarray) -> int:
    return int(x.__array_interface__["data"][0])


def _remember(view: np.ndarray, source: np.ndarray) -> None:
    start = _address(view)
    with _lock:
        _views[start] = (view.nbytes, source)
    weakref.finalize(view, _forget, start)


def _forget(start: int) -> None:
    with _lock:
        _views.pop(start, None)


def shared_source(x: np.ndarray) -> Optional[np.ndarray]:
    """The shared bytes behind ``x`` (contiguous in memory) when ``x`` lies in a private view this process handed out
    and none of its pages was written here: the same bytes as a flat ``uint8`` view of the source mapping, cheaper to
    read than the fresh private mapping (an adapter that serializes ``x`` reads those instead). None otherwise."""
    if not _views:
        return None
    start = _address(x)
    end = start + x.nbytes
    with _lock:
        found = next(((s, src) for s, (n, src) in _views.items() if s <= start and end <= s + n), None)
    if found is None or not never_written(start, x.nbytes):
        return None
    first, source = found
    return source[start - first : end - first]


_pagemap: Optional[tuple[int, int]] = None  # (pid, fd) of /proc/self/pagemap, reopened after a fork
_PAGE = mmap.PAGESIZE


def never_written(start: int, nbytes: int) -> bool:
    """Whether no page of ``[start, start + nbytes)`` of a private file mapping of this process was ever written
    (a written page became the process's own anonymous page). False when it cannot tell (no ``/proc``)."""
    global _pagemap
    if nbytes <= 0:
        return True
    first = start // _PAGE
    count = (start + nbytes - 1) // _PAGE - first + 1
    try:
        with _lock:
            if _pagemap is None or _pagemap[0] != os.getpid():
                _pagemap = (os.getpid(), os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC))
            raw = os.pread(_pagemap[1], count * 8, first * 8)
    except OSError:
        return False
    if len(raw) != count * 8:
        return False
    flags = np.frombuffer(raw, dtype="<u8") >> np.uint64(61)
    # Bit 63 present, 62 swapped, 61 file page or shared: present and not a file page (or swapped out) means
    # the page was copied on write.
    present = (flags & np.uint64(4)) != 0
    swapped = (flags & np.uint64(2)) != 0
    file_page = (flags & np.uint64(1)) != 0
    return not bool(np.any((present & ~file_page) | swapped))


def private_bytes(
    buf: Any, *, keep: Any = None, hint_pids: Iterable[int] = (), min_bytes: int = PRIVATE_MIN_BYTES
) -> np.ndarray:
    """The bytes of ``buf`` as a writeable, flat ``uint8`` array private to this process: :func:`private_view`
    where it can map, else a copy. Buffers under ``min_bytes`` are copied, uncounted (:data:`PRIVATE_MIN_BYTES`;
    an adapter raises it where smaller bodies may not be in shared memory).
    """
    raw = _as_bytes(buf)
    n = raw.nbytes
    if n < min_bytes:
        return _owned_copy(raw) if n else np.empty(0, np.uint8)
    view = private_view(raw, keep=buf if keep is None else keep, hint_pids=hint_pids)
    return view if view is not None else _owned_copy(raw)


def private_array(a: np.ndarray, *, keep: Any = None, hint_pids: Iterable[int] = ()) -> np.ndarray:
    """A writeable array with the dtype, shape and values of ``a`` (a read-only view of shared memory), private to
    this process: a copy-on-write view of the same pages for C- or Fortran-contiguous arrays (see
    :func:`private_bytes`; ``keep`` defaults to ``a``), a copy for other layouts and small arrays."""
    if a.nbytes < PRIVATE_MIN_BYTES or a.dtype.hasobject:
        return a.copy(order="K")
    keep = a if keep is None else keep
    if a.flags.c_contiguous:
        flat = private_bytes(a.reshape(-1).view(np.uint8), keep=keep, hint_pids=hint_pids)
        return flat.view(a.dtype).reshape(a.shape)
    if a.flags.f_contiguous:
        return private_array(a.T, keep=keep, hint_pids=hint_pids).T
    return a.copy(order="K")


def _fell_back(nbytes: int) -> None:
    global _copies, _copied_bytes, _warned
    with _lock:
        _copies += 1
        _copied_bytes += nbytes
        first = not _warned
        _warned = True
    if first:
        reason = _rs._private_view_stats().get("last_failure") or "no route to the shared file"
        warnings.warn(
            f"tenso: cannot map shared memory copy-on-write here ({reason}); readers get private copies instead "
            "(correct, one copy each). Counted in tenso.cow.stats()['copies']; this warning is shown once.",
            RuntimeWarning,
            stacklevel=3,
        )


def stats() -> dict[str, Any]:
    """This process's copy-on-write counters: the native ones (``views``, ``fallbacks``, per-route counts,
    ``last_failure``) plus ``copies`` and ``copied_bytes``, the buffers handed out as copies because no route
    worked (small buffers, copied on purpose, are not counted)."""
    out: dict[str, Any] = dict(_rs._private_view_stats())
    out["copies"] = _copies
    out["copied_bytes"] = _copied_bytes
    return out
