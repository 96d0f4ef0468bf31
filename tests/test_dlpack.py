"""DLPack on the CPU: tenso.from_dlpack, DLPack producers given to the writers, and tenso views exported to torch/JAX.

What the installed versions do (also in tenso.frameworks' docstring): NumPy >= 2.1 exports read-only arrays only
through versioned capsules with READ_ONLY set; torch ignores that flag; NumPy's import knows no bfloat16/float8 type
code, which tenso.frameworks bridges by renaming the type code in the capsule (same bytes, zero-copy).
"""

from __future__ import annotations

import io

import numpy as np
import pytest

import tenso
from tenso import frameworks as fw

ml_dtypes = pytest.importorskip("ml_dtypes")
torch = pytest.importorskip("torch")

BUILTIN = ["bool", "uint8", "int8", "int16", "int32", "int64", "uint16", "uint32", "uint64",
           "float16", "float32", "float64", "complex64", "complex128"]
ML = ["bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz"]
# JAX without x64 narrows 64-bit types; these are the ones it keeps as is.
JAX_DTYPES = ["bool", "uint8", "int8", "int16", "int32", "uint16", "uint32", "float16", "float32", "complex64",
              "bfloat16", "float8_e4m3fn", "float8_e5m2"]


def _dtype(name: str) -> np.dtype:
    return np.dtype(getattr(ml_dtypes, name)) if name in ML else np.dtype(name)


def _sample(name: str, shape: tuple[int, ...] = (3, 5)) -> np.ndarray:
    dt = _dtype(name)
    n = int(np.prod(shape))
    if dt == np.bool_:
        return (np.arange(n) % 3 == 0).reshape(shape)
    raw = np.random.default_rng(7).integers(0, 256, n * dt.itemsize, dtype=np.uint8)
    if dt.kind in "fc" or name in ML:  # finite, non-NaN values so that == compares bits
        return (np.arange(n) % 11 - 5).astype(np.float32).astype(dt).reshape(shape)
    return raw.view(dt).reshape(shape)


def _bits(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a).tobytes()


def _ptr(a: np.ndarray) -> int:
    return int(a.__array_interface__["data"][0])


# ------------------------------------------------------------------------------------------------ numpy <-> torch
@pytest.mark.parametrize("name", BUILTIN + ML)
def test_numpy_torch_numpy_zero_copy(name):
    a = _sample(name)
    t = torch.from_dlpack(fw.to_dlpack(a))
    assert t.dtype == fw.torch_dtype_of(a.dtype)
    assert t.data_ptr() == _ptr(a)  # torch shares
    back = tenso.from_dlpack(t)
    assert back.dtype == a.dtype and back.shape == a.shape
    assert _ptr(back) == _ptr(a)  # and so does tenso.from_dlpack
    assert _bits(back) == _bits(a)


@pytest.mark.parametrize("name", BUILTIN + ML)
def test_from_dlpack_copy(name):
    t = torch.from_dlpack(fw.to_dlpack(_sample(name)))
    out = tenso.from_dlpack(t, copy=True)
    assert _ptr(out) != t.data_ptr() and out.flags.writeable
    assert _bits(out) == _bits(tenso.from_dlpack(t))


def test_strided_torch_view_kept():
    t = torch.arange(24, dtype=torch.bfloat16).reshape(4, 6)[:, ::2].t()
    a = tenso.from_dlpack(t)
    assert a.dtype == ml_dtypes.bfloat16 and a.shape == (3, 4)
    assert _ptr(a) == t.data_ptr()
    np.testing.assert_array_equal(a.astype(np.float32), t.float().numpy())


def test_from_dlpack_errors():
    with pytest.raises(TypeError, match="not a DLPack producer"):
        tenso.from_dlpack([1, 2, 3])

    class OnDevice:
        def __dlpack__(self, **kwargs):
            raise AssertionError("must not be exported")

        def __dlpack_device__(self):
            return (2, 1)  # kDLCUDA, device 1

    with pytest.raises(BufferError, match="cuda:1.*tenso.gpu"):
        tenso.from_dlpack(OnDevice())
    with pytest.raises(BufferError, match="tenso.gpu.write_from_device"):
        tenso.dumps(OnDevice())
    with pytest.raises(BufferError, match="tenso.gpu"):
        tenso.write_stream({"x": OnDevice()}, io.BytesIO())


# ------------------------------------------------------------------------------------------------ read-only
def test_readonly_view_exports_versioned_readonly():
    packet = bytes(tenso.dumps(np.arange(12, dtype=np.float32)))
    view = tenso.loads(packet)
    assert not view.flags.writeable
    # NumPy >= 2.1: read-only goes out only through a versioned capsule (READ_ONLY flag); legacy export refuses.
    with pytest.raises(BufferError):
        view.__dlpack__()
    assert "dltensor_versioned" in repr(view.__dlpack__(max_version=(1, 0)))
    again = np.from_dlpack(view)
    assert not again.flags.writeable and _ptr(again) == _ptr(view)
    shared = tenso.from_dlpack(view)
    assert not shared.flags.writeable and _ptr(shared) == _ptr(view)
    assert tenso.from_dlpack(view, copy=True).flags.writeable


