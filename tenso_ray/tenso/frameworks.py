"""Host arrays to and from framework tensors: the one place that knows torch, JAX, CuPy and ml_dtypes.

Every adapter (the cache, ``tenso.gpu``, the Ray, Dask and DataLoader plug-ins) converts through these functions, so
that a dtype or a device is handled once and the same way everywhere:

* :func:`to_host` turns a ``torch.Tensor``, ``jax.Array`` or ``cupy.ndarray`` (any device) into a NumPy array; a CPU
  torch tensor comes back as a view of its own memory.
* :func:`from_host` turns a NumPy array into a tensor on a named device (``"torch"``, ``"torch:cuda:0"``, ``"jax"``,
  ``"cupy:0"``, ...); ``zero_copy=True`` shares the array's memory where the target can.
* :func:`map_arrays` applies either of them over nested dicts, lists and tuples.
* :func:`torch_from_bytes` and :func:`torch_bytes` move a torch tensor through a flat byte buffer (the Ray plug-in's
  wire body) without needing ``ml_dtypes``.

dtypes without a NumPy builtin (``bfloat16``, the ``float8_*`` family, ``complex32``) live in NumPy as ``ml_dtypes``
arrays. They always cross to and from torch as a reinterpretation of the same bytes (a ``uint8`` view, or an integer
view of the same width for strided arrays), never through ``torch.from_numpy`` on the ``ml_dtypes`` array (which
torch refuses) and never through a float conversion.

No framework is imported until a function needs it; a missing one raises ImportError naming the extra to install.
A CUDA device asked of a framework that has none raises RuntimeError saying what is missing. Device copies go
through tenso's pinned staging (crate ``tenso-gpu``) whenever the driver reports a CUDA device: :func:`from_host` to
``torch:cuda:N`` / ``cupy:N`` copies into device memory tenso allocates and hands over through DLPack
(:func:`device_from_dlpack`), :func:`to_host` of a CUDA tensor copies it home through the same staging; dtypes the
wire does not carry (float8, complex32) and strided device tensors keep the framework's own copy. JAX targets keep
``jax.device_put``. Packets go to and from CUDA in :mod:`tenso.gpu`.

DLPack (framework-agnostic, see :func:`from_dlpack`, :func:`host_input` and :func:`to_dlpack`) goes through
NumPy's own ``np.from_dlpack`` / ``ndarray.__dlpack__``. What the installed versions do (numpy 2.4, torch 2.15,
JAX 0.10, checked by tests/test_dlpack.py):

* NumPy >= 2.1 exports a read-only array only through a *versioned* capsule carrying the READ_ONLY flag (the legacy
  unversioned export raises BufferError), and ``np.from_dlpack`` of a READ_ONLY capsule gives a read-only view.
* torch ignores the READ_ONLY flag: ``torch.from_dlpack(readonly_view)`` shares the memory as a writable tensor.
  Hence :func:`from_host` (``"torch"``) hands torch a copy unless the caller passes ``zero_copy=True``.
* JAX 0.10 asks only for the legacy capsule, which cannot carry READ_ONLY, so NumPy refuses to hand it a read-only
  view (BufferError); ``from_host(view, "jax")`` hands JAX a copy of it instead.
* NumPy does not know DLPack's bfloat16 and float8 type codes ("Unsupported dtype in DLTensor"). Those cross as the
  unsigned integer of the same width with the type code rewritten in the capsule, and are named as ``ml_dtypes``
  types on the NumPy side: still zero-copy, never a float conversion.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import math
import re
import sys
import warnings
from typing import Any, Callable, Optional, Sequence

import numpy as np

from . import tenso_rs as _rs
from .tenso_rs import _owned_copy

__all__ = [
    "to_host",
    "from_host",
    "map_arrays",
    "torch_dtype_of",
    "numpy_dtype_of",
    "torch_from_bytes",
    "torch_bytes",
    "is_tensor",
    "torch_cuda_device",
    "check_device",
    "from_dlpack",
    "host_input",
    "is_dlpack_producer",
    "to_dlpack",
    "device_from_dlpack",
]

# NumPy builtin dtypes that torch also has, under the same name.
_TORCH_BUILTIN = frozenset(
    {
        "bool", "uint8", "int8", "int16", "int32", "int64", "uint16", "uint32", "uint64",
        "float16", "float32", "float64", "complex64", "complex128",
    }
)
# The same as NumPy dtypes (native byte order): ``dtype in`` this costs nanoseconds, ``dtype.name`` microseconds.
_TORCH_BUILTIN_DTYPES = frozenset(np.dtype(name) for name in _TORCH_BUILTIN)
# ml_dtypes types whose torch dtype has the same name and the same bytes per element. Sub-byte integers and float4
# are not here: ml_dtypes stores one value per byte, torch packs them (float4_e2m1fn_x2) or has no kernels.
_TORCH_ML = frozenset(
    {
        "bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu",
        "complex32", "bcomplex32",
    }
)
# An integer type of each width: views through them reinterpret bytes and keep any strides.
_SAME_WIDTH = {1: np.uint8, 2: np.int16, 4: np.int32, 8: np.int64}

_EXTRAS = {
    "torch": "pip install 'tenso-ray[torch]'",
    "jax": "pip install 'tenso-ray[jax]'",
    "cupy": "pip install a CuPy wheel for your CUDA version (e.g. cupy-cuda12x)",
    "ml_dtypes": "pip install 'tenso-ray[bfloat16]'",
}

_DEVICE = re.compile(r"^(?P<fw>numpy|torch|jax|cupy)(?::(?P<spec>.*))?$")
_CUDA_SPEC = re.compile(r"^(?:cuda|gpu)(?::(?P<index>\d+))?$")

# torch warns when it shares a non-writable NumPy array (it cannot mark tensors read-only). Sharing is what the
# caller asked for with zero_copy=True, and read-only inputs are only read on the way to a device.
_READONLY_WARNING = "The given NumPy array is not writable"


def _import(name: str, what: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        top = name.split(".")[0]
        raise ImportError(f"{what} needs {top}, which is not installed: {_EXTRAS[top]}") from exc


def _torch() -> Any:
    return sys.modules.get("torch") or _import("torch", "converting to or from torch")


# ---------------------------------------------------------------------------------------------------------------
# dtypes
# ---------------------------------------------------------------------------------------------------------------
# NumPy dtype -> torch dtype, filled by torch_dtype_of (a handful of entries: one per dtype ever converted).
_TORCH_DTYPES: dict[np.dtype, Any] = {}


def torch_dtype_of(dtype: Any) -> Any:
    """The ``torch.dtype`` holding the same values, byte for byte, as NumPy ``dtype`` (ml_dtypes included).

    Raises TypeError for dtypes torch has no equivalent of (strings, objects, structured, datetime, long double,
    sub-byte integers, non-native byte order).
    """
    if isinstance(dtype, np.dtype):
        known = _TORCH_DTYPES.get(dtype)
        if known is not None:
            return known
    torch = _torch()
    dt = np.dtype(dtype)
    tdtype = _torch_dtype(torch, dt)
    if dt.fields is None:  # structured dtypes never get here (TypeError); keep the cache to plain ones anyway
        _TORCH_DTYPES[dt] = tdtype
    return tdtype


def _torch_dtype(torch: Any, dt: np.dtype) -> Any:
    name = dt.name
    if name in _TORCH_BUILTIN and dt.isnative:
        return getattr(torch, name)
    if name in _TORCH_ML and dt.fields is None and dt.isnative:
        tdtype = getattr(torch, name, None)
        if isinstance(tdtype, torch.dtype) and tdtype.itemsize == dt.itemsize:
            return tdtype
    raise TypeError(f"torch has no dtype for NumPy dtype {dt.str!r} ({name})")


def numpy_dtype_of(torch_dtype: Any) -> np.dtype:
    """The NumPy dtype (an ``ml_dtypes`` one for bfloat16, float8 and complex32) of a ``torch.dtype``.

    Raises TypeError for torch dtypes NumPy cannot hold (quantized, packed sub-byte, bits), and ImportError naming the
    extra when the dtype needs ``ml_dtypes`` and it is missing.
    """
    name = str(torch_dtype).removeprefix("torch.")
    if name in _TORCH_BUILTIN:
        return np.dtype(name)
    if name in _TORCH_ML:
        ml_dtypes = _import("ml_dtypes", f"torch.{name}")
        scalar = getattr(ml_dtypes, name, None)
        if scalar is not None:
            return np.dtype(scalar)
    raise TypeError(f"NumPy has no dtype for torch.{name}")


# ---------------------------------------------------------------------------------------------------------------
# Recognising framework tensors without importing the frameworks
# ---------------------------------------------------------------------------------------------------------------
def _torch_tensor_type() -> Optional[type]:
    torch = sys.modules.get("torch")
    return getattr(torch, "Tensor", None) if torch is not None else None


def _kind(obj: Any) -> Optional[str]:
    """'torch', 'jax' or 'cupy' for a tensor of that framework; None otherwise (NumPy included).

    A framework that has not been imported cannot have made ``obj``, so only imported ones are looked at.
    """
    if isinstance(obj, np.ndarray):
        return None
    tensor = _torch_tensor_type()
    if tensor is not None and isinstance(obj, tensor):
        return "torch"
    jax = sys.modules.get("jax")
    if jax is not None:
        array = getattr(jax, "Array", None)
        if array is not None and isinstance(obj, array):
            return "jax"
    cupy = sys.modules.get("cupy")
    if cupy is not None:
        ndarray = getattr(cupy, "ndarray", None)
        if ndarray is not None and isinstance(obj, ndarray):
            return "cupy"
    return None


def is_tensor(obj: Any) -> bool:
    """Whether ``obj`` is a torch, JAX or CuPy array (what :func:`to_host` converts)."""
    return _kind(obj) is not None


# ---------------------------------------------------------------------------------------------------------------
# CUDA through tenso's pinned staging (crate tenso-gpu)
# ---------------------------------------------------------------------------------------------------------------
# dtypes the wire (and so the staging) carries; the rest (float8, complex32) keep the framework's own copy.
_WIRE_DTYPES = frozenset(np.dtype(name) for name in _TORCH_BUILTIN)
_STAGED: Optional[bool] = None


def _staged() -> bool:
    """Whether device copies go through tenso's pinned staging: the driver reports a CUDA device.

    The first call initialises CUDA in this process (``cuInit``): call it only for a tensor already known to be on a
    CUDA device (or a CUDA target), never for CPU data, which must convert in processes that never touch CUDA
    (``tests/test_gpu_cpu.py`` counts the calls)."""
    global _STAGED
    if _STAGED is None:
        _STAGED = bool(_rs._gpu_available())
    return _STAGED


def _wire(array: np.ndarray) -> bool:
    return array.dtype in _WIRE_DTYPES or array.dtype.name == "bfloat16"


# alloc(nbytes) -> (device address, owner, consumer stream handle): see _consumer_alloc.
_Alloc = Callable[[int], tuple[int, Any, int]]


def _consumer_alloc(framework: str, index: int) -> Optional[_Alloc]:
    """An allocator of device memory in ``framework``'s own caching allocator on CUDA device ``index``, or None for
    a framework without one that tenso can use (JAX: tenso allocates, and the memory goes through DLPack).

    Each call returns an empty ``uint8`` tensor's address, the tensor (its owner: the memory goes back to the
    framework's pool when it is freed, stream-ordered, with no ``cuMemFree`` and no device-wide synchronisation),
    and the framework's current stream on that device, which the native copy waits for (on the device) before it
    writes: the pool may hand out a block that work queued earlier on that stream still uses.
    """
    if framework == "torch":
        torch = _torch()
        device = torch.device("cuda", index)
        stream = int(torch.cuda.current_stream(device).cuda_stream)

        def torch_alloc(nbytes: int) -> tuple[int, Any, int]:
            t = torch.empty(nbytes, dtype=torch.uint8, device=device)
            return int(t.data_ptr()), t, stream

        return torch_alloc
    if framework == "cupy":
        cupy = sys.modules["cupy"]
        with cupy.cuda.Device(index):
            cupy_stream = int(cupy.cuda.get_current_stream().ptr)

        def cupy_alloc(nbytes: int) -> tuple[int, Any, int]:
            with cupy.cuda.Device(index):
                a = cupy.empty(nbytes, dtype=cupy.uint8)
            return int(a.data.ptr), a, cupy_stream

        return cupy_alloc
    return None


def _consumed(owner: Any, dtype: str, shape: Sequence[int], framework: str) -> Any:
    """The ``uint8`` tensor that ``_consumer_alloc`` made, seen as the packet's dtype and shape (a view)."""
    if framework == "torch":
        return owner.view(getattr(_torch(), dtype)).reshape(tuple(shape))
    return owner.view(np.dtype(dtype)).reshape(tuple(shape))


