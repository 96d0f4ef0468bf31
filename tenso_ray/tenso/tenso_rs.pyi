"""Type stubs for the native module ``tenso.tenso_rs`` (rust/tenso-py).

The five ``*_rs`` functions are the seed's public names; everything prefixed
with ``_`` is private to the :mod:`tenso` package. Constants mirror
``tenso-format``'s ``consts.rs``.
"""

from collections.abc import Callable, Sequence
from typing import Any, Final, Optional, TypeAlias, Union, final, overload

import numpy as np
import numpy.typing as npt
from typing_extensions import Buffer as _PyBuffer

#: Anything exporting the buffer protocol; ndarrays are listed since NumPy's stubs
#: do not declare ``__buffer__``.
_Buffer: TypeAlias = _PyBuffer | npt.NDArray[Any]

__all__ = [
    "_owned_copy",
    "_Mapping",
    "_Shm",
    "_Pool",
    "dumps_rs",
    "loads_rs",
    "dump_to_buffer_rs",
    "dump_to_fd_rs",
    "get_packet_info_rs",
    "_dumps",
    "_loads",
    "_dump_parts",
    "_frame",
    "_padding_report",
    "_alloc",
    "_xxh3_64",
    "_xxh3_64_chunked",
    "_lz4_compress",
    "_lz4_decompress",
    "_kernel_paths",
    "_CachedBuffer",
    "_buffer_cache_configure",
    "_buffer_cache_stats",
    "_buffer_cache_clear",
    "_gpu_available",
    "_gpu_init_calls",
    "_gpu_problem",
    "_gpu_read_to_device",
    "_gpu_write_from_device",
    "_gpu_staging_stats",
    "_gpu_from_host",
    "_gpu_to_host",
    "DeviceTensor",
    "_process_alive",
    "_PrivateMap",
    "_private_view",
    "_private_view_stats",
    "_private_view_routes",
    "_quantize",
    "_pack_int4",
    "_unpack_int4",
    "_dequantize",
    "FLAG_ALIGNED",
    "FLAG_INTEGRITY",
    "FLAG_COMPRESSION",
    "FLAG_SPARSE",
    "FLAG_BUNDLE",
    "FLAG_SPARSE_CSR",
    "FLAG_SPARSE_CSC",
    "FLAG_CUST_ALIGN",
    "FLAG_STRING",
    "FLAG_RAGGED",
    "FLAG_GPU_IPC_REF",
    "MAX_NDIM",
    "MAX_ELEMENTS",
    "MAX_DEPTH",
    "MAX_BUNDLE_ENTRIES",
    "QDTYPE_QINT8",
    "QDTYPE_QUINT8",
    "QDTYPE_QINT4",
    "QDTYPE_QUINT4",
    "QUANT_PER_TENSOR",
    "QUANT_PER_CHANNEL",
    "QUANT_PER_GROUP",
    "DEFAULT_ALIGNMENT",
    "PROTOCOL_VERSION",
    "HEADER_SIZE_V3",
    "HEADER_SIZE_V4",
    "MAGIC",
]

# ---- constants -------------------------------------------------------------

FLAG_ALIGNED: Final[int]
FLAG_INTEGRITY: Final[int]
FLAG_COMPRESSION: Final[int]
FLAG_SPARSE: Final[int]
FLAG_BUNDLE: Final[int]
FLAG_SPARSE_CSR: Final[int]
FLAG_SPARSE_CSC: Final[int]
FLAG_CUST_ALIGN: Final[int]
FLAG_STRING: Final[int]
FLAG_RAGGED: Final[int]
FLAG_GPU_IPC_REF: Final[int]

MAX_NDIM: Final[int]
MAX_ELEMENTS: Final[int]
MAX_DEPTH: Final[int]
MAX_BUNDLE_ENTRIES: Final[int]

QDTYPE_QINT8: Final[int]
QDTYPE_QUINT8: Final[int]
QDTYPE_QINT4: Final[int]
QDTYPE_QUINT4: Final[int]

QUANT_PER_TENSOR: Final[int]
QUANT_PER_CHANNEL: Final[int]
QUANT_PER_GROUP: Final[int]

DEFAULT_ALIGNMENT: Final[int]
PROTOCOL_VERSION: Final[int]
HEADER_SIZE_V3: Final[int]
HEADER_SIZE_V4: Final[int]
MAGIC: Final[bytes]

# ---- public (seed) functions ------------------------------------------------

