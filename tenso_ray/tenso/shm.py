"""Shared-memory transport: one tenso packet in a named POSIX shared-memory segment.

:class:`TensoShm` lets processes on one host hand a tensor over without a copy:
the writer encodes straight into the segment, readers decode read-only views of it.

Unlike :mod:`multiprocessing.shared_memory`, segments are created and mapped by the
native module (``shm_open`` + ``mmap``): no resource tracker unlinks a segment
when some attached process exits.

Lifetime (the same rule for :class:`TensoShm` and :class:`~tenso.TensoCache`):

* A segment created **with a name you chose** lives until :meth:`TensoShm.unlink`
  (or ``TensoCache.unlink``): no data is lost because some process exited.
* A segment created **without a name** (``name=None``) gets a generated one,
  ``tenso_shm_<creator pid>_<12 hex>`` (``tenso_cache_...`` for caches), and is
  unlinked when its creator exits: at interpreter exit (``atexit``), or, after a
  ``SIGKILL``, by the next process on the host that creates an unnamed segment or
  attaches a node cache (:func:`sweep`), which finds the creator's pid dead. Those
  name patterns are reserved for this. Processes that still have it mapped keep their
  mapping; only the name goes.

Both classes pickle by name: unpickling opens the segment again, so a handle can be
passed to spawned workers, Ray tasks and DataLoader workers on the same host.

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

import atexit
import os
import re
import secrets
import threading
from typing import Any, Optional

from . import tenso_rs as _rs

__all__ = ["TensoShm"]

#: Where POSIX shared memory lives on Linux.
SHM_DIR = "/dev/shm"
# Generated names carry their creator's pid: "<prefix>_<pid>_<hex>". tenso_ray_ is the node cache of tenso-ray
# 0.x (named after its raylet), kept so that such leftovers are swept as well.
_GENERATED = re.compile(r"^(?:tenso_shm|tenso_cache)_(\d+)_[0-9a-f]{12}$|^tenso_ray_(\d+)_[0-9a-f]{16}$")

_exit_lock = threading.Lock()
_unlink_at_exit: set[str] = set()  # generated names this process created and has not unlinked yet
_exit_pid: Optional[int] = None  # the pid that registered the atexit hook (a forked child must not run it)


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host and is not a zombie (a process we may not signal counts).

    The one liveness check of the Python package: ``tenso_shm::lock::process_alive``, which the pool uses for its
    lock, pending entries, leases and pins. Pids from another PID namespace look dead.
    """
    if pid <= 0 or pid > 0x7FFFFFFF:
        return False
    return _rs._process_alive(pid)


def unlink_name(name: str) -> bool:
    """Remove ``/dev/shm/<name>``; False if it was not there (or could not be removed)."""
    with _exit_lock:
        _unlink_at_exit.discard(name)
    try:
        os.unlink(os.path.join(SHM_DIR, name))
    except OSError:
        return False
    return True


def sweep() -> list[str]:
    """Unlink generated segments (see the module docs) whose creator is dead; returns the names removed."""
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return []
    removed = []
    for name in names:
        match = _GENERATED.match(name)
        if match is None:
            continue
        pid = int(match.group(1) or match.group(2))
        if not process_alive(pid) and unlink_name(name):
            removed.append(name)
    return removed


def generated_name(prefix: str) -> str:
    """A fresh name ``<prefix>_<this pid>_<12 hex>`` that :func:`sweep` removes once this process is dead.

    Registers it for removal at this process's exit, and sweeps the leftovers of dead creators first.
    """
    global _exit_pid
    sweep()
    name = f"{prefix}_{os.getpid()}_{secrets.token_hex(6)}"
    with _exit_lock:
        if _exit_pid != os.getpid():
            _exit_pid = os.getpid()
            _unlink_at_exit.clear()  # a forked child inherits the parent's set: those names are not its own
            atexit.register(_unlink_generated, _exit_pid)
        _unlink_at_exit.add(name)
    return name


def _unlink_generated(pid: int) -> None:
    if os.getpid() != pid:  # an atexit hook inherited through fork()
        return
    with _exit_lock:
        names = list(_unlink_at_exit)
        _unlink_at_exit.clear()
    for name in names:
        try:
            os.unlink(os.path.join(SHM_DIR, name))
        except OSError:
            pass


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
    name : str or None
        Segment name: 1-200 characters of ``[A-Za-z0-9._-]`` (a leading ``/`` is
        accepted and dropped). ``None`` with ``create=True`` generates one, and the
        segment is then removed when this process exits (see the module docs).
    create : bool
        Create a new segment of ``size`` bytes (``FileExistsError`` if the name
        exists) instead of opening an existing one (``FileNotFoundError`` if not).
    size : int
        Size of a new segment in bytes.
    mode : int
        Permission bits of a new segment (default ``0o600``).
    """

    __slots__ = ("_seg", "__weakref__")

    def __init__(self, name: Optional[str] = None, create: bool = False, size: int = 0, *, mode: int = 0o600) -> None:
        if create:
            if size <= 0:
                raise ValueError("size must be > 0 when creating a shared memory segment")
            self._seg = _rs._Shm.create(_new_name(name), size, mode)
        else:
            if name is None:
                raise ValueError("name is required to open an existing TensoShm (create=False)")
            self._seg = _rs._Shm.open(name)

    @classmethod
    def create_from(
        cls,
        name: Optional[str],
        obj: Any,
        check_integrity: bool = False,
        compress: bool = False,
        alignment: int = 64,
        *,
        mode: int = 0o600,
    ) -> "TensoShm":
        """Create a segment sized to fit ``obj``'s packet and encode it there.

        The name must be new (``FileExistsError`` otherwise): an existing segment may
        belong to a live process, so it is never reclaimed behind its back. ``None``
        generates a name removed at this process's exit (see the module docs).
        """
        self = cls.__new__(cls)
        self._seg = _rs._Shm.create_from(_new_name(name), obj, check_integrity, compress, alignment, mode)
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
        unlink_name(self.name)  # already gone: only forgets the name's exit-time removal

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        # By name: the receiving process (same host) opens the segment again.
        return (TensoShm, (self.name,))

    def __enter__(self) -> "TensoShm":
        return self

    def __exit__(self, exc_type: Any, exc_value: Any, traceback: Any) -> None:
        # Not unlinked: another process may still need the segment.
        self.close()

    def __repr__(self) -> str:
        return f"TensoShm(name={self.name!r}, size={self.size})"


def _new_name(name: Optional[str]) -> str:
    return generated_name("tenso_shm") if name is None else name
