"""Variable-length data without padding: string tensors and ragged arrays.

:class:`StringTensor` is a batch of strings stored as UTF-8 bytes back to back
plus ``count + 1`` uint64 offsets; it has its own packet kind (v4 only,
``docs/FORMAT.md`` section 10). :class:`RaggedArray` is a batch of 1-D arrays of
different lengths, stored as one flat array plus offsets and written as an
ordinary bundle (section 11), so any tenso reader can decode it as a dict.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Union, overload

import numpy as np

from . import tenso_rs as _rs

__all__ = ["StringTensor", "RaggedArray"]

_OFFSETS_KEY = "__ragged_offsets__"
_FLAT_KEY = "__ragged_flat__"
_COUNT_KEY = "__ragged_count__"


def _rebuild_strings(offsets: np.ndarray, payload: bytes) -> "StringTensor":
    """Unpickle a :class:`StringTensor` (module-level so pickle can find it)."""
    return StringTensor.__tenso_from_parts__(offsets, payload)


class StringTensor:
    """A batch of variable-length strings stored as packed UTF-8 plus offsets.

    String ``i`` is ``payload[offsets[i]:offsets[i + 1]]`` decoded as UTF-8.
    Compared with an object-dtype array it serializes without padding or
    pickling, and a decoded tensor is a view of the packet's payload.

    Parameters
    ----------
    strings : sequence of str or bytes
        The strings. ``bytes`` items are stored unchanged and must be valid UTF-8.

    Raises
    ------
    TypeError
        If an item is neither ``str`` nor bytes-like.
    ValueError
        If a bytes item is not valid UTF-8.

    Examples
    --------
    >>> st = StringTensor(["hello", "", "wörld"])
    >>> StringTensor.loads(st.dumps()).to_list()
    ['hello', '', 'wörld']
    """

    __slots__ = ("_offsets", "_payload")
    __hash__ = None  # type: ignore[assignment]

    def __init__(self, strings: Sequence[Union[str, bytes]]) -> None:
        encoded: list[bytes] = []
        for index, item in enumerate(strings):
            if isinstance(item, str):
                encoded.append(item.encode("utf-8"))
            elif isinstance(item, (bytes, bytearray, memoryview)):
                raw = bytes(item)
                try:
                    raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise ValueError(f"item {index} is not valid UTF-8: {exc}") from None
                encoded.append(raw)
            else:
                raise TypeError(f"StringTensor items must be str or bytes, item {index} is {type(item).__name__}")
        offsets = np.zeros(len(encoded) + 1, dtype=np.uint64)
        if encoded:
            np.cumsum([len(b) for b in encoded], out=offsets[1:])
        self._offsets: np.ndarray = offsets
        self._payload: Union[bytes, memoryview] = b"".join(encoded)

    # The codec's accessors: the native module reads and builds string tensors through these two documented
    # methods only, never through the private attributes (FORMAT.md §10: offsets, then payload).

    def __tenso_parts__(self) -> tuple[np.ndarray, Union[bytes, memoryview]]:
        """The wire parts ``(offsets, payload)``: ``len(self) + 1`` uint64 offsets and the packed UTF-8.

        What the native encoder writes; no copy.
        """
        return self._offsets, self._payload

    @classmethod
    def __tenso_from_parts__(cls, offsets: np.ndarray, payload: Any) -> "StringTensor":
        """Assemble a tensor from already validated offsets and payload (no copy).

        Used by the native decoder, which checks the offsets and the UTF-8
        before calling; the payload may be a view of the packet.
        """
        obj = cls.__new__(cls)
        obj._offsets = np.asarray(offsets, dtype=np.uint64)
        if isinstance(payload, bytes):
            obj._payload = payload
        else:
            view = memoryview(payload)
            if view.format != "B" or view.ndim != 1:
                view = view.cast("B") if view.nbytes else memoryview(b"")
            obj._payload = view
        return obj

    def _item(self, index: int) -> str:
        start = int(self._offsets[index])
        end = int(self._offsets[index + 1])
        return str(self._payload[start:end], "utf-8")

    def __len__(self) -> int:
        return len(self._offsets) - 1

    @overload
    def __getitem__(self, index: int) -> str: ...
    @overload
    def __getitem__(self, index: slice) -> "StringTensor": ...

    def __getitem__(self, index: Union[int, slice]) -> Union[str, "StringTensor"]:
        """Return string ``index`` (negative counts from the end), or a new tensor for a slice."""
        count = len(self)
        if isinstance(index, slice):
            return StringTensor([self._item(i) for i in range(*index.indices(count))])
        i = int(index)
        if i < 0:
            i += count
        if not 0 <= i < count:
            raise IndexError(f"index {index} out of range for StringTensor of length {count}")
        return self._item(i)

    def __iter__(self) -> Iterator[str]:
        for i in range(len(self)):
            yield self._item(i)

    def to_list(self) -> list[str]:
        """Return the strings as a list of ``str``."""
        return list(self)

    @property
    def nbytes(self) -> int:
        """Size of the UTF-8 payload in bytes (the offsets not included)."""
        return len(self._payload)

    @property
    def shape(self) -> tuple[int]:
        """``(count,)``."""
        return (len(self),)

    def dumps(self, check_integrity: bool = False) -> memoryview:
        """Serialize into a v4 string-tensor packet.

        Parameters
        ----------
        check_integrity : bool, default False
            If True, append an XXH3-64 footer over offsets and payload.

        Returns
        -------
        memoryview
            The packet, backed by a 64-byte aligned buffer.
        """
        return _rs._dumps(self, check_integrity=check_integrity)

    @classmethod
    def loads(cls, data: Any) -> "StringTensor":
        """Decode a string-tensor packet.

        Parameters
        ----------
        data : bytes-like
            The packet; the result's payload is a view of it.

        Returns
        -------
        StringTensor
            The decoded tensor.

        Raises
        ------
        ValueError
            If the packet is valid but holds another kind of object.
        tenso.TensoFormatError, tenso.TensoIntegrityError, tenso.TensoTruncatedError
            If the packet is invalid.
        """
        obj = _rs._loads(data, copy=False)
        if not isinstance(obj, cls):
            raise ValueError(f"Not a StringTensor packet: it holds a {type(obj).__name__}")
        return obj

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, StringTensor):
            return NotImplemented
        return np.array_equal(self._offsets, other._offsets) and bytes(self._payload) == bytes(other._payload)

    def __repr__(self) -> str:
        count = len(self)
        preview = [self._item(i) for i in range(min(count, 3))]
        more = ", ..." if count > 3 else ""
        return f"StringTensor({preview!r}{more}, count={count})"

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (_rebuild_strings, (self._offsets, bytes(self._payload)))


def _rebuild_ragged(offsets: np.ndarray, flat: np.ndarray) -> "RaggedArray":
    """Unpickle a :class:`RaggedArray` (module-level so pickle can find it)."""
    return RaggedArray._from_parts(offsets, flat)


class RaggedArray:
    """A batch of 1-D arrays of different lengths, stored as one flat array plus offsets.

    Row ``i`` is ``flat_values[row_splits[i]:row_splits[i + 1]]``.

    Parameters
    ----------
    arrays : sequence of array-like
        The rows. Each is flattened to 1-D and cast to the dtype of the first
        row; an empty sequence gives an empty float32 array.

    Examples
    --------
    >>> ra = RaggedArray([np.array([1.0, 2.0]), np.array([3.0])])
    >>> [r.tolist() for r in RaggedArray.loads(ra.dumps())]
    [[1.0, 2.0], [3.0]]
    """

    __slots__ = ("_offsets", "_flat", "_count")
    __hash__ = None  # type: ignore[assignment]

    def __init__(self, arrays: Sequence[Any]) -> None:
        rows = [np.asarray(a).reshape(-1) for a in arrays]
        if not rows:
            flat = np.empty(0, dtype=np.float32)
        else:
            dtype = rows[0].dtype
            flat = np.concatenate([r if r.dtype == dtype else r.astype(dtype) for r in rows])
        offsets = np.zeros(len(rows) + 1, dtype=np.uint64)
        if rows:
            np.cumsum([r.size for r in rows], out=offsets[1:])
        self._offsets: np.ndarray = offsets
        self._flat: np.ndarray = flat
        self._count: int = len(rows)

    @classmethod
    def _from_parts(cls, offsets: np.ndarray, flat: np.ndarray) -> "RaggedArray":
        obj = cls.__new__(cls)
        obj._offsets = offsets
        obj._flat = flat
        obj._count = len(offsets) - 1
        return obj

    def __len__(self) -> int:
        return self._count

    def _row(self, index: int) -> np.ndarray:
        return self._flat[int(self._offsets[index]) : int(self._offsets[index + 1])].copy()

    def __getitem__(self, index: int) -> np.ndarray:
        """Return a copy of row ``index`` (negative counts from the end)."""
        i = int(index)
        if i < 0:
            i += self._count
        if not 0 <= i < self._count:
            raise IndexError(f"index {index} out of range for RaggedArray of length {self._count}")
        return self._row(i)

    def __iter__(self) -> Iterator[np.ndarray]:
        for i in range(self._count):
            yield self._row(i)

    @property
    def dtype(self) -> np.dtype:
        """The dtype shared by all rows."""
        return self._flat.dtype

    @property
    def flat_values(self) -> np.ndarray:
        """All rows concatenated (not a copy)."""
        return self._flat

    @property
    def row_splits(self) -> np.ndarray:
        """The ``count + 1`` uint64 row boundaries, starting at 0 (not a copy)."""
        return self._offsets

    def to_list(self) -> list[np.ndarray]:
        """Return the rows as a list of new 1-D arrays."""
        return list(self)

    def dumps(self, check_integrity: bool = False) -> memoryview:
        """Serialize as a bundle of offsets, flat values and count.

        Parameters
        ----------
        check_integrity : bool, default False
            If True, every entry carries an XXH3-64 footer.

        Returns
        -------
        memoryview
            The packet: a bundle with ``__ragged_offsets__`` (uint64),
            ``__ragged_flat__`` and ``__ragged_count__`` (uint64, one element),
            in that order.
        """
        return _rs._dumps(self.__tenso_parts__(), check_integrity=check_integrity)

    def __tenso_parts__(self) -> dict[str, np.ndarray]:
        """The bundle this array is written as (entry order is part of the format, FORMAT.md §11).

        The codec's accessor: the native encoder writes a ragged array as this dict, no copy.
        """
        return {
            _OFFSETS_KEY: self._offsets,
            _FLAT_KEY: self._flat,
            _COUNT_KEY: np.array([self._count], dtype=np.uint64),
        }

    @classmethod
    def loads(cls, data: Any) -> "RaggedArray":
        """Rebuild a ragged array from its packet or from the decoded bundle.

        Parameters
        ----------
        data : bytes-like or dict
            A packet written by :meth:`dumps`, or the dict :func:`tenso.loads`
            returns for it.

        Returns
        -------
        RaggedArray
            Views of the decoded arrays (no copy).

        Raises
        ------
        ValueError
            If an entry is missing, or the offsets do not have ``count + 1``
            entries, do not start at 0, decrease, or do not end at the length
            of the flat array.
        """
        bundle = data if isinstance(data, dict) else _rs._loads(data, copy=False)
        if not isinstance(bundle, dict) or not all(k in bundle for k in (_OFFSETS_KEY, _FLAT_KEY, _COUNT_KEY)):
            raise ValueError(
                f"Not a RaggedArray packet: expected a bundle with {_OFFSETS_KEY}, {_FLAT_KEY} and {_COUNT_KEY}"
            )
        offsets = np.asarray(bundle[_OFFSETS_KEY])
        flat = np.asarray(bundle[_FLAT_KEY])
        count_arr = np.asarray(bundle[_COUNT_KEY]).reshape(-1)
        if offsets.ndim != 1 or offsets.dtype.kind not in "iu":
            raise ValueError(f"{_OFFSETS_KEY} must be a 1-D integer array, got {offsets.dtype} of shape {offsets.shape}")
        if flat.ndim != 1:
            raise ValueError(f"{_FLAT_KEY} must be 1-D, got shape {flat.shape}")
        if count_arr.size != 1 or count_arr.dtype.kind not in "iu":
            raise ValueError(f"{_COUNT_KEY} must hold exactly one integer")
        count = int(count_arr[0])
        if count < 0 or offsets.size != count + 1:
            raise ValueError(f"{_OFFSETS_KEY} has {offsets.size} entries, expected count + 1 = {count + 1}")
        if offsets.dtype.kind == "i" and offsets.size and int(offsets.min()) < 0:
            raise ValueError(f"{_OFFSETS_KEY} must not be negative")
        offsets = offsets.astype(np.uint64, copy=False)
        if int(offsets[0]) != 0:
            raise ValueError(f"{_OFFSETS_KEY} must start at 0, starts at {int(offsets[0])}")
        if count and bool(np.any(offsets[1:] < offsets[:-1])):
            raise ValueError(f"{_OFFSETS_KEY} must be non-decreasing")
        if int(offsets[-1]) != flat.size:
            raise ValueError(f"{_OFFSETS_KEY} ends at {int(offsets[-1])} but {_FLAT_KEY} has {flat.size} elements")
        return cls._from_parts(offsets, flat)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RaggedArray):
            return NotImplemented
        return (
            self._flat.dtype == other._flat.dtype
            and np.array_equal(self._offsets, other._offsets)
            and np.array_equal(self._flat, other._flat)
        )

    def __repr__(self) -> str:
        return f"RaggedArray(count={self._count}, dtype={self._flat.dtype}, total_elements={self._flat.size})"

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (_rebuild_ragged, (self._offsets, self._flat))
