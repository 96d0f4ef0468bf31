"""Sending and receiving one lease: the same-host proof of a peer, the sender's copy into a lease or its hand-on of
a block it already holds (by reference), and the recipient's adoption of it as a private view.

The bytes of a lease are written once, by the process that made it, before its handle goes out; after that nobody
writes them. A recipient's array is a ``MAP_PRIVATE`` view of the block (``tenso_rs._private_view``): reads hit the
shared pages, a write copies the pages it touches into the writer's own memory. An array that arrived this way is
sent on (to another worker, to the client, through the scheduler) by adding a reference to its block, with no copy,
as long as its pages were never written here (``/proc/self/pagemap``); otherwise it is copied into a new lease.
"""

from __future__ import annotations

import threading
import time
import weakref
from typing import Any, Callable, Optional

import numpy as np

from .. import cow
from ..errors import TensoError
from . import state
from .state import HANDSHAKE_KEY, LeaseLostError, _Pending, _release_quietly, _State

_HANDLE_LEN = 6  # (slot, stamp, offset, len, reference, tag): see tenso_shm::pool::LeaseHandle


def _peer_ok(st: _State, context: Optional[dict[str, Any]]) -> bool:
    if not context:
        return False  # spilling and other local serialization
    recipient = context.get("recipient")
    if not isinstance(recipient, dict):
        return False
    info = recipient.get(HANDSHAKE_KEY)
    if not isinstance(info, dict) or info.get("pool") != st.pool_name:
        return False
    return st.verify(info.get("peer"))


def _pending(st: _State, handle: tuple[int, ...], now: float, forwarded: bool) -> None:
    with st.lock:
        st.pending[handle] = _Pending(handle, now)
        state._counts["leases_sent"] += 1
        if forwarded:
            state._counts["leases_forwarded"] += 1
    st.start_reaper()


def _lease_send(st: _State, nbytes: int, fill: Callable[[np.ndarray], None]) -> Optional[dict[str, Any]]:
    """Lease ``nbytes``, let ``fill`` write them (the only write the block ever gets); the header fields, or None
    if the pool has no room."""
    now = time.monotonic()
    st.sweep()
    st.self_check(now)
    try:
        handle, view = st.cache.lease(nbytes)
    except (MemoryError, TensoError, OSError, ValueError):
        return None  # no room: Dask's frames
    handle = tuple(int(v) for v in handle)
    try:
        fill(np.frombuffer(view, dtype=np.uint8))
    except BaseException:
        _release_quietly(st.cache, handle)
        raise
    finally:
        del view  # the block is published below: this process keeps no writeable view of it
    _pending(st, handle, now, forwarded=False)
    return {"pool": st.pool_name, "peer": st.token, "h": list(handle), "o": 0, "n": nbytes}


# ---------------------------------------------------------------------------------------------------------------
# Blocks this process holds, by the address of the array made from them (what a send looks for)
# ---------------------------------------------------------------------------------------------------------------
class _Held:
    __slots__ = ("handle", "start", "nbytes", "private", "root")

    def __init__(self, handle: tuple[int, ...], start: int, nbytes: int, private: bool, root: Any) -> None:
        self.handle = handle
        self.start = start
        self.nbytes = nbytes
        self.private = private
        self.root = root  # weakref to the array over the block: the entry lives exactly as long as it


_held: dict[int, _Held] = {}  # id(root array) -> what it holds
_held_lock = threading.Lock()


def _hold(root: np.ndarray, handle: tuple[int, ...], nbytes: int, private: bool) -> None:
    key = id(root)

    def forget(_: Any) -> None:
        with _held_lock:
            entry = _held.get(key)
            if entry is not None and entry.root() is None:
                del _held[key]

    entry = _Held(handle, _address(root), nbytes, private, weakref.ref(root, forget))
    with _held_lock:
        _held[key] = entry


def _address(x: np.ndarray) -> int:
    return int(x.__array_interface__["data"][0])


