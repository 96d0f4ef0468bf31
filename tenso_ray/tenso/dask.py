"""Dask integration: same-host tensors move through the node pool; only a small header crosses TCP.

Dask already sends contiguous NumPy arrays as zero-copy frames, so a serializer that only changes the frame format
cannot beat it: the time goes into the socket (two copies through the kernel, plus the reader's allocation). When the
sender and the recipient of a message share a host, this plug-in copies the body once into *leased* memory of the
host's node pool (:func:`tenso.nodecache.attach`: recycled, pre-faulted shared memory) and sends a header of about
200 bytes; the recipient adopts the lease and gets a zero-copy view of it. Everywhere else (another host, an
unregistered peer, spilling to disk, small or object arrays) Dask's own serializers run unchanged.

Usage::

    from distributed import Client
    import tenso.dask

    client = Client(cluster)
    tenso.dask.install(client)     # this process, every worker, and every worker started or restarted later
    ...
    tenso.dask.uninstall(client)   # puts back exactly what was there

``register()`` / ``unregister()`` switch one process (``install`` runs them in the client and, through a worker
plugin, in every worker). Clusters started from the command line can load it at worker start instead::

    dask worker tcp://scheduler:8786 --preload tenso.dask      # or distributed.worker.preload: [tenso.dask]

and the client still calls ``tenso.dask.install(client)`` (idempotent with the preload).

Types
-----
* ``numpy.ndarray`` (and subclasses Dask dispatches to it, e.g. ``numpy.memmap``, which arrive as plain arrays):
  every dtype, ml_dtypes (bfloat16, float8...) included, any layout. C- and Fortran-ordered arrays keep their order;
  other strided views are gathered into C order by the one copy into the pool. Object arrays and arrays under
  ``min_bytes`` (2 MiB by default) always use Dask's serializer.
* ``torch.Tensor`` on the CPU (every dtype, bfloat16 through ml_dtypes, any layout); ``requires_grad`` is kept.
  CUDA, sparse and quantized tensors, and tensors with a ``.grad``, keep Dask's serializer.
* :class:`tenso.QuantizedTensor`, :class:`tenso.StringTensor` and :class:`tenso.RaggedArray` travel as one tenso
  packet (in the pool on one host, as one frame otherwise).
* dicts, lists and tuples: Dask splits them before dispatch, so every array inside takes the paths above (the
  default serializer list is fixed, and only per-type registrations reach worker-to-worker transfers).

Arrays that arrive through the pool are writeable exactly when the sender's were (as Dask's own), and own their
lease: nobody else writes that memory while they live.

Same-host proof
---------------
Each registered process generates a random token and writes it, with its pid, into its node pool; it advertises
``{pool name, token}`` in the handshake of every connection it opens or accepts afterwards (on connections that
deserialize what they receive). A sender uses the pool only if the recipient's token is present in the sender's own
mapping of that pool, written by a live process: only a process that maps the same shared memory can have put it
there. The recipient checks the sender's token the same way before it touches the lease, and checks a 16-byte nonce
the sender wrote into the lease. IP addresses are never compared. Connections opened before ``register()`` keep
Dask's frames; ``install`` closes the idle ones of the client and of each worker, so that the next transfer opens
one that advertises.

The scheduler forwards data undecoded. ``install`` also registers :class:`TensoSchedulerPlugin`, which makes it a
forwarder for *results*: on the connections the scheduler opens to workers (``get_data`` for ``future.result()`` /
``client.gather()``, ``run`` for ``client.run``) it advertises its own proven token with a ``fwd`` flag, so a worker
replies with a lease; the scheduler passes the header on when the requesting client proves it maps the same pool,
and otherwise adopts the lease itself and sends Dask's frames. Connections that clients open to the scheduler never
advertise (``scatter`` without ``direct=True``, queues and variables stay Dask's frames): what the scheduler may keep
longer than a claim timeout never names a lease.

Lifetime (who frees each lease)
-------------------------------
A lease belongs to the sender until the recipient adopts it, and to the recipient afterwards; the pool frees the
leases of a process that dies (SIGKILL included) at its next allocation.

* Delivered: the recipient adopts it and releases it when the last view of the array is garbage-collected.
* Dropped before delivery, or never deserialized (a closed comm, a dead recipient): the sender releases it after
  ``claim_timeout`` seconds (60 by default). The pool lets only a lease's holder free it, and adopting and
  releasing both run under its lock, so exactly one side frees it when a late recipient races the sender: the
  sender's release is refused once the recipient adopted, and a recipient that comes after the release raises
  :class:`tenso.TensoError` rather than reading reused memory. Neither side writes into a block it does not hold.
* Sender or recipient SIGKILLed, worker restarted by its nanny: the pool frees what that process held.
* The pool itself has a fixed size (``pool_size``, or the node pool's default), is reserved when the first process
  of the cluster attaches, and is removed when its owner exits (:func:`tenso.nodecache.attach`; ``install`` makes
  the client the owner, the preload makes the worker's nanny the owner). ``/dev/shm`` never grows with traffic; a
  message that does not fit in the free space goes as ordinary frames.

Memory accounting: Dask counts an array it holds by ``nbytes`` (managed memory) whichever way it arrived. A worker's
process memory (RSS, which ``memory_limit`` compares against) includes the pool pages it has touched, as shared
memory, so a received 64 MiB array adds 64 MiB to the recipient's RSS as Dask's own frames do. Spilling serializes
without a ``context`` and therefore writes Dask's ordinary frames to disk; the spilled array's lease is freed when
the in-memory object is dropped.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import secrets
import sys
import threading
import time
import warnings
import weakref
from typing import Any, Callable, Literal, Optional

import numpy as np

from .errors import TensoError
from .shm import process_alive

try:
    from dask.utils import has_keyword
    from distributed.comm.core import Comm
    from distributed.diagnostics.plugin import SchedulerPlugin, WorkerPlugin
    from distributed.protocol.serialize import dask_deserialize, dask_serialize
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("tenso.dask requires Dask distributed; install it with: pip install 'tenso-ray[dask]'") from exc

__all__ = [
    "register",
    "unregister",
    "install",
    "uninstall",
    "is_registered",
    "counts",
    "pool_name",
    "scope_for",
    "TensoWorkerPlugin",
    "TensoSchedulerPlugin",
    "LeaseLostError",
    "dask_setup",
    "dask_teardown",
    "MIN_BYTES",
    "CLAIM_TIMEOUT",
]

#: Arrays smaller than this keep Dask's frames. Measured on a 2-core LocalCluster (scatter + gather, direct): a
#: lease loses below ~1 MiB (0.75x at 64 KiB, 0.94x at 256 KiB), breaks even at 1 MiB and wins from 4 MiB (1.6x).
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
# Control block at the start of every lease: nonce (16 bytes), then the recipient's "adopted" word (a hint that lets
# the sender forget the lease early; only the pool decides who frees it). The body starts 64 bytes in, so it keeps
# the pool's 64-byte alignment.
_CTRL = 64
_R_WORD = 3  # index of the recipient's word in the control block viewed as uint64
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


# ---------------------------------------------------------------------------------------------------------------
# Per-process state
# ---------------------------------------------------------------------------------------------------------------
class _Pending:
    __slots__ = ("handle", "ctrl", "since")

    def __init__(self, handle: tuple[int, ...], ctrl: np.ndarray, since: float) -> None:
        self.handle = handle
        self.ctrl = ctrl
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
        self.pending: dict[bytes, _Pending] = {}
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
        """Forget leases the recipient claimed; free those nobody claimed within ``claim_timeout``."""
        now = time.monotonic()
        if not force and now < self.next_sweep:
            return
        self.next_sweep = now + _SWEEP_INTERVAL
        with self.lock:
            items = list(self.pending.items())
        for nonce, p in items:
            if p.ctrl[_R_WORD] != 0:
                self._forget(nonce)
            elif now - p.since >= self.claim_timeout:
                # The pool lets only the lease's holder free it: this succeeds exactly when the recipient has not
                # adopted it (the pool lock orders the two), and nobody writes into the block to find out.
                _release_quietly(self.cache, p.handle)
                self._forget(nonce)

    def _forget(self, nonce: bytes) -> None:
        with self.lock:
            self.pending.pop(nonce, None)

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
_counts = {"leases_sent": 0, "leases_received": 0, "frames_sent": 0}


def _process_token() -> str:
    # Stable for the life of the process, so that connections opened under an earlier registration keep working
    # after unregister()/register(); a forked child gets its own.
    global _token
    if _token is None or _token[0] != os.getpid():
        _token = (os.getpid(), secrets.token_hex(16))
    return _token[1]
_register_lock = threading.RLock()
_saved: dict[tuple[str, type], Any] = {}  # (dispatcher name, type) -> what our registration replaced
_saved_lazy: dict[tuple[str, str], Any] = {}  # (dispatcher name, toplevel module) -> the lazy hook we wrapped
_orig_handshake: Any = None


def _release_quietly(cache: Any, handle: tuple[int, ...]) -> None:
    try:
        cache.release(handle)
    except (TensoError, ValueError, OSError, RuntimeError):
        pass  # adopted by the recipient, already freed, or the pool handle is closed (freed when this process exits)


# ---------------------------------------------------------------------------------------------------------------
# Sending and receiving one lease
# ---------------------------------------------------------------------------------------------------------------
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
        _counts["leases_sent"] += 1
    st.start_reaper()
    return {"pool": st.pool_name, "peer": st.token, "h": list(handle), "nonce": nonce, "n": nbytes}


def _lease_receive(lease: dict[str, Any]) -> np.ndarray:
    """Adopt the lease a header names; its body as a uint8 array that frees the lease when garbage-collected."""
    st = _state
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
        _counts["leases_received"] += 1
    return raw[_CTRL : _CTRL + nbytes]


# ---------------------------------------------------------------------------------------------------------------
# NumPy
# ---------------------------------------------------------------------------------------------------------------
def _dtype_desc(dtype: np.dtype) -> Any:
    if dtype.kind in "biufcmM" and dtype.fields is None and type(dtype).__module__.startswith("numpy"):
        return dtype.str
    return pickle.dumps(dtype)  # ml_dtypes, structured and other custom dtypes (Dask pickles them too)


def _dtype_from(desc: Any) -> np.dtype:
    if isinstance(desc, str):
        return np.dtype(desc)
    dtype = pickle.loads(desc)
    if not isinstance(dtype, np.dtype):
        raise TensoError("tenso.dask: malformed dtype in header")
    return dtype


def _previous(kind: str, cls: type) -> Any:
    fn = _saved.get((kind, cls), _MISSING)
    if fn is _MISSING or fn is None:
        return None
    return fn


_resolved: dict[tuple[str, type], Any] = {}  # (kind, cls) -> (Dask's function, whether it takes context) or None


def _resolve(kind: str, cls: type) -> Any:
    # Every small array goes through here: resolve what our registration replaced once per registration (cleared
    # by _uninstall_dispatch), not per call; has_keyword is inspect.signature, ~10 us.
    fn = _previous(kind, cls)
    found = None if fn is None else (fn, kind == "ser" and bool(has_keyword(fn, "context")))
    _resolved[(kind, cls)] = found
    return found


def _default_dumps(cls: type, x: Any, context: Optional[dict[str, Any]]) -> tuple[dict[str, Any], list[Any]]:
    found = _resolved.get(("ser", cls)) or _resolve("ser", cls)
    if found is None:
        raise NotImplementedError(cls.__name__)  # Dask moves on to pickle
    fn, wants = found
    return fn(x, context=context) if wants else fn(x)


def _default_loads(cls: type, header: dict[str, Any], frames: list[Any]) -> Any:
    found = _resolved.get(("de", cls)) or _resolve("de", cls)
    if found is None:
        raise TensoError(f"tenso.dask: no deserializer for {cls.__name__} payloads without a tenso header")
    return found[0](header, frames)


def _send_ndarray(st: _State, x: np.ndarray) -> Optional[dict[str, Any]]:
    order: Literal["C", "F"] = "F" if x.flags.f_contiguous and not x.flags.c_contiguous else "C"
    dtype = x.dtype
    shape = x.shape

    def fill(body: np.ndarray) -> None:
        dst = body.view(dtype).reshape(shape, order=order)
        np.copyto(dst, x, casting="no")

    lease = _lease_send(st, x.nbytes, fill)
    if lease is None:
        return None
    lease.update(dtype=_dtype_desc(dtype), shape=list(shape), order=order, w=bool(x.flags.writeable))
    return lease


def _receive_ndarray(h: dict[str, Any]) -> np.ndarray:
    dtype = _dtype_from(h["dtype"])
    shape = tuple(int(s) for s in h["shape"])
    body = _lease_receive(h)
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if count * dtype.itemsize != body.nbytes:
        raise TensoError("tenso.dask: lease size does not match shape and dtype")
    out = body.view(dtype).reshape(shape, order="F" if h.get("order") == "F" else "C")
    if not h.get("w", True):
        out.flags.writeable = False
    return out


def _lease_ok(st: Optional[_State], x: np.ndarray, context: Optional[dict[str, Any]]) -> bool:
    return (
        st is not None
        and x.nbytes >= st.min_bytes
        and not x.dtype.hasobject
        and x.dtype.itemsize > 0
        and _peer_ok(st, context)
    )


def _serialize_ndarray(x: np.ndarray, context: Optional[dict[str, Any]] = None) -> tuple[dict[str, Any], list[Any]]:
    st = _state
    if st is not None and _lease_ok(st, x, context):
        lease = _send_ndarray(st, x)
        if lease is not None:
            return {"tenso": lease}, []
    if context:
        _counts["frames_sent"] += 1
    return _default_dumps(np.ndarray, x, context)


def _deserialize_ndarray(header: dict[str, Any], frames: list[Any]) -> np.ndarray:
    lease = header.get("tenso")
    if lease is None:
        return _default_loads(np.ndarray, header, frames)
    return _receive_ndarray(lease)


# ---------------------------------------------------------------------------------------------------------------
# torch
# ---------------------------------------------------------------------------------------------------------------
def _serialize_tensor(t: Any, context: Optional[dict[str, Any]] = None) -> tuple[dict[str, Any], list[Any]]:
    import torch

    if (
        t.device.type != "cpu"
        or t.layout != torch.strided
        or t.is_quantized
        or t.grad is not None
        or t.is_conj()
        or t.is_neg()
    ):
        return _default_dumps(torch.Tensor, t, context)
    from .frameworks import to_host

    host = to_host(t.detach())
    st = _state
    if st is not None and _lease_ok(st, host, context):
        lease = _send_ndarray(st, host)
        if lease is not None:
            return {"tenso-torch": {"rg": bool(t.requires_grad), "lease": lease}}, []
    if context:
        _counts["frames_sent"] += 1
    sub, frames = _default_dumps(np.ndarray, host, None)
    return {"tenso-torch": {"rg": bool(t.requires_grad), "sub": sub}}, frames


def _deserialize_tensor(header: dict[str, Any], frames: list[Any]) -> Any:
    import torch

    info = header.get("tenso-torch")
    if info is None:
        return _default_loads(torch.Tensor, header, frames)
    from .frameworks import from_host

    if "lease" in info:
        host = _receive_ndarray(info["lease"])
    else:
        host = _default_loads(np.ndarray, info["sub"], frames)
    t = from_host(host, "torch", zero_copy=True)
    if info.get("rg"):
        t.requires_grad_(True)
    return t


# ---------------------------------------------------------------------------------------------------------------
# tenso's own types: one tenso packet
# ---------------------------------------------------------------------------------------------------------------
def _packet_kind(x: Any) -> str:
    from .ragged import RaggedArray, StringTensor

    if isinstance(x, StringTensor):
        return "strings"
    if isinstance(x, RaggedArray):
        return "ragged"
    return "tenso"


def _to_packet(kind: str, x: Any) -> Any:
    from .core import dumps

    return x.dumps() if kind in ("strings", "ragged") else dumps(x)


def _from_packet(kind: str, data: Any) -> Any:
    from .core import loads
    from .ragged import RaggedArray, StringTensor

    if kind == "strings":
        return StringTensor.loads(data)
    if kind == "ragged":
        return RaggedArray.loads(data)
    return loads(data)


def _serialize_packet(x: Any, context: Optional[dict[str, Any]] = None) -> tuple[dict[str, Any], list[Any]]:
    kind = _packet_kind(x)
    packet = memoryview(_to_packet(kind, x)).cast("B")
    st = _state
    if st is not None and packet.nbytes >= st.min_bytes and _peer_ok(st, context):

        def fill(body: np.ndarray) -> None:
            body[:] = np.frombuffer(packet, dtype=np.uint8)

        lease = _lease_send(st, packet.nbytes, fill)
        if lease is not None:
            return {"tenso-packet": {"kind": kind, "lease": lease}}, []
    if context:
        _counts["frames_sent"] += 1
    return {"tenso-packet": {"kind": kind}}, [packet]


def _deserialize_packet(header: dict[str, Any], frames: list[Any]) -> Any:
    info = header.get("tenso-packet")
    if not isinstance(info, dict):
        raise TensoError("tenso.dask: malformed header for a tenso packet")
    kind = str(info.get("kind"))
    if "lease" in info:
        return _from_packet(kind, _lease_receive(info["lease"]))
    (frame,) = frames
    return _from_packet(kind, frame)


def _tenso_types() -> list[type]:
    from .quantize import QuantizedTensor
    from .ragged import RaggedArray, StringTensor

    return [QuantizedTensor, StringTensor, RaggedArray]


# ---------------------------------------------------------------------------------------------------------------
# Registration in Dask's dispatch tables
# ---------------------------------------------------------------------------------------------------------------
_DISPATCH = {"ser": dask_serialize, "de": dask_deserialize}


def _ours() -> set[Any]:
    return {
        _serialize_ndarray,
        _deserialize_ndarray,
        _serialize_tensor,
        _deserialize_tensor,
        _serialize_packet,
        _deserialize_packet,
    }


def _set(kind: str, cls: type, fn: Any) -> None:
    table = _DISPATCH[kind]._lookup
    current = table.get(cls, _MISSING)
    if current not in _ours() and (kind, cls) not in _saved:
        _saved[(kind, cls)] = current
    table[cls] = fn


def _register_torch(kind: str) -> None:
    import torch

    _set(kind, torch.Tensor, _serialize_tensor if kind == "ser" else _deserialize_tensor)


class _LazyTorch:
    """Wraps Dask's lazy ``torch`` hook: runs it, then puts our torch registration over it."""

    def __init__(self, kind: str, original: Any) -> None:
        self.kind = kind
        self.original = original

    def __call__(self) -> None:
        if self.original is not None:
            self.original()  # imports distributed.protocol.torch, which registers both of Dask's torch functions
        if _state is not None:
            _register_torch("ser")
            _register_torch("de")


