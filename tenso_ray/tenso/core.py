"""Serialization entry points: bytes, files and streams.

Everything here is a thin layer over the native module :mod:`tenso.tenso_rs`,
which owns the wire format (``docs/FORMAT.md``). Python only moves bytes:

* :func:`dumps` / :func:`loads` convert between objects and one packet in memory;
* :func:`iter_dumps`, :func:`write_stream` and :func:`dump` write a packet as a
  list of parts whose array bodies are views of the caller's arrays, so a large
  tensor reaches the socket or file without an intermediate copy;
* :func:`read_stream` and :func:`load` read one packet from a stream straight
  into a 64-byte aligned buffer, asking the native framer how many bytes the
  packet needs so far. The buffer grows only as far as the bytes already
  received justify, so a hostile header cannot make us allocate gigabytes up front.

Supported objects are NumPy arrays (any dtype the format knows, any layout),
``dict[str, ...]`` bundles, SciPy sparse COO/CSR/CSC matrices,
:class:`tenso.QuantizedTensor`, :class:`tenso.StringTensor` and
:class:`tenso.RaggedArray`.
"""

from __future__ import annotations

import functools
import io
import mmap
import os
from collections.abc import Iterator, Sequence
from typing import Any, BinaryIO, Callable, Optional, Union

from . import tenso_rs as _rs
from .errors import TensoTruncatedError
from .frameworks import host_input as _host_input
from .ragged import RaggedArray

__all__ = [
    "dumps",
    "loads",
    "dump",
    "load",
    "iter_dumps",
    "write_stream",
    "read_stream",
]

Buffer = Union[bytes, bytearray, memoryview, mmap.mmap, Any]
"""Anything that exports the buffer protocol (bytes, bytearray, memoryview, mmap, ndarray)."""

#: Largest step by which a stream read buffer may grow beyond the bytes already
#: received (it may also grow by as much as it already holds, i.e. geometrically).
_GROWTH_STEP = 16 << 20
#: Packets up to this size get their final buffer as soon as the header proves
#: the size; larger ones grow with the data (see ``_grow``).
_DIRECT_LIMIT = 1 << 30
#: Size of the first read buffer; enough for most headers and small tensors.
_INITIAL_CAPACITY = 4096
#: Largest single ``read``/``recv`` for sources that cannot read into our buffer,
#: so the temporary bytes object they return stays small.
_COPY_CHUNK = 16 << 20


def _byte_parts(parts: Sequence[Union[bytes, memoryview]]) -> list[Union[bytes, memoryview]]:
    """Return ``parts`` as flat byte-format views, dropping empty ones.

    A part can be a typed memoryview of an array body (format ``'f'``, shape
    ``(n, m)``); its ``len`` would count rows, not bytes. Casting to ``'B'`` is
    free and makes ``len`` and slicing byte-based for every writer below.
    """
    out: list[Union[bytes, memoryview]] = []
    for part in parts:
        if isinstance(part, bytes):
            if part:
                out.append(part)
            continue
        view = memoryview(part)
        if view.nbytes == 0:
            continue
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        out.append(view)
    return out


def _parts(
    tensor: Any, strict: bool, check_integrity: bool, protocol: int
) -> list[Union[bytes, memoryview]]:
    return _byte_parts(
        _rs._dump_parts(
            _host_input(tensor), strict=strict, check_integrity=check_integrity, protocol=protocol
        )
    )


