"""Type stubs for the native module ``tenso.tenso_rs`` (rust/tenso-py).

The five ``*_rs`` functions are the seed's public names; everything prefixed
with ``_`` is private to the :mod:`tenso` package. Constants mirror
``tenso-format``'s ``consts.rs``.
"""

from collections.abc import Sequence
from typing import Any, Final

import numpy as np
import numpy.typing as npt
from typing_extensions import Buffer

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

def loads_rs(data: Buffer) -> Any:
    """Decode a packet into read-only zero-copy views of ``data``."""

def dump_to_buffer_rs(
    array: Any,
    buffer: Buffer,
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

def get_packet_info_rs(data: Buffer) -> dict[str, Any]:
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
def _loads(data: Buffer, copy: bool = False, writeable: bool = False) -> Any: ...
def _dump_parts(
    obj: Any,
    strict: bool = False,
    check_integrity: bool = False,
    protocol: int = 4,
) -> list[bytes | memoryview]: ...
def _frame(buf: Buffer, have: int) -> int: ...
def _alloc(n: int) -> npt.NDArray[np.uint8]: ...
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
def _xxh3_64(data: Buffer) -> int: ...
def _xxh3_64_chunked(data: Buffer) -> int: ...
def _lz4_compress(data: Buffer) -> bytes: ...
def _lz4_decompress(data: Buffer, size: int) -> npt.NDArray[np.uint8]: ...
