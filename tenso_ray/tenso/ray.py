"""Ray integration: tensor bodies go to Ray's object store out of band, never through pickle.

Ray pickles every object with protocol 5 and moves each ``pickle.PickleBuffer`` it meets into the object store
without copying it into the pickle stream. Ray's default already does that for C-contiguous NumPy arrays of the
builtin dtypes; it falls back to in-band pickling (three to four copies) for torch tensors, ``ml_dtypes`` arrays
such as bfloat16, and non-contiguous arrays. This plug-in registers reducers that always return a tiny header plus
the body as a ``PickleBuffer``, so every one of those reaches the object store with at most one copy (the gather of a
non-contiguous array) and comes back as a zero-copy view.

Usage::

    import ray
    import tenso.ray

    ray.init(runtime_env=tenso.ray.runtime_env(include_torch=True))   # every worker registers when it starts
    tenso.ray.register(include_torch=True)                            # the driver, and the job-wide switch

``register()`` alone (after a plain ``ray.init()``) covers the driver, and every worker that receives a tenso payload
adopts the registration when it decodes one. ``runtime_env()`` adds Ray's ``worker_process_setup_hook`` so that
every worker of the job, including one that only creates and returns tensors, registers when it starts.
``unregister()`` restores, in the driver at once and in workers at their next serialization, whatever the
registration replaced (for example Ray's own reducer under ``RAY_ENABLE_ZERO_COPY_TORCH_TENSORS``). A worker that is
off catches up with a later ``register()`` when it next decodes a tenso payload (or at start, with ``runtime_env()``).

``cached_get(ref)`` (module :mod:`tenso.ray_cache`, re-exported here) reads an object through a node-local
shared-memory cache: one copy per node, zero-copy for every task and actor there.

Workers learn the driver's state from a small file in the Ray session directory (a ``stat`` at most once a
millisecond while serializing), and from GCS's key-value store on nodes that do not share that directory.

Policies
--------
* ``numpy.ndarray``: every dtype. Builtin dtypes that are C- or Fortran-contiguous are handed over as their own
  buffer (no copy, the same cost as Ray's default). A large strided view whose elements fill at least half of the
  memory it spans is sent as that span with its strides (one memcpy, no gather; the receiver gets the same strided
  view); other layouts, and ml_dtypes/datetime/structured dtypes, are gathered once into C order. Object arrays
  keep NumPy's own (in-band) pickling.
* Subclasses: Ray dispatches by exact type. ``numpy.memmap`` is registered and arrives as a plain read-only
  ``numpy.ndarray`` (the file mapping does not travel); ``torch.nn.Parameter`` is registered and arrives as a
  writeable ``Parameter`` (a copy-on-write view, as tensors below), with ``requires_grad`` kept. Other subclasses keep
  Ray's default.
* ``torch.Tensor`` (``include_torch=True``), every dtype (bfloat16, float8, complex, bool) and state dicts of them:
  zero-copy *and* safe. A CPU tensor comes back writeable, over a private copy-on-write mapping of the object
  store's pages (see "Copy-on-write views" below): no copy, and a write stays in the process that made it.
  CUDA tensors are staged through host memory and restored on the same device index. ``requires_grad`` is kept;
  the autograd graph is not. ``torch_zero_copy=True`` (which used to share the store's pages, writes included) is
  deprecated and ignored: the default is now as fast and safe.
* JAX arrays (``include_jax=True``): copied to host, restored with ``jax.numpy.asarray``.
* SciPy sparse matrices, ``tenso.QuantizedTensor`` and containers (dict, list, dataclasses) pickle as objects that
  hold ndarrays, so each of their arrays takes the ndarray path above. Ray never consults a registration for
  ``dict`` or ``list`` themselves.
* NumPy arrays that Ray's default hands back as writeable copies (ml_dtypes, datetime and structured dtypes,
  non-contiguous layouts) come back as writeable copy-on-write views. C- and Fortran-contiguous arrays of builtin
  dtypes stay Ray's read-only views of the store, unless ``register(writeable_numpy=True)`` (or the same option
  of :func:`runtime_env`) makes them copy-on-write views too; ``numpy.array(x)`` gives a writeable copy either way.

Copy-on-write views
-------------------
Bytes in the object store are never written after they are sealed; a reader that may write gets a ``MAP_PRIVATE``
mapping of the same pages (:mod:`tenso.cow`). Reads hit the store's shared pages; the first write to a page copies
that page alone into the writer's memory, invisible to every other reader, the owner and the driver. The view holds
Ray's buffer, so the object stays pinned in the store (not evicted, not spilled away, its bytes unchanged) until the
last view of it dies -- also after its ``ObjectRef`` is gone. The store keeps its pages in a file that the raylet
has already unlinked; the route to it (``/proc/self/map_files``, or the raylet's descriptor) is found once per
mapping. Where none works (another user's store, no ``/proc``, not Linux) each reader gets one copy, as before:
counted in ``tenso.cow.stats()``, with one ``RuntimeWarning`` per process. Bodies up to 100 KiB (Ray's inline limit,
``RAY_max_direct_call_object_size``) are always copied: Ray may keep them in the owner's heap, not in the store.

The header is a small tuple, not a tenso packet header: the payload lives inside one Ray job and is read only by
this module, and a tuple pickles in about a microsecond. ``PickleBuffer`` needs pickle protocol 5, which is what Ray
uses; pickling a registered type through ``ray.cloudpickle`` at a lower protocol fails while the plug-in is on.
"""

