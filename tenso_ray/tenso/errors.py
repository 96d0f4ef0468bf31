"""Exception hierarchy of :mod:`tenso`.

Every error the package raises on purpose derives from :class:`TensoError`, so
``except tenso.TensoError`` catches all of them. Each class also derives from the
builtin the seed API promises for that situation, so code written against the
reference package keeps working:

============================  =================================  ==================================
class                         also a                             raised when
============================  =================================  ==================================
``TensoFormatError``          ``ValueError``                     bytes are not a valid packet, or a
                                                                 packet breaks a limit (ndim, ...)
``TensoIntegrityError``       ``ValueError``                     an XXH3 footer does not match
``TensoTruncatedError``       ``EOFError``                       a buffer or stream ends mid-packet
``TensoIncompleteReadError``  ``TensoTruncatedError`` and        ``aread_stream``'s stream ends
                              ``asyncio.IncompleteReadError``    inside a packet
``TensoUnknownNameError``     ``ValueError`` and ``KeyError``    a quantization scheme or dtype
                                                                 name is not one tenso knows
``TensoCacheFullError``       ``MemoryError``                    a cache pool cannot make room
============================  =================================  ==================================

Two classes are both of two builtins so that code written for either keeps
working: an unknown name is the ``ValueError`` tenso raises for bad arguments and
the ``KeyError`` upstream's dict lookup leaked; a stream that ends inside a
packet in ``aread_stream`` is tenso's ``TensoTruncatedError`` and the
``asyncio.IncompleteReadError`` of ``StreamReader.readexactly``.
``TensoIncompleteReadError`` is built on first access (importing asyncio costs
tens of milliseconds, which ``import tenso`` does not pay).

The classes carry only their ``args`` (and ``TensoIncompleteReadError`` its
``partial`` and ``expected``), so they pickle by value (Ray sends worker
exceptions back to the driver by pickling them) and can be imported from
``tenso.errors`` as well as from ``tenso``.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

__all__ = [
    "TensoError",
    "TensoFormatError",
    "TensoIntegrityError",
    "TensoTruncatedError",
    "TensoCacheFullError",
    "TensoUnknownNameError",
    "TensoIncompleteReadError",
]


class TensoError(Exception):
    """Base class of every exception raised by tenso on purpose."""


class TensoFormatError(TensoError, ValueError):
    """The input is not a well-formed tenso packet, or it exceeds a security limit.

    Also a :class:`ValueError`, as the seed API documents for malformed packets.
    """


class TensoIntegrityError(TensoFormatError):
    """A packet's XXH3-64 footer does not match the bytes it protects."""


class TensoTruncatedError(TensoError, EOFError):
    """A buffer or stream ended before the packet it started was complete.

    Also an :class:`EOFError`, as the seed API documents for short streams.
    """


class TensoCacheFullError(TensoError, MemoryError):
    """A :class:`tenso.TensoCache` pool has no room left, even after eviction.

    Also a :class:`MemoryError`, as the seed API documents for an exhausted pool.
    """

    # MemoryError has a __new__ of its own, which Python refuses to call for a class whose layout comes from
    # Exception ("MemoryError.__new__(TensoCacheFullError) is not safe"). Picklers that rebuild exceptions with
    # `cls.__new__(cls, *args)` -- tblib's, which Dask installs in every process -- would then fail on this class.
    def __new__(cls, *args: Any, **kwargs: Any) -> "TensoCacheFullError":
        return Exception.__new__(cls, *args)


class TensoUnknownNameError(TensoError, ValueError, KeyError):
    """A name (quantization scheme, quantized dtype) that tenso does not know.

    Both a :class:`ValueError` (tenso's class for bad arguments) and a
    :class:`KeyError` (what upstream tenso's dict lookup raises), so handlers
    written for either catch it.
    """

    # KeyError shows its argument with repr() (quotes around the message); show the message as it is.
    def __str__(self) -> str:
        return Exception.__str__(self)


def _incomplete_read_error() -> type:
    """Build ``TensoIncompleteReadError``: a ``TensoTruncatedError`` that is also an ``asyncio.IncompleteReadError``."""
    from asyncio import IncompleteReadError

    class TensoIncompleteReadError(TensoTruncatedError, IncompleteReadError):
        """An asyncio stream ended inside a packet (:func:`tenso.aread_stream`).

        Both a :class:`TensoTruncatedError` (so an ``EOFError``) and an
        :class:`asyncio.IncompleteReadError`, whose ``partial`` (the bytes of the
        packet that arrived) and ``expected`` (the bytes it needs at least) it
        carries. The message is tenso's (upstream's words, then the detail).
        """

        partial: bytes
        expected: Optional[int]

        def __init__(self, message: str, partial: bytes = b"", expected: Optional[int] = None) -> None:
            Exception.__init__(self, message)
            self.partial = partial
            self.expected = expected

        def __str__(self) -> str:
            return Exception.__str__(self)

        def __reduce__(self) -> Tuple[Any, ...]:
            return (type(self), (self.args[0] if self.args else "", self.partial, self.expected))

    TensoIncompleteReadError.__module__ = __name__
    TensoIncompleteReadError.__qualname__ = "TensoIncompleteReadError"
    return TensoIncompleteReadError


def __getattr__(name: str) -> Any:
    if name == "TensoIncompleteReadError":
        cls = _incomplete_read_error()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
