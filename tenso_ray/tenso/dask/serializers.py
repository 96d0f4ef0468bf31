"""The serializers registered with Dask: NumPy arrays, torch CPU tensors and tenso's own types (one packet), each
through a lease for a proven same-host peer and Dask's own serializer otherwise."""

from __future__ import annotations

import pickle
from typing import Any, Literal, Optional

import numpy as np
from dask.utils import has_keyword

from ..errors import TensoError
from . import leases, state
from .state import _MISSING, _State

_saved: dict[tuple[str, type], Any] = {}  # (dispatcher name, type) -> what our registration replaced
_saved_lazy: dict[tuple[str, str], Any] = {}  # (dispatcher name, toplevel module) -> the lazy hook we wrapped


def _dtype_desc(dtype: np.dtype) -> Any:
    if dtype.kind in "biufcmM" and dtype.fields is None and type(dtype).__module__.startswith("numpy"):
        return dtype.str
    return pickle.dumps(dtype)  # ml_dtypes, structured and other custom dtypes (Dask pickles them too)


def _dtype_from(desc: Any) -> np.dtype:
    if isinstance(desc, str):
        return np.dtype(desc)
    dtype = pickle.loads(desc)
    if not isinstance(dtype, np.dtype):
        raise TensoError("tenso.dask: malformed dtype in header")
    return dtype


def _previous(kind: str, cls: type) -> Any:
    fn = _saved.get((kind, cls), _MISSING)
    if fn is _MISSING or fn is None:
        return None
    return fn


_resolved: dict[tuple[str, type], Any] = {}  # (kind, cls) -> (Dask's function, whether it takes context) or None


def _resolve(kind: str, cls: type) -> Any:
    # Every small array goes through here: resolve what our registration replaced once per registration (cleared
    # by _uninstall_dispatch), not per call; has_keyword is inspect.signature, ~10 us.
    fn = _previous(kind, cls)
    found = None if fn is None else (fn, kind == "ser" and bool(has_keyword(fn, "context")))
    _resolved[(kind, cls)] = found
    return found


def _default_dumps(cls: type, x: Any, context: Optional[dict[str, Any]]) -> tuple[dict[str, Any], list[Any]]:
    found = _resolved.get(("ser", cls)) or _resolve("ser", cls)
    if found is None:
        raise NotImplementedError(cls.__name__)  # Dask moves on to pickle
    fn, wants = found
    return fn(x, context=context) if wants else fn(x)


def _default_loads(cls: type, header: dict[str, Any], frames: list[Any]) -> Any:
    found = _resolved.get(("de", cls)) or _resolve("de", cls)
    if found is None:
        raise TensoError(f"tenso.dask: no deserializer for {cls.__name__} payloads without a tenso header")
    return found[0](header, frames)


def _send_ndarray(st: _State, x: np.ndarray) -> Optional[dict[str, Any]]:
    order: Literal["C", "F"] = "F" if x.flags.f_contiguous and not x.flags.c_contiguous else "C"
    dtype = x.dtype
    shape = x.shape
    lease = None
    if x.flags.c_contiguous or x.flags.f_contiguous:
        lease = leases._lease_forward(st, x)  # an array that arrived through the pool goes on by reference

    def fill(body: np.ndarray) -> None:
        dst = body.view(dtype).reshape(shape, order=order)
        np.copyto(dst, x, casting="no")

    if lease is None:
        lease = leases._lease_send(st, x.nbytes, fill)
    if lease is None:
        return None
    lease.update(dtype=_dtype_desc(dtype), shape=list(shape), order=order, w=bool(x.flags.writeable))
    return lease


def _receive_ndarray(h: dict[str, Any]) -> np.ndarray:
    dtype = _dtype_from(h["dtype"])
    shape = tuple(int(s) for s in h["shape"])
    writeable = bool(h.get("w", True))
    body = leases._lease_receive(h, writeable=writeable)
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if count * dtype.itemsize != body.nbytes:
        raise TensoError("tenso.dask: lease size does not match shape and dtype")
    out = body.view(dtype).reshape(shape, order="F" if h.get("order") == "F" else "C")
    if not writeable:
        out.flags.writeable = False
    return out


def _lease_ok(st: Optional[_State], x: np.ndarray, context: Optional[dict[str, Any]]) -> bool:
    return (
        st is not None
        and x.nbytes >= st.min_bytes
        and not x.dtype.hasobject
        and x.dtype.itemsize > 0
        and leases._peer_ok(st, context)
    )


