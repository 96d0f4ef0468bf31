"""Asyncio counterparts of :func:`tenso.read_stream` and :func:`tenso.write_stream`.

They speak the same framing as the blocking functions, over
:class:`asyncio.StreamReader` / :class:`asyncio.StreamWriter` pairs such as
those returned by :func:`asyncio.open_connection`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from . import tenso_rs as _rs
from .core import _GROWTH_STEP, _INITIAL_CAPACITY, _ended_message, _grow, _loads_owned, _parts
from . import errors as _errors

if TYPE_CHECKING:  # asyncio costs ~80 ms to import; only the coroutines need it
    import asyncio

__all__ = ["aread_stream", "awrite_stream"]

#: Largest single ``readexactly``; bounds the temporary bytes object the
#: reader builds before it is copied into the packet buffer.
_CHUNK = _GROWTH_STEP


async def aread_stream(reader: asyncio.StreamReader) -> Optional[Any]:
    """Read exactly one packet from an asyncio stream and deserialize it.

    The bytes land in a private 64-byte aligned buffer that is decoded without
    a further copy; the reader is never consumed past the end of the packet.

    Parameters
    ----------
    reader : asyncio.StreamReader
        The stream to read from.

    Returns
    -------
    Any or None
        The decoded object (as for :func:`tenso.loads`), or None if the stream
        ended before the packet's first byte.

    Raises
    ------
    tenso.errors.TensoIncompleteReadError
        If the stream ends inside a packet: a ``tenso.TensoTruncatedError``
        (so an ``EOFError``) that is also an ``asyncio.IncompleteReadError``,
        with the packet's bytes received as ``partial`` and the bytes it needs
        at least as ``expected``.
    tenso.TensoFormatError
        If the packet is malformed, exceeds a limit or cannot be framed
        (a ``ValueError``).
    tenso.TensoIntegrityError
        If an XXH3 footer does not match.
    """
    from asyncio import IncompleteReadError

    buf = _rs._alloc(_INITIAL_CAPACITY)
    have = 0
    while True:
        need = _rs._frame(buf, have)
        if need <= have:
            break
        if need > len(buf):
            buf = _grow(buf, have, need)
        end = min(need, len(buf))
        while have < end:
            step = min(end - have, _CHUNK)
            try:
                chunk = await reader.readexactly(step)
            except IncompleteReadError as exc:
                if have == 0 and not exc.partial:
                    return None
                got = have + len(exc.partial)
                raise _errors.TensoIncompleteReadError(
                    _ended_message(got, need), bytes(buf[:have]) + exc.partial, need
                ) from None
            buf[have : have + step] = memoryview(chunk)
            have += step
    return _loads_owned(buf[:have])


async def awrite_stream(
    tensor: Any,
    writer: asyncio.StreamWriter,
    strict: bool = False,
    check_integrity: bool = False,
    *,
    protocol: int = 4,
) -> None:
    """Serialize an object and write it to an asyncio stream, then drain it.

    Array bodies are handed to the transport as views of the arrays, so the
    arrays must not be modified until this coroutine returns.

    Parameters
    ----------
    tensor : Any
        Any object :func:`tenso.dumps` accepts.
    writer : asyncio.StreamWriter
        The stream to write to.
    strict : bool, default False
        If True, refuse arrays that are not C-contiguous.
    check_integrity : bool, default False
        If True, the packet carries an XXH3-64 footer.
    protocol : int, default 4
        Wire version to write (3 or 4).

    Raises
    ------
    TypeError, ValueError
        As for :func:`tenso.dumps`.
    ConnectionError
        If the peer goes away while writing.
    """
    for part in _parts(tensor, strict, check_integrity, protocol):
        writer.write(part)
    await writer.drain()