def _staged_to_device(array: np.ndarray, index: int, framework: str) -> Any:
    """``array`` on CUDA device ``index`` as a ``framework`` tensor: one copy into pinned staging, DMA to memory of
    the framework's own allocator (torch, CuPy), or memory tenso allocated handed over through DLPack (JAX)."""
    contiguous = np.ascontiguousarray(array)  # a no-op for C-contiguous input (the common case)
    alloc = _consumer_alloc(framework, index)
    if alloc is None:
        return device_from_dlpack(_rs._gpu_from_host(contiguous, index), framework)
    owner = _rs._gpu_from_host(contiguous, index, alloc)
    return _consumed(owner, contiguous.dtype.name, contiguous.shape, framework)


def _staged_to_host(obj: Any) -> Optional[np.ndarray]:
    """A CUDA DLPack producer copied home through pinned staging, or None when it cannot be (not C-contiguous, a
    dtype the wire does not carry): the caller then uses the framework's own copy."""
    try:
        raw, name, shape = _rs._gpu_to_host(obj)
    except (BufferError, TypeError):
        return None
    if name == "bfloat16":
        dtype = np.dtype(_import("ml_dtypes", "a bfloat16 device tensor").bfloat16)
    else:
        dtype = np.dtype(name)
    return raw.view(dtype).reshape(shape)


