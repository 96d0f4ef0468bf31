"""Exception hierarchy of :mod:`tenso`.

Every error the package raises on purpose derives from :class:`TensoError`, so
``except tenso.TensoError`` catches all of them. Each class also derives from the
builtin the seed API promises for that situation, so code written against the
reference package keeps working:

=========================  ==================  =====================================
class                      also a              raised when
=========================  ==================  =====================================
``TensoFormatError``       ``ValueError``      bytes are not a valid packet, or a
                                               packet breaks a limit (ndim, elements)
``TensoIntegrityError``    ``ValueError``      an XXH3 footer does not match
``TensoTruncatedError``    ``EOFError``        a buffer or stream ends mid-packet
``TensoCacheFullError``    ``MemoryError``     a cache pool cannot make room
=========================  ==================  =====================================

The classes carry only their ``args``, so they pickle by value (Ray sends worker
exceptions back to the driver by pickling them) and can be imported from
``tenso.errors`` as well as from ``tenso``.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "TensoError",
    "TensoFormatError",
    "TensoIntegrityError",
    "TensoTruncatedError",
    "TensoCacheFullError",
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
