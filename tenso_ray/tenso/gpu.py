"""Move tenso packets between streams and CUDA device tensors (CuPy, PyTorch or JAX).

:func:`read_to_device` streams one packet into device memory: the native engine (``tenso-gpu``) parses the header,
reads each body chunk by chunk into a pinned staging buffer from a pool (allocated once per process and device) and
copies it to the device on two alternating CUDA streams, so reading chunk k+1 overlaps the copy of chunk k. The device
memory is allocated by tenso and handed to the framework through DLPack (``torch.from_dlpack``, ``cupy.from_dlpack``,
``jax.dlpack.from_dlpack``): no framework-specific allocation, no second host copy. :func:`write_from_device` does the
reverse: each tensor is imported through DLPack (with the ``stream=`` handshake, so the producer's pending work is
ordered first), copied device -> staging -> destination chunk by chunk, and the packet's headers and XXH3 footers are
written around the bodies; the bytes are exactly :func:`tenso.dumps`'s.

These functions need a CUDA GPU for device tensors. Without one, :func:`read_to_device` still reads and checks the
packet (a bad packet is a ``ValueError``, a stream that ends early an ``EOFError``, an empty stream ``None``, as on a
GPU machine) and then raises RuntimeError saying what is missing (no NVIDIA driver, no device, or a framework built
without CUDA) instead of quietly handing back CPU tensors; :func:`write_from_device` writes host arrays on any
machine. :func:`available` asks first.
For CPU tensors use :func:`tenso.frameworks.from_host` / :func:`tenso.frameworks.to_host` with
:func:`tenso.read_stream` / :func:`tenso.write_stream`.

Importing this module imports no framework and needs no CUDA; each function imports the framework it uses.
"""

from __future__ import annotations

import functools
import importlib.util
import io
import mmap
import os
import sys
from typing import Any, Optional

import numpy as np

from .core import _make_filler, _writer, read_stream, write_stream
from .frameworks import (
    _consumed,
    _consumer_alloc,
    _cuda_export,
    _is_cuda,
    check_device,
    device_from_dlpack,
    map_arrays,
    to_host,
)
from .tenso_rs import _gpu_available, _gpu_problem, _gpu_read_to_device, _gpu_staging_stats, _gpu_write_from_device

__all__ = ["BACKEND", "available", "read_to_device", "write_from_device", "staging_stats"]


_FRAMEWORKS = ("cupy", "torch", "jax")

#: The framework :func:`read_to_device` returns tensors of when its ``framework`` argument is None: ``"cupy"``,
#: ``"torch"`` or ``"jax"``; None (the default) means the first installed of CuPy, PyTorch, JAX, looked up at each
#: call. Set it once to fix a process's default (upstream tenso's module attribute of the same name; code and tests
#: written for it keep working).
BACKEND: Optional[str] = None


@functools.lru_cache(maxsize=1)
def _cuda_problem() -> Optional[str]:
    """Why no CUDA device can be used here, or None when the driver reports at least one (the native probe)."""
    if sys.platform == "darwin":
        return "CUDA does not run on macOS"
    problem = _gpu_problem()
    if problem is not None and "no CUDA device" in problem:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is not None:
            problem += f" (CUDA_VISIBLE_DEVICES={visible!r})"
    return problem


@functools.lru_cache(maxsize=1)
def _native_available() -> bool:
    return _gpu_available()


def available() -> bool:
    """Whether a CUDA GPU can be used here: the NVIDIA driver loads and reports at least one device.

    Asks the driver directly through the native engine (tenso-gpu loads ``libcuda`` at run time and checks for it
    before any driver call), imports no framework, and caches the answer for the process. A framework may still
    lack CUDA support (a CPU-only PyTorch build): the transfer functions then say so.
    """
    return _native_available()


def _require_cuda(what: str) -> None:
    problem = _cuda_problem()
    if problem is not None:
        raise RuntimeError(f"tenso.gpu.{what} needs a CUDA GPU: {problem}")


def _pick_framework(framework: Optional[str]) -> str:
    if framework is None:
        framework = BACKEND
    if framework is not None:
        name = framework.lower()
        if name not in _FRAMEWORKS:
            raise ValueError(f"framework must be one of {_FRAMEWORKS} or None, got {framework!r}")
        return name
    for name in _FRAMEWORKS:  # CuPy first: installed only where CUDA is, it is what the caller meant
        if importlib.util.find_spec(name) is not None:
            return name
    raise ImportError(
        "tenso.gpu.read_to_device needs CuPy, PyTorch or JAX; install one, e.g. pip install 'tenso-ray[torch]'"
    )


def _device(framework: str, device_id: int) -> str:
    if isinstance(device_id, bool) or not isinstance(device_id, int) or device_id < 0:
        raise ValueError(f"device_id must be a CUDA device index (an int >= 0), got {device_id!r}")
    if framework == "cupy":
        return f"cupy:{device_id}"
    return f"{framework}:cuda:{device_id}"


def _as_stream(source: Any) -> Any:
    """``source`` as :func:`tenso.read_stream` takes it (a bytes-like object is read from memory)."""
    if isinstance(source, (bytes, bytearray, memoryview, np.ndarray, mmap.mmap)):
        view: memoryview = memoryview(source)  # type: ignore[arg-type]  # mmap and ndarray are buffers
        return io.BytesIO(view.cast("B"))
    return source