# ---------------------------------------------------------------------------------------------------------------
# Framework -> host
# ---------------------------------------------------------------------------------------------------------------
def _torch_host(t: Any) -> Any:
    """A CPU, strided, materialised (no lazy conj/neg bit) torch tensor with the same values as ``t``."""
    import torch

    if t.layout is not torch.strided:
        raise TypeError(f"cannot convert a {t.layout} torch tensor; call .to_dense() first")
    if t.is_quantized:
        raise TypeError("cannot convert a quantized torch tensor; call .dequantize() or .int_repr() first")
    device = t.device.type
    if device == "meta":
        raise TypeError("a torch tensor on the meta device has no data")
    t = t.detach().resolve_conj().resolve_neg()  # no-ops unless a lazy conjugate/negation bit is set
    if device != "cpu":
        t = t.cpu()  # one device-to-host copy
    return t


def _is_cuda(obj: Any) -> bool:
    return is_dlpack_producer(obj) and _dl_device(obj)[0] == _DL_CUDA


def to_host(obj: Any) -> Any:
    """A NumPy array with the values of a torch / JAX / CuPy tensor on any device; other objects unchanged.

    A CPU torch tensor comes back as a view of its memory (strides kept, no copy), a CPU JAX array as a read-only
    view where JAX allows; device tensors are copied to host. torch's bfloat16, float8 and complex32 come back as
    ``ml_dtypes`` arrays over the same bytes (ImportError naming ``tenso-ray[bfloat16]`` if ml_dtypes is missing).
    Containers are not entered: use :func:`map_arrays` with ``tensors=True`` for those.

    Raises TypeError for tensors without host values (sparse, quantized, meta).
    """
    kind = _kind(obj)
    if kind is None:
        return obj
    # The device is looked at before _staged(): only a CUDA tensor may make this process initialise CUDA.
    if kind == "torch" and obj.device.type == "cuda" and obj.layout is _torch().strided and _staged():
        # Every dtype, through its bytes (torch_bytes stages CUDA tensors); a C-contiguous copy.
        return torch_bytes(obj).view(numpy_dtype_of(obj.dtype)).reshape(tuple(obj.shape))
    if kind != "torch" and _is_cuda(obj) and _staged():
        producer, on_device = _cuda_export(obj)  # CuPy exports on its current device: make it the array's
        with on_device:
            host = _staged_to_host(producer)
        if host is not None:
            return host
    if kind == "torch":
        t = _torch_host(obj)
        dt = numpy_dtype_of(t.dtype)
        if dt.name in _TORCH_BUILTIN:
            return t.numpy()
        # ml_dtypes: reinterpret through an integer tensor of the same width (keeps strides), then name the dtype.
        import torch

        width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[dt.itemsize]
        return t.view(width).numpy().view(dt)
    if kind == "cupy":
        return obj.get()
    return np.asarray(obj)  # JAX: a copy from a device, a read-only view on the CPU


