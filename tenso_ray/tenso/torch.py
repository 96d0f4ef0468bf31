"""PyTorch DataLoader collation: every tensor of a batch in one shared buffer, views rebuilt in the main process.

``collate`` is a drop-in for :func:`torch.utils.data.default_collate`; ``Collate(pool="256MB")`` adds a recycled
shared-memory pool. Use either as a ``DataLoader``'s ``collate_fn``::

    from torch.utils.data import DataLoader
    from tenso.torch import Collate, collate

    loader = DataLoader(dataset, batch_size=64, num_workers=2, collate_fn=collate)
    loader = DataLoader(dataset, batch_size=64, num_workers=2, collate_fn=Collate(pool="256MB"))

How a batch travels (``default_collate`` for comparison)::

    default_collate   worker: one fresh shared-memory segment per tensor; one file descriptor per tensor
                      through the result queue (file_descriptor strategy) or one name each (file_system)
    collate           worker: ONE fresh segment for the whole batch (every field at a 64-byte aligned offset),
                      one descriptor per batch; batches under ``inband_bytes`` go through the pipe instead
    Collate(pool=)    worker: ONE lease of recycled, pre-faulted memory from the main process's pool; no
                      descriptor, a handle of four integers; a full pool waits up to ``wait`` seconds, then
                      the batch goes through the pipe (never a new segment)

In the main process the batch comes out with the structure and types ``default_collate`` gives (dicts and other
mappings, namedtuples, lists, strings and bytes unchanged, numbers as tensors): each tensor is a writeable view of
the batch's one buffer. A pooled batch's memory goes back to the pool when the last view of it is freed, so a
batch the program keeps keeps its memory and a bounded pool serves an endless epoch. Pin-memory threads, any
``prefetch_factor``, ``persistent_workers`` and the fork and spawn contexts work as with ``default_collate``.

With CUDA, ``Collate`` page-locks its pool once in the main process (``pin_memory=None``, the default; see
:class:`Collate`): pooled batch tensors are pinned memory, a pin-memory thread passes them through without a copy
and ``.to("cuda", non_blocking=True)`` reads them straight from the pool.

In a worker, ``collate`` returns a :class:`PackedBatch`, which becomes the collated structure when it is
unpickled in the main process (``PackedBatch.unpack()`` gives it in the worker). With ``num_workers=0`` both
return the structure at once, in one private buffer.

Lifetimes and crashes: ``collate``'s segments are made by torch's sharing strategy (``file_descriptor``: unlinked
at creation, so nothing is left in ``/dev/shm`` whatever happens). The pool is a node pool service
(:mod:`tenso.nodecache`) scoped to the main process: it is removed when the main process exits, and a lease held
by a worker that dies is freed with it.
"""

from __future__ import annotations

import collections
import copy
import os
import threading
import time
import warnings
import weakref
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch.utils.data import get_worker_info
from torch.utils.data._utils import collate as _tcollate

from .cache import TensoCache, parse_size
from .errors import TensoCacheFullError

__all__ = ["collate", "Collate", "PackedBatch"]

_ALIGN = 64
# Batches smaller than this go through the worker's result pipe (a pickle) rather than a shared segment: below
# it, creating, passing and mapping a segment costs more than copying the bytes twice. Measured with
# benchmarks/bench_torch.py --crossover on this machine kind (2 workers): see integrations/torch/README.md.
INBAND_BYTES = 512 * 1024
_SPARSE = (torch.sparse_coo, torch.sparse_csr, torch.sparse_bsr, torch.sparse_csc, torch.sparse_bsc)


# ---------------------------------------------------------------------------------------------------------------
# Planning: default_collate's traversal, with every tensor leaf replaced by a slot of the batch buffer
# ---------------------------------------------------------------------------------------------------------------
class _Slot:
    """A tensor leaf of a batch: its place in the batch buffer and, once filled, its view."""

    __slots__ = ("sources", "stack", "dtype", "shape", "offset", "buf", "tensor")

    def __init__(self, sources: list[Any], stack: bool, dtype: Any, shape: tuple[int, ...]) -> None:
        self.sources: Optional[list[Any]] = sources
        self.stack = stack
        self.dtype = dtype
        self.shape = shape
        self.offset = 0
        self.buf: Any = None
        self.tensor: Any = None

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * self.dtype.itemsize

    def __reduce__(self) -> tuple[Any, ...]:
        # `buf` is the same object for every slot of a batch, so a pickle carries it (and its one file
        # descriptor or lease handle) once and refers back to it for the other slots.
        return (_view, (self.buf, self.offset, self.dtype, self.shape))

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        return self.tensor


