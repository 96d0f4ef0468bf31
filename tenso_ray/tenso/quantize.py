"""Quantized tensors: 8-bit and 4-bit codes with affine scale/zero-point metadata.

A :class:`QuantizedTensor` stores packed integer codes plus float32 scales and
zero points; an element decodes as ``(q - zero_point) * scale``, with the pair
chosen per tensor, per channel (index along ``axis``) or per group of
``group_size`` flattened elements (``docs/FORMAT.md`` section 9). The
arithmetic of :meth:`QuantizedTensor.quantize` and
:meth:`QuantizedTensor.dequantize` runs in the native module.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import tenso_rs as _rs
from .errors import TensoUnknownNameError
from .config import (
    QDTYPE_QINT4,
    QDTYPE_QINT8,
    QDTYPE_QUINT4,
    QDTYPE_QUINT8,
    QUANT_PER_CHANNEL,
    QUANT_PER_GROUP,
    QUANT_PER_TENSOR,
    _QDTYPE_FROM_NAME,
    _QDTYPE_NAMES,
)

__all__ = ["QuantizedTensor"]

_QDTYPE_BY_NAME = _QDTYPE_FROM_NAME
_QDTYPE_NAME = _QDTYPE_NAMES

_SCHEME_BY_NAME: dict[str, int] = {
    "per_tensor": QUANT_PER_TENSOR,
    "per_channel": QUANT_PER_CHANNEL,
    "per_group": QUANT_PER_GROUP,
}
_SCHEME_NAME: dict[int, str] = {code: name for name, code in _SCHEME_BY_NAME.items()}


def _pack_int4(values: Any) -> np.ndarray:
    """Pack 4-bit codes two per byte, even index in the low nibble (upstream's helper, on the native packer).

    Only the low nibble of each value counts, so signed codes may be given as int8 or their uint8 view.
    """
    codes = np.ascontiguousarray(values).reshape(-1).astype(np.uint8, casting="unsafe", copy=False)
    return _rs._pack_int4(codes)


def _unpack_int4(packed: Any, num_elements: int, signed: bool) -> np.ndarray:
    """Unpack ``num_elements`` 4-bit codes: int8 (sign-extended) if ``signed``, else uint8 (upstream's helper)."""
    return _rs._unpack_int4(np.ascontiguousarray(packed, dtype=np.uint8).reshape(-1), int(num_elements), bool(signed))


def _rebuild(*args: Any) -> "QuantizedTensor":
    """Unpickle a :class:`QuantizedTensor` (kept module-level so pickle can find it)."""
    return QuantizedTensor(*args)


class QuantizedTensor:
    """A tensor stored as packed 8-bit or 4-bit integer codes with affine metadata.

    Parameters
    ----------
    data : array-like of uint8
        The packed codes, in C order: one byte per element for 8-bit dtypes,
        two elements per byte for 4-bit ones (even index in the low nibble).
        Stored as a flat uint8 array (no copy when already one).
    scales : array-like of float
        Scales, one per tensor, channel or group; stored as float32.
    zero_points : array-like of float
        Zero points, as many as ``scales``; stored as float32.
    shape : sequence of int
        The logical (unpacked) shape.
    dtype_code : int
        One of ``QDTYPE_QINT8`` (16), ``QDTYPE_QUINT8`` (17), ``QDTYPE_QINT4``
        (18), ``QDTYPE_QUINT4`` (19).
    quant_scheme : int, default 0
        ``QUANT_PER_TENSOR`` (0), ``QUANT_PER_CHANNEL`` (1) or ``QUANT_PER_GROUP`` (2).
    group_size : int, default 0
        Elements per group for the per-group scheme.
    axis : int, default 0
        Channel axis for the per-channel scheme (0 otherwise).

    Raises
    ------
    ValueError
        If a code is unknown, ``scales`` and ``zero_points`` differ in length,
        or ``data`` does not hold exactly :attr:`nbytes` bytes.
    """

    __slots__ = ("data", "scales", "zero_points", "shape", "dtype_code", "quant_scheme", "group_size", "axis")
    __hash__ = None  # type: ignore[assignment]  # mutable arrays inside: not hashable

    def __init__(
        self,
        data: Any,
        scales: Any,
        zero_points: Any,
        shape: Sequence[int],
        dtype_code: int,
        quant_scheme: int = QUANT_PER_TENSOR,
        group_size: int = 0,
        axis: int = 0,
    ) -> None:
        dtype_code = int(dtype_code)
        quant_scheme = int(quant_scheme)
        if dtype_code not in _QDTYPE_NAME:
            raise ValueError(f"unknown quantized dtype code {dtype_code}; valid codes are {sorted(_QDTYPE_NAME)}")
        if quant_scheme not in _SCHEME_NAME:
            raise ValueError(f"unknown quantization scheme code {quant_scheme}; valid codes are {sorted(_SCHEME_NAME)}")
        codes = np.asarray(data)
        if codes.dtype != np.uint8:
            if codes.dtype.itemsize != 1 or codes.dtype.kind not in "iub":
                raise ValueError(f"data must hold packed uint8 codes, got dtype {codes.dtype}")
            codes = codes.view(np.uint8)
        self.data: np.ndarray = codes.reshape(-1)
        self.scales: np.ndarray = np.asarray(scales, dtype=np.float32).reshape(-1)
        self.zero_points: np.ndarray = np.asarray(zero_points, dtype=np.float32).reshape(-1)
        self.shape: tuple[int, ...] = tuple(int(d) for d in shape)
        self.dtype_code: int = dtype_code
        self.quant_scheme: int = quant_scheme
        self.group_size: int = int(group_size)
        self.axis: int = int(axis)
        if self.scales.shape != self.zero_points.shape:
            raise ValueError(
                f"scales and zero_points must have the same length, got {self.scales.size} and {self.zero_points.size}"
            )
        if self.data.size != self.nbytes:
            raise ValueError(
                f"data holds {self.data.size} bytes but {self.dtype_name} codes of shape {self.shape} need {self.nbytes}"
            )

    @property
    def dtype_name(self) -> str:
        """The quantized dtype name: ``"qint8"``, ``"quint8"``, ``"qint4"`` or ``"quint4"``."""
        return _QDTYPE_NAME[self.dtype_code]

    @property
    def is_4bit(self) -> bool:
        """True for ``qint4``/``quint4``, whose codes are packed two per byte."""
        return self.dtype_code in (QDTYPE_QINT4, QDTYPE_QUINT4)

    @property
    def is_signed(self) -> bool:
        """True for ``qint8``/``qint4``, whose codes are two's complement."""
        return self.dtype_code in (QDTYPE_QINT8, QDTYPE_QINT4)

    @property
    def nbytes(self) -> int:
        """Size of the packed codes in bytes: ``N`` for 8-bit, ``ceil(N / 2)`` for 4-bit."""
        n = math.prod(self.shape)
        return (n + 1) // 2 if self.is_4bit else n

    @classmethod
    def quantize(
        cls,
        tensor: Any,
        dtype: str,
        scheme: str = "per_tensor",
        group_size: int = 0,
        axis: int = 0,
    ) -> "QuantizedTensor":
        """Quantize a float tensor with min/max affine quantization.

        >>> import numpy as np
        >>> q = QuantizedTensor.quantize(np.linspace(-1, 1, 8), "qint8")
        >>> q.dtype_name, q.nbytes, bool(np.abs(q.dequantize() - np.linspace(-1, 1, 8)).max() < 0.01)
        ('qint8', 8, True)

        For each tensor, channel or group, ``scale = (max - min) / (qmax - qmin)``
        and ``zero_point = qmin - min / scale`` (not clamped); a constant slice
        gets scale 1 and zero point 0. Codes are ``clip(round(x / scale +
        zero_point), qmin, qmax)``.

        Parameters
        ----------
        tensor : array-like
            Values to quantize; converted to float32.
        dtype : str
            ``"qint8"``, ``"quint8"``, ``"qint4"`` or ``"quint4"``.
        scheme : str, default "per_tensor"
            ``"per_tensor"``, ``"per_channel"`` or ``"per_group"``.
        group_size : int, default 0
            Elements per group; must be positive for ``"per_group"``. Recorded
            as given for the other schemes.
        axis : int, default 0
            Channel axis for ``"per_channel"``; negative values count from the
            end and are stored normalised. Ignored (stored as 0) otherwise.

        Returns
        -------
        QuantizedTensor
            The packed codes with their scales and zero points.

        Raises
        ------
        tenso.errors.TensoUnknownNameError
            If ``dtype`` or ``scheme`` is not a valid name (both a ``ValueError``
            and a ``KeyError``).
        ValueError
            If ``group_size`` is not positive for ``"per_group"``, or ``axis``
            is out of range for ``"per_channel"``.
        """
        if dtype not in _QDTYPE_BY_NAME:
            raise TensoUnknownNameError(
                f"unknown quantized dtype {dtype!r}; valid names are {', '.join(_QDTYPE_BY_NAME)}"
            )
        if scheme not in _SCHEME_BY_NAME:
            raise TensoUnknownNameError(
                f"unknown quantization scheme {scheme!r}; valid names are {', '.join(_SCHEME_BY_NAME)}"
            )
        qdtype_code = _QDTYPE_BY_NAME[dtype]
        scheme_code = _SCHEME_BY_NAME[scheme]
        values = np.ascontiguousarray(tensor, dtype=np.float32)
        group_size = int(group_size)
        if group_size < 0:
            raise ValueError(f"group_size must not be negative, got {group_size}")
        if scheme_code == QUANT_PER_GROUP and group_size == 0:
            raise ValueError("group_size must be > 0 for the per_group scheme")
        if scheme_code == QUANT_PER_CHANNEL:
            ndim = values.ndim
            axis = int(axis)
            if ndim == 0:
                raise ValueError("the per_channel scheme needs a tensor with at least one dimension")
            if not -ndim <= axis < ndim:
                raise ValueError(f"axis {axis} is out of range for a tensor with {ndim} dimensions")
            axis %= ndim
        else:
            axis = 0
        codes, scales, zero_points = _rs._quantize(values, qdtype_code, scheme_code, group_size, axis)
        return cls(codes, scales, zero_points, values.shape, qdtype_code, scheme_code, group_size, axis)

    def dequantize(self) -> np.ndarray:
        """Reconstruct a float32 approximation of the original tensor.

        Returns
        -------
        numpy.ndarray
            A new float32 array of shape :attr:`shape`.

        Raises
        ------
        tenso.TensoFormatError
            If the metadata is inconsistent (wrong number of scales for the
            scheme, bad group size or axis).
        """
        out = _rs._dequantize(
            self.data,
            self.scales,
            self.zero_points,
            self.shape,
            self.dtype_code,
            self.quant_scheme,
            self.group_size,
            self.axis,
        )
        return out if out.shape == self.shape else out.reshape(self.shape)

    def __repr__(self) -> str:
        return (
            f"QuantizedTensor(dtype={self.dtype_name}, shape={self.shape}, "
            f"scheme={_SCHEME_NAME[self.quant_scheme]}, group_size={self.group_size}, "
            f"axis={self.axis}, nbytes={self.nbytes})"
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, QuantizedTensor):
            return NotImplemented
        return (
            self.shape == other.shape
            and self.dtype_code == other.dtype_code
            and self.quant_scheme == other.quant_scheme
            and self.group_size == other.group_size
            and self.axis == other.axis
            and np.array_equal(self.data, other.data)
            and np.array_equal(self.scales, other.scales)
            and np.array_equal(self.zero_points, other.zero_points)
        )

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (
            _rebuild,
            (
                self.data,
                self.scales,
                self.zero_points,
                self.shape,
                self.dtype_code,
                self.quant_scheme,
                self.group_size,
                self.axis,
            ),
        )