def dumps(
    tensor: Any,
    strict: bool = False,
    check_integrity: bool = False,
    compress: bool = False,
    alignment: int = 64,
    *,
    protocol: int = 4,
) -> memoryview:
    """Serialize an object into one tenso packet.

    >>> import numpy as np, tenso
    >>> packet = tenso.dumps(np.arange(3, dtype=np.float32))
    >>> len(packet), bytes(packet[:4])
    (76, b'TNSO')

    Parameters
    ----------
    tensor : Any
        A NumPy array (or NumPy scalar), a ``dict`` mapping ``str`` to supported
        objects, a SciPy sparse COO/CSR/CSC matrix, a :class:`tenso.QuantizedTensor`,
        a :class:`tenso.StringTensor` or a :class:`tenso.RaggedArray`. Any DLPack
        producer in host memory (a CPU torch tensor, JAX or NumPy array) is
        serialized as its NumPy view (:func:`tenso.from_dlpack`), bytes for bytes;
        a device tensor raises BufferError (use :mod:`tenso.gpu`).
    strict : bool, default False
        If True, refuse arrays that are not C-contiguous instead of gathering them.
    check_integrity : bool, default False
        If True, append an XXH3-64 footer that readers verify.
    compress : bool, default False
        If True, compress dense bodies with LZ4 (quantized and string packets
        are never compressed).
    alignment : int, default 64
        Boundary, in bytes, the body of each dense array starts on. Must be a
        power of two; values other than 64 are recorded with ``FLAG_CUST_ALIGN``.
    protocol : int, default 4
        Wire version to write: 4, or 3 for readers of the 0.19 series.

    Returns
    -------
    memoryview
        A writeable view of the packet, backed by a 64-byte aligned buffer.

    Raises
    ------
    TypeError
        If the object (or a bundle key) is of an unsupported type.
    ValueError
        If ``strict`` is set and an array is not C-contiguous, if
        ``alignment`` is not a power of two, if ``protocol`` is unknown, or
        if the object breaks a format limit (:class:`tenso.TensoFormatError`).
    """
    return _rs._dumps(
        _host_input(tensor),  # DLPack producers (torch, JAX, CuPy on the host) as NumPy views
        strict=strict,
        check_integrity=check_integrity,
        compress=compress,
        alignment=alignment,
        protocol=protocol,
    )


def loads(data: Buffer, copy: bool = False) -> Any:
    """Deserialize one tenso packet held in memory.

    >>> import numpy as np, tenso
    >>> view = tenso.loads(tenso.dumps({"x": np.arange(3)}))
    >>> view["x"].tolist(), view["x"].flags.writeable
    ([0, 1, 2], False)

    Parameters
    ----------
    data : bytes, bytearray, memoryview, numpy.ndarray or mmap.mmap
        The packet. Bytes after a complete packet are ignored.
    copy : bool, default False
        If False, arrays are read-only views of ``data`` (which they keep
        alive). If True, they are writeable, 64-byte aligned copies.

    Returns
    -------
    Any
        An ndarray, a dict (bundle), a SciPy sparse matrix, a
        :class:`tenso.QuantizedTensor` or a :class:`tenso.StringTensor`.

    Raises
    ------
    tenso.TensoFormatError
        If the packet is malformed or exceeds a limit (a ``ValueError``).
        A buffer that ends before its packet does is malformed too.
    tenso.TensoIntegrityError
        If an XXH3 footer does not match.
    ImportError
        If the packet holds a sparse matrix and SciPy is not installed.
    """
    return _rs._loads(data, copy=copy)


def iter_dumps(
    tensor: Any,
    strict: bool = False,
    check_integrity: bool = False,
    *,
    protocol: int = 4,
) -> Iterator[Union[bytes, memoryview]]:
    """Serialize an object as a sequence of chunks, without copying array bodies.

    The concatenation of the chunks equals ``dumps(tensor, strict,
    check_integrity, protocol=protocol)``. Headers, padding and footers are
    small ``bytes``; the body of a C-contiguous little-endian array is a
    memoryview of that array, so the array must not be modified until every
    chunk has been consumed.

    Parameters
    ----------
    tensor : Any
        Any object :func:`dumps` accepts.
    strict : bool, default False
        If True, refuse arrays that are not C-contiguous.
    check_integrity : bool, default False
        If True, the packet carries an XXH3-64 footer.
    protocol : int, default 4
        Wire version to write (3 or 4).

    Yields
    ------
    bytes or memoryview
        Consecutive, non-empty byte chunks of the packet.

    Raises
    ------
    TypeError, ValueError
        As for :func:`dumps`; raised on the first ``next()``.
    """
    yield from _parts(tensor, strict, check_integrity, protocol)


