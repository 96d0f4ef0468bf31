"""Protocol constants of the tenso wire format.

The values are defined once, in the Rust crate ``tenso-format``, and exported by
the native module :mod:`tenso.tenso_rs`; this module only re-exports them so that
``from tenso.config import FLAG_BUNDLE`` works as in the seed API. The meaning of
each value is specified in ``docs/FORMAT.md`` (section 2).

Packet flags (bit set in the header's flags field)
    ``FLAG_ALIGNED`` (1): the body is padded to a 64-byte boundary.
    ``FLAG_INTEGRITY`` (2): an 8-byte XXH3-64 footer follows the body.
    ``FLAG_COMPRESSION`` (4): the body is an LZ4 frame.
    ``FLAG_SPARSE`` (8): the packet holds a sparse COO matrix.
    ``FLAG_BUNDLE`` (16): the packet holds a dict of named packets.
    ``FLAG_SPARSE_CSR`` (32): the packet holds a sparse CSR matrix.
    ``FLAG_SPARSE_CSC`` (64): the packet holds a sparse CSC matrix.
    ``FLAG_CUST_ALIGN`` (128): a one-byte alignment exponent follows the shape.
    ``FLAG_STRING`` (256): the packet holds a string tensor (v4 only).
    ``FLAG_RAGGED`` (512): reserved for ragged arrays; never written.
    ``FLAG_GPU_IPC_REF`` (1024): reserved for GPU IPC references; never written.

Limits enforced on every decode
    ``MAX_NDIM`` (32): most dimensions a tensor may have.
    ``MAX_ELEMENTS`` (10**9): most elements one tensor may declare.
    ``MAX_DEPTH`` (64): deepest nesting of bundles.
    ``MAX_BUNDLE_ENTRIES`` (255): most entries in one bundle (the count is one byte).

Quantized dtype codes (the header's dtype byte)
    ``QDTYPE_QINT8`` (16), ``QDTYPE_QUINT8`` (17): one signed / unsigned byte per element.
    ``QDTYPE_QINT4`` (18), ``QDTYPE_QUINT4`` (19): two signed / unsigned nibbles per byte.

Quantization schemes
    ``QUANT_PER_TENSOR`` (0): one scale and zero point for the whole tensor.
    ``QUANT_PER_CHANNEL`` (1): one pair per index along the channel axis.
    ``QUANT_PER_GROUP`` (2): one pair per run of ``group_size`` flattened elements.

Framing
    ``MAGIC`` (``b"TNSO"``): the first four bytes of every packet.
    ``PROTOCOL_VERSION`` (4): the version written by default.
    ``HEADER_SIZE_V3`` (8), ``HEADER_SIZE_V4`` (10): fixed header sizes.
    ``DEFAULT_ALIGNMENT`` (64): body alignment used when none is requested.

Large-buffer cache (not a protocol setting)
    Every fresh buffer of 256 KiB or more that the codec hands out (``dumps``,
    ``loads(copy=True)``, ``read_stream`` / ``aread_stream`` / ``load`` targets)
    comes from a bounded cache of recently freed buffers, so that the next packet
    of that size reuses memory that is already faulted in. A buffer returns to the
    cache when the last array or view over it is freed. :func:`set_buffer_cache`
    changes the cap on retained bytes (``TENSO_BUFFER_CACHE_BYTES``, default
    512 MiB; 0 turns the cache off) and the idle period after which everything
    retained is given back to the system (``TENSO_BUFFER_CACHE_IDLE_S``, default
    2 seconds); :func:`buffer_cache_stats` reports the settings and counters.
"""

from __future__ import annotations

from typing import Final, Optional, Union

from . import tenso_rs as _rs

__all__ = [
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
    "MAGIC",
    "PROTOCOL_VERSION",
    "HEADER_SIZE_V3",
    "HEADER_SIZE_V4",
    "DEFAULT_ALIGNMENT",
    "set_buffer_cache",
    "buffer_cache_stats",
]

FLAG_ALIGNED: Final[int] = _rs.FLAG_ALIGNED  #: Body padded to a 64-byte boundary.
FLAG_INTEGRITY: Final[int] = _rs.FLAG_INTEGRITY  #: 8-byte XXH3-64 footer present.
FLAG_COMPRESSION: Final[int] = _rs.FLAG_COMPRESSION  #: Body is an LZ4 frame.
FLAG_SPARSE: Final[int] = _rs.FLAG_SPARSE  #: Sparse COO matrix.
FLAG_BUNDLE: Final[int] = _rs.FLAG_BUNDLE  #: Dict of named packets.
FLAG_SPARSE_CSR: Final[int] = _rs.FLAG_SPARSE_CSR  #: Sparse CSR matrix.
FLAG_SPARSE_CSC: Final[int] = _rs.FLAG_SPARSE_CSC  #: Sparse CSC matrix.
FLAG_CUST_ALIGN: Final[int] = _rs.FLAG_CUST_ALIGN  #: Alignment exponent byte follows the shape.
FLAG_STRING: Final[int] = _rs.FLAG_STRING  #: String tensor (v4 only).
FLAG_RAGGED: Final[int] = _rs.FLAG_RAGGED  #: Reserved; no writer produces it.
FLAG_GPU_IPC_REF: Final[int] = _rs.FLAG_GPU_IPC_REF  #: Reserved; host decoders reject it.