from __future__ import annotations

import json
import os
import pickle
import time
import warnings
from typing import Any, Callable, Optional

import numpy as np

from .cow import PRIVATE_MIN_BYTES, private_bytes, shared_source
from .frameworks import from_host, to_host, torch_bytes, torch_from_bytes

try:
    import ray
    import ray.cloudpickle as _ray_pickle
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("tenso.ray requires Ray; install it with: pip install 'tenso-ray[ray]'") from exc

# The node-local object cache lives in its own module; it is part of this module's API.
from .ray_cache import NODE_CACHE_ENV, cached_get, drop_node_cache, node_cache, raylet_pid, uncache

__all__ = [
    "register",
    "unregister",
    "runtime_env",
    "setup_worker",
    "is_registered",
    "cached_get",
    "node_cache",
    "uncache",
    "drop_node_cache",
]

#: Environment variable through which ``runtime_env()`` passes the options to the worker setup hook.
OPTIONS_ENV = "TENSO_RAY_OPTIONS"
_KV_NAMESPACE = "tenso"
_HOOK = "tenso.ray.setup_worker"

# PickleBuffer itself, typed to take any object: NumPy's stubs declare no ``__buffer__`` before Python 3.12, so type
# checkers would reject the ndarrays it is given here.
_pickle_buffer: Callable[[Any], pickle.PickleBuffer] = pickle.PickleBuffer


def _buffer(a: np.ndarray) -> pickle.PickleBuffer:
    """The out-of-band buffer of ``a`` (contiguous in memory). Where ``a`` is an unwritten private view we handed out
    (a tensor a task received and returns, say), the same bytes are read from Ray's own store mapping instead, whose
    page tables this worker has filled already, rather than through the fresh private mapping (a page fault per 64
    KiB on first read)."""
    source = shared_source(a)
    return _pickle_buffer(a if source is None else source)

# Types whose buffer NumPy can rebuild from ``dtype.str`` alone (bool, integers, floats, complex); others (ml_dtypes,
# structured, datetime) travel with their dtype object.
_BUILTIN_KINDS = frozenset("biufc")

# ---------------------------------------------------------------------------------------------------------------
# Per-process registration state.
# ---------------------------------------------------------------------------------------------------------------
_options: Optional[dict[str, bool]] = None  # what this process has installed, or None
_writeable_numpy = False  # _options' "writeable_numpy", read by every ndarray rebuild
_replaced: dict[type, Optional[Callable[..., Any]]] = {}  # what each of our entries replaced in Ray's table
_state_path: Optional[str] = None  # the job's state file (workers only)
_state_token: Optional[tuple[int, int]] = None  # (mtime_ns, size) of the state file when last read
_next_check = 0.0  # monotonic time of the next state-file check (workers only)
_CHECK_INTERVAL = 0.001
_next_kv_check = 0.0  # monotonic time of the next GCS check, where this node has no state file
_KV_INTERVAL = 1.0