def dumps_rs(
    array: Any,
    check_integrity: bool = False,
    compress: bool = False,
    alignment: int = 64,
) -> memoryview:
    """Serialize an object to a v4 packet (the engine behind ``tenso.dumps``)."""

def loads_rs(data: _Buffer) -> Any:
    """Decode a packet into read-only zero-copy views of ``data``."""

def dump_to_buffer_rs(
    array: Any,
    buffer: _Buffer,
    check_integrity: bool = False,
    compress: bool = False,
    alignment: int = 64,
    protocol: int = 4,
) -> int:
    """Serialize into a caller-provided writeable buffer; returns the bytes written."""

def dump_to_fd_rs(
    array: Any,
    fd: int,
    check_integrity: bool = False,
    compress: bool = False,
    alignment: int = 64,
    protocol: int = 4,
) -> int:
    """Serialize straight to a file descriptor; returns the bytes written."""

def get_packet_info_rs(data: _Buffer) -> dict[str, Any]:
    """Header facts (version, flags, dtype, shape, sizes, kind) without decoding the body."""

# ---- private functions used by the tenso package ----------------------------

def _dumps(
    obj: Any,
    strict: bool = False,
    check_integrity: bool = False,
    compress: bool = False,
    alignment: int = 64,
    protocol: int = 4,
) -> memoryview: ...
def _loads(data: _Buffer, copy: bool = False, writeable: bool = False) -> Any: ...
def _dump_parts(
    obj: Any,
    strict: bool = False,
    check_integrity: bool = False,
    protocol: int = 4,
) -> list[bytes | memoryview]: ...
def _frame(buf: _Buffer, have: int) -> int: ...
def _padding_report(buf: _Buffer) -> dict[str, Any]: ...
def _alloc(n: int) -> npt.NDArray[np.uint8]: ...
def _owned_copy(data: _Buffer) -> npt.NDArray[np.uint8]: ...
def _quantize(
    array: npt.ArrayLike,
    qdtype_code: int,
    scheme_code: int,
    group_size: int = 0,
    axis: int = 0,
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.float32], npt.NDArray[np.float32]]: ...
def _dequantize(
    data: npt.NDArray[np.uint8],
    scales: npt.NDArray[np.float32],
    zero_points: npt.NDArray[np.float32],
    shape: Sequence[int],
    qdtype_code: int,
    scheme_code: int,
    group_size: int = 0,
    axis: int = 0,
) -> npt.NDArray[np.float32]: ...
def _pack_int4(codes: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]: ...
def _unpack_int4(packed: npt.NDArray[np.uint8], n: int, signed: bool) -> npt.NDArray[Any]: ...
def _xxh3_64(data: _Buffer) -> int: ...
def _xxh3_64_chunked(data: _Buffer) -> int: ...
def _lz4_compress(data: _Buffer) -> bytes: ...
def _lz4_decompress(data: _Buffer, size: int) -> npt.NDArray[np.uint8]: ...
def _kernel_paths() -> dict[str, str]:
    """The paths of the compute kernels in this process: ``{"xxh3": "avx512" | "avx2" | "portable",
    "gather": "specialized" | "portable"}`` (all ``"portable"`` under ``TENSO_FORCE_PORTABLE=1``)."""
@final
class _CachedBuffer:
    """Owner of a block of the large-buffer cache: the ``base`` of the arrays over it; gives the block back when
    freed."""

    @property
    def nbytes(self) -> int: ...

def _buffer_cache_configure(max_bytes: Optional[int] = None, idle_seconds: Optional[float] = None) -> None: ...
def _buffer_cache_stats() -> dict[str, Union[int, float]]: ...
def _buffer_cache_clear() -> int: ...
def _gpu_available() -> bool: ...
def _gpu_init_calls() -> int: ...
def _gpu_problem() -> Optional[str]:
    """Why CUDA cannot be used here (no driver, no device, built without CUDA), or None."""

# --- CUDA staging and DLPack (rust/tenso-py/src/gpu.rs) ---
@final
class DeviceTensor:
    """Device memory tenso allocated and filled (``tenso.gpu.read_to_device``), exported through DLPack."""

    def __dlpack__(
        self,
        *,
        stream: Optional[Any] = None,
        max_version: Optional[tuple[int, int]] = None,
        dl_device: Optional[tuple[int, int]] = None,
        copy: Optional[bool] = None,
    ) -> Any: ...
    def __dlpack_device__(self) -> tuple[int, int]: ...
    @property
    def shape(self) -> tuple[int, ...]: ...
    @property
    def dtype(self) -> str: ...
    @property
    def nbytes(self) -> int: ...