def _write_all_raw(write: Any, part: Union[bytes, memoryview]) -> None:
    """Write ``part`` with a ``write`` that may accept fewer bytes than offered."""
    view = memoryview(part)
    while view.nbytes:
        written = write(view)
        if written is None:
            # Raw non-blocking files return None when they would block.
            raise BlockingIOError("destination is non-blocking and would block")
        if written >= view.nbytes:
            return
        view = view[written:]


def _writer(dest: Any, who: str) -> Callable[[Union[bytes, memoryview]], Any]:
    """What writes a whole part to ``dest``: its ``sendall``, or its ``write`` retried on short writes."""
    sendall = getattr(dest, "sendall", None)
    if sendall is not None:
        return sendall
    write = getattr(dest, "write", None)
    if write is None:
        raise TypeError(f"{who} needs a destination with sendall() or write(), got {type(dest).__name__}")
    return functools.partial(_write_all_raw, write)


def write_stream(
    tensor: Any,
    dest: Any,
    strict: bool = False,
    check_integrity: bool = False,
    *,
    protocol: int = 4,
) -> int:
    """Serialize an object and write it to a socket or file, part by part.

    Array bodies are handed to the destination as views of the array (no
    intermediate packet is built).

    Parameters
    ----------
    tensor : Any
        Any object :func:`dumps` accepts.
    dest : Any
        A socket-like object with ``sendall`` or a file-like object with
        ``write``. Short writes (raw files, pipes) are retried.
    strict : bool, default False
        If True, refuse arrays that are not C-contiguous.
    check_integrity : bool, default False
        If True, the packet carries an XXH3-64 footer.
    protocol : int, default 4
        Wire version to write (3 or 4).

    Returns
    -------
    int
        The number of bytes written (the packet length).

    Raises
    ------
    TypeError
        If ``dest`` has neither ``sendall`` nor ``write``, or the object is unsupported.
    ValueError
        As for :func:`dumps`.
    OSError
        Whatever the destination raises.
    """
    parts = _parts(tensor, strict, check_integrity, protocol)
    write_all = _writer(dest, "write_stream")
    for part in parts:
        write_all(part)
    return sum(len(p) for p in parts)


def _real_file_fd(fp: Any) -> Optional[int]:
    """Return the descriptor of ``fp`` if writing to it directly is safe, else None.

    Only plain OS files qualify: ``io.FileIO`` or a buffered reader/writer over
    one. Other objects with ``fileno()`` (gzip files, socket files) transform
    or frame the bytes they are given, so writing to their descriptor would
    bypass them.
    """
    if not hasattr(os, "writev"):
        return None
    raw = fp
    if isinstance(fp, (io.BufferedWriter, io.BufferedRandom)):
        raw = fp.raw
    if type(raw) is not io.FileIO:
        return None
    try:
        return int(fp.fileno())
    except (OSError, ValueError):
        return None


def _writev_all(fd: int, parts: list[Union[bytes, memoryview]]) -> None:
    """Write every part to ``fd`` with ``os.writev``, resuming after short writes."""
    try:
        iov_max = os.sysconf("SC_IOV_MAX")
    except (AttributeError, ValueError, OSError):
        iov_max = 1024
    iov_max = max(1, min(iov_max, 1024))
    pending = [memoryview(p) for p in parts]
    while pending:
        written = os.writev(fd, pending[:iov_max])
        while written and pending:
            head = pending[0]
            if written >= head.nbytes:
                written -= head.nbytes
                pending.pop(0)
            else:
                pending[0] = head[written:]
                written = 0