def _install_dispatch() -> None:
    # Dask registers NumPy's serializers lazily, the first time a NumPy type is dispatched, and that registration
    # would overwrite ours: run it first.
    for kind, disp in _DISPATCH.items():
        disp.dispatch(np.ndarray)
        _set(kind, np.ndarray, _serialize_ndarray if kind == "ser" else _deserialize_ndarray)
        for cls in _tenso_types():
            _set(kind, cls, _serialize_packet if kind == "ser" else _deserialize_packet)
        if "torch" in sys.modules:
            import torch

            disp.dispatch(torch.Tensor)  # runs Dask's lazy torch registration, if still pending
            _register_torch(kind)
        else:
            current = disp._lazy.get("torch")
            if not isinstance(current, _LazyTorch):
                _saved_lazy[(kind, "torch")] = current
                disp._lazy["torch"] = _LazyTorch(kind, current)


def _uninstall_dispatch() -> None:
    ours = _ours()
    for kind, disp in _DISPATCH.items():
        table = disp._lookup
        for cls in list(table):
            if table[cls] in ours:
                previous = _saved.get((kind, cls), _MISSING)
                if previous is _MISSING:
                    del table[cls]  # a subclass lookup Dask cached from our entry, or a type we added
                else:
                    table[cls] = previous
        lazy = disp._lazy.get("torch")
        if isinstance(lazy, _LazyTorch):
            original = _saved_lazy.get((kind, "torch"))
            if original is None:
                disp._lazy.pop("torch", None)
            else:
                disp._lazy["torch"] = original
        _saved_lazy.pop((kind, "torch"), None)
    # A saved entry that was missing is dropped above; keep nothing between registrations.
    _saved.clear()
    _resolved.clear()


