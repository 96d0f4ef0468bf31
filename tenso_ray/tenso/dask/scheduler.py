"""The scheduler as a same-host forwarder (``TensoSchedulerPlugin``): of results (``gather``, ``broadcast``: the
worker's lease header goes on to a proven client), and of a client's ``scatter`` through it (the data arrives as
Dask's frames; the scheduler puts each large value into a lease for the worker it sends it to, at once)."""

from __future__ import annotations

from typing import Any, Callable

from distributed.diagnostics.plugin import SchedulerPlugin

from . import state
from .state import CLAIM_TIMEOUT, HANDSHAKE_KEY, MIN_BYTES, PLUGIN_NAME


_FORWARDED_HANDLERS = ("gather", "broadcast")
_SCATTER_HANDLER = "scatter"
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
    st = state._state
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


def _frames_nbytes(frames: Any) -> int:
    return sum(memoryview(f).nbytes for f in frames) if isinstance(frames, (list, tuple)) else 0


def _for_workers(value: Any) -> Any:
    """A large value a client scattered through the scheduler, as an object that our serializer sends to a proven
    same-host worker as a lease (one copy instead of the scheduler -> worker socket); anything else as it came."""
    from distributed.protocol.serialize import Serialized, deserialize, to_serialize

    st = state._state
    if (
        st is None
        or not isinstance(value, Serialized)
        or _frames_nbytes(value.frames) < st.min_bytes  # small values (most of them) stop here
        or _carries_lease(value.header)
    ):
        return value
    try:
        obj = deserialize(value.header, value.frames)
    except Exception:  # noqa: BLE001 - a type this process cannot load (the client's own classes): frames
        return value
    return to_serialize(obj)


def _lease_scatter(original: Callable[..., Any]) -> Callable[..., Any]:
    # The scheduler hands scattered data to workers within this call (and keeps none of it), so a lease made
    # here is adopted at once or left to the claim timeout like any other.
    async def handler(comm: Any, **kwargs: Any) -> Any:
        data = kwargs.get("data")
        if isinstance(data, dict):
            kwargs["data"] = {k: _for_workers(v) for k, v in data.items()}
        result = original(**kwargs)
        if hasattr(result, "__await__"):
            result = await result
        return result

    handler._tenso_original = original  # type: ignore[attr-defined]
    return handler


def _start_forwarding(scheduler: Any) -> None:
    for name in _FORWARDED_HANDLERS + (_SCATTER_HANDLER,):
        current = scheduler.handlers.get(name)
        if current is not None and not hasattr(current, "_tenso_original"):
            wrap = _lease_scatter if name == _SCATTER_HANDLER else _forward_or_materialize
            scheduler.handlers[name] = wrap(current)
    state._forwarding = True
    # The scheduler's own idle connections to workers were opened without the forwarder's entry.
    scheduler.rpc.collect()


def _stop_forwarding(dask_scheduler: Any = None) -> None:
    """Undo the scheduler plugin (``uninstall`` runs it on the scheduler)."""
    state._forwarding = False
    if dask_scheduler is not None:
        for name in _FORWARDED_HANDLERS + (_SCATTER_HANDLER,):
            current = dask_scheduler.handlers.get(name)
            original = getattr(current, "_tenso_original", None)
            if original is not None:
                dask_scheduler.handlers[name] = original
        dask_scheduler.rpc.collect()
    if state._forwarder_registered:  # not when the scheduler shares its process with the client (LocalCluster)
        state._forwarder_registered = False
        from .plugins import unregister

        unregister()


class TensoSchedulerPlugin(SchedulerPlugin):
    """Makes the scheduler a same-host forwarder: results gathered through it (``future.result()``,
    ``client.gather``, ``client.run``) travel from the worker to a same-host client as a lease, and as Dask's frames
    to any other requester (the scheduler adopts the lease and re-serializes it)."""

    __module__ = "tenso.dask"  # pickled by its public name (the scheduler may run another version's layout)
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
        if state._state is None:
            from .plugins import register

            register(self.scope, pool_size=self.pool_size, min_bytes=self.min_bytes, claim_timeout=self.claim_timeout)
            state._forwarder_registered = True
        _start_forwarding(scheduler)