def _table() -> Any:
    # Ray keeps its custom reducers in this class-level table; the pickler consults it by exact type.
    return _ray_pickle.CloudPickler.dispatch


# ---------------------------------------------------------------------------------------------------------------
# NumPy
# ---------------------------------------------------------------------------------------------------------------
def _reduce_ndarray(a: np.ndarray) -> Any:
    if _next_check and time.monotonic() >= _next_check:
        _refresh()
        if _options is None:  # the driver unregistered: this call already uses what we restored
            return _fallback(a)
    dtype = a.dtype
    if dtype.hasobject:
        # Python objects cannot go out of band; NumPy's reduction contains no ndarray instance, so no recursion.
        return a.__reduce_ex__(5)
    if dtype.kind not in _BUILTIN_KINDS or dtype.isbuiltin == 2:
        # ml_dtypes (bfloat16, float8...), datetimes and structured dtypes expose no buffer of their own: send the
        # bytes and the dtype object. (Some ml_dtypes claim a builtin kind -- float8_e5m2 is 'f', complex32 'c' --
        # but are user-defined types, isbuiltin == 2, whose ``dtype.str`` NumPy cannot parse back.)
        if not a.flags.c_contiguous:
            a = np.ascontiguousarray(a)  # the one gather copy
        return _rebuild_bytes, (_buffer(a.reshape(-1).view(np.uint8)), dtype, a.shape)
    if a.flags.c_contiguous:
        order = "C"
    elif a.flags.f_contiguous:
        order = "F"
    else:
        span = _span(a)
        if span is not None:
            return _rebuild_strided, (_buffer(span), dtype.str, a.shape, a.strides)
        a = np.ascontiguousarray(a)  # the one gather copy: pickle5 can only hand out contiguous memory
        return _rebuild_gathered, (_buffer(a), dtype.str, a.shape)
    if a.ndim == 1:
        return _rebuild_ndarray1, (_buffer(a), dtype.str)
    return _rebuild_ndarray, (_buffer(a), dtype.str, a.shape, order)


# A strided view whose elements cover at least half of the memory between its first and last byte is sent as that
# whole range, with its strides: one memcpy of at most twice the bytes, and no gather on either side (a gather reads
# the same range anyway and costs more than the copy). Small views are gathered; the copy is cheap there.
_SPAN_MIN_BYTES = 1 << 20
_SPAN_MAX_RATIO = 2