def _handshake_info(self: Any) -> dict[str, Any]:
    info: dict[str, Any] = _orig_handshake(self)
    st = _state
    if st is None:
        return info
    if getattr(self, "deserialize", True):
        info[HANDSHAKE_KEY] = {"pool": st.pool_name, "peer": st.token}
    elif _forwarding and _opened_here():
        # The scheduler forwards data undecoded. On the connections it opens itself (to workers: get_data for a
        # gather, run for a broadcast) every reply is consumed by the handler that asked and forwarded at once,
        # and that handler hands a lease only to a proven same-host requester (see _forward_or_materialize).
        # Connections that clients open to it (scatter, queues, variables: data the scheduler may keep for
        # longer than a claim timeout) never advertise.
        info[HANDSHAKE_KEY] = {"pool": st.pool_name, "peer": st.token, "fwd": True}
    return info


def _opened_here() -> bool:
    # True when the handshake is being built by distributed.comm.core.connect (an outgoing connection), not by a
    # listener accepting one. Anything else (a future distributed that renames it) advertises nothing: frames.
    frame = sys._getframe(2)
    return frame.f_code.co_name == "connect" and frame.f_globals.get("__name__") == "distributed.comm.core"


def _install_handshake() -> None:
    global _orig_handshake
    current = Comm.__dict__.get("handshake_info")
    if current is _handshake_info:
        return
    _orig_handshake = current
    Comm.handshake_info = _handshake_info  # type: ignore[method-assign]