def _serialize_ndarray(x: np.ndarray, context: Optional[dict[str, Any]] = None) -> tuple[dict[str, Any], list[Any]]:
    st = state._state
    if st is not None and _lease_ok(st, x, context):
        lease = _send_ndarray(st, x)
        if lease is not None:
            return {"tenso": lease}, []
    if context:
        state._counts["frames_sent"] += 1
    return _default_dumps(np.ndarray, x, context)


def _deserialize_ndarray(header: dict[str, Any], frames: list[Any]) -> np.ndarray:
    lease = header.get("tenso")
    if lease is None:
        return _default_loads(np.ndarray, header, frames)
    return _receive_ndarray(lease)


# ---------------------------------------------------------------------------------------------------------------
# torch
# ---------------------------------------------------------------------------------------------------------------
def _serialize_tensor(t: Any, context: Optional[dict[str, Any]] = None) -> tuple[dict[str, Any], list[Any]]:
    import torch

    if (
        t.device.type != "cpu"
        or t.layout != torch.strided
        or t.is_quantized
        or t.grad is not None
        or t.is_conj()
        or t.is_neg()
    ):
        return _default_dumps(torch.Tensor, t, context)
    from ..frameworks import to_host

    host = to_host(t.detach())
    st = state._state
    if st is not None and _lease_ok(st, host, context):
        lease = _send_ndarray(st, host)
        if lease is not None:
            return {"tenso-torch": {"rg": bool(t.requires_grad), "lease": lease}}, []
    if context:
        state._counts["frames_sent"] += 1
    sub, frames = _default_dumps(np.ndarray, host, None)
    return {"tenso-torch": {"rg": bool(t.requires_grad), "sub": sub}}, frames


def _deserialize_tensor(header: dict[str, Any], frames: list[Any]) -> Any:
    import torch

    info = header.get("tenso-torch")
    if info is None:
        return _default_loads(torch.Tensor, header, frames)
    from ..frameworks import from_host

    if "lease" in info:
        host = _receive_ndarray(info["lease"])
    else:
        host = _default_loads(np.ndarray, info["sub"], frames)
    t = from_host(host, "torch", zero_copy=True)
    if info.get("rg"):
        t.requires_grad_(True)
    return t


# ---------------------------------------------------------------------------------------------------------------
# tenso's own types: one tenso packet
# ---------------------------------------------------------------------------------------------------------------
def _packet_kind(x: Any) -> str:
    from ..ragged import RaggedArray, StringTensor

    if isinstance(x, StringTensor):
        return "strings"
    if isinstance(x, RaggedArray):
        return "ragged"
    return "tenso"


def _to_packet(kind: str, x: Any) -> Any:
    from ..core import dumps

    return x.dumps() if kind in ("strings", "ragged") else dumps(x)


def _from_packet(kind: str, data: Any) -> Any:
    from ..core import loads
    from ..ragged import RaggedArray, StringTensor

    if kind == "strings":
        return StringTensor.loads(data)
    if kind == "ragged":
        return RaggedArray.loads(data)
    return loads(data)


def _serialize_packet(x: Any, context: Optional[dict[str, Any]] = None) -> tuple[dict[str, Any], list[Any]]:
    kind = _packet_kind(x)
    packet = memoryview(_to_packet(kind, x)).cast("B")
    st = state._state
    if st is not None and packet.nbytes >= st.min_bytes and leases._peer_ok(st, context):

        def fill(body: np.ndarray) -> None:
            body[:] = np.frombuffer(packet, dtype=np.uint8)

        lease = leases._lease_send(st, packet.nbytes, fill)
        if lease is not None:
            return {"tenso-packet": {"kind": kind, "lease": lease}}, []
    if context:
        state._counts["frames_sent"] += 1
    return {"tenso-packet": {"kind": kind}}, [packet]


def _deserialize_packet(header: dict[str, Any], frames: list[Any]) -> Any:
    info = header.get("tenso-packet")
    if not isinstance(info, dict):
        raise TensoError("tenso.dask: malformed header for a tenso packet")
    kind = str(info.get("kind"))
    if "lease" in info:
        return _from_packet(kind, leases._lease_receive(info["lease"]))
    (frame,) = frames
    return _from_packet(kind, frame)


def _tenso_types() -> list[type]:
    from ..quantize import QuantizedTensor
    from ..ragged import RaggedArray, StringTensor

    return [QuantizedTensor, StringTensor, RaggedArray]

