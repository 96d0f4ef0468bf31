"""Sending and receiving one lease: the same-host proof of a peer, the sender's copy into a lease, and the
recipient's adoption of it."""

from __future__ import annotations

import os
import time
import weakref
from typing import Any, Callable, Optional

import numpy as np

from ..errors import TensoError
from . import state
from .state import _CTRL, _R_WORD, HANDSHAKE_KEY, LeaseLostError, _Pending, _release_quietly, _State


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


def _lease_send(st: _State, nbytes: int, fill: Callable[[np.ndarray], None]) -> Optional[dict[str, Any]]:
    """Lease ``nbytes`` (+ control block), let ``fill`` write the body; the header fields, or None if full."""
    now = time.monotonic()
    st.sweep()
    st.self_check(now)
    try:
        handle, view = st.cache.lease(_CTRL + nbytes)
    except (MemoryError, TensoError, OSError, ValueError):
        return None  # no room: Dask's frames
    handle = tuple(int(v) for v in handle)
    raw = np.frombuffer(view, dtype=np.uint8)
    nonce = os.urandom(16)
    raw[:16] = np.frombuffer(nonce, dtype=np.uint8)
    ctrl = raw[:_CTRL].view(np.uint64)
    ctrl[_R_WORD] = 0
    try:
        fill(raw[_CTRL : _CTRL + nbytes])
    except BaseException:
        _release_quietly(st.cache, handle)
        raise
    with st.lock:
        st.pending[nonce] = _Pending(handle, ctrl, now)
        state._counts["leases_sent"] += 1
    st.start_reaper()
    return {"pool": st.pool_name, "peer": st.token, "h": list(handle), "nonce": nonce, "n": nbytes}


def _lease_receive(lease: dict[str, Any]) -> np.ndarray:
    """Adopt the lease a header names; its body as a uint8 array that frees the lease when garbage-collected."""
    st = state._state
    pool = lease.get("pool")
    if st is None or pool != st.pool_name:
        raise LeaseLostError(
            f"tenso.dask: a same-host payload in pool {pool!r} reached a process that does not map it "
            "(tenso.dask is not registered here, or was registered with another scope)"
        )
    if not st.verify(lease.get("peer")):
        raise LeaseLostError(f"tenso.dask: the sender of a same-host payload is not registered in pool {pool!r}")
    handle = tuple(int(v) for v in lease["h"])
    nbytes = int(lease["n"])
    if len(handle) != 4 or handle[3] != _CTRL + nbytes:
        raise TensoError("tenso.dask: malformed lease header")
    try:
        view = st.cache.adopt(handle)
    except (ValueError, OSError) as exc:
        raise LeaseLostError("tenso.dask: the lease was freed before delivery (claim timeout exceeded?)") from exc
    raw = np.frombuffer(view, dtype=np.uint8)
    if raw[:16].tobytes() != lease["nonce"]:
        _release_quietly(st.cache, handle)
        raise LeaseLostError("tenso.dask: lease nonce mismatch (freed before delivery and reused)")
    # Ours now (the sender can no longer free it): tell the sender it may forget the lease before its timeout.
    raw[:_CTRL].view(np.uint64)[_R_WORD] = 1
    # Every view derived from ``raw`` keeps ``raw`` itself alive (NumPy stops collapsing bases at the array whose
    # base is not an ndarray), so the lease is released only after the last of them.
    weakref.finalize(raw, _release_quietly, st.cache, handle)
    with st.lock:
        state._counts["leases_received"] += 1
    return raw[_CTRL : _CTRL + nbytes]