def dump(
    tensor: Any,
    fp: BinaryIO,
    strict: bool = False,
    check_integrity: bool = False,
    *,
    protocol: int = 4,
) -> None:
    """Serialize an object and write it to an open binary file.

    For a plain OS file the parts are written with one ``os.writev`` call
    (the array body is not copied into a packet first); any other writable
    object receives the parts through ``fp.write``.

    Parameters
    ----------
    tensor : Any
        Any object :func:`dumps` accepts.
    fp : BinaryIO
        A file opened for binary writing, at the position the packet should start.
    strict : bool, default False
        If True, refuse arrays that are not C-contiguous.
    check_integrity : bool, default False
        If True, the packet carries an XXH3-64 footer.
    protocol : int, default 4
        Wire version to write (3 or 4).

    Raises
    ------
    TypeError, ValueError
        As for :func:`dumps`.
    OSError
        If writing fails.
    """
    parts = _parts(tensor, strict, check_integrity, protocol)
    fd = _real_file_fd(fp)
    if fd is None:
        for part in parts:
            _write_all_raw(fp.write, part)
        return
    # Buffered bytes must reach the descriptor before ours, and a buffered
    # reader must rewind its read-ahead so the descriptor sits at fp's position.
    fp.flush()
    _writev_all(fd, parts)
    if fp is not getattr(fp, "raw", fp) and fp.seekable():
        # A buffered object caches the raw position; an absolute seek resets it.
        fp.seek(os.lseek(fd, 0, os.SEEK_CUR))


def load(fp: BinaryIO, mmap_mode: bool = False, copy: bool = False) -> Any:
    """Deserialize one packet from an open binary file.

    Parameters
    ----------
    fp : BinaryIO
        A file opened for binary reading.
    mmap_mode : bool, default False
        If True, map the whole file read-only and decode the packet that
        starts at offset 0 without reading it: arrays are views of the map
        (unless ``copy``), which stays open as long as they live. If False,
        read the packet at the current position with :func:`read_stream`,
        leaving the file just after it.
    copy : bool, default False
        If True, return writeable copies that do not reference the file or map.

    Returns
    -------
    Any
        The decoded object, as for :func:`loads`.

    Raises
    ------
    tenso.TensoTruncatedError
        If the file is empty, or (without ``mmap_mode``) ends inside the
        packet; an ``EOFError``.
    tenso.TensoFormatError, tenso.TensoIntegrityError
        If the packet is invalid (with ``mmap_mode``, a file that ends inside
        the packet is a ``TensoFormatError``, as for :func:`loads`).
    """
    if mmap_mode:
        fd = fp.fileno()
        if os.fstat(fd).st_size == 0:
            raise TensoTruncatedError("cannot load a packet from an empty file")
        mapped = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        if copy:
            try:
                return _rs._loads(mapped, copy=True)
            finally:
                try:
                    mapped.close()
                except BufferError:
                    # Something still exports the map (e.g. a lazily built
                    # object); leave it to the garbage collector.
                    pass
        return _rs._loads(mapped, copy=False)
    packet = _framed_read(_make_filler(fp))
    if packet is None:
        raise TensoTruncatedError("the file holds no packet at its current position")
    # The packet buffer is private to this call, so views of it are as good
    # as copies: nothing else can see or change them.
    return _loads_owned(packet)


# ---------------------------------------------------------------------------
# Stream reading
# ---------------------------------------------------------------------------

def _make_filler(source: Any) -> Any:
    """Return ``fill(view) -> int`` reading at most ``len(view)`` bytes into ``view``.

    It returns 0 only at the end of the stream. Sources that can read into a
    caller's buffer (``readinto``, ``recv_into``) write straight into ``view``;
    the others (``read``, ``recv``) return bytes that are copied in.
    """
    readinto = getattr(source, "readinto", None)
    if readinto is not None:
        def fill_readinto(view: memoryview) -> int:
            n = readinto(view)
            if n is None:
                raise BlockingIOError("source is non-blocking and has no data ready")
            return int(n)
        return fill_readinto
    recv_into = getattr(source, "recv_into", None)
    if recv_into is not None:
        return recv_into
    reader = getattr(source, "read", None) or getattr(source, "recv", None)
    if reader is None:
        raise TypeError(
            "read_stream needs a source with readinto(), recv_into(), read() or recv(), "
            f"got {type(source).__name__}"
        )

    def fill_copy(view: memoryview) -> int:
        chunk = reader(min(len(view), _COPY_CHUNK))
        if chunk is None:
            raise BlockingIOError("source is non-blocking and has no data ready")
        n = len(chunk)
        if n > len(view):
            raise ValueError(f"source returned {n} bytes when at most {len(view)} were requested")
        view[:n] = chunk
        return n
    return fill_copy