def _feed(source: Any) -> Any:
    """What the native reader takes: a bytes-like object as is (read without the GIL), else a ``fill`` callable."""
    if isinstance(source, (bytes, bytearray, memoryview, np.ndarray, mmap.mmap)):
        return source
    return _make_filler(source)


def read_to_device(source: Any, device_id: int = 0, framework: Optional[str] = None) -> Any:
    """Read one packet from a stream straight into CUDA device memory.

    Parameters
    ----------
    source : Any
        A file-like or socket-like object, as for :func:`tenso.read_stream`; or a bytes-like object holding the
        packet (``bytes``, ``memoryview``, ``mmap``, a NumPy buffer such as a shm view), read from memory.
    device_id : int, default 0
        Index of the target CUDA device.
    framework : {"cupy", "torch", "jax"}, optional
        The tensor type to return; by default :data:`BACKEND`, or when that is None the first installed of CuPy,
        PyTorch, JAX.

    Returns
    -------
    Any
        A ``cupy.ndarray``, ``torch.Tensor`` (on ``cuda:device_id``) or ``jax.Array`` over device memory that tenso
        allocated (shared through DLPack, no copy); a dict of them for a bundle; None if the stream ended before
        any byte.

    Raises
    ------
    RuntimeError
        If no CUDA device can be used (no driver, no device, or a framework built without CUDA). Without a driver
        or device the packet is read and checked first (so the errors below come first, and an empty stream
        returns None); with a device whose framework lacks CUDA support it is raised before reading.
    ImportError
        If the framework is not installed (the message names the extra); checked before reading.
    TypeError
        If the packet holds a sparse matrix, quantized, string or compressed tensor, or a nested bundle (the stream
        is then left after that packet's header).
    tenso.TensoFormatError, tenso.TensoIntegrityError
        If the packet is invalid (both are ``ValueError``); its device memory is freed.
    tenso.TensoTruncatedError
        If the stream ends inside the packet (an ``EOFError``).
    """
    name = _pick_framework(framework)
    target = _device(name, device_id)
    if _cuda_problem() is not None:
        # No GPU: the packet is still read and checked, so that what a caller sees for a bad or missing packet does
        # not depend on the machine; a valid one then cannot go anywhere.
        if read_stream(_as_stream(source)) is None:
            return None
        _require_cuda("read_to_device")
    check_device(target)  # the framework and its CUDA support, before the stream is consumed
    alloc = _consumer_alloc(name, device_id)
    if alloc is not None:
        # torch and CuPy: each tensor in the framework's own caching allocator (no cuMemFree when it goes).
        got = _gpu_read_to_device(_feed(source), device_id, alloc)
        if isinstance(got, dict):
            return {key: _consumed(*value, name) for key, value in got.items()}
        return None if got is None else _consumed(*got, name)
    obj = _gpu_read_to_device(_feed(source), device_id)
    if obj is None:
        return None
    if isinstance(obj, dict):
        return {key: device_from_dlpack(value, name) for key, value in obj.items()}
    return device_from_dlpack(obj, name)


def write_from_device(tensor: Any, dest: Any, check_integrity: bool = False) -> int:
    """Write CUDA tensors as one packet, copied through pinned staging while the destination is written.

    Parameters
    ----------
    tensor : Any
        A CUDA ``torch.Tensor``, ``cupy.ndarray`` or ``jax.Array`` (any DLPack producer on a CUDA device,
        C-contiguous), or a dict of them on one device (written as a bundle). Host arrays and tensors (or a dict
        mixing them) are written as :func:`tenso.write_stream` would, after bringing device ones home.
    dest : Any
        A socket-like (``sendall``) or file-like (``write``) destination.
    check_integrity : bool, default False
        If True, the packet carries XXH3-64 footers, computed as the bodies stream by.

    Returns
    -------
    int
        The number of bytes written.

    Raises
    ------
    RuntimeError
        If CUDA tensors are given and no CUDA device can be used here (the message says what is missing).
    TypeError
        If the tensor type or dtype is not supported, or ``dest`` cannot be written.
    BufferError
        If a device tensor is not C-contiguous (call ``.contiguous()`` first).
    """
    leaves = list(tensor.values()) if isinstance(tensor, dict) else [tensor]
    if leaves and all(_is_cuda(leaf) for leaf in leaves):
        _require_cuda("write_from_device")
        # torch tensors detached (with grad or a conj/neg bit torch refuses to export them) and exported with their
        # device current (torch exports only from the current device); one device per packet, checked natively.
        if isinstance(tensor, dict):
            ready = {key: _cuda_export(value) for key, value in tensor.items()}
            producers: Any = {key: t for key, (t, _) in ready.items()}
            on_device = next(iter(ready.values()))[1]
        else:
            producers, on_device = _cuda_export(tensor)
        with on_device:
            return int(_gpu_write_from_device(producers, _writer(dest, "write_from_device"), check_integrity))
    host = map_arrays(tensor, to_host, tensors=True)
    return write_stream(host, dest, check_integrity=check_integrity)


def staging_stats(device_id: int = 0) -> dict[str, int]:
    """The pinned staging pool of a device: ``{"allocations", "idle", "chunk"}``.

    ``allocations`` counts the page-locked buffers ever allocated (two per device, then none: a steady state of
    transfers allocates no pinned memory); ``chunk`` is the size of each.
    """
    _require_cuda("staging_stats")
    allocations, idle, chunk = _gpu_staging_stats(device_id)
    return {"allocations": allocations, "idle": idle, "chunk": chunk}