def _holding(x: np.ndarray) -> Optional[tuple[_Held, int]]:
    """The block this process holds that ``x`` (contiguous) lies in, and ``x``'s offset in it; None if none."""
    if not _held:
        return None
    start = _address(x)
    end = start + x.nbytes
    with _held_lock:
        entries = list(_held.values())
    for entry in entries:
        if entry.start <= start and end <= entry.start + entry.nbytes and entry.root() is not None:
            return entry, start - entry.start
    return None


def _lease_forward(st: _State, x: np.ndarray) -> Optional[dict[str, Any]]:
    """Send on ``x`` (C- or F-contiguous) by reference if it lies in a block this process holds and was never
    written here: a new reference to the block for the recipient, no copy. None otherwise."""
    found = _holding(x)
    if found is None:
        return None
    entry, offset = found
    if entry.private and not cow.never_written(entry.start + offset, x.nbytes):
        return None  # written through a private view: those bytes are this process's, not the block's
    now = time.monotonic()
    st.sweep()
    st.self_check(now)
    try:
        handle = tuple(int(v) for v in st.cache.share(entry.handle))
    except (MemoryError, TensoError, OSError, ValueError):
        return None  # no room in the reference table, or a reference inherited through fork: copy
    _pending(st, handle, now, forwarded=True)
    return {"pool": st.pool_name, "peer": st.token, "h": list(handle), "o": offset, "n": x.nbytes}


# ---------------------------------------------------------------------------------------------------------------
# Receiving
# ---------------------------------------------------------------------------------------------------------------
class _Reference:
    """Holds one adopted reference to a block; drops it when garbage-collected (after the last view of it)."""

    __slots__ = ("__weakref__",)


def _lease_receive(lease: dict[str, Any], writeable: bool = True) -> np.ndarray:
    """Adopt the reference a header names; the body as a 1-D uint8 array of this process's: a copy-on-write view
    of the block when ``writeable`` (a read-only view of it otherwise) that drops the reference when the last view
    of it is garbage-collected, or a private copy where no private mapping can be made."""
    st = state._state
    pool = lease.get("pool")
    if st is None or pool != st.pool_name:
        raise LeaseLostError(
            f"tenso.dask: a same-host payload in pool {pool!r} reached a process that does not map it "
            "(tenso.dask is not registered here, or was registered with another scope)"
        )
    if not st.verify(lease.get("peer")):
        raise LeaseLostError(f"tenso.dask: the sender of a same-host payload is not registered in pool {pool!r}")
    try:
        handle = tuple(int(v) for v in lease["h"])
        nbytes = int(lease["n"])
        offset = int(lease.get("o", 0))
    except (KeyError, TypeError, ValueError) as exc:
        raise TensoError("tenso.dask: malformed lease header") from exc
    if len(handle) != _HANDLE_LEN or offset < 0 or nbytes < 0 or offset + nbytes > handle[3]:
        raise TensoError("tenso.dask: malformed lease header")
    try:
        block = st.cache.adopt(handle, writeable=False)
    except (ValueError, OSError) as exc:
        raise LeaseLostError("tenso.dask: the lease was freed before delivery (claim timeout exceeded?)") from exc
    body = memoryview(block)[offset : offset + nbytes]
    with st.lock:
        state._counts["leases_received"] += 1
    if not writeable:
        # Read-only, as the sender's array was: a view of the shared block itself, which nobody writes.
        raw = np.frombuffer(body, dtype=np.uint8)
        weakref.finalize(raw, _release_quietly, st.cache, handle)
        _hold(raw, handle, nbytes, private=False)
        return raw
    ref = _Reference()
    weakref.finalize(ref, _release_quietly, st.cache, handle)
    out = cow.private_view(body, keep=ref) if nbytes else None
    if out is None:
        # No route to a private mapping (counted and warned about by tenso.cow), or an empty body: this process's
        # own copy, and the reference goes now.
        out = np.frombuffer(body, dtype=np.uint8).copy()
        del body, block, ref
        with st.lock:
            state._counts["received_copies"] += 1
        return out
    with st.lock:
        state._counts["private_views"] += 1
    _hold(out, handle, nbytes, private=True)
    return out