def _uninstall_handshake() -> None:
    global _orig_handshake
    if Comm.__dict__.get("handshake_info") is _handshake_info and _orig_handshake is not None:
        Comm.handshake_info = _orig_handshake  # type: ignore[method-assign]
    _orig_handshake = None


# ---------------------------------------------------------------------------------------------------------------
# The scheduler as a forwarder
# ---------------------------------------------------------------------------------------------------------------
_FORWARDED_HANDLERS = ("gather", "broadcast")
_LEASE_KEYS = ("tenso", "tenso-torch", "tenso-packet")


def _carries_lease(header: Any) -> bool:
    """Whether a Dask header (any depth: collections nest sub-headers) names a lease of ours."""
    if isinstance(header, dict):
        for key in _LEASE_KEYS:
            sub = header.get(key)
            if isinstance(sub, dict) and ("h" in sub or "lease" in sub):
                return True
        return any(_carries_lease(v) for v in header.values() if isinstance(v, (dict, list)))
    if isinstance(header, list):
        return any(_carries_lease(v) for v in header)
    return False


def _requester_proven(comm: Any) -> bool:
    st = _state
    info = getattr(comm, "remote_info", None) or {}
    mine = info.get(HANDSHAKE_KEY)
    return (
        st is not None
        and isinstance(mine, dict)
        and not mine.get("fwd")
        and mine.get("pool") == st.pool_name
        and st.verify(mine.get("peer"))
    )


