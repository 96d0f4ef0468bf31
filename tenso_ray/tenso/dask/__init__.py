"""Dask integration: same-host tensors move through the node pool; only a small header crosses TCP.

Dask already sends contiguous NumPy arrays as zero-copy frames, so a serializer that only changes the frame format
cannot beat it: the time goes into the socket (two copies through the kernel, plus the reader's allocation). When the
sender and the recipient of a message share a host, this plug-in copies the body once into *leased* memory of the
host's node pool (:func:`tenso.nodecache.attach`: recycled, pre-faulted shared memory) and sends a header of about
200 bytes; the recipient adopts the lease and gets a copy-on-write (``MAP_PRIVATE``) view of it. An array that
arrived this way is sent on (to the next worker, back to the client, through the scheduler) by reference: the block
gains a holder, nothing is copied. Everywhere else (another host, an unregistered peer, spilling to disk, small or
object arrays) Dask's own serializers run unchanged.

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

Shared bytes are immutable: a lease is written once, by the process that made it, before its header goes out, and
never again. Arrays that arrive through the pool are writeable exactly when the sender's were (as Dask's own): a
writeable one is a private mapping of the block (a write copies the pages it touches into the writer's own memory,
seen by nobody else), a read-only one a view of the block itself. Where this process has no route to a private
mapping (``tenso_rs._private_view`` returns None) the body is copied out of the lease instead, counted in
``counts()["received_copies"]``, with one warning. A holder sends an array on by reference only while its pages were
never written here (``/proc/self/pagemap``); a written one is copied into a new lease.

Same-host proof
---------------
Each registered process generates a random token and writes it, with its pid, into its node pool; it advertises
``{pool name, token}`` in the handshake of every connection it opens or accepts afterwards (on connections that
deserialize what they receive). A sender uses the pool only if the recipient's token is present in the sender's own
mapping of that pool, written by a live process: only a process that maps the same shared memory can have put it
there. The recipient checks the sender's token the same way before it adopts the lease, and the pool checks that
the handle names a live reference (entry slot, stamp and the reference's own tag). IP addresses are never compared. Connections opened before ``register()`` keep
Dask's frames; ``install`` closes the idle ones of the client and of each worker, so that the next transfer opens
one that advertises.

The scheduler forwards data undecoded. ``install`` also registers :class:`TensoSchedulerPlugin`, which makes it a
forwarder for *results*: on the connections the scheduler opens to workers (``get_data`` for ``future.result()`` /
``client.gather()``, ``run`` for ``client.run``) it advertises its own proven token with a ``fwd`` flag, so a worker
replies with a lease; the scheduler passes the header on when the requesting client proves it maps the same pool,
and otherwise adopts the lease itself and sends Dask's frames. Connections that clients open to the scheduler never
advertise (queues and variables stay Dask's frames): what the scheduler may keep longer than a claim timeout never
names a lease. A ``scatter`` without ``direct=True`` reaches the scheduler as frames too; its wrapped ``scatter``
handler, which passes the data to workers at once, sends each large value on to a proven worker as a lease.

Lifetime (who frees each lease)
-------------------------------
A block lives as long as its references (``tenso-shm`` counts them under the pool lock). A sender makes a reference
for the recipient (a new lease, or a ``share`` of a block it holds) and holds it until the recipient adopts it; the
pool drops the references of a process that dies (SIGKILL included) and frees a block with its last reference.

* Delivered: the recipient adopts the reference and drops it when the last view of the array is garbage-collected.
* Dropped before delivery, or never deserialized (a closed comm, a dead recipient): the sender drops the reference
  after ``claim_timeout`` seconds (60 by default). The pool lets only a reference's holder drop it, and adopting and
  releasing both run under its lock, so exactly one side drops it when a late recipient races the sender: the
  sender's release is refused once the recipient adopted, and a recipient that comes after the release raises
  :class:`LeaseLostError` rather than reading freed memory. The block itself stays while anyone else holds it.
* Sender, recipient or an earlier holder SIGKILLed, worker restarted by its nanny: the pool drops what that process
  held; the others' arrays stay right.
* The pool itself has a fixed size (``pool_size``, or the node pool's default), is reserved when the first process
  of the cluster attaches, and is removed when its owner exits (:func:`tenso.nodecache.attach`; ``install`` makes
  the client the owner, the preload makes the worker's nanny the owner). ``/dev/shm`` never grows with traffic; a
  message that does not fit in the free space goes as ordinary frames.

Memory accounting: Dask counts an array it holds by ``nbytes`` (managed memory) whichever way it arrived. A worker's
process memory (RSS, which ``memory_limit`` compares against) includes the pool pages it has touched, as shared
memory, so a received 64 MiB array adds 64 MiB to the recipient's RSS as Dask's own frames do. Spilling serializes
without a ``context`` and therefore writes Dask's ordinary frames to disk; the spilled array's lease is freed when
the in-memory object is dropped.

Layout of the package (one module per concern): :mod:`~tenso.dask.state` (options, this process's token, the peer
registry, references in flight), :mod:`~tenso.dask.leases` (sending a body by a new lease or by reference, adopting
it as a private view),
:mod:`~tenso.dask.serializers` (NumPy, torch and tenso packets), :mod:`~tenso.dask.dispatch` (Dask's dispatch
tables), :mod:`~tenso.dask.handshake` (the connection handshake), :mod:`~tenso.dask.scheduler` (the forwarding
scheduler) and :mod:`~tenso.dask.plugins` (the public API and plug-ins). Everything public is re-exported here:
``tenso.dask.install``, ``--preload tenso.dask`` and pickled plug-ins named ``tenso.dask.TensoWorkerPlugin`` keep
working.
"""

from __future__ import annotations

from typing import Any

try:
    import distributed  # noqa: F401
    from dask.utils import has_keyword  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("tenso.dask requires Dask distributed; install it with: pip install 'tenso-ray[dask]'") from exc

from ..errors import TensoError  # noqa: F401  (tenso.dask.TensoError, as before the split)
from .plugins import (
    TensoWorkerPlugin,
    counts,
    dask_setup,
    dask_teardown,
    install,
    is_registered,
    pool_name,
    register,
    scope_for,
    uninstall,
    unregister,
)
from .scheduler import TensoSchedulerPlugin
from .state import CLAIM_TIMEOUT, HANDSHAKE_KEY, MIN_BYTES, PLUGIN_NAME, POOL_SIZE_ENV, LeaseLostError  # noqa: F401

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


def __getattr__(name: str) -> Any:
    # The per-process state changes with register()/unregister(): read it where it lives.
    if name in ("_state", "_forwarding", "_counts"):
        from . import state

        return getattr(state, name)
    raise AttributeError(f"module 'tenso.dask' has no attribute {name!r}")
