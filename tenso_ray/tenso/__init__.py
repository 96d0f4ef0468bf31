"""tenso: zero-copy tensor serialization, backed by a Rust engine.

The wire format is specified in ``docs/FORMAT.md``; this package reads protocol
versions 3 and 4 and writes version 4 (or 3 on request).

Main API
--------
dumps, loads, dump, load
    Serialize to and from memory or files.
read_stream, write_stream, iter_dumps
    Stream packets over sockets and files without copying array bodies.
aread_stream, awrite_stream
    The same over asyncio streams.
from_dlpack
    A NumPy array over any DLPack producer's host memory (torch, JAX, CuPy, NumPy).
read_to_device
    Read a packet into CuPy or PyTorch device memory (imported on first use).
get_packet_info, is_aligned
    Inspect packet headers and buffer alignment.
QuantizedTensor, StringTensor, RaggedArray
    Quantized, string and ragged data types.

Importing the package loads only NumPy and the native module; integrations
(``tenso.fastapi``, ``tenso.gpu``) import their frameworks themselves.
"""

from __future__ import annotations

from .async_core import aread_stream, awrite_stream
from .cache import TensoCache
from .core import dump, dumps, iter_dumps, load, loads, read_stream, write_stream
from .frameworks import from_dlpack
from .errors import (
    TensoCacheFullError,
    TensoError,
    TensoFormatError,
    TensoIntegrityError,
    TensoTruncatedError,
    TensoUnknownNameError,
)
from .quantize import QuantizedTensor
from .ragged import RaggedArray, StringTensor
from .shm import TensoShm
from .utils import get_packet_info, is_aligned


def _package_version() -> str:
    # importlib.metadata is slow to import, so this runs on first access only.
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tenso-ray")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0+unknown"


__version__: str
__all__ = [
    "dumps",
    "loads",
    "dump",
    "load",
    "read_stream",
    "write_stream",
    "iter_dumps",
    "aread_stream",
    "awrite_stream",
    "read_to_device",
    "from_dlpack",
    "get_packet_info",
    "is_aligned",
    "QuantizedTensor",
    "StringTensor",
    "RaggedArray",
    "TensoShm",
    "TensoCache",
    "TensoError",
    "TensoFormatError",
    "TensoIntegrityError",
    "TensoTruncatedError",
    "TensoCacheFullError",
    "TensoUnknownNameError",
    "TensoIncompleteReadError",
    "__version__",
]

# Names resolved on first access, so that `import tenso` stays cheap.
_LAZY = {"read_to_device": "gpu", "TensoIncompleteReadError": "errors"}


def __getattr__(name: str) -> object:
    if name == "__version__":
        value: object = _package_version()
        globals()[name] = value
        return value
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'tenso' has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(f".{module_name}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | {"__version__"})