def _materialize(value: Any) -> Any:
    """Replace every forwarded payload that names a lease by the object itself (adopting the lease here), so
    that writing it to the requester serializes it again, as Dask's frames for a peer outside the pool."""
    from distributed.protocol.serialize import Serialized, deserialize, to_serialize

    if isinstance(value, Serialized):
        if _carries_lease(value.header):
            return to_serialize(deserialize(value.header, value.frames))
        return value
    if isinstance(value, dict):
        return {k: _materialize(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_materialize(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_materialize(v) for v in value)
    return value


def _forward_or_materialize(original: Callable[..., Any]) -> Callable[..., Any]:
    async def handler(comm: Any, **kwargs: Any) -> Any:
        result = original(**kwargs)
        if hasattr(result, "__await__"):
            result = await result
        if _requester_proven(comm):
            return result  # the requester maps the pool: it adopts the leases itself
        return _materialize(result)

    # Not __wrapped__: Dask reads a handler's signature (a first parameter named comm) and would follow it.
    handler._tenso_original = original  # type: ignore[attr-defined]
    return handler


def _start_forwarding(scheduler: Any) -> None:
    global _forwarding
    for name in _FORWARDED_HANDLERS:
        current = scheduler.handlers.get(name)
        if current is not None and not hasattr(current, "_tenso_original"):
            scheduler.handlers[name] = _forward_or_materialize(current)
    _forwarding = True
    # The scheduler's own idle connections to workers were opened without the forwarder's entry.
    scheduler.rpc.collect()


def _stop_forwarding(dask_scheduler: Any = None) -> None:
    """Undo the scheduler plugin (``uninstall`` runs it on the scheduler)."""
    global _forwarding, _forwarder_registered
    _forwarding = False
    if dask_scheduler is not None:
        for name in _FORWARDED_HANDLERS:
            current = dask_scheduler.handlers.get(name)
            original = getattr(current, "_tenso_original", None)
            if original is not None:
                dask_scheduler.handlers[name] = original
        dask_scheduler.rpc.collect()
    if _forwarder_registered:  # not when the scheduler shares its process with the client (LocalCluster)
        _forwarder_registered = False
        unregister()


class TensoSchedulerPlugin(SchedulerPlugin):
    """Makes the scheduler a same-host forwarder: results gathered through it (``future.result()``,
    ``client.gather``, ``client.run``) travel from the worker to a same-host client as a lease, and as Dask's frames
    to any other requester (the scheduler adopts the lease and re-serializes it)."""

    name = PLUGIN_NAME + "-scheduler"
    idempotent = False

    def __init__(
        self, scope: str, pool_size: Any = None, min_bytes: int = MIN_BYTES, claim_timeout: float = CLAIM_TIMEOUT
    ) -> None:
        self.scope = scope
        self.pool_size = pool_size
        self.min_bytes = min_bytes
        self.claim_timeout = claim_timeout

    async def start(self, scheduler: Any) -> None:
        global _forwarder_registered
        if _state is None:
            register(self.scope, pool_size=self.pool_size, min_bytes=self.min_bytes, claim_timeout=self.claim_timeout)
            _forwarder_registered = True
        _start_forwarding(scheduler)


# ---------------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------------
def scope_for(address: str) -> str:
    """The node-pool scope of the cluster whose scheduler listens at ``address`` (``dask-<hash>``)."""
    return "dask-" + hashlib.sha256(address.encode()).hexdigest()[:16]


def register(
    scope: str = "dask",
    *,
    pool_size: Any = None,
    min_bytes: int = MIN_BYTES,
    claim_timeout: float = CLAIM_TIMEOUT,
    owner_pid: Optional[int] = None,
    host: Optional[str] = None,
) -> None:
    """Serialize NumPy arrays, torch CPU tensors and tenso's types with tenso in this process.

    Parameters
    ----------
    scope : str
        Node-pool scope (``[A-Za-z0-9_-]``); every process of one cluster on one host must use the same one
        (``install`` uses :func:`scope_for` of the scheduler's address).
    pool_size : int or str, optional
        Size of the pool if this process creates it (else ``TENSO_DASK_POOL_SIZE``, else the node pool's default).
    min_bytes : int
        Arrays (and packets) smaller than this keep Dask's frames.
    claim_timeout : float
        Seconds after which a lease sent but never adopted is freed by its sender.
    owner_pid : int, optional
        Process whose exit removes the pool, if this process creates it (default: this process).
    host : str, optional
        Tests and benchmarks: pretend to live on another host (a separate pool), so that every transfer with
        this process uses Dask's frames.

    Calling it again with the same arguments changes nothing; with other arguments it re-registers.
    """
    global _state
    if host is not None:
        scope = f"{scope}-h{hashlib.sha256(host.encode()).hexdigest()[:8]}"
    if not _SCOPE.match(scope):
        raise ValueError(f"scope must match [A-Za-z0-9_-]{{1,64}}, got {scope!r}")
    if pool_size is None:
        pool_size = os.environ.get(POOL_SIZE_ENV) or None
    options = {"pool_size": pool_size, "min_bytes": int(min_bytes), "claim_timeout": float(claim_timeout)}
    with _register_lock:
        st = _state
        if st is not None and st.scope == scope:
            st.publish()
            st.min_bytes = int(min_bytes)
            st.claim_timeout = float(claim_timeout)
            st.options = options
            _install_dispatch()
            _install_handshake()
            return
        if st is not None:
            unregister()
        from .nodecache import attach

        cache = attach(scope, size=pool_size, owner_pid=owner_pid)
        st = _State(scope, cache, min_bytes, claim_timeout, options)
        st.sweep_registry()
        st.publish()
        _install_dispatch()
        _state = st
        _install_handshake()


def unregister() -> None:
    """Restore Dask's serializers (exactly what ``register()`` replaced) in this process."""
    global _state
    with _register_lock:
        st = _state
        _state = None
        _uninstall_handshake()
        _uninstall_dispatch()
        if st is None:
            return
        st.token_view = None  # unpins the registry entry
        try:
            st.cache.delete(_PEER_PREFIX + st.token)
        except (RuntimeError, TensoError, OSError):
            pass
        # Leases still in flight stay with the reaper thread until claimed or timed out; arrays received keep the
        # pool handle alive through their finalizers.
        st.closed = True
        if st.pending:
            st.start_reaper()


def is_registered() -> bool:
    """Whether this process currently serializes with tenso."""
    return _state is not None


def counts() -> dict[str, int]:
    """This process's transfers so far: ``leases_sent``, ``leases_received`` and ``frames_sent`` (arrays and
    tensors that went as Dask's frames over a comm)."""
    return dict(_counts)


def pool_name() -> Optional[str]:
    """The name of the node pool this process uses, or None when not registered."""
    st = _state
    return None if st is None else st.pool_name


class TensoWorkerPlugin(WorkerPlugin):
    """Registers tenso in a worker when it starts (including workers the nanny restarts) and removes it on teardown.

    ``hosts`` maps worker addresses to fake host names (tests and benchmarks: that worker uses another pool).
    """

    name = PLUGIN_NAME
    idempotent = False

    def __init__(
        self,
        scope: str,
        pool_size: Any = None,
        min_bytes: int = MIN_BYTES,
        claim_timeout: float = CLAIM_TIMEOUT,
        hosts: Optional[dict[str, str]] = None,
    ) -> None:
        self.scope = scope
        self.pool_size = pool_size
        self.min_bytes = min_bytes
        self.claim_timeout = claim_timeout
        self.hosts = dict(hosts or {})

    def setup(self, worker: Any) -> None:
        # Under a nanny the pool outlives worker restarts: make the nanny (our parent) its owner.
        owner = os.getppid() if getattr(worker, "nanny", None) else None
        register(
            self.scope,
            pool_size=self.pool_size,
            min_bytes=self.min_bytes,
            claim_timeout=self.claim_timeout,
            owner_pid=owner,
            host=self.hosts.get(worker.address),
        )
        # Connections this worker opened before registering carry a handshake without our entry (peers would keep
        # sending it frames): close the idle ones, so every later transfer opens one that advertises the pool.
        worker.rpc.collect()

    def teardown(self, worker: Any) -> None:
        unregister()


def install(
    client: Any,
    *,
    pool_size: Any = None,
    min_bytes: int = MIN_BYTES,
    claim_timeout: float = CLAIM_TIMEOUT,
    hosts: Optional[dict[str, str]] = None,
) -> None:
    """Register tenso in this process and in every worker of ``client``'s cluster, present and future.

    The client process attaches first and owns the pool (it is removed when the client process exits or at
    :func:`uninstall`). ``hosts`` is the test override of :class:`TensoWorkerPlugin`.
    """
    scope = scope_for(client.scheduler.address)
    register(scope, pool_size=pool_size, min_bytes=min_bytes, claim_timeout=claim_timeout)
    plugin = TensoWorkerPlugin(scope, pool_size, min_bytes, claim_timeout, hosts)
    client.register_plugin(plugin, name=PLUGIN_NAME)
    try:
        _remove_forwarder(client)  # installing again replaces it (with the new options)
        forwarder = TensoSchedulerPlugin(scope, pool_size, min_bytes, claim_timeout)
        client.register_plugin(forwarder, name=TensoSchedulerPlugin.name)
    except Exception as exc:  # a scheduler without tenso-ray (or on another host's Python): still correct
        warnings.warn(
            f"tenso.dask: the scheduler could not load its plug-in ({exc!r}); results gathered through the "
            "scheduler keep Dask's frames (direct transfers and worker-to-worker transfers still use the pool)",
            RuntimeWarning,
            stacklevel=2,
        )
    _collect_idle_comms(client)


def _collect_idle_comms(client: Any) -> None:
    # The client's pooled connections to workers were opened before registration (``Client(cluster)`` connects
    # at once) and their handshakes lack our entry: close the idle ones, so the next transfer advertises the pool.
    async def collect() -> None:
        client.rpc.collect()

    client.sync(collect)


def uninstall(client: Any) -> None:
    """Undo :func:`install`: every worker and this process get back exactly the serializers they had."""
    try:
        client.unregister_worker_plugin(PLUGIN_NAME)
    except ValueError:
        pass  # not installed
    except OSError:
        pass  # a worker went away meanwhile (CommClosedError); the ones left have unregistered
    try:
        _remove_forwarder(client)
    except (ValueError, OSError):
        pass  # the scheduler is gone
    st = _state
    unregister()
    if st is not None and st.scope == scope_for(client.scheduler.address):
        from .nodecache import drop

        drop(st.scope)


def _scheduler_plugins(dask_scheduler: Any) -> list[str]:
    return list(dask_scheduler.plugins)


def _remove_forwarder(client: Any) -> None:
    if TensoSchedulerPlugin.name in client.run_on_scheduler(_scheduler_plugins):
        client.run_on_scheduler(_stop_forwarding)
        client.unregister_scheduler_plugin(TensoSchedulerPlugin.name)


# distributed.worker.preload hooks (``dask worker --preload tenso.dask``)
def dask_setup(worker: Any) -> None:
    """Preload entry point: register tenso in a worker started from the command line."""
    owner = os.getppid() if getattr(worker, "nanny", None) else None
    register(scope_for(worker.scheduler.address), owner_pid=owner)


def dask_teardown(worker: Any) -> None:
    """Preload exit point."""
    unregister()