def _grow(buf: Any, have: int, need: int) -> Any:
    """Return a larger aligned buffer holding the first ``have`` bytes of ``buf``.

    Up to ``_DIRECT_LIMIT`` the buffer is sized to ``need`` at once, so every byte
    is read straight into its final place: the allocation is virtual memory the
    kernel backs page by page as data arrives, so a header that lies costs
    address space, not RAM. Beyond that, capacity grows by at most
    ``max(have, 16 MiB)`` past what was received, so a lying header costs at
    most a doubling of what the peer actually sent.
    """
    if need <= _DIRECT_LIMIT:
        new_cap = need
    else:
        cap = len(buf)
        limit = have + max(have, _GROWTH_STEP)
        new_cap = min(limit, max(need, cap + cap // 2))
    new = _rs._alloc(new_cap)
    if have:
        new[:have] = buf[:have]
    return new


def _ended_message(have: int, need: int) -> str:
    """The message of a stream that ends inside a packet: upstream's words, then ours.

    "header" while the fixed header (8 bytes in v3, 10 in v4) is incomplete, "body" after it, as 0.19.4
    and 0.24.0 say; the detail says how far the packet got.
    """
    part = "header" if have < _FIXED_HEADER_MAX else "body"
    return f"Stream ended during {part} read: got {have} bytes of a packet that needs at least {need}"


_FIXED_HEADER_MAX = 10  # the v4 header; a v3 packet's 8 bytes are followed by at least a shape or a key length


def _framed_read(fill: Any) -> Optional[Any]:
    """Read one packet with ``fill`` into an aligned buffer; None if the stream is empty.

    Returns the uint8 array holding exactly the packet's bytes.
    """
    buf = _rs._alloc(_INITIAL_CAPACITY)
    have = 0
    while True:
        need = _rs._frame(buf, have)
        if need <= have:
            return buf[:have]
        if need > len(buf):
            buf = _grow(buf, have, need)
        end = min(need, len(buf))
        view = buf.data  # the array's own memoryview (format "B")
        while have < end:
            n = fill(view[have:end])
            if not n:
                if have == 0:
                    return None
                raise TensoTruncatedError(_ended_message(have, need))
            have += n


def _loads_owned(packet: Any) -> Any:
    """Decode a packet held in a buffer we own: its arrays are writeable views of that buffer."""
    return _rs._loads(packet, copy=False, writeable=True)





def read_stream(source: Any) -> Optional[Any]:
    """Read exactly one packet from a stream and deserialize it.

    Bytes are read straight into a 64-byte aligned buffer that is then decoded
    without copying; the returned arrays are views of that private buffer. The
    source is never read past the end of the packet, so consecutive packets
    can be read one call at a time.

    Parameters
    ----------
    source : Any
        A file-like object (``readinto`` or ``read``) or a socket-like object
        (``recv_into`` or ``recv``), in blocking mode.

    Returns
    -------
    Any or None
        The decoded object, as for :func:`loads`; None if the stream ended
        before its first byte.

    Raises
    ------
    tenso.TensoTruncatedError
        If the stream ends inside a packet (an ``EOFError``).
    tenso.TensoFormatError
        If the packet is malformed, exceeds a limit, or cannot be framed
        (a top-level compressed packet has no length); a ``ValueError``.
    tenso.TensoIntegrityError
        If an XXH3 footer does not match.
    TypeError
        If ``source`` has none of the supported read methods.
    ImportError
        If the packet holds a sparse matrix and SciPy is not installed.
    """
    packet = _framed_read(_make_filler(source))
    if packet is None:
        return None
    return _loads_owned(packet)
