"""Shared-memory transport: one tenso packet in a named POSIX shared-memory segment.

:class:`TensoShm` lets processes on one host hand a tensor over without a copy:
the writer encodes straight into the segment, readers decode read-only views of it.

Unlike :mod:`multiprocessing.shared_memory`, segments are created and mapped by the
native module (``shm_open`` + ``mmap``): no resource tracker unlinks a segment
when some attached process exits. A segment lives until :meth:`TensoShm.unlink`.
Creation reserves the whole size, so a full ``/dev/shm`` raises ``OSError``
(``ENOSPC``) at creation instead of ``SIGBUS`` on a later write. New segments get
mode ``0600`` (owner only) unless ``mode`` says otherwise.

Who may write: one process, the writer, puts packets; readers only read. A
``put`` while readers hold views changes the bytes under those views, so a
writer that reuses a segment must know its readers are done (or readers use
``copy``). The views keep the mapping alive on their own: ``close()`` never
invalidates an array already returned.
"""

from __future__ import annotations

from typing import Any, Optional

from . import tenso_rs as _rs

__all__ = ["TensoShm"]


class TensoShm:
    """One tenso packet in a named POSIX shared-memory segment.

    Example::

        # Writer
        ary = np.random.rand(100, 100)
        with TensoShm.create_from("my_tensor", ary) as shm:
            print("Wrote to SHM")
            input("Press enter to cleanup...")

        # Reader
        with TensoShm("my_tensor") as shm:
            ary = shm.get()
            print(ary.shape)

    Parameters
    ----------
    name : str
        Segment name: 1-200 characters of ``[A-Za-z0-9._-]`` (a leading ``/`` is
        accepted and dropped).
    create : bool
        Create a new segment of ``size`` bytes (``FileExistsError`` if the name
        exists) instead of opening an existing one (``FileNotFoundError`` if not).
    size : int
        Size of a new segment in bytes.
    mode : int
        Permission bits of a new segment (default ``0o600``).
    """

    __slots__ = ("_seg", "__weakref__")

    def __init__(self, name: str, create: bool = False, size: int = 0, *, mode: int = 0o600) -> None:
        if create:
            if size <= 0:
                raise ValueError("size must be > 0 when creating a shared memory segment")
            self._seg = _rs._Shm.create(name, size, mode)
        else:
            self._seg = _rs._Shm.open(name)

    @classmethod
    def create_from(
        cls,
        name: str,
        obj: Any,
        check_integrity: bool = False,
        compress: bool = False,
        alignment: int = 64,
        *,
        mode: int = 0o600,
    ) -> "TensoShm":
        """Create a segment sized to fit ``obj``'s packet and encode it there.

        The name must be new (``FileExistsError`` otherwise): an existing segment may
        belong to a live process, so it is never reclaimed behind its back.
        """
        self = cls.__new__(cls)
        self._seg = _rs._Shm.create_from(name, obj, check_integrity, compress, alignment, mode)
        return self

    @property
    def name(self) -> str:
        return self._seg.name

    @property
    def size(self) -> int:
        return self._seg.size

    @property
    def buffer(self) -> memoryview:
        """The whole segment as a writeable memoryview."""
        return self._seg.buffer

    def put(self, obj: Any, check_integrity: bool = False, compress: bool = False, alignment: int = 64) -> int:
        """Encode ``obj`` into the segment (at offset 0); returns the bytes written.

        Raises ``ValueError`` if the packet does not fit.
        """
        return self._seg.put(obj, check_integrity, compress, alignment)

    def get(self) -> Optional[Any]:
        """Decode the packet in the segment as read-only zero-copy views.

        The arrays keep the mapping alive themselves: they stay valid after
        :meth:`close` and after :meth:`unlink`. They show the segment's current
        bytes, so a later :meth:`put` into the same segment changes them.
        """
        return self._seg.get()

    def close(self) -> None:
        """Close this handle. Arrays already returned keep their mapping."""
        self._seg.close()

    def unlink(self) -> None:
        """Remove the segment's name; processes that have it open keep their mapping."""
        self._seg.unlink()

    def __enter__(self) -> "TensoShm":
        return self

    def __exit__(self, exc_type: Any, exc_value: Any, traceback: Any) -> None:
        # Not unlinked: another process may still need the segment.
        self.close()

    def __repr__(self) -> str:
        return f"TensoShm(name={self.name!r}, size={self.size})"