# alloc(nbytes) -> (device address, owner tensor, consumer stream handle): memory of the consumer's allocator.
_GpuAlloc = Callable[[int], tuple[int, Any, int]]

@overload
def _gpu_read_to_device(
    source: Union[_Buffer, Callable[[memoryview], Optional[int]]], device_id: int, alloc: None = None
) -> Union[None, DeviceTensor, dict[str, DeviceTensor]]: ...
@overload
def _gpu_read_to_device(
    source: Union[_Buffer, Callable[[memoryview], Optional[int]]], device_id: int, alloc: _GpuAlloc
) -> Union[None, tuple[Any, str, list[int]], dict[str, tuple[Any, str, list[int]]]]: ...
def _gpu_write_from_device(
    tensors: Any, write: Callable[[memoryview], object], check_integrity: bool = False
) -> int: ...
def _gpu_staging_stats(device_id: int) -> tuple[int, int, int]: ...
@overload
def _gpu_from_host(array: npt.NDArray[Any], device_id: int, alloc: None = None) -> DeviceTensor: ...
@overload
def _gpu_from_host(array: npt.NDArray[Any], device_id: int, alloc: _GpuAlloc) -> Any: ...
def _gpu_to_host(tensor: Any) -> tuple[npt.NDArray[np.uint8], str, list[int]]: ...
def _process_alive(pid: int) -> bool: ...

# --- private copy-on-write views (rust/tenso-py/src/private.rs over tenso_shm::private) ---
@final
class _PrivateMap:
    """The base of a private view: a MAP_PRIVATE mapping, and the object keeping its source bytes alive."""

    @property
    def source(self) -> Any: ...

def _private_view(
    buffer: Any, keep: Any = None, hint_pids: Optional[Sequence[int]] = None, populate: bool = False
) -> Optional[npt.NDArray[np.uint8]]: ...
def _private_view_stats() -> dict[str, Any]: ...
def _private_view_routes(routes: Optional[list[str]]) -> None: ...

# --- shared memory (rust/tenso-py/src/shm.rs) ---
@final
class _Mapping:
    """A live shared-memory mapping: the base of every zero-copy view into it."""

@final
class _Shm:
    @staticmethod
    def create(name: str, size: int, mode: int = 0o600) -> _Shm: ...
    @staticmethod
    def open(name: str) -> _Shm: ...
    @staticmethod
    def create_from(
        name: str, obj: Any, check_integrity: bool = False, compress: bool = False, alignment: int = 64, mode: int = 0o600
    ) -> _Shm: ...
    @property
    def name(self) -> str: ...
    @property
    def size(self) -> int: ...
    @property
    def buffer(self) -> memoryview: ...
    def put(self, obj: Any, check_integrity: bool = False, compress: bool = False, alignment: int = 64) -> int: ...
    def get(self) -> Any: ...
    def close(self) -> None: ...
    def unlink(self) -> None: ...

@final
class _Pool:
    @staticmethod
    def create(name: str, size: int, max_entries: int | None = None, mode: int = 0o600) -> _Pool: ...
    @staticmethod
    def open(name: str) -> _Pool: ...
    @property
    def name(self) -> str: ...
    def put(self, key: str, obj: Any, ttl: float | None = None, evict: bool = True) -> int: ...
    def get(self, key: str, copy: bool = False, pin: bool = False) -> Any | None: ...
    def get_many(self, keys: list[str], copy: bool = False, pin: bool = False) -> list[Any | None]: ...
    def delete(self, key: str) -> bool: ...
    def keys(self) -> list[str]: ...
    def info(self, key: str) -> dict[str, Any] | None: ...
    @property
    def stats(self) -> dict[str, int | float]: ...
    def clear(self) -> None: ...
    def _check(self) -> None: ...
    def _lease(self, n: int) -> tuple[tuple[int, int, int, int, int, int], memoryview]: ...
    def _share(self, handle: tuple[int, int, int, int, int, int]) -> tuple[int, int, int, int, int, int]: ...
    def _adopt(self, handle: tuple[int, int, int, int, int, int], writeable: bool = True) -> memoryview: ...
    def _release(self, handle: tuple[int, int, int, int, int, int]) -> None: ...
    def _references(self, handle: tuple[int, int, int, int, int, int]) -> int: ...
    def _pin_host(self, device_id: int) -> bool: ...
    def _host_pinned(self) -> bool: ...
    def close(self) -> None: ...
    def unlink(self) -> None: ...
