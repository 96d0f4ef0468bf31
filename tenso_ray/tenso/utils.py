"""Packet inspection and alignment helpers."""

from __future__ import annotations

from typing import Any

import numpy as np

from . import tenso_rs as _rs

__all__ = ["get_packet_info", "is_aligned"]


def get_packet_info(data: Any) -> dict[str, Any]:
    """Describe a packet from its header and shape, without decoding its body.

    >>> import numpy as np, tenso
    >>> info = tenso.get_packet_info(tenso.dumps(np.zeros((2, 3), np.int16)))
    >>> info["shape"], info["dtype"], info["data_size_bytes"]
    ((2, 3), dtype('int16'), 12)

    The cost is independent of the body size; the body is not validated.

    Parameters
    ----------
    data : bytes-like
        The packet, or at least its header and shape (any buffer: bytes,
        bytearray, memoryview, ndarray, mmap).

    Returns
    -------
    dict
        ``version``, ``flags`` (raw header value), ``dtype_code``, ``ndim``,
        ``shape`` (tuple), ``total_elements``, ``aligned`` (the ``ALIGNED`` bit
        only), ``integrity_protected``, ``data_size_bytes`` (uncompressed body
        size; ``ceil(n/2)`` for 4-bit codes) and ``dtype``: a NumPy dtype, the
        quantized dtype name (with ``quantized: True``) or None (bundles,
        sparse, strings). Bundles also carry ``entry_count``.

    Raises
    ------
    tenso.TensoFormatError
        If ``data`` is shorter than the header and shape, or the magic,
        version or dtype code is invalid (a ``ValueError``).
    """
    return _rs.get_packet_info_rs(data)


def is_aligned(data: Any, alignment: int = 64) -> bool:
    """Tell whether a buffer's first byte sits on an ``alignment``-byte boundary.

    Parameters
    ----------
    data : bytes-like
        Any object exporting the buffer protocol (bytes, bytearray,
        memoryview, ndarray, mmap).
    alignment : int, default 64
        The boundary in bytes; a power of two.

    Returns
    -------
    bool
        True if the address of the first byte is a multiple of ``alignment``.
        An empty buffer counts as aligned, since no load can touch it.

    Raises
    ------
    ValueError
        If ``alignment`` is not a positive power of two.
    TypeError
        If ``data`` does not export the buffer protocol.
    """
    if isinstance(alignment, bool) or not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise ValueError(f"alignment must be a positive power of two, got {alignment!r}")
    if isinstance(data, np.ndarray):
        if data.size == 0:
            return True
        address = data.__array_interface__["data"][0]
    else:
        view = memoryview(data)
        if view.nbytes == 0:
            return True
        # Wrapping the view is zero-copy: the array's address is the buffer's.
        try:
            wrapped = np.asarray(view)
        except (TypeError, ValueError):
            # A struct format NumPy does not know; reinterpret the bytes.
            wrapped = np.frombuffer(view.cast("B"), dtype=np.uint8)
        address = wrapped.__array_interface__["data"][0]
    return bool(address % alignment == 0)
