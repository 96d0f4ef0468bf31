"""Per-process state of tenso.dask: options and constants, this process's proven token, the peer registry in the
node pool, leases in flight (and their sweep), and the transfer counters."""

from __future__ import annotations

import os
import re
import secrets
import threading
import time
from typing import Any, Optional

import numpy as np

from ..errors import TensoError
from ..shm import process_alive

MIN_BYTES = 2 * 1024 * 1024
#: Seconds after which a sender frees a lease nobody adopted (a dropped or undelivered message).
CLAIM_TIMEOUT = 60.0
#: Name under which ``install`` registers its worker plugin.
PLUGIN_NAME = "tenso-dask"
#: Key of this plug-in's entry in a connection's handshake.
HANDSHAKE_KEY = "tenso-dask"
#: Environment variable with the pool size for processes that attach without an explicit ``pool_size``.
POOL_SIZE_ENV = "TENSO_DASK_POOL_SIZE"

_PEER_PREFIX = "tenso.dask.peer."
_VERIFY_TTL = 5.0  # seconds a verified peer token is trusted before it is looked up again
_SWEEP_INTERVAL = 0.5
_SELF_CHECK_INTERVAL = 1.0
_SCOPE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_MISSING = object()


class LeaseLostError(TensoError, EOFError):
    """A same-host payload that can no longer be delivered: its lease was freed (the sender's claim timeout passed,
    or it died), or this process or the sender is not in the pool any more.

    It is an ``EOFError`` because that is what Dask's comms treat as a broken connection: the comm is aborted and the
    transfer takes Dask's network-failure path (a worker fetches the data again, from a new lease or as frames), where
    any other exception would leave the dependency in error and the dependent task waiting forever.
    """

    __module__ = "tenso.dask"  # its public name (pickled with the errors Dask sends between processes)


# ---------------------------------------------------------------------------------------------------------------
# Per-process state
# ---------------------------------------------------------------------------------------------------------------
class _Pending:
    """A reference this process sent and the recipient may not have adopted yet."""

    __slots__ = ("handle", "since")

    def __init__(self, handle: tuple[int, ...], since: float) -> None:
        self.handle = handle
        self.since = since


class _State:
    """What ``register()`` set up in this process: the pool, this process's token, leases in flight."""

    def __init__(self, scope: str, cache: Any, min_bytes: int, claim_timeout: float, options: dict[str, Any]):
        self.scope = scope
        self.cache = cache
        self.pool_name: str = cache.name
        self.token = _process_token()
        self.min_bytes = int(min_bytes)
        self.claim_timeout = float(claim_timeout)
        self.options = options
        self.lock = threading.Lock()
        self.pending: dict[tuple[int, ...], _Pending] = {}  # by handle
        self.verified: dict[str, float] = {}
        self.next_sweep = 0.0
        self.next_self_check = 0.0
        self.reaper: Optional[threading.Thread] = None
        self.closed = False
        self.token_view: Any = None  # a pinned view of this process's registry entry (see publish)

    # -- the peer registry -------------------------------------------------------------------------------------
    def publish(self) -> None:
        # Never evicts anything; if the pool has no room the process simply cannot be proven local (frames). The
        # entry is then pinned for as long as this state lives, so that leases filling the pool cannot evict it.
        key = _PEER_PREFIX + self.token
        try:
            self.cache.put(key, np.array([os.getpid()], np.int64), None, evict=False)
            self.token_view = self.cache.get(key, pin=True)
        except (MemoryError, TensoError, OSError):
            pass

    def sweep_registry(self) -> None:
        # Entries of processes that died without unregistering (SIGKILL, nanny restarts) would otherwise stay.
        try:
            keys = self.cache.keys()
        except (RuntimeError, TensoError, OSError):
            return
        for key in keys:
            if not key.startswith(_PEER_PREFIX):
                continue
            entry = self.cache.get(key, copy=True)
            if entry is not None and getattr(entry, "size", 0) == 1 and not process_alive(int(entry[0])):
                self.cache.delete(key)

    def self_check(self, now: float) -> None:
        # A lease may evict our registry entry when the pool is full: put it back (at most once a second).
        if now < self.next_self_check:
            return
        self.next_self_check = now + _SELF_CHECK_INTERVAL
        if self.cache.get(_PEER_PREFIX + self.token, copy=True) is None:
            self.publish()

    def verify(self, token: Any) -> bool:
        """Whether ``token`` was written into this process's mapping of the pool by a live process."""
        if not isinstance(token, str) or len(token) != 32:
            return False
        now = time.monotonic()
        if self.verified.get(token, 0.0) > now:
            return True
        entry = self.cache.get(_PEER_PREFIX + token, copy=True)
        if entry is None or getattr(entry, "size", 0) != 1:
            return False
        if not process_alive(int(entry[0])):
            return False
        self.verified[token] = now + _VERIFY_TTL
        return True

    # -- leases in flight --------------------------------------------------------------------------------------
    def sweep(self, force: bool = False) -> None:
        """Give up the references sent that nobody adopted within ``claim_timeout``."""
        now = time.monotonic()
        if not force and now < self.next_sweep:
            return
        self.next_sweep = now + _SWEEP_INTERVAL
        with self.lock:
            expired = [h for h, p in self.pending.items() if now - p.since >= self.claim_timeout]
            for h in expired:
                del self.pending[h]
        for h in expired:
            # The pool lets only a reference's holder drop it: this succeeds exactly when the recipient has not
            # adopted it (the pool lock orders the two); the block itself lives on while anyone else references it.
            _release_quietly(self.cache, h)

    def start_reaper(self) -> None:
        with self.lock:
            if self.reaper is not None:
                return
            self.reaper = threading.Thread(target=self._reap, name="tenso-dask-reaper", daemon=True)
        self.reaper.start()

    def _reap(self) -> None:
        # Frees unclaimed leases of a process that stopped sending (otherwise the sweep runs on each send); exits
        # once nothing is in flight.
        while True:
            time.sleep(min(1.0, self.claim_timeout / 4))
            self.sweep(force=True)
            with self.lock:
                if not self.pending:
                    self.reaper = None
                    return


_state: Optional[_State] = None
_forwarding = False  # this process is a scheduler that forwards same-host leases (TensoSchedulerPlugin)
_forwarder_registered = False  # the scheduler plug-in registered this process (and unregisters it when removed)
_token: Optional[tuple[int, str]] = None  # (pid, token): one per process, kept across register/unregister
#: Transfers by this process since it started: leases sent and received, arrays sent as Dask's frames.
_counts = {
    "leases_sent": 0,  # lease headers sent (copied into a new lease, or forwarded)
    "leases_forwarded": 0,  # of which forwarded by reference: no copy
    "leases_received": 0,
    "private_views": 0,  # received arrays that are copy-on-write views of their lease
    "received_copies": 0,  # received arrays copied out of their lease (no route to a private view)
    "frames_sent": 0,
}


def _process_token() -> str:
    # Stable for the life of the process, so that connections opened under an earlier registration keep working
    # after unregister()/register(); a forked child gets its own.
    global _token
    if _token is None or _token[0] != os.getpid():
        _token = (os.getpid(), secrets.token_hex(16))
    return _token[1]


#: Serializes register() / unregister() (and the plug-ins that call them).
_register_lock = threading.RLock()


def _release_quietly(cache: Any, handle: tuple[int, ...]) -> None:
    try:
        cache.release(handle)
    except (TensoError, ValueError, OSError, RuntimeError):
        pass  # adopted by the recipient, already freed, or the pool handle is closed (freed when this process exits)