def _view(storage: Any, offset: int, dtype: Any, shape: tuple[int, ...]) -> Any:
    """A tensor of `dtype` and `shape` over `storage` at byte `offset` (a multiple of 64)."""
    t = torch.empty(0, dtype=dtype)
    if not shape or all(shape):
        strides, step = [], 1
        for d in reversed(shape):
            strides.append(step)
            step *= d
        t.set_(storage, offset // dtype.itemsize, shape, strides[::-1])
    else:
        t.resize_(shape)  # zero-size: nothing to share
    return t


def _tensor_slot(batch: list[Any], *, collate_fn_map: Any = None) -> Any:
    elem = batch[0]
    if elem.is_nested:
        raise RuntimeError(
            "Batches of nested tensors are not currently supported by the default collate_fn; "
            "please provide a custom collate_fn to handle them appropriately."
        )
    if elem.layout in _SPARSE:
        raise RuntimeError(
            "Batches of sparse tensors are not currently supported by the default collate_fn; "
            "please provide a custom collate_fn to handle them appropriately."
        )
    if elem.device.type != "cpu" or any(t.requires_grad for t in batch) or type(elem) is not torch.Tensor:
        # Device tensors, autograd leaves and tensor subclasses keep torch's own path (stack with out= would drop
        # the graph or the subclass); they travel as torch pickles them.
        return _record(torch.stack(batch, 0))
    return _record(_Slot(list(batch), True, elem.dtype, (len(batch), *elem.shape)))


def _numpy_slot(batch: list[Any], *, collate_fn_map: Any = None) -> Any:
    elem = batch[0]
    if _tcollate.np_str_obj_array_pattern.search(elem.dtype.str) is not None:
        raise TypeError(_tcollate.default_collate_err_msg_format.format(elem.dtype))
    return _tensor_slot([torch.as_tensor(b) for b in batch])


def _small(make: Callable[..., Any]) -> Callable[..., Any]:
    """Numbers: the tensor default_collate makes, copied into the batch buffer like the others."""

    def fn(batch: list[Any], *, collate_fn_map: Any = None) -> Any:
        t = make(batch)
        return _record(_Slot([t], False, t.dtype, tuple(t.shape)))

    return fn


_OURS: dict[Any, Callable[..., Any]] = {
    _tcollate.collate_tensor_fn: _tensor_slot,
    _tcollate.collate_numpy_array_fn: _numpy_slot,
    _tcollate.collate_numpy_scalar_fn: _small(torch.as_tensor),
    _tcollate.collate_float_fn: _small(lambda b: torch.tensor(b, dtype=torch.float64)),
    _tcollate.collate_int_fn: _small(torch.tensor),
}
_map_cache: tuple[tuple[Any, ...], dict[Any, Callable[..., Any]]] = ((), {})


def _collate_map() -> dict[Any, Callable[..., Any]]:
    """torch's `default_collate_fn_map` (entries a program added or replaced kept), our slots for its own ones."""
    global _map_cache
    current = tuple(_tcollate.default_collate_fn_map.items())
    if current != _map_cache[0]:
        _map_cache = (current, {k: _OURS.get(v, v) for k, v in current})
    return _map_cache[1]


class _Planning(threading.local):
    slots: Optional[list[_Slot]] = None
    kept: Optional[list[Any]] = None


_planning = _Planning()


def _record(leaf: Any) -> Any:
    """Note a leaf made during planning, in traversal order (the order of the buffer)."""
    if isinstance(leaf, _Slot):
        assert _planning.slots is not None
        _planning.slots.append(leaf)
    else:
        assert _planning.kept is not None
        _planning.kept.append(leaf)
    return leaf


def _plan(batch: Any) -> tuple[Any, list[_Slot], list[Any], int]:
    """The batch's skeleton (default_collate's output with slots for tensors), its slots, the tensors torch
    stacked itself, and the buffer size."""
    _planning.slots, _planning.kept = [], []
    try:
        skeleton = _tcollate.collate(batch, collate_fn_map=_collate_map())
        slots, kept = _planning.slots, _planning.kept
    finally:
        _planning.slots = _planning.kept = None
    total = 0
    for s in slots:
        s.offset = total
        total += -(-s.nbytes // _ALIGN) * _ALIGN
    return skeleton, slots, kept, total


def _fill(slots: list[_Slot], storage: Any, buf: Any) -> None:
    for s in slots:
        view = _view(storage, s.offset, s.dtype, s.shape)
        assert s.sources is not None
        if s.stack:
            torch.stack(s.sources, 0, out=view)
        else:
            view.copy_(s.sources[0])
        s.sources = None  # the samples are not kept alive by the batch
        s.tensor = view
        s.buf = buf


# ---------------------------------------------------------------------------------------------------------------
# Buffers: private (in band), a fresh shared segment, a pool lease
# ---------------------------------------------------------------------------------------------------------------
def _private(total: int) -> Any:
    return torch.empty(total, dtype=torch.uint8).untyped_storage()


class _InBand:
    """A batch buffer that travels inside the pickle (through the worker's result pipe)."""

    __slots__ = ("storage",)

    def __init__(self, storage: Any) -> None:
        self.storage = storage

    def __reduce__(self) -> tuple[Any, ...]:
        raw = torch.empty(0, dtype=torch.uint8).set_(self.storage).numpy()
        return (_from_bytes, (bytearray(raw.data),))


def _from_bytes(data: bytearray) -> Any:
    _drain_fences()  # batches that come in band (a full pool) still let pinned blocks waiting on fences go back
    if not data:
        return torch.empty(0, dtype=torch.uint8).untyped_storage()
    return torch.frombuffer(data, dtype=torch.uint8).untyped_storage()


class _Shared:
    """A batch buffer in one fresh shared segment, made and passed by torch's sharing strategy (one fd or name)."""

    __slots__ = ("storage",)

    def __init__(self, storage: Any) -> None:
        self.storage = storage

    def __reduce__(self) -> tuple[Any, ...]:
        return (_identity, (self.storage,))


def _identity(obj: Any) -> Any:
    return obj


class _Leased:
    """A batch buffer leased from the main process's pool: pickles as a handle, adopted by the receiver."""

    __slots__ = ("scope", "size", "owner_pid", "handle", "pin")

    def __init__(
        self, scope: str, size: int, owner_pid: int, handle: tuple[int, ...], pin: Optional[bool] = False
    ) -> None:
        self.scope, self.size, self.owner_pid, self.handle, self.pin = scope, size, owner_pid, handle, pin

    def __reduce__(self) -> tuple[Any, ...]:
        return (_adopt, (self.scope, self.size, self.owner_pid, self.handle, self.pin))


def _adopt(scope: str, size: int, owner_pid: int, handle: tuple[int, ...], pin: Optional[bool] = False) -> Any:
    """Take the lease over in this process; it goes back to the pool when the last tensor view of it is freed."""
    _drain_fences()
    pool = _pool(scope, size, owner_pid)
    if pin is not False:
        _pin_pool(pool, pin)
    mem = pool.adopt(handle)
    holder = np.frombuffer(mem, dtype=np.uint8)
    # torch.from_numpy keeps `holder` referenced by the storage until the storage is freed; the finalizer then
    # returns the block. `holder` is referenced nowhere else. (Not frameworks.from_host: the release hangs on
    # exactly this reference, which its conversion does not promise. Samples go through torch.as_tensor, as in
    # default_collate, so the dtypes accepted are default_collate's.)
    # `mem` rides along: it keeps the mapping (and its page-locking) alive until the block's fence has passed, also
    # when the pool was closed meanwhile and this batch was the mapping's last view.
    weakref.finalize(holder, _release, pool, handle, os.getpid(), mem)
    return torch.from_numpy(holder).untyped_storage()


def _release(pool: TensoCache, handle: tuple[int, ...], pid: Optional[int] = None, mem: Any = None) -> None:
    if pid is not None and os.getpid() != pid:
        # A forked child freeing its copy of the batch (objects that only another thread of the parent held are
        # freed in the child): the lease is still the parent's, and its batch may be in use there.
        return
    # Fenced whenever torch has used CUDA, pinned now or not: the pool may have been pinned since the batch arrived,
    # or closed since (then `_host_pinned` cannot tell, and the mapping is unpinned and unmapped when its last view
    # goes, which `mem` in the fence delays).
    fence = _fence()
    if fence is not None:
        # A `.to("cuda", non_blocking=True)` of this batch may still be reading it: a copy from pinned memory
        # returns before the DMA ends, and torch only delays the reuse of pinned blocks it allocated itself.
        # The block goes back to the pool once the work queued so far on the current stream is done.
        _fences.append((fence, pool, handle, mem))
        _drain_fences()
        return
    _give_back(pool, handle)
    _drain_fences()


def _host_pinned(pool: TensoCache) -> bool:
    try:
        return bool(pool._pool._host_pinned())
    except Exception:  # noqa: BLE001 - a closed handle (or the interpreter exiting): the release cannot happen anyway
        return False


def _give_back(pool: TensoCache, handle: tuple[int, ...]) -> None:
    try:
        pool.release(handle)
    except Exception:  # noqa: BLE001 - the pool may be gone at interpreter exit; the block dies with it
        pass


# ---------------------------------------------------------------------------------------------------------------
# Pinning the pool in the main process (Collate(pin_memory=...))
# ---------------------------------------------------------------------------------------------------------------
# Why pinning is off in this process (set by the first failure, so a missing driver is probed and warned about once).
_pin_problem: Optional[str] = None
_pin_warned = False
# Freed batches whose blocks wait for the CUDA work queued before they were freed: (event, pool, handle, the
# batch's memory, which keeps the mapping mapped and page-locked until the event has passed).
_fences: collections.deque[tuple[Any, TensoCache, tuple[int, ...], Any]] = collections.deque()
_fences_pid = os.getpid()
_fences_lock = threading.Lock()


def _pin_pool(pool: TensoCache, pin: Optional[bool]) -> bool:
    """Page-lock ``pool``'s mapping in this process once (True if it is).

    ``pin=None`` waits until torch has initialised CUDA in this process (then no CUDA context is made on a device the
    program does not use, and nothing is locked for a program that trains on the CPU) and quietly skips when it
    cannot; ``pin=True`` pins at once and warns once when it cannot. Either way batches stay correct."""
    global _pin_problem, _pin_warned
    if _host_pinned(pool):
        return True
    if pin is None and not torch.cuda.is_initialized():
        return False
    if _pin_problem is None:
        try:
            pool._pool._pin_host(_cuda_ordinal())
            return True
        except RuntimeError as e:
            _pin_problem = str(e)
    if pin is True and not _pin_warned:
        _pin_warned = True
        warnings.warn(
            f"tenso.torch.Collate(pin_memory=True): the pool cannot be pinned ({_pin_problem}); batches arrive "
            "in pageable memory",
            RuntimeWarning,
            stacklevel=2,
        )
    return False


def _cuda_ordinal() -> int:
    """The device whose primary context takes the registration (torch's current one; the registration is portable,
    so the pool counts as pinned for every device)."""
    try:
        if torch.cuda.is_available():
            return int(torch.cuda.current_device())
    except Exception:  # noqa: BLE001 - torch's CUDA unusable: the engine still can (device 0)
        pass
    return 0


def _fence() -> Any:
    """A CUDA event after the work queued so far on torch's current stream, or None when torch has not used CUDA
    in this process (then no copy from the pool can be in flight)."""
    try:
        if not torch.cuda.is_initialized():
            return None
        event = torch.cuda.Event()
        event.record()
        return event
    except Exception:  # noqa: BLE001 - CUDA torn down at exit: nothing is in flight any more
        return None


def _drain_fences(wait: bool = False) -> None:
    """Give back the blocks whose fences have passed (all of them, waiting, with ``wait``)."""
    global _fences_pid
    if _fences_pid != os.getpid():  # a forked child: the parent's fences and leases are not its own
        _fences.clear()
        _fences_pid = os.getpid()
        return
    if not _fences or not _fences_lock.acquire(blocking=False):
        return  # nothing pending, or another thread (or a finalizer interrupting this one) is draining
    try:
        while _fences:
            event, pool, handle, _mem = _fences[0]
            try:
                if wait:
                    event.synchronize()
                elif not event.query():
                    break
            except Exception:  # noqa: BLE001 - the event cannot be asked now
                # Stream capture in progress (the copy may be part of a graph replayed later) or a sticky CUDA
                # error: nobody can say the copy is done, so the block stays out of the pool and its memory mapped;
                # a later drain asks again.
                break
            _fences.popleft()
            _give_back(pool, handle)
    finally:
        _fences_lock.release()


def _pool(scope: str, size: int, owner_pid: int) -> TensoCache:
    """This process's handle on the pool ``scope`` (the node pool service keeps one per process and scope)."""
    from .nodecache import attach

    return attach(scope, size=size, owner_pid=owner_pid)


# ---------------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------------
class PackedBatch:
    """A batch collated in a DataLoader worker, all its tensors in one buffer.

    Pickling it (the worker's result queue does) sends the buffer once, as a file descriptor, a pool lease
    handle or in-band bytes; unpickling gives the collated structure, the tensors as views of the buffer.
    """

    __slots__ = ("_skeleton", "_kept", "nbytes")

    def __init__(self, skeleton: Any, kept: list[Any], nbytes: int) -> None:
        self._skeleton = skeleton
        self._kept = kept
        self.nbytes = nbytes

    def unpack(self) -> Any:
        """The collated structure in this process (tensors are views of the batch buffer)."""
        return _unpack(self._skeleton, self._kept)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_identity, (self._skeleton,))

    def __repr__(self) -> str:
        return f"PackedBatch(nbytes={self.nbytes})"


def _unpack(skeleton: Any, kept: list[Any]) -> Any:
    # Tensors torch stacked itself (device, autograd, subclasses) are taken as they are, not copied.
    return copy.deepcopy(skeleton, {id(t): t for t in kept})


def _pack(batch: Any, allocate: Callable[[int], tuple[Any, Any]]) -> tuple[Any, list[Any], int]:
    skeleton, slots, kept, total = _plan(batch)
    storage, buf = allocate(total)
    try:
        _fill(slots, storage, buf)
    except BaseException:
        if isinstance(buf, _Leased):
            _give_back(_pool(buf.scope, buf.size, buf.owner_pid), buf.handle)
        raise
    return skeleton, kept, total


def _in_band(total: int) -> tuple[Any, Any]:
    storage = _private(total)
    return storage, _InBand(storage)


def _shared_or_in_band(total: int, inband_bytes: int) -> tuple[Any, Any]:
    if total < max(inband_bytes, 1):
        return _in_band(total)
    storage = torch.UntypedStorage._new_shared(total)
    return storage, _Shared(storage)


def collate(batch: Any, *, inband_bytes: Optional[int] = None) -> Any:
    """Drop-in for ``torch.utils.data.default_collate``: one buffer for every tensor of the batch.

    In a DataLoader worker the result is a :class:`PackedBatch` that arrives in the main process as the
    structure ``default_collate`` returns, its tensors views of one shared segment (one file descriptor per
    batch), or of in-band bytes when the batch is under ``inband_bytes`` (default :data:`INBAND_BYTES`).
    Outside a worker the structure is returned at once, its tensors in one private buffer.
    """
    if get_worker_info() is None:
        skeleton, kept, _ = _pack(batch, _in_band)
        return _unpack(skeleton, kept)
    limit = INBAND_BYTES if inband_bytes is None else inband_bytes
    return PackedBatch(*_pack(batch, lambda n: _shared_or_in_band(n, limit)))


class Collate:
    """A DataLoader ``collate_fn`` writing each batch into recycled, pre-faulted memory of a bounded pool.

    Parameters
    ----------
    pool : str or int
        Pool size (``"256MB"``, bytes). The pool belongs to the process that makes this object (scope
        ``torch-<pid>``, shared by every ``Collate`` of that process: the first size wins) and is removed when
        that process exits. It is made on first use (by whichever worker leases first), so an object that a
        spawned worker makes again while importing the main module costs nothing. Its size bounds what the
        batches in flight take in ``/dev/shm``, whatever ``prefetch_factor`` and ``num_workers`` are.
    wait : float
        Seconds a worker waits for room in a full pool (batches the program holds keep their memory) before
        it sends the batch through the result pipe instead. A batch larger than the pool goes that way at once.
    inband_bytes : int
        Batches under this size always go through the pipe (default :data:`INBAND_BYTES`).
    pin_memory : bool or None
        Page-lock the pool for CUDA in the process that receives the batches (the main process), once, with
        ``cuMemHostRegister`` through tenso's own engine (``tenso.gpu``; torch's CUDA build is not needed for it):
        batch tensors are then pinned memory (``is_pinned()`` is True), ``DataLoader(pin_memory=True)``'s
        pin-memory thread passes them through without a copy (``Tensor.pin_memory()`` returns a pinned tensor
        itself), and ``.to("cuda", non_blocking=True)`` is a DMA straight out of the pool. ``None`` (the default):
        once torch has initialised CUDA in this process (the batches before that arrive unpinned; a program that
        trains on the CPU never locks anything or makes a CUDA context), in torch's current device's context;
        ``True``: from the first batch, warning once (RuntimeWarning) and going on unpinned when it cannot;
        ``False``: never. Batches that do not go through the pool (small, or a
        full pool) are ordinary memory, which a pin-memory thread copies as usual. A pinned batch freed while torch
        has used CUDA goes back to the pool only once the work queued on torch's current stream has finished, so a
        non-blocking copy of it still in flight is never overwritten by the next batch (a copy queued on another
        stream: keep the batch until that stream is synchronised).
    """

    def __init__(
        self,
        pool: Any = "256MB",
        *,
        wait: float = 1.0,
        inband_bytes: Optional[int] = None,
        pin_memory: Optional[bool] = None,
    ) -> None:
        if pin_memory is not None and not isinstance(pin_memory, bool):
            raise TypeError(f"pin_memory must be True, False or None, got {pin_memory!r}")
        self.size = parse_size(pool)
        self.wait = float(wait)
        self.inband_bytes = INBAND_BYTES if inband_bytes is None else int(inband_bytes)
        self.pin_memory = pin_memory
        self.owner_pid = os.getpid()
        self.scope = f"torch-{self.owner_pid}"

    @property
    def pinned(self) -> bool:
        """Whether the pool is page-locked in this process (see ``pin_memory``: it happens when a pooled batch
        arrives)."""
        from .nodecache import attached

        held = attached(self.scope)
        return held is not None and _host_pinned(held)

    @property
    def pool(self) -> TensoCache:
        """This process's handle on the pool (made if it does not exist yet)."""
        return _pool(self.scope, self.size, self.owner_pid)

    def __call__(self, batch: Any) -> Any:
        if get_worker_info() is None:
            return collate(batch)
        return PackedBatch(*_pack(batch, self._lease))

    def _lease(self, total: int) -> tuple[Any, Any]:
        if total < max(self.inband_bytes, 1):
            return _in_band(total)
        pool = self.pool
        deadline = time.monotonic() + self.wait
        delay = 0.0005
        while True:
            try:
                handle, mem = pool.lease(total)
                break
            except TensoCacheFullError:
                # Room comes back as the main process frees batches; a batch that can never fit goes in band.
                if time.monotonic() >= deadline or total > self.size:
                    return _in_band(total)
                time.sleep(delay)
                delay = min(delay * 2, 0.02)
        handle = tuple(handle)
        # The worker writes the batch through this view; the lease passes to the main process on adoption (or
        # is freed with this process if it dies first).
        storage = torch.from_numpy(np.frombuffer(mem, dtype=np.uint8)).untyped_storage()
        return storage, _Leased(self.scope, self.size, self.owner_pid, handle, self.pin_memory)

    def close(self) -> None:
        """Remove the pool now (in the process that made this object, once its loaders are done).

        Batches still alive keep their memory mapped (and pinned: the pool is unregistered from CUDA just before
        its last mapping in this process goes, never while a batch can use it); a later ``Collate`` of this
        process makes a new pool.
        """
        from .nodecache import drop

        _drain_fences(wait=True)
        drop(self.scope)

    def __repr__(self) -> str:
        return f"Collate(pool={self.size}, wait={self.wait}, pin_memory={self.pin_memory}, scope={self.scope!r})"