def _cuda_export(obj: Any) -> tuple[Any, Any]:
    """``obj`` ready for a CUDA DLPack export, and the context manager to export it in.

    torch's ``__dlpack__`` refuses (BufferError) tensors that require grad or carry a conj/neg bit, and CUDA tensors
    on a device other than torch's current one: a torch tensor comes back detached with its bits resolved (a view;
    a copy only where a bit is set) with a guard that makes its device current. A CuPy array gets a guard that makes
    its device current (its ``stream=`` handshake records the ordering event on the *current* device's stream, which
    must be the array's). JAX exports from the array's own device whatever is current (its DLPack export names the
    device and orders on it), so JAX arrays and anything else come back as they are, with a guard that does
    nothing.
    """
    kind = _kind(obj)
    if kind == "cupy":
        cupy = sys.modules["cupy"]
        return obj, cupy.cuda.Device(int(obj.device.id))
    if kind != "torch":
        return obj, contextlib.nullcontext()
    import torch

    t = obj.detach().resolve_conj().resolve_neg()
    if t.device.type != "cuda":
        return t, contextlib.nullcontext()
    return t, torch.cuda.device(t.device)


def torch_bytes(t: Any) -> np.ndarray:
    """The bytes of a torch tensor as a flat ``uint8`` NumPy array, in C order, on the host.

    No copy for a contiguous CPU tensor (the result is a view of its memory); one copy otherwise (a gather, or the
    device-to-host copy). Needs no ``ml_dtypes``: every torch dtype with a byte layout is accepted. Rebuild with
    :func:`torch_from_bytes`.
    """
    import torch

    if t.device.type == "cuda" and t.layout is torch.strided and not t.is_quantized and _staged():
        # Gathered on the device if strided, then one copy home through tenso's pinned staging (exported with the
        # tensor's device current: torch refuses to export it otherwise).
        t, on_device = _cuda_export(t)
        if t.numel() == 0:
            return np.empty(0, np.uint8)
        with on_device:
            raw: np.ndarray = _rs._gpu_to_host(t.contiguous().reshape(-1).view(torch.uint8))[0]
        return raw
    t = _torch_host(t)
    if t.numel() == 0:
        return np.empty(0, np.uint8)
    return t.contiguous().reshape(-1).view(torch.uint8).numpy()


# ---------------------------------------------------------------------------------------------------------------
# Host -> framework
# ---------------------------------------------------------------------------------------------------------------
def _cuda_index(spec: str) -> Optional[int]:
    m = _CUDA_SPEC.match(spec)
    if m is None:
        raise ValueError(spec)
    return None if m.group("index") is None else int(m.group("index"))


# Device strings already parsed (callers pass the same few strings over and over).
_PARSED: dict[str, tuple[str, str]] = {}


def _parse_device(device: str) -> tuple[str, str]:
    parsed = _PARSED.get(device) if isinstance(device, str) else None
    if parsed is None:
        parsed = _parse_device_string(device)
        if len(_PARSED) < 256:
            _PARSED[device] = parsed
    return parsed


def _parse_device_string(device: str) -> tuple[str, str]:
    m = _DEVICE.match(device.strip().lower()) if isinstance(device, str) else None
    if m is not None:
        framework, spec = m.group("fw"), m.group("spec") or ""
        if framework == "numpy" and spec in ("", "cpu"):
            return framework, ""
        if framework == "torch" and (spec in ("", "cpu") or _CUDA_SPEC.match(spec)):
            return framework, spec
        if framework == "jax" and (spec in ("", "cpu") or spec.isdigit() or _CUDA_SPEC.match(spec)):
            return framework, spec
        if framework == "cupy" and (spec == "" or spec.isdigit()):
            return framework, spec
    raise ValueError(
        f"Unsupported device framework: {device!r}; use 'numpy', 'torch', 'torch:cpu', 'torch:cuda:N', 'jax', 'jax:N', "
        "'jax:cpu', 'jax:cuda:N', 'cupy' or 'cupy:N'"
    )


def torch_cuda_device(index: Optional[int] = None, *, what: str = "this call") -> Any:
    """``torch.device("cuda", index)`` after checking that PyTorch can use it; RuntimeError naming what is missing."""
    torch = _torch()
    with warnings.catch_warnings():
        # Without a driver some builds warn while probing ("CUDA initialization: ..."); we raise our own error.
        warnings.simplefilter("ignore", UserWarning)
        ok = torch.cuda.is_available()
    if not ok:
        if torch.version.cuda is None:
            reason = f"PyTorch {torch.__version__} is built without CUDA (install a CUDA build of torch)"
        else:
            reason = (
                f"PyTorch {torch.__version__} (CUDA {torch.version.cuda}) finds no CUDA device: no NVIDIA GPU or "
                "driver on this machine, or CUDA_VISIBLE_DEVICES hides them"
            )
        raise RuntimeError(f"{what} needs a CUDA GPU: {reason}")
    if index is None:
        index = torch.cuda.current_device()
    count = torch.cuda.device_count()
    if not 0 <= index < count:
        raise RuntimeError(f"{what} asks for CUDA device {index}, but PyTorch sees {count} device(s)")
    return torch.device("cuda", index)


