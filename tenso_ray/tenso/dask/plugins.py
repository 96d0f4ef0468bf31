"""The public API: ``register`` / ``unregister`` in one process, ``install`` / ``uninstall`` across a cluster
(worker and scheduler plug-ins), and the ``--preload`` hooks."""

from __future__ import annotations

import hashlib
import os
import warnings
from typing import Any, Optional

from distributed.diagnostics.plugin import WorkerPlugin

from ..errors import TensoError
from . import state
from .dispatch import _install_dispatch, _uninstall_dispatch
from .handshake import _install_handshake, _uninstall_handshake
from .scheduler import TensoSchedulerPlugin, _stop_forwarding
from .state import (
    _PEER_PREFIX,
    _SCOPE,
    CLAIM_TIMEOUT,
    MIN_BYTES,
    PLUGIN_NAME,
    POOL_SIZE_ENV,
    _register_lock,
    _State,
)


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
    if host is not None:
        scope = f"{scope}-h{hashlib.sha256(host.encode()).hexdigest()[:8]}"
    if not _SCOPE.match(scope):
        raise ValueError(f"scope must match [A-Za-z0-9_-]{{1,64}}, got {scope!r}")
    if pool_size is None:
        pool_size = os.environ.get(POOL_SIZE_ENV) or None
    options = {"pool_size": pool_size, "min_bytes": int(min_bytes), "claim_timeout": float(claim_timeout)}
    with _register_lock:
        st = state._state
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
        from ..nodecache import attach

        cache = attach(scope, size=pool_size, owner_pid=owner_pid)
        st = _State(scope, cache, min_bytes, claim_timeout, options)
        st.sweep_registry()
        st.publish()
        _install_dispatch()
        state._state = st
        _install_handshake()


def unregister() -> None:
    """Restore Dask's serializers (exactly what ``register()`` replaced) in this process."""
    with _register_lock:
        st = state._state
        state._state = None
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
    return state._state is not None


def counts() -> dict[str, int]:
    """This process's transfers so far: ``leases_sent``, ``leases_received`` and ``frames_sent`` (arrays and
    tensors that went as Dask's frames over a comm)."""
    return dict(state._counts)


def pool_name() -> Optional[str]:
    """The name of the node pool this process uses, or None when not registered."""
    st = state._state
    return None if st is None else st.pool_name


class TensoWorkerPlugin(WorkerPlugin):
    """Registers tenso in a worker when it starts (including workers the nanny restarts) and removes it on teardown.

    ``hosts`` maps worker addresses to fake host names (tests and benchmarks: that worker uses another pool).
    """

    __module__ = "tenso.dask"  # pickled by its public name, as before the package split
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
    st = state._state
    unregister()
    if st is not None and st.scope == scope_for(client.scheduler.address):
        from ..nodecache import drop

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