def _span(a: np.ndarray) -> Optional[np.ndarray]:
    if a.nbytes < _SPAN_MIN_BYTES or any(s < 0 for s in a.strides):
        return None
    itemsize = a.itemsize
    if any(s % itemsize for s in a.strides):
        return None
    extent = sum((n - 1) * s for n, s in zip(a.shape, a.strides)) + itemsize
    if extent > _SPAN_MAX_RATIO * a.nbytes:
        return None
    # A 1-D contiguous view of the range [first element, last element]: inside the base's memory by construction.
    return np.lib.stride_tricks.as_strided(a, shape=(extent // itemsize,), strides=(itemsize,), writeable=False)


def _rebuild_strided(buf: Any, descr: str, shape: tuple[int, ...], strides: tuple[int, ...]) -> np.ndarray:
    _adopt()
    flat = np.frombuffer(buf, dtype=descr)
    if any(n == 0 for n in shape):
        return np.empty(shape, dtype=descr)
    # as_strided checks nothing: make sure every element lies inside the buffer before building the view.
    extent = sum((n - 1) * s for n, s in zip(shape, strides)) + flat.itemsize
    if min(strides, default=0) < 0 or extent > flat.nbytes:
        raise ValueError(f"strided body of {flat.nbytes} bytes cannot hold shape {shape} with strides {strides}")
    # Ray's default hands a strided array back as a writeable copy: a private view of the span gives the same.
    flat = _private(buf).view(descr)
    return np.lib.stride_tricks.as_strided(flat, shape=shape, strides=strides, writeable=True)


# Ray keeps objects up to max_direct_call_object_size (100 KiB unless RAY_max_direct_call_object_size says otherwise)
# in the owner's heap and inlines them into tasks: bodies that small may not be in the store at all. They are copied,
# which costs less than a mapping anyway, and never counted as a fallback. A larger body is always in the store.
_INLINE_MAX = int(os.environ.get("RAY_max_direct_call_object_size") or 100 * 1024)
_PRIVATE_MIN = max(PRIVATE_MIN_BYTES, _INLINE_MAX + 1)


def _private(buf: Any) -> np.ndarray:
    """A copy-on-write view of an out-of-band body (a copy where no route works): writeable, private, and holding
    Ray's buffer -- so the object stays pinned in the store, its bytes unchanged -- while any view of it lives."""
    return private_bytes(buf, hint_pids=_hint_pids(), min_bytes=_PRIVATE_MIN)


_hints: tuple[int, ...] = ()
_hints_for: Any = None  # the Ray worker object _hints was computed for


def _hint_pids() -> tuple[int, ...]:
    # The raylet runs the object store and keeps its unlinked file open: a route to it when /proc/self/map_files is
    # closed to this process. Looked up once per connection.
    global _hints, _hints_for
    worker = ray._private.worker.global_worker
    node = getattr(worker, "node", None)
    if node is not _hints_for:
        pid = raylet_pid()
        _hints, _hints_for = ((pid,) if pid else ()), node
    return _hints


def _fallback(obj: Any) -> Any:
    previous = _table().get(type(obj))
    return previous(obj) if previous is not None else obj.__reduce_ex__(5)


def _reduce_memmap(a: np.ndarray) -> Any:
    # Policy: a memmap travels as its data; the receiver gets a plain ndarray, not a new mapping of the file.
    return _reduce_ndarray(a.view(np.ndarray))


def _rebuild_bytes(buf: Any, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    # ml_dtypes, datetime and structured arrays: Ray's default copies them in band (writeable); a private view.
    _adopt()
    return _private(buf).view(dtype).reshape(shape)


def _rebuild_gathered(buf: Any, descr: str, shape: tuple[int, ...]) -> np.ndarray:
    # A non-contiguous array gathered by the sender: Ray's default gives a writeable copy; a private view.
    _adopt()
    return _private(buf).view(descr).reshape(shape)


def _builtin_flat(buf: Any, descr: Any) -> np.ndarray:
    # A builtin-dtype body: Ray's read-only view of the store, or with writeable_numpy a private view of it.
    return _private(buf).view(descr) if _writeable_numpy else np.frombuffer(buf, dtype=descr)


def _rebuild_ndarray1(buf: Any, descr: Any) -> np.ndarray:
    _adopt()
    return _builtin_flat(buf, descr)


def _rebuild_ndarray(buf: Any, descr: Any, shape: tuple[int, ...], order: str) -> np.ndarray:
    _adopt()
    flat = _builtin_flat(buf, descr)
    if order == "C":
        return flat.reshape(shape)
    return flat.reshape(shape, order="F")


# ---------------------------------------------------------------------------------------------------------------
# torch
# ---------------------------------------------------------------------------------------------------------------
def _torch_body(t: Any) -> tuple[Any, str, tuple[int, ...], str]:
    device = str(t.device)
    body = torch_bytes(t)  # a view of a contiguous CPU tensor; else one gather or device-to-host copy
    return _buffer(body), str(t.dtype).removeprefix("torch."), tuple(t.shape), device


def _reduce_tensor(t: Any) -> Any:
    if _next_check and time.monotonic() >= _next_check:
        _refresh()
        if _options is None:  # the driver unregistered: this call already uses what we restored
            return _fallback(t)
    if t.layout != _torch_strided() or t.is_quantized or t.device.type == "meta":
        return _default(t)  # sparse, quantized and meta tensors keep what Ray did before us
    buf, dtype, shape, device = _torch_body(t)
    return _rebuild_tensor, (buf, dtype, shape, device, t.requires_grad)


def _torch_strided() -> Any:
    import torch

    return torch.strided


def _default(obj: Any) -> Any:
    # What Ray would have done had we not registered (never our own reducer: that would recurse).
    previous = _replaced.get(type(obj))
    return previous(obj) if previous is not None else obj.__reduce_ex__(5)


def _reduce_parameter(p: Any) -> Any:
    if p.layout != _torch_strided() or p.is_quantized or p.device.type == "meta":
        return _default(p)
    buf, dtype, shape, device = _torch_body(p)
    return _rebuild_parameter, (buf, dtype, shape, device, p.requires_grad)


def _tensor_from(buf: Any, dtype: str, shape: tuple[int, ...], device: str) -> Any:
    # CPU: a tensor over a private copy-on-write view of the stored bytes (a copy where no route works): writes stay
    # in this process. Another device: the stored bytes are only read, by the one host-to-device copy.
    if device == "cpu":
        return torch_from_bytes(_private(buf), dtype, shape, "cpu", True)
    return torch_from_bytes(buf, dtype, shape, device, True)


def _rebuild_tensor(buf: Any, dtype: str, shape: tuple[int, ...], device: str, requires_grad: bool) -> Any:
    _adopt()
    t = _tensor_from(buf, dtype, shape, device)
    if requires_grad:
        t.requires_grad_(True)
    return t


def _rebuild_parameter(buf: Any, dtype: str, shape: tuple[int, ...], device: str, requires_grad: bool) -> Any:
    import torch

    _adopt()
    return torch.nn.Parameter(_tensor_from(buf, dtype, shape, device), requires_grad=requires_grad)


# ---------------------------------------------------------------------------------------------------------------
# JAX
# ---------------------------------------------------------------------------------------------------------------
def _reduce_jax(x: Any) -> Any:
    buf_reduce = _reduce_ndarray(to_host(x))
    return _rebuild_jax, (buf_reduce[0], buf_reduce[1])


def _rebuild_jax(rebuild: Callable[..., np.ndarray], args: tuple[Any, ...]) -> Any:
    return from_host(rebuild(*args), "jax")


# ---------------------------------------------------------------------------------------------------------------
# Installing and removing reducers in this process
# ---------------------------------------------------------------------------------------------------------------
def _ours() -> set[Callable[..., Any]]:
    return {_reduce_ndarray, _reduce_memmap, _reduce_tensor, _reduce_parameter, _reduce_jax}


def _reducers(options: dict[str, bool]) -> dict[type, Callable[..., Any]]:
    reducers: dict[type, Callable[..., Any]] = {np.ndarray: _reduce_ndarray, np.memmap: _reduce_memmap}
    if options.get("include_torch"):
        try:
            import torch
        except ImportError as exc:
            raise ImportError(
                "tenso.ray.register(include_torch=True) requires PyTorch; "
                "install it with: pip install 'tenso-ray[torch]'"
            ) from exc
        reducers[torch.Tensor] = _reduce_tensor
        reducers[torch.nn.Parameter] = _reduce_parameter
    if options.get("include_jax"):
        try:
            import jax
            import jax.numpy
        except ImportError as exc:
            raise ImportError(
                "tenso.ray.register(include_jax=True) requires JAX; install it with: pip install 'tenso-ray[jax]'"
            ) from exc
        reducers[type(jax.numpy.zeros(0))] = _reduce_jax
        array_impl = getattr(getattr(jax, "_src", None), "array", None)
        if array_impl is not None and hasattr(array_impl, "ArrayImpl"):
            reducers[array_impl.ArrayImpl] = _reduce_jax
    return reducers


def _install(options: dict[str, bool]) -> None:
    """Make this process's reducers match ``options`` (idempotent)."""
    global _options, _writeable_numpy
    wanted = _reducers(options)  # raises ImportError before anything changes
    table = _table()
    ours = _ours()
    for cls in list(_replaced):
        if cls not in wanted:
            _restore(cls)
    for cls, reducer in wanted.items():
        current = table.get(cls)
        if current not in ours:
            _replaced[cls] = current
        table[cls] = reducer
    _options = dict(options)
    _writeable_numpy = bool(options.get("writeable_numpy"))


def _restore(cls: type) -> None:
    table = _table()
    previous = _replaced.pop(cls, None)
    if table.get(cls) in _ours():
        if previous is None:
            table.pop(cls, None)
        else:
            table[cls] = previous


def _uninstall() -> None:
    global _options, _writeable_numpy
    for cls in list(_replaced):
        _restore(cls)
    _options = None
    _writeable_numpy = False


# ---------------------------------------------------------------------------------------------------------------
# The job-wide switch: a state file in the Ray session directory (read by workers on this node, cheap to check) and
# the same JSON in GCS's key-value store (read by the setup hook on nodes that do not share the directory).
# ---------------------------------------------------------------------------------------------------------------
def _job_key() -> str:
    return f"tenso.ray.{ray.get_runtime_context().get_job_id()}"


def _job_state_path() -> Optional[str]:
    node = getattr(ray._private.worker, "_global_node", None)
    if node is None:
        return None
    return os.path.join(node.get_session_dir_path(), f"{_job_key()}.json")


def _publish(options: Optional[dict[str, bool]]) -> None:
    text = json.dumps({"options": options, "time": time.time_ns()})
    path = _job_state_path()
    if path is not None:
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    try:
        from ray.experimental import internal_kv

        internal_kv._internal_kv_put(_job_key(), text, overwrite=True, namespace=_KV_NAMESPACE)
    except Exception:  # pragma: no cover - the KV store is an optional second channel
        pass


def _read_state() -> Optional[dict[str, Any]]:
    global _state_token
    path = _state_path
    if path is not None:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            pass
        else:
            _state_token = (st.st_mtime_ns, st.st_size)
            with open(path) as f:
                return json.load(f)
    try:
        from ray.experimental import internal_kv

        text = internal_kv._internal_kv_get(_job_key(), namespace=_KV_NAMESPACE)
    except Exception:  # pragma: no cover
        return None
    return None if text is None else json.loads(text)


def _is_worker() -> bool:
    worker = ray._private.worker.global_worker
    return getattr(worker, "mode", None) == ray._private.worker.WORKER_MODE


def _sync() -> None:
    """Worker side: read the job's state and install or remove our reducers to match it."""
    global _state_path, _next_check
    if _state_path is None:
        _state_path = _job_state_path()
    state = _read_state()
    if state is None:  # the driver has not spoken: follow the runtime_env's options, if any
        text = os.environ.get(OPTIONS_ENV)
        options = json.loads(text) if text else None
    else:
        options = state.get("options")
    if options:
        _install(options)
    else:
        _uninstall()
    _next_check = time.monotonic() + _CHECK_INTERVAL


def _refresh() -> None:
    # Called from our reducers in workers at most once per millisecond: re-read the state only if the file changed.
    global _next_check, _next_kv_check
    _next_check = time.monotonic() + _CHECK_INTERVAL
    try:
        st = os.stat(_state_path) if _state_path else None
    except FileNotFoundError:
        st = None
    if st is None:
        # No state file on this node (a worker on another machine than the driver): ask GCS, at most once a second.
        if time.monotonic() >= _next_kv_check:
            _next_kv_check = time.monotonic() + _KV_INTERVAL
            _sync()
        return
    if (st.st_mtime_ns, st.st_size) != _state_token:
        _sync()


_in_worker: Optional[bool] = None  # whether this process is a Ray worker (decided on first use)


def _adopt() -> None:
    # Called by every deserializer. A worker that is not registered (it started before register(), or the driver
    # unregistered and registered again) catches up with the job's state when it decodes one of our payloads.
    global _in_worker
    if _options is not None:
        return
    if _in_worker is None:
        _in_worker = ray.is_initialized() and _is_worker()
    if not _in_worker or time.monotonic() < _next_check:
        return
    try:
        if _next_check == 0.0:
            _sync()
        else:
            _refresh()
    except ImportError:  # a framework the driver registered is missing here: keep Ray's default for returns
        pass


# ---------------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------------
def register(
    include_torch: bool = False,
    include_jax: bool = False,
    *,
    writeable_numpy: bool = False,
    torch_zero_copy: bool = False,
) -> None:
    """Register Tenso as the serializer for tensor types in every process of the current Ray job.

    Call it after ``ray.init()``. The driver switches at once; workers switch when they start (with
    ``ray.init(runtime_env=tenso.ray.runtime_env(...))``) or when they next decode a tenso payload, and, while
    registered, at their next serialization after any later ``register``/``unregister`` in the driver. Calling it
    again with the same options changes nothing; with other options it replaces the previous registration.

    Parameters
    ----------
    include_torch : bool, default False
        Also register ``torch.Tensor`` and ``torch.nn.Parameter``. Requires PyTorch.
    include_jax : bool, default False
        Also register JAX arrays. Requires JAX.
    writeable_numpy : bool, default False
        Hand out NumPy arrays of builtin dtypes (C- or Fortran-contiguous) as writeable copy-on-write views of the
        object store, like every other array and tensor, instead of Ray's read-only views.
    torch_zero_copy : bool, default False
        Deprecated, and ignored: torch tensors are zero-copy and safe by default now (copy-on-write views of the
        object store). Passing True raises a ``DeprecationWarning``.

    Raises
    ------
    ImportError
        If PyTorch or JAX is requested but not installed (the message names the extra).
    RuntimeError
        If Ray is not initialized.
    """
    if not ray.is_initialized():
        raise RuntimeError("tenso.ray.register() needs a connected Ray job: call ray.init() first")
    options = _make_options(include_torch, include_jax, writeable_numpy, torch_zero_copy)
    _install(options)
    if not _is_worker():
        _publish(options)


def unregister() -> None:
    """Remove the Tenso serializers and restore what ``register()`` replaced, in the driver and in every worker."""
    _uninstall()
    if ray.is_initialized() and not _is_worker():
        _publish(None)


def is_registered() -> bool:
    """Whether this process currently serializes with Tenso (in a worker, after catching up with the driver)."""
    if _next_check:
        _refresh()
    return _options is not None


def _make_options(include_torch: bool, include_jax: bool, writeable_numpy: bool, torch_zero_copy: bool) -> dict:
    if torch_zero_copy:
        warnings.warn(
            "tenso.ray: torch_zero_copy is deprecated and ignored: torch tensors now come back zero-copy and safe "
            "by default (private copy-on-write views of the object store; a reader's writes stay its own). "
            "Drop the argument.",
            DeprecationWarning,
            stacklevel=3,
        )
    return {
        "include_torch": bool(include_torch),
        "include_jax": bool(include_jax),
        "writeable_numpy": bool(writeable_numpy),
    }


def runtime_env(
    include_torch: bool = False,
    include_jax: bool = False,
    *,
    writeable_numpy: bool = False,
    torch_zero_copy: bool = False,
    base: Optional[dict[str, Any]] = None,
    node_cache: Any = None,
) -> dict[str, Any]:
    """A ``runtime_env`` for ``ray.init`` that registers Tenso in every worker of the job when it starts.

    Workers register with these options even before the driver calls :func:`register`; ``unregister()`` in the
    driver still switches them off. ``base`` is merged in (its ``env_vars`` are kept). ``node_cache`` (``"2GB"`` or
    bytes) sizes the per-node pool of :func:`cached_get` when a worker is the first on its node to use it.
    """
    env = dict(base or {})
    env_vars = dict(env.get("env_vars") or {})
    if node_cache is not None:
        env_vars[NODE_CACHE_ENV] = str(node_cache)
    env_vars[OPTIONS_ENV] = json.dumps(_make_options(include_torch, include_jax, writeable_numpy, torch_zero_copy))
    env["env_vars"] = env_vars
    env["worker_process_setup_hook"] = _HOOK
    return env


def setup_worker() -> None:
    """Ray ``worker_process_setup_hook``: register Tenso in this worker according to the job's state.

    The driver's last ``register()``/``unregister()`` wins; before the driver has called either, the options that
    :func:`runtime_env` put in the environment apply.
    """
    _sync()