# Whether torch.from_numpy warns about non-writable arrays at most once per process (TORCH_WARN_ONCE) and has done
# so already, silenced: then read-only arrays need no catch_warnings (which costs microseconds per call). Found out
# by _quiet_readonly on first use; None until then.
_READONLY_QUIET: Optional[bool] = None


def _quiet_readonly(torch: Any) -> bool:
    """Spend torch's once-per-process read-only warning on a probe, silenced, and check it does not come back."""
    global _READONLY_QUIET
    probe = np.zeros(1, np.uint8)
    probe.flags.writeable = False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.from_numpy(probe)
        del caught[:]
        torch.from_numpy(probe)
        again = any(_READONLY_WARNING in str(w.message) for w in caught)
    _READONLY_QUIET = not again
    return _READONLY_QUIET


def _from_numpy(torch: Any, array: np.ndarray) -> Any:
    """``torch.from_numpy``, silencing its warning about a non-writable array, and only that one."""
    if array.flags.writeable or _READONLY_QUIET or (_READONLY_QUIET is None and _quiet_readonly(torch)):
        return torch.from_numpy(array)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_READONLY_WARNING, category=UserWarning)
        return torch.from_numpy(array)


def _shareable(array: np.ndarray) -> bool:
    # torch.from_numpy takes any non-negative strides that are whole elements.
    item = array.dtype.itemsize
    return all(s >= 0 and s % item == 0 for s in array.strides)


def torch_from_bytes(
    data: Any, dtype: Any, shape: Sequence[int], device: Any = "cpu", zero_copy: bool = False
) -> Any:
    """A torch tensor of ``dtype`` (a ``torch.dtype`` or its name, ``"bfloat16"``) and ``shape`` over C-order bytes.

    ``data`` is any buffer (bytes, memoryview, ``pickle.PickleBuffer``, a ``uint8`` array) holding exactly the
    tensor's bytes. On the CPU, ``zero_copy=True`` shares them (writes go through, even to a read-only buffer: the
    caller vouches for that), else the tensor owns one fresh copy. For another ``device`` (any ``torch.device``;
    CUDA is checked first, RuntimeError saying what is missing) the bytes are read once, by the copy to it.
    """
    torch = _torch()
    tdtype = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not isinstance(tdtype, torch.dtype):
        raise TypeError(f"not a torch dtype: {dtype!r}")
    target = None  # the CPU; checked on the string first, as torch.device(...).type costs microseconds
    if not (isinstance(device, str) and device == "cpu"):
        target = torch.device(device)
        kind = target.type
        if kind == "cuda":
            target = torch_cuda_device(target.index, what=f"device {str(device)!r}")
        elif kind == "cpu":
            target = None
    raw = data if isinstance(data, np.ndarray) and data.dtype == np.uint8 else np.frombuffer(data, dtype=np.uint8)
    shape = tuple(int(n) for n in shape)
    expected = math.prod(shape) * tdtype.itemsize
    if raw.size != expected:
        raise ValueError(f"{raw.size} bytes cannot hold a {tdtype} tensor of shape {shape} ({expected} bytes)")
    if target is not None and target.type == "cuda" and _staged():
        return _staged_to_device(raw, target.index, "torch").view(tdtype).reshape(shape)
    if target is None and not zero_copy:
        # One copy into fresh memory the tensor owns (huge pages, several threads, GIL released).
        raw = _owned_copy(raw)
    view = _from_numpy(torch, raw.reshape(-1)).view(tdtype).reshape(shape)
    return view if target is None else view.to(target)


def _torch_from_host(array: np.ndarray, spec: str, zero_copy: bool) -> Any:
    torch = _torch()
    if array.flags.c_contiguous and not _shareable(array):
        # C-contiguous, yet a negative stride on an axis of length 1 (NumPy ignores those, torch refuses them): the
        # same bytes with C strides.
        c_strides = [array.dtype.itemsize] * array.ndim
        for axis in range(array.ndim - 2, -1, -1):
            c_strides[axis] = c_strides[axis + 1] * array.shape[axis + 1]
        array = np.lib.stride_tricks.as_strided(array, strides=c_strides)
    tdtype = torch_dtype_of(array.dtype)
    device: Any = "cpu"
    if (
        zero_copy
        and spec in ("", "cpu")
        and array.dtype in _TORCH_BUILTIN_DTYPES
        and (array.flags.c_contiguous or _shareable(array))
    ):
        return _from_numpy(torch, array)  # the common case (a CPU view of the pool): one call, same dtype and shape
    if spec not in ("", "cpu"):
        device = torch_cuda_device(_cuda_index(spec), what=f"device 'torch:{spec}'")
        zero_copy = True  # the host bytes are only read, by the one host-to-device copy
    if array.flags.c_contiguous:
        return torch_from_bytes(array.reshape(-1).view(np.uint8), tdtype, array.shape, device, zero_copy)
    if not zero_copy or not _shareable(array):
        # One gather into C order, which the tensor then owns.
        return torch_from_bytes(np.ascontiguousarray(array).reshape(-1).view(np.uint8), tdtype, array.shape,
                                device, True)
    # Strided and shared: an integer view of the same width keeps the strides, then torch names the dtype.
    base = array if array.dtype in _TORCH_BUILTIN_DTYPES else array.view(_SAME_WIDTH[array.dtype.itemsize])
    tensor = _from_numpy(torch, base)
    if tensor.dtype != tdtype:
        tensor = tensor.view(tdtype)
    return tensor if device == "cpu" else tensor.to(device)


