"""Registration in Dask's dispatch tables: what ``register()`` puts in ``dask_serialize`` / ``dask_deserialize``,
and how ``unregister()`` puts back exactly what it replaced (Dask's lazy NumPy and torch registrations included)."""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
from distributed.protocol.serialize import dask_deserialize, dask_serialize

from . import state
from .serializers import (
    _deserialize_ndarray,
    _deserialize_packet,
    _deserialize_tensor,
    _resolved,
    _saved,
    _saved_lazy,
    _serialize_ndarray,
    _serialize_packet,
    _serialize_tensor,
    _tenso_types,
)
from .state import _MISSING

_DISPATCH = {"ser": dask_serialize, "de": dask_deserialize}


def _ours() -> set[Any]:
    return {
        _serialize_ndarray,
        _deserialize_ndarray,
        _serialize_tensor,
        _deserialize_tensor,
        _serialize_packet,
        _deserialize_packet,
    }


def _set(kind: str, cls: type, fn: Any) -> None:
    table = _DISPATCH[kind]._lookup
    current = table.get(cls, _MISSING)
    if current not in _ours() and (kind, cls) not in _saved:
        _saved[(kind, cls)] = current
    table[cls] = fn


def _register_torch(kind: str) -> None:
    import torch

    _set(kind, torch.Tensor, _serialize_tensor if kind == "ser" else _deserialize_tensor)


class _LazyTorch:
    """Wraps Dask's lazy ``torch`` hook: runs it, then puts our torch registration over it."""

    def __init__(self, kind: str, original: Any) -> None:
        self.kind = kind
        self.original = original

    def __call__(self) -> None:
        if self.original is not None:
            self.original()  # imports distributed.protocol.torch, which registers both of Dask's torch functions
        if state._state is not None:
            _register_torch("ser")
            _register_torch("de")


def _install_dispatch() -> None:
    # Dask registers NumPy's serializers lazily, the first time a NumPy type is dispatched, and that registration
    # would overwrite ours: run it first.
    for kind, disp in _DISPATCH.items():
        disp.dispatch(np.ndarray)
        _set(kind, np.ndarray, _serialize_ndarray if kind == "ser" else _deserialize_ndarray)
        for cls in _tenso_types():
            _set(kind, cls, _serialize_packet if kind == "ser" else _deserialize_packet)
        if "torch" in sys.modules:
            import torch

            disp.dispatch(torch.Tensor)  # runs Dask's lazy torch registration, if still pending
            _register_torch(kind)
        else:
            current = disp._lazy.get("torch")
            if not isinstance(current, _LazyTorch):
                _saved_lazy[(kind, "torch")] = current
                disp._lazy["torch"] = _LazyTorch(kind, current)


def _uninstall_dispatch() -> None:
    ours = _ours()
    for kind, disp in _DISPATCH.items():
        table = disp._lookup
        for cls in list(table):
            if table[cls] in ours:
                previous = _saved.get((kind, cls), _MISSING)
                if previous is _MISSING:
                    del table[cls]  # a subclass lookup Dask cached from our entry, or a type we added
                else:
                    table[cls] = previous
        lazy = disp._lazy.get("torch")
        if isinstance(lazy, _LazyTorch):
            original = _saved_lazy.get((kind, "torch"))
            if original is None:
                disp._lazy.pop("torch", None)
            else:
                disp._lazy["torch"] = original
        _saved_lazy.pop((kind, "torch"), None)
    # A saved entry that was missing is dropped above; keep nothing between registrations.
    _saved.clear()
    _resolved.clear()

