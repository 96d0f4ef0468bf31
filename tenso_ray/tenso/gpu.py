"""Move tenso packets between streams and CUDA device tensors (CuPy, PyTorch or JAX).

:func:`read_to_device` reads one packet with :func:`tenso.read_stream` (straight into an aligned host buffer) and
copies its arrays to a CUDA device; :func:`write_from_device` copies a device tensor to host memory and writes it
with :func:`tenso.write_stream`. Both convert through :mod:`tenso.frameworks`, so every dtype (bfloat16 and float8
included) is handled as everywhere else in tenso.

These functions need a CUDA GPU. Without one they raise RuntimeError saying what is missing (no NVIDIA driver, no
device, or a framework built without CUDA) instead of quietly handing back CPU tensors; :func:`available` asks first.
For CPU tensors use :func:`tenso.frameworks.from_host` / :func:`tenso.frameworks.to_host` with
:func:`tenso.read_stream` / :func:`tenso.write_stream`.

Importing this module imports no framework and needs no CUDA; each function imports the framework it uses. The
copies currently go through pageable host memory (pinned staging and DLPack are issue #13).
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
import sys
from typing import Any, Optional

import numpy as np

from .core import read_stream, write_stream
from .frameworks import check_device, from_host, map_arrays, to_host
from .tenso_rs import _gpu_available

__all__ = ["available", "read_to_device", "write_from_device"]

_FRAMEWORKS = ("cupy", "torch", "jax")


def _driver_library() -> str:
    if sys.platform == "win32":
        return "nvcuda.dll"
    return "libcuda.so.1"


@functools.lru_cache(maxsize=1)
def _cuda_problem() -> Optional[str]:
    """Why no CUDA device can be used here, or None when the driver reports at least one."""
    if sys.platform == "darwin":
        return "CUDA does not run on macOS"
    name = _driver_library()
    try:
        lib = ctypes.CDLL(name)
    except OSError:
        return f"the NVIDIA driver library ({name}) was not found: no NVIDIA driver is installed"
    status = lib.cuInit(0)
    if status != 0:
        return f"the NVIDIA driver failed to start (cuInit returned CUDA error {status})"
    count = ctypes.c_int(0)
    status = lib.cuDeviceGetCount(ctypes.byref(count))
    if status != 0:
        return f"the NVIDIA driver could not count devices (CUDA error {status})"
    if count.value == 0:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        hint = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
        return f"the NVIDIA driver reports no CUDA device{hint}"
    return None


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


def read_to_device(source: Any, device_id: int = 0, framework: Optional[str] = None) -> Any:
    """Read one packet from a stream and place its arrays on a CUDA device.

    Parameters
    ----------
    source : Any
        A file-like or socket-like object, as for :func:`tenso.read_stream`.
    device_id : int, default 0
        Index of the target CUDA device.
    framework : {"cupy", "torch", "jax"}, optional
        The tensor type to return; by default the first installed of CuPy, PyTorch, JAX.

    Returns
    -------
    Any
        A ``cupy.ndarray``, ``torch.Tensor`` (on ``cuda:device_id``) or ``jax.Array``; a dict of them for a
        bundle; None if the stream ended before any byte.

    Raises
    ------
    RuntimeError
        If no CUDA device can be used (no driver, no device, or a framework built without CUDA); checked before
        reading, so the stream is untouched.
    ImportError
        If the framework is not installed (the message names the extra); checked before reading.
    TypeError
        If the packet holds a sparse matrix, quantized or string tensor (the packet has then been consumed).
    tenso.TensoFormatError, tenso.TensoIntegrityError
        If the packet is invalid (both are ``ValueError``).
    tenso.TensoTruncatedError
        If the stream ends inside the packet (an ``EOFError``).
    """
    _require_cuda("read_to_device")
    device = _device(_pick_framework(framework), device_id)
    check_device(device)  # the framework and its CUDA support, before the stream is consumed
    obj = read_stream(source)
    if obj is None:
        return None
    if not isinstance(obj, (np.ndarray, dict)):
        raise TypeError(
            "read_to_device supports dense arrays and bundles of them; the packet holds a "
            f"{type(obj).__name__} (use tenso.read_stream for it)"
        )
    # The freshly read host buffer is only read by the host-to-device copy: no second host copy.
    return map_arrays(obj, lambda array: from_host(array, device, zero_copy=True))


def write_from_device(tensor: Any, dest: Any, check_integrity: bool = False) -> int:
    """Copy a device tensor to host memory and write it as one packet.

    Parameters
    ----------
    tensor : Any
        A ``cupy.ndarray``, ``torch.Tensor`` or ``jax.Array`` (any device), a NumPy array, or a dict of them.
    dest : Any
        A socket-like (``sendall``) or file-like (``write``) destination.
    check_integrity : bool, default False
        If True, the packet carries an XXH3-64 footer.

    Returns
    -------
    int
        The number of bytes written.

    Raises
    ------
    RuntimeError
        If no CUDA device can be used here (the message says what is missing).
    TypeError
        If the tensor type is not supported.
    ImportError
        If a bfloat16/float8 torch tensor is written without ``ml_dtypes``.
    """
    _require_cuda("write_from_device")
    host = map_arrays(tensor, to_host, tensors=True)
    return write_stream(host, dest, check_integrity=check_integrity)