def _jax_target(spec: str) -> Any:
    """The JAX device for ``spec`` (None: JAX's default device); RuntimeError if it does not exist."""
    jax = _import("jax", "device 'jax'")
    _import("jax.numpy", "device 'jax'")
    if spec == "":
        return None
    if spec == "cpu":
        return jax.devices("cpu")[0]
    if spec.isdigit():
        devices = jax.devices()
        if int(spec) >= len(devices):
            raise RuntimeError(f"device 'jax:{spec}' does not exist: JAX sees {devices}")
        return devices[int(spec)]
    index = _cuda_index(spec) or 0
    try:
        devices = jax.devices("cuda")
    except RuntimeError as exc:
        raise RuntimeError(
            f"device 'jax:{spec}' needs a CUDA GPU: JAX {jax.__version__} has no CUDA backend here "
            "(no GPU or driver, or jaxlib without CUDA: pip install 'jax[cuda12]')"
        ) from exc
    if index >= len(devices):
        raise RuntimeError(f"device 'jax:{spec}' does not exist: JAX sees {len(devices)} CUDA device(s)")
    return devices[index]


def _cupy_index(spec: str) -> int:
    """The CUDA device index for ``cupy[:spec]``; RuntimeError if CuPy sees no such device."""
    cupy = _import("cupy", "device 'cupy'")
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CuPy raises its own CUDARuntimeError without a driver
        raise RuntimeError(f"device 'cupy' needs a CUDA GPU: CuPy finds none ({exc})") from exc
    index = int(spec) if spec else int(cupy.cuda.runtime.getDevice())
    if index >= count:
        raise RuntimeError(f"device 'cupy:{index}' does not exist: CuPy sees {count} CUDA device(s)")
    return index


def check_device(device: str) -> None:
    """Check that :func:`from_host` can reach ``device``, without converting anything.

    Raises what :func:`from_host` would: ValueError (unknown device), ImportError (framework missing, naming the
    extra) or RuntimeError (no such CUDA device, saying what is missing).
    """
    framework, spec = _parse_device(device)
    if framework == "torch":
        _torch()
        if spec not in ("", "cpu"):
            torch_cuda_device(_cuda_index(spec), what=f"device 'torch:{spec}'")
    elif framework == "jax":
        _jax_target(spec)
    elif framework == "cupy":
        _cupy_index(spec)


def from_host(array: np.ndarray, device: str = "numpy", zero_copy: bool = False) -> Any:
    """``array`` as a tensor on ``device``.

    Parameters
    ----------
    array : numpy.ndarray
        Any dtype the target holds, ml_dtypes (bfloat16, float8) included; any strides.
    device : str, default "numpy"
        ``"numpy"``, ``"torch"`` (= ``"torch:cpu"``), ``"torch:cuda"``, ``"torch:cuda:N"``, ``"jax"`` (JAX's default
        device), ``"jax:N"``, ``"jax:cpu"``, ``"jax:cuda:N"``, ``"cupy"`` or ``"cupy:N"``. Case-insensitive.
    zero_copy : bool, default False
        Share ``array``'s memory where the target allows (NumPy, CPU torch -- also for read-only arrays and
        ml_dtypes --, JAX on the CPU where aligned); writes through the result then reach ``array``. Otherwise the
        result owns a copy. Device targets always copy once.

    Raises
    ------
    ValueError
        Unknown device string.
    ImportError
        The framework is not installed (the message names the extra).
    RuntimeError
        A CUDA device is asked for and the framework has none (the message says what is missing).
    TypeError
        ``array`` is not an ndarray, or its dtype does not exist in the target framework.
    """
    framework, spec = _parse_device(device)
    if not isinstance(array, np.ndarray):
        raise TypeError(f"from_host takes a numpy.ndarray, not {type(array).__name__}")
    if array.dtype.hasobject:
        raise TypeError(f"device {device!r} cannot hold an object array")
    if framework == "numpy":
        return array if zero_copy else array.copy()
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))  # frameworks are native-endian; this is a copy
    if framework == "torch":
        return _torch_from_host(array, spec, zero_copy)
    if framework == "jax":
        jax = _import("jax", "device 'jax'")
        target = _jax_target(spec)
        # JAX arrays are immutable, yet on the CPU device_put aliases an aligned NumPy array whatever its may_alias
        # says: only zero_copy=True may take that path; otherwise jnp.array makes the copy. (JAX without
        # jax_enable_x64 narrows 64-bit dtypes to 32 bits, as it does for every input.)
        if zero_copy:
            return jax.device_put(array, target)
        copied = jax.numpy.array(array, copy=True)
        return copied if target is None else jax.device_put(copied, target)
    cupy = _import("cupy", "device 'cupy'")
    index = _cupy_index(spec)
    if _staged() and _wire(array) and array.dtype.name != "bfloat16":  # CuPy has no bfloat16
        return _staged_to_device(array, index, "cupy")
    with cupy.cuda.Device(index):
        return cupy.asarray(array)