MAX_NDIM: Final[int] = _rs.MAX_NDIM  #: Most dimensions a tensor may have.
MAX_ELEMENTS: Final[int] = _rs.MAX_ELEMENTS  #: Most elements one tensor may declare.
MAX_DEPTH: Final[int] = _rs.MAX_DEPTH  #: Deepest nesting of bundles accepted on decode.
MAX_BUNDLE_ENTRIES: Final[int] = _rs.MAX_BUNDLE_ENTRIES  #: Most entries one bundle may hold.

QDTYPE_QINT8: Final[int] = _rs.QDTYPE_QINT8  #: 8-bit signed quantized codes.
QDTYPE_QUINT8: Final[int] = _rs.QDTYPE_QUINT8  #: 8-bit unsigned quantized codes.
QDTYPE_QINT4: Final[int] = _rs.QDTYPE_QINT4  #: 4-bit signed codes, two per byte.
QDTYPE_QUINT4: Final[int] = _rs.QDTYPE_QUINT4  #: 4-bit unsigned codes, two per byte.

QUANT_PER_TENSOR: Final[int] = _rs.QUANT_PER_TENSOR  #: One scale/zero point for the tensor.
QUANT_PER_CHANNEL: Final[int] = _rs.QUANT_PER_CHANNEL  #: One pair per channel along ``axis``.
QUANT_PER_GROUP: Final[int] = _rs.QUANT_PER_GROUP  #: One pair per ``group_size`` elements.

MAGIC: Final[bytes] = _rs.MAGIC  #: First four bytes of every packet.
PROTOCOL_VERSION: Final[int] = _rs.PROTOCOL_VERSION  #: Version written by default (4).
HEADER_SIZE_V3: Final[int] = _rs.HEADER_SIZE_V3  #: Size of a v3 header in bytes.
HEADER_SIZE_V4: Final[int] = _rs.HEADER_SIZE_V4  #: Size of a v4 header in bytes.
DEFAULT_ALIGNMENT: Final[int] = _rs.DEFAULT_ALIGNMENT  #: Default body alignment in bytes.

# Upstream's private names for the same constants (tenso 0.19.4 / 0.24.0 ``tenso.config``), kept so that code and
# tests written against upstream import unchanged. Not part of the public API.
_MAGIC: Final[bytes] = MAGIC
_VERSION: Final[int] = PROTOCOL_VERSION
_HEADER_BASE_V3: Final[int] = HEADER_SIZE_V3
_HEADER_BASE_V4: Final[int] = HEADER_SIZE_V4
_ALIGNMENT: Final[int] = DEFAULT_ALIGNMENT
_QDTYPE_NAMES: Final[dict[int, str]] = {
    QDTYPE_QINT8: "qint8",
    QDTYPE_QUINT8: "quint8",
    QDTYPE_QINT4: "qint4",
    QDTYPE_QUINT4: "quint4",
}
_QDTYPE_FROM_NAME: Final[dict[str, int]] = {name: code for code, name in _QDTYPE_NAMES.items()}


def set_buffer_cache(max_bytes: Optional[int] = None, idle_seconds: Optional[float] = None) -> None:
    """Configure the large-buffer cache of this process.

    Parameters
    ----------
    max_bytes : int, optional
        Most bytes of freed buffers kept for reuse; 0 turns the cache off
        (fresh buffers come from NumPy's allocator again). A lower cap releases
        the excess at once. Unchanged if None.
    idle_seconds : float, optional
        After this long without a buffer being taken or given back, every
        retained buffer is returned to the system. Unchanged if None.

    Raises
    ------
    ValueError
        If ``idle_seconds`` is negative or not finite.
    OverflowError
        If ``max_bytes`` is negative.
    """
    _rs._buffer_cache_configure(max_bytes, idle_seconds)


def buffer_cache_stats() -> dict[str, Union[int, float]]:
    """The large-buffer cache's settings and counters.

    Returns
    -------
    dict
        ``max_bytes``, ``idle_seconds``, ``min_block`` (smallest buffer it
        serves), ``retained_bytes`` and ``retained_blocks`` (held for reuse
        now), ``hits`` and ``misses`` (requests served from / not from retained
        buffers) and ``idle_trims`` (times the idle period released everything).
    """
    return _rs._buffer_cache_stats()