def test_torch_ignores_readonly_so_from_host_copies():
    view = tenso.loads(bytes(tenso.dumps(np.arange(6, dtype=np.int32))))
    # torch imports the READ_ONLY capsule as a writable tensor over the same memory (documented hazard) ...
    t = torch.from_dlpack(view)
    assert t.data_ptr() == _ptr(view)
    # ... so tenso's own conversion hands torch a copy unless the caller opts into sharing.
    assert fw.from_host(view, "torch").data_ptr() != _ptr(view)
    assert fw.from_host(view, "torch", zero_copy=True).data_ptr() == _ptr(view)


@pytest.mark.parametrize("name", ["float32", "bfloat16"])
def test_readonly_ml_dtypes_export(name):
    a = _sample(name)
    a.flags.writeable = False
    back = tenso.from_dlpack(fw.to_dlpack(a))
    assert back.dtype == a.dtype and _ptr(back) == _ptr(a) and not back.flags.writeable


# ------------------------------------------------------------------------------------------------ writers
@pytest.mark.parametrize("name", BUILTIN + ["bfloat16"])  # the dtypes the wire format carries
def test_dumps_torch_equals_dumps_numpy(name, tmp_path):
    a = _sample(name)
    t = torch.from_dlpack(fw.to_dlpack(a))
    expected = bytes(tenso.dumps(a, check_integrity=True))
    assert bytes(tenso.dumps(t, check_integrity=True)) == expected
    sink = io.BytesIO()
    tenso.write_stream(t, sink, check_integrity=True)
    assert sink.getvalue() == expected
    path = tmp_path / "t.tnso"
    with open(path, "wb") as fp:
        tenso.dump(t, fp, check_integrity=True)
    assert path.read_bytes() == expected
    assert bytes(tenso.dumps({"w": t, "n": a})) == bytes(tenso.dumps({"w": a, "n": a}))


def test_dumps_strided_torch_gathers_like_numpy():
    t = torch.arange(40, dtype=torch.float32).reshape(5, 8)[1:, ::3]
    assert bytes(tenso.dumps(t)) == bytes(tenso.dumps(t.numpy()))
    with pytest.raises(ValueError):
        tenso.dumps(t, strict=True)


# ------------------------------------------------------------------------------------------------ JAX
@pytest.mark.parametrize("name", JAX_DTYPES)
def test_jax_round_trips(name):
    jax = pytest.importorskip("jax")
    jnp = pytest.importorskip("jax.numpy")
    a = np.ascontiguousarray(_sample(name, (8, 16)))  # 128+ byte rows: aligned for JAX's zero-copy import
    j = jnp.from_dlpack(fw.to_dlpack(a))
    assert j.dtype == a.dtype
    back = tenso.from_dlpack(j)  # JAX exports read-only
    assert back.dtype == a.dtype and _bits(back) == _bits(a) and not back.flags.writeable
    assert _ptr(back) == j.unsafe_buffer_pointer()  # zero-copy out of JAX
    if name not in ML[1:]:  # the wire format carries no float8
        assert bytes(tenso.dumps(j)) == bytes(tenso.dumps(a))
    # JAX -> torch -> numpy, all through DLPack
    t = torch.from_dlpack(j) if name not in ML else torch.from_dlpack(fw.to_dlpack(back))
    assert _bits(tenso.from_dlpack(t)) == _bits(a)
    del jax


def test_jax_zero_copy_import_of_aligned_numpy():
    jnp = pytest.importorskip("jax.numpy")
    packet = bytearray(tenso.dumps(np.arange(64, dtype=np.float32).reshape(8, 8)))
    a = tenso.loads(packet, copy=True)  # writable, in a 64-byte aligned buffer
    assert a.flags.writeable and _ptr(a) % 64 == 0
    j = jnp.from_dlpack(a)
    assert j.unsafe_buffer_pointer() == _ptr(a)
    np.testing.assert_array_equal(np.asarray(j), a)
    # JAX 0.10 asks only for the legacy capsule, which cannot say READ_ONLY: NumPy refuses read-only views then.
    # tenso.frameworks.from_host(view, "jax") is the way in for those (a copy).
    ro = tenso.loads(bytes(packet))
    with pytest.raises(BufferError, match="readonly"):
        jnp.from_dlpack(ro)
    np.testing.assert_array_equal(np.asarray(fw.from_host(ro, "jax")), ro)


def test_loads_round_trip_of_dlpack_dump():
    t = torch.randn(4, 4).to(torch.bfloat16)
    out = tenso.loads(tenso.dumps(t))
    assert out.dtype == ml_dtypes.bfloat16
    assert torch.equal(torch.from_dlpack(fw.to_dlpack(out)), t)


@pytest.mark.parametrize("name", ["float32", "bfloat16", "bool"])
def test_device_from_dlpack_hands_a_producer_to_each_framework(name):
    # What tenso.gpu does with its DeviceTensor, shown on host producers: the framework shares the producer's memory.
    a = np.arange(12).astype(ml_dtypes.bfloat16 if name == "bfloat16" else name).reshape(3, 4)
    t = fw.device_from_dlpack(fw.to_dlpack(a), "torch")
    assert t.data_ptr() == a.__array_interface__["data"][0] and tuple(t.shape) == (3, 4)
    assert str(t.dtype) == f"torch.{name}"
    jax = pytest.importorskip("jax")
    j = fw.device_from_dlpack(fw.to_dlpack(a), "jax")
    assert isinstance(j, jax.Array) and j.dtype == a.dtype
    np.testing.assert_array_equal(np.asarray(j), a)
    with pytest.raises(ValueError, match="Unsupported device framework"):
        fw.device_from_dlpack(a, "mxnet")