# ---------------------------------------------------------------------------------------------------------------
# Nested structures
# ---------------------------------------------------------------------------------------------------------------
def map_arrays(obj: Any, fn: Callable[[Any], Any], *, tensors: bool = False) -> Any:
    """Apply ``fn`` to every ``numpy.ndarray`` in nested dicts, lists and tuples; other leaves stay as they are.

    Dicts keep their key order and come back as plain ``dict`` (an ``OrderedDict`` such as a torch ``state_dict``
    included); lists as ``list``; tuples as ``tuple`` (named tuples keep their type). With ``tensors=True``, torch,
    JAX and CuPy tensors are leaves too (``map_arrays(obj, to_host, tensors=True)`` brings a whole structure home).
    """
    if isinstance(obj, np.ndarray) or (tensors and _kind(obj) is not None):
        return fn(obj)
    if isinstance(obj, dict):
        return {key: map_arrays(value, fn, tensors=tensors) for key, value in obj.items()}
    if isinstance(obj, list):
        return [map_arrays(value, fn, tensors=tensors) for value in obj]
    if isinstance(obj, tuple):
        items = [map_arrays(value, fn, tensors=tensors) for value in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)
    return obj


# ---------------------------------------------------------------------------------------------------------------
# DLPack
# ---------------------------------------------------------------------------------------------------------------
# DLDeviceType codes whose memory the CPU can read directly.
_DL_HOST_DEVICES = frozenset({1, 3, 11, 13})  # kDLCPU, kDLCUDAHost, kDLROCMHost, kDLCUDAManaged
_DL_DEVICE_NAMES = {1: "cpu", 2: "cuda", 3: "cuda_host", 4: "opencl", 7: "vulkan", 8: "metal", 10: "rocm",
                    13: "cuda_managed", 14: "oneapi", 15: "webgpu"}
_DL_UINT = 1
_DL_CUDA = 2
# DLDataTypeCode -> ml_dtypes name, for the byte-per-element codes NumPy's DLPack import does not know.
_DL_ML_CODES = {
    4: "bfloat16", 7: "float8_e3m4", 8: "float8_e4m3", 9: "float8_e4m3b11fnuz", 10: "float8_e4m3fn",
    11: "float8_e4m3fnuz", 12: "float8_e5m2", 13: "float8_e5m2fnuz", 14: "float8_e8m0fnu",
}
_DL_ML_NAMES = {name: code for code, name in _DL_ML_CODES.items()}
# Byte offset of the DLTensor inside the managed struct the capsule points to: DLManagedTensorVersioned starts with
# version (2 x uint32), manager_ctx, deleter, flags (uint64); the legacy DLManagedTensor starts with the DLTensor.
_DL_TENSOR_OFFSET = {b"dltensor_versioned": 8 + 2 * ctypes.sizeof(ctypes.c_void_p) + 8, b"dltensor": 0}
# Inside DLTensor: data (pointer), device (2 x int32), ndim (int32), then DLDataType {uint8 code, uint8 bits, ...}.
_DL_DTYPE_OFFSET = ctypes.sizeof(ctypes.c_void_p) + 8 + 4

_capsule_is_valid = ctypes.pythonapi.PyCapsule_IsValid
_capsule_is_valid.restype = ctypes.c_int
_capsule_is_valid.argtypes = [ctypes.py_object, ctypes.c_char_p]
_capsule_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_pointer.restype = ctypes.c_void_p
_capsule_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]


def is_dlpack_producer(obj: Any) -> bool:
    """Whether ``obj`` exports DLPack (``__dlpack__`` and ``__dlpack_device__``): torch, JAX, CuPy, NumPy, ..."""
    cls = type(obj)
    return hasattr(cls, "__dlpack__") and hasattr(cls, "__dlpack_device__")


def _dl_device(obj: Any) -> tuple[int, int]:
    kind, index = obj.__dlpack_device__()
    return int(kind), int(index)


def _device_label(kind: int, index: int) -> str:
    return f"{_DL_DEVICE_NAMES.get(kind, f'DLPack device type {kind}')}:{index}"


def _capsule_dtype(capsule: Any) -> Any:
    """The 2 bytes ``(code, bits)`` of the DLDataType inside an unconsumed DLPack capsule, as a writable ctypes view.

    The capsule name is checked before any cast; a consumed (``used_*``) or foreign capsule raises BufferError.
    """
    for name, offset in _DL_TENSOR_OFFSET.items():
        if _capsule_is_valid(capsule, name):
            base = _capsule_pointer(capsule, name)
            return (ctypes.c_uint8 * 2).from_address(base + offset + _DL_DTYPE_OFFSET)
    raise BufferError("not an unconsumed DLPack capsule (expected 'dltensor_versioned' or 'dltensor')")


class _Retyped:
    """A DLPack producer that forwards to ``source`` and rewrites the type code of each capsule it hands out.

    The bytes, shape, strides, device, flags and deleter stay the producer's; only the name of the element type
    changes (bfloat16 <-> uint16, float8 <-> uint8), so the consumer shares the same memory.
    """

    __slots__ = ("_source", "_code", "seen")

    def __init__(self, source: Any, code: int) -> None:
        self._source = source
        self._code = code
        self.seen: Optional[tuple[int, int]] = None  # (code, bits) the producer exported

    def __dlpack__(self, **kwargs: Any) -> Any:
        capsule = self._source.__dlpack__(**kwargs)
        dtype = _capsule_dtype(capsule)
        self.seen = (dtype[0], dtype[1])
        dtype[0] = self._code
        return capsule

    def __dlpack_device__(self) -> tuple[int, int]:
        return _dl_device(self._source)


