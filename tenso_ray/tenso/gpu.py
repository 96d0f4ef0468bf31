"""Move tenso packets between streams and device tensors (CuPy or PyTorch).

:func:`read_to_device` reads one packet with :func:`tenso.read_stream` (straight
into an aligned host buffer) and copies its arrays to the device;
:func:`write_from_device` copies a device tensor to host memory and writes it
with :func:`tenso.write_stream`. CuPy is preferred when both are installed for
reading; writing dispatches on the tensor's own type. With PyTorch but no CUDA
device, :func:`read_to_device` returns CPU tensors, so the same code runs on
machines without a GPU.

Neither framework is imported until a function needs it. Without either,
:func:`read_to_device` raises ImportError naming the ``tenso-ray[torch]`` extra.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np

from .core import read_stream, write_stream

__all__ = ["read_to_device", "write_from_device"]

_MISSING = (
    "tenso.gpu needs CuPy or PyTorch; install one, e.g. pip install 'tenso-ray[torch]' "
    "(or a cupy-cuda* wheel)"
)


def _cupy_module() -> Optional[Any]:
    try:
        import cupy
    except ImportError:
        return None
    return cupy


def _torch_module() -> Optional[Any]:
    try:
        import torch
    except ImportError:
        return None
    return torch


def _to_device_converter(device_id: int) -> Callable[[np.ndarray], Any]:
    """Pick the framework and return a function copying a host array to ``device_id``."""
    cupy = _cupy_module()
    if cupy is not None:
        def to_cupy(array: np.ndarray) -> Any:
            with cupy.cuda.Device(device_id):
                return cupy.asarray(array)
        return to_cupy
    torch = _torch_module()
    if torch is not None:
        device = torch.device("cuda", device_id) if torch.cuda.is_available() else torch.device("cpu")

        def to_torch(array: np.ndarray) -> Any:
            if not array.flags.writeable:
                # torch.from_numpy warns on read-only memory; it would share it.
                array = array.copy()
            tensor = torch.from_numpy(array)
            return tensor.to(device) if device.type != "cpu" else tensor
        return to_torch
    raise ImportError(_MISSING)


def _map_arrays(obj: Any, convert: Callable[[np.ndarray], Any]) -> Any:
    if isinstance(obj, np.ndarray):
        return convert(obj)
    if isinstance(obj, dict):
        return {key: _map_arrays(value, convert) for key, value in obj.items()}
    raise TypeError(
        "read_to_device supports dense arrays and bundles of them; the packet holds a "
        f"{type(obj).__name__} (use tenso.read_stream for it)"
    )


def read_to_device(source: Any, device_id: int = 0) -> Any:
    """Read one packet from a stream and place its arrays on a device.

    Parameters
    ----------
    source : Any
        A file-like or socket-like object, as for :func:`tenso.read_stream`.
    device_id : int, default 0
        Index of the target CUDA device.

    Returns
    -------
    Any
        A ``cupy.ndarray`` (CuPy installed) or a ``torch.Tensor`` (on
        ``cuda:device_id``, or on the CPU when PyTorch sees no CUDA device);
        a dict of them for a bundle; None if the stream ended before any byte.

    Raises
    ------
    ImportError
        If neither CuPy nor PyTorch is installed (checked before reading).
    TypeError
        If the packet holds a sparse matrix, quantized or string tensor
        (the packet has then been consumed).
    tenso.TensoFormatError, tenso.TensoIntegrityError
        If the packet is invalid (both are ``ValueError``).
    tenso.TensoTruncatedError
        If the stream ends inside the packet (an ``EOFError``).
    """
    convert = _to_device_converter(device_id)
    obj = read_stream(source)
    if obj is None:
        return None
    return _map_arrays(obj, convert)


def _to_host(tensor: Any) -> Any:
    """Copy a CuPy or PyTorch tensor (or bundle of them) to host NumPy arrays."""
    if isinstance(tensor, dict):
        return {key: _to_host(value) for key, value in tensor.items()}
    if isinstance(tensor, np.ndarray):
        return tensor
    module = type(tensor).__module__ or ""
    if module.startswith("cupy"):
        return tensor.get()
    if module.startswith("torch"):
        import torch

        host = tensor.detach().resolve_conj().resolve_neg().cpu()
        if host.dtype == torch.bfloat16:
            try:
                import ml_dtypes
            except ImportError as exc:
                raise ImportError(
                    "writing a bfloat16 tensor needs ml_dtypes: pip install 'tenso-ray[bfloat16]'"
                ) from exc
            return host.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return host.numpy()
    if hasattr(tensor, "__array__"):
        # JAX and other array libraries copy device memory to host on __array__.
        return np.asarray(tensor)
    raise TypeError(f"write_from_device does not know how to copy a {type(tensor).__name__} to host memory")


def write_from_device(tensor: Any, dest: Any, check_integrity: bool = False) -> int:
    """Copy a device tensor to host memory and write it as one packet.

    Parameters
    ----------
    tensor : Any
        A ``cupy.ndarray``, a ``torch.Tensor`` (any device), an object with
        ``__array__`` (e.g. a JAX array), a NumPy array, or a dict of them.
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
    TypeError
        If the tensor type is not supported.
    ImportError
        If a bfloat16 torch tensor is written without ``ml_dtypes``.
    """
    return write_stream(_to_host(tensor), dest, check_integrity=check_integrity)