def _from_dlpack_ml(obj: Any, copy: Optional[bool]) -> np.ndarray:
    """NumPy's import of a capsule whose type code NumPy does not know (bfloat16, float8), named as ml_dtypes."""
    retyped = _Retyped(obj, _DL_UINT)
    raw = np.from_dlpack(retyped, copy=copy)
    code, bits = retyped.seen or (-1, 0)
    name = _DL_ML_CODES.get(code)
    scalar = None if name is None else getattr(_import("ml_dtypes", f"DLPack {name}"), name, None)
    if scalar is None or bits != 8 * np.dtype(scalar).itemsize:
        raise TypeError(f"NumPy has no dtype for DLPack type code {code} with {bits} bits")
    return raw.view(np.dtype(scalar))


def from_dlpack(obj: Any, copy: Optional[bool] = None) -> np.ndarray:
    """A NumPy array over the memory of any DLPack producer (torch, JAX, CuPy, NumPy, ...).

    Host memory (CPU, CUDA pinned or managed) is shared without a copy unless ``copy=True``; a read-only export
    (READ_ONLY flag, e.g. a JAX array or a read-only NumPy view) comes back read-only. bfloat16 and float8 come back
    as ``ml_dtypes`` arrays over the same bytes (ImportError naming ``tenso-ray[bfloat16]`` without ml_dtypes).

    Parameters
    ----------
    obj : Any
        An object with ``__dlpack__`` and ``__dlpack_device__``.
    copy : bool, optional
        None: share where possible. True: always return a fresh host copy; device memory (CUDA) is then copied to
        the host by the producer. False: never copy (BufferError if the producer would have to).

    Raises
    ------
    TypeError
        ``obj`` is not a DLPack producer, or its dtype has no NumPy equivalent.
    BufferError
        The memory is on a device and ``copy`` is not True (the message points to :mod:`tenso.gpu`).
    """
    if not is_dlpack_producer(obj):
        raise TypeError(f"{type(obj).__name__} is not a DLPack producer (no __dlpack__/__dlpack_device__)")
    kind, index = _dl_device(obj)
    if kind not in _DL_HOST_DEVICES:
        if not copy:
            raise BufferError(
                f"the {type(obj).__name__} lives on {_device_label(kind, index)}, not in host memory: pass "
                "copy=True for a host copy, or use tenso.gpu.write_from_device to serialize it through pinned "
                "staging"
            )
        return np.from_dlpack(obj, device="cpu", copy=True)
    try:
        return np.from_dlpack(obj, copy=copy)
    except (RuntimeError, BufferError) as exc:
        if "dtype" not in str(exc):
            raise
        return _from_dlpack_ml(obj, copy)


def host_input(obj: Any) -> Any:
    """What :func:`tenso.dumps` and the writers serialize for ``obj``: DLPack producers become NumPy arrays.

    A NumPy array is returned as is; any other object with ``__dlpack__`` becomes a zero-copy NumPy view of its host
    memory (:func:`from_dlpack`); dict values are converted the same way (a new dict, same order). Anything else is
    returned unchanged, for the encoder to accept or refuse. Device tensors raise BufferError pointing to
    :func:`tenso.gpu.write_from_device`: a serializer does not copy device memory behind the caller's back.
    """
    if isinstance(obj, np.ndarray):
        return obj
    if isinstance(obj, dict):
        ndarray = np.ndarray
        for value in obj.values():  # a plain loop: this runs on every dumps of a dict
            if not isinstance(value, ndarray) and is_dlpack_producer(value):
                return {key: host_input(value) for key, value in obj.items()}
        return obj
    if is_dlpack_producer(obj):
        return from_dlpack(obj, copy=None)
    return obj


def to_dlpack(array: np.ndarray) -> Any:
    """A DLPack producer for ``array`` that other frameworks import without a copy, ml_dtypes included.

    For builtin dtypes this is ``array`` itself (NumPy's ``__dlpack__``). bfloat16 and float8 arrays, which NumPy
    cannot export, are exported as their bytes with the DLPack type code of the ml_dtypes type
    (``torch.from_dlpack(to_dlpack(bf16_array))`` is a ``torch.bfloat16`` tensor over the same memory). A read-only
    array carries the READ_ONLY flag -- which torch ignores (see the module docstring).
    """
    if not isinstance(array, np.ndarray):
        raise TypeError(f"to_dlpack takes a numpy.ndarray, not {type(array).__name__}")
    code = _DL_ML_NAMES.get(array.dtype.name)
    if code is None or array.dtype.fields is not None:
        return array
    return _Retyped(array.view(f"u{array.dtype.itemsize}"), code)


def device_from_dlpack(producer: Any, framework: str) -> Any:
    """A ``framework`` tensor (``"torch"``, ``"cupy"`` or ``"jax"``) over the device memory of a DLPack producer.

    Used by :mod:`tenso.gpu` to hand over device memory that tenso allocated (``tenso.DeviceTensor``): the
    framework imports it without a copy and frees it through the capsule's deleter when its tensor goes.
    """
    if framework == "torch":
        return _torch().from_dlpack(producer)
    if framework == "cupy":
        return _import("cupy", "device 'cupy'").from_dlpack(producer)
    if framework == "jax":
        return _import("jax.dlpack", "device 'jax'").from_dlpack(producer)
    raise ValueError(f"Unsupported device framework {framework!r}: expected 'torch', 'cupy' or 'jax'")
