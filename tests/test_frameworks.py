"""tenso.frameworks: host arrays to and from torch / JAX / CuPy, every dtype, zero-copy where promised; tenso.gpu
without CUDA."""

from __future__ import annotations

import collections
import io
import subprocess
import sys
import warnings

import numpy as np
import pytest

import tenso
import tenso.gpu
from tenso import frameworks as fw

ml_dtypes = pytest.importorskip("ml_dtypes")

try:
    import torch
except ImportError:  # pragma: no cover - torch is a test dependency, but heavy
    torch = None
try:
    import jax
    import jax.numpy as jnp
except ImportError:  # pragma: no cover
    jax = jnp = None

needs_torch = pytest.mark.skipif(torch is None, reason="PyTorch is not installed")
needs_jax = pytest.mark.skipif(jax is None, reason="JAX is not installed")
no_torch_cuda = pytest.mark.skipif(
    torch is not None and torch.cuda.is_available(), reason="this machine has CUDA: the no-CUDA errors cannot occur"
)

BUILTIN = ["bool", "uint8", "int8", "int16", "int32", "int64", "uint16", "uint32", "uint64",
           "float16", "float32", "float64", "complex64", "complex128"]
ML = ["bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu",
      "complex32", "bcomplex32"]
ALL = BUILTIN + [name for name in ML if hasattr(ml_dtypes, name)]


def _dtype(name: str) -> np.dtype:
    return np.dtype(getattr(ml_dtypes, name)) if name in ML else np.dtype(name)


def _sample(name: str, shape=(3, 4)) -> np.ndarray:
    n = int(np.prod(shape))
    values = (np.arange(n) % 5 + 1).reshape(shape)  # small positive values: exact in every float8 and e8m0
    if name == "bool":
        return (values % 2).astype(bool)
    if "complex" in name:
        return (values + 1j * values).astype(_dtype(name))
    return values.astype(_dtype(name))


def _bytes(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a).tobytes()


def _ptr(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


# --- torch ----------------------------------------------------------------------------------------------------------


@needs_torch
@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("zero_copy", [True, False], ids=["shared", "copied"])
def test_torch_round_trip_every_dtype(name, zero_copy):
    a = _sample(name)
    t = fw.from_host(a, "torch", zero_copy=zero_copy)
    assert isinstance(t, torch.Tensor) and t.dtype == fw.torch_dtype_of(a.dtype) and tuple(t.shape) == a.shape
    assert (t.data_ptr() == _ptr(a)) is zero_copy
    back = fw.to_host(t)
    assert type(back) is np.ndarray and back.dtype == a.dtype and back.shape == a.shape
    assert _bytes(back) == _bytes(a)
    assert _ptr(back) == t.data_ptr()  # a CPU tensor comes home as a view of its memory


@needs_torch
@pytest.mark.parametrize("name", ["float32", "bfloat16", "float8_e4m3fn", "complex64", "bool"])
@pytest.mark.parametrize("zero_copy", [True, False], ids=["shared", "copied"])
def test_torch_strided_zero_d_and_empty(name, zero_copy):
    base = _sample(name, (4, 6))
    for a in (base[:, ::2], base.T, base[1:, 2:], base[::-1], np.array(base[0, 0]), base[:0]):
        t = fw.from_host(a, "torch", zero_copy=zero_copy)
        assert tuple(t.shape) == a.shape and t.dtype == fw.torch_dtype_of(a.dtype)
        back = fw.to_host(t)
        assert back.dtype == a.dtype and _bytes(back) == _bytes(a)
        if a.size and zero_copy and all(s >= 0 for s in a.strides):
            assert t.data_ptr() == _ptr(a)  # shared, strides kept
            assert back.strides == a.strides
        elif a.size and not zero_copy:
            assert t.data_ptr() != _ptr(a)


@needs_torch
def test_torch_copy_is_private_and_share_writes_through():
    a = np.arange(6, dtype=np.float32)
    fw.from_host(a, "torch").add_(1)
    assert a[0] == 0
    fw.from_host(a, "torch", zero_copy=True).add_(1)
    assert a[0] == 1
    b = np.ones(4, ml_dtypes.bfloat16)
    fw.from_host(b, "torch", zero_copy=True).mul_(3)
    assert float(b[0]) == 3.0


@needs_torch
def test_torch_values_not_just_bytes():
    a = np.array([1.5, -2.25, 3.0], dtype=ml_dtypes.bfloat16)
    t = fw.from_host(a, "torch")
    assert t.dtype == torch.bfloat16 and t.float().tolist() == [1.5, -2.25, 3.0]
    f8 = torch.tensor([0.5, 2.0, -4.0]).to(torch.float8_e4m3fn)
    h = fw.to_host(f8)
    assert h.dtype == np.dtype(ml_dtypes.float8_e4m3fn) and h.astype(np.float32).tolist() == [0.5, 2.0, -4.0]
    big_endian = np.arange(4, dtype=">i4")  # frameworks are native-endian: converted, values kept
    assert fw.from_host(big_endian, "torch", zero_copy=True).tolist() == [0, 1, 2, 3]


@needs_torch
def test_torch_tensors_with_lazy_bits_and_grad():
    conj = torch.tensor([1 + 2j, 3 - 1j], dtype=torch.complex64).conj()
    assert fw.to_host(conj).tolist() == [1 - 2j, 3 + 1j]
    neg = torch.tensor([1.0, 2.0])._neg_view()
    assert fw.to_host(neg).tolist() == [-1.0, -2.0]
    p = torch.nn.Parameter(torch.ones(3, dtype=torch.bfloat16))
    h = fw.to_host(p)
    assert h.dtype == np.dtype(ml_dtypes.bfloat16) and _ptr(h) == p.data_ptr()
    with pytest.raises(TypeError, match="sparse"):
        fw.to_host(torch.eye(3).to_sparse())


@needs_torch
def test_read_only_array_shared_into_torch_warns_nothing():
    # torch warns once per process when it first shares a non-writable array: check in a fresh process, with every
    # warning an error, that none leaks out of from_host (shared and copied, C-order and strided, ml_dtypes) nor
    # out of the byte path the Ray plug-in uses.
    code = (
        "import numpy as np, ml_dtypes, torch\n"
        "from tenso import frameworks as fw\n"
        "for dt in (np.float32, ml_dtypes.bfloat16):\n"
        "    a = np.arange(12).astype(dt).reshape(3, 4); a.flags.writeable = False\n"
        "    for v in (a, a[:, ::2]):\n"
        "        for zc in (True, False):\n"
        "            t = fw.from_host(v, 'torch', zero_copy=zc)\n"
        "            assert (t.data_ptr() == v.__array_interface__['data'][0]) is zc, (dt, zc)\n"
        "t = fw.torch_from_bytes(bytes(8), 'bfloat16', (4,), 'cpu', True)\n"
        "t = fw.torch_from_bytes(memoryview(bytes(8)), torch.float32, (2,))\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


@needs_torch
def test_dtype_maps():
    for name in ALL:
        tdtype = fw.torch_dtype_of(_dtype(name))
        assert tdtype == getattr(torch, name) and tdtype.itemsize == _dtype(name).itemsize
        assert fw.numpy_dtype_of(tdtype) == _dtype(name)
    for bad in (np.dtype(object), np.dtype("U3"), np.dtype("M8[D]"), np.dtype([("a", "<i4")]), np.dtype(">f4"),
                np.dtype(ml_dtypes.int4), np.dtype(np.longdouble)):
        with pytest.raises(TypeError):
            fw.torch_dtype_of(bad)
    for bad in (torch.qint8, torch.quint4x2):
        with pytest.raises(TypeError):
            fw.numpy_dtype_of(bad)


@needs_torch
def test_torch_bytes_need_no_ml_dtypes(monkeypatch):
    t = torch.arange(6, dtype=torch.float32).to(torch.bfloat16).reshape(2, 3)
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)
    body = fw.torch_bytes(t.T)  # gathered into C order
    assert body.dtype == np.uint8 and body.nbytes == 12
    back = fw.torch_from_bytes(body, "bfloat16", (3, 2))
    assert torch.equal(back, t.T)
    contiguous = fw.torch_bytes(t)
    assert _ptr(contiguous) == t.data_ptr()  # no copy for a contiguous CPU tensor
    assert fw.torch_from_bytes(b"", torch.bfloat16, (0, 4)).shape == (0, 4)
    with pytest.raises(ValueError, match="cannot hold"):
        fw.torch_from_bytes(bytes(10), "bfloat16", (3, 2))
    with pytest.raises(TypeError, match="not a torch dtype"):
        fw.torch_from_bytes(bytes(4), "Tensor", (1,))
    with pytest.raises(ImportError, match=r"tenso-ray\[bfloat16\]"):
        fw.to_host(t)


# --- JAX ------------------------------------------------------------------------------------------------------------


def _jax_keeps(name: str) -> bool:
    # Without jax_enable_x64, JAX narrows 64-bit types to 32 bits (its rule, for every input); complex32 has no JAX type.
    if name in ("complex32", "bcomplex32"):
        return False
    return bool(jax.config.jax_enable_x64) or _dtype(name).itemsize < 8 and name != "complex128"


@needs_jax
@pytest.mark.parametrize("name", [n for n in ALL if n not in ("complex32", "bcomplex32")])
def test_jax_round_trip_every_dtype(name):
    a = _sample(name)
    x = fw.from_host(a, "jax")
    assert isinstance(x, jax.Array) and x.shape == a.shape
    back = fw.to_host(x)
    assert type(back) is np.ndarray
    if _jax_keeps(name):
        assert x.dtype == a.dtype and back.dtype == a.dtype and _bytes(back) == _bytes(a)
    else:
        np.testing.assert_array_equal(back, a.astype(back.dtype))


@needs_jax
def test_jax_zero_copy_and_devices():
    from tenso.tenso_rs import _owned_copy

    a = _owned_copy(np.arange(64, dtype=np.float32).view(np.uint8)).view(np.float32)  # 64-byte aligned
    shared = fw.from_host(a, "jax", zero_copy=True)
    copied = fw.from_host(a, "jax:cpu")
    assert copied.unsafe_buffer_pointer() != _ptr(a)  # a JAX array must not see later writes unless asked
    a[0] = 42
    assert float(copied[0]) == 0.0
    assert shared.unsafe_buffer_pointer() == _ptr(a)  # CPU JAX aliases aligned memory when allowed
    assert fw.from_host(a, "jax:0").devices() == {jax.devices()[0]}
    bf = jnp.arange(6, dtype=jnp.bfloat16)
    assert fw.to_host(bf).dtype == np.dtype(ml_dtypes.bfloat16)
    with pytest.raises(RuntimeError, match="does not exist"):
        fw.from_host(a, f"jax:{len(jax.devices())}")


# --- numpy, nesting, devices ----------------------------------------------------------------------------------------


def test_numpy_device_and_passthrough():
    a = np.arange(4)
    assert fw.from_host(a, "numpy", zero_copy=True) is a
    c = fw.from_host(a, "numpy")
    assert _ptr(c) != _ptr(a) and np.array_equal(c, a)
    for other in (a, 3, "x", None, [a], np.float32(2)):
        assert fw.to_host(other) is other
    assert not fw.is_tensor(a)
    with pytest.raises(TypeError):
        fw.from_host([1, 2], "numpy")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="object"):
        fw.from_host(np.array([None]), "torch")


def test_map_arrays_nested():
    Point = collections.namedtuple("Point", "x y")
    a, b = np.ones(2), np.zeros(3)
    tree = collections.OrderedDict(
        [("z", a), ("a", [b, (a, "keep", 3)]), ("p", Point(a, None)), ("n", {"deep": [[b]]})]
    )
    out = fw.map_arrays(tree, lambda x: x.size)
    assert out == {"z": 2, "a": [3, (2, "keep", 3)], "p": Point(2, None), "n": {"deep": [[3]]}}
    assert list(out) == ["z", "a", "p", "n"] and type(out) is dict and type(out["p"]) is Point
    assert type(out["a"][1]) is tuple
    assert fw.map_arrays(5, lambda x: 0) == 5


@needs_torch
def test_map_arrays_tensors_and_to_host_tree():
    tree = {"w": torch.ones(2, dtype=torch.bfloat16), "b": [torch.zeros(1), np.ones(1)], "s": "name"}
    assert fw.map_arrays(tree, lambda x: "seen")["w"] is tree["w"]  # tensors are leaves only when asked
    host = fw.map_arrays(tree, fw.to_host, tensors=True)
    assert host["w"].dtype == np.dtype(ml_dtypes.bfloat16) and type(host["b"][0]) is np.ndarray
    assert host["b"][1] is tree["b"][1] and host["s"] == "name"
    back = fw.map_arrays(host, lambda x: fw.from_host(x, "torch"))
    assert back["w"].dtype == torch.bfloat16 and fw.is_tensor(back["b"][0])


@pytest.mark.parametrize(
    "device",
    ["tensorflow", "", "torch:tpu", "torch:cuda:x", "torch:cuda:0:1", "numpy:cuda", "cupy:a", "jax:cuda:-1", "cuda"],
)
def test_unknown_device_is_value_error(device):
    with pytest.raises(ValueError, match="Unsupported device framework"):
        fw.from_host(np.ones(2), device)
    with pytest.raises(ValueError, match="Unsupported device framework"):
        fw.check_device(device)


def test_device_names_are_case_insensitive():
    assert fw.from_host(np.ones(2), "NumPy").shape == (2,)
    if torch is not None:
        assert isinstance(fw.from_host(np.ones(2), "Torch:CPU"), torch.Tensor)


@needs_torch
@no_torch_cuda
@pytest.mark.parametrize("device", ["torch:cuda", "torch:cuda:0", "torch:cuda:3"])
def test_torch_cuda_without_cuda_is_runtime_error(device):
    with pytest.raises(RuntimeError, match="needs a CUDA GPU") as info:
        fw.from_host(np.ones(2, ml_dtypes.bfloat16), device)
    assert "PyTorch" in str(info.value)
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        fw.check_device(device)
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        fw.torch_from_bytes(bytes(4), "float32", (1,), "cuda:0")


@needs_jax
def test_jax_cuda_without_cuda_is_runtime_error():
    try:
        jax.devices("cuda")
    except RuntimeError:
        pass
    else:  # pragma: no cover
        pytest.skip("JAX has a CUDA backend here")
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        fw.from_host(np.ones(2), "jax:cuda:0")


def test_cupy_missing_or_without_cuda():
    try:
        import cupy  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="CuPy|cupy"):
            fw.from_host(np.ones(2), "cupy:0")
    else:  # pragma: no cover - CuPy installs only where CUDA is
        if not tenso.gpu.available():
            with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
                fw.from_host(np.ones(2), "cupy:0")


@pytest.mark.parametrize("device,extra", [("torch", "torch"), ("torch:cuda:0", "torch"), ("jax", "jax")])
def test_missing_framework_names_the_extra(monkeypatch, device, extra):
    monkeypatch.setitem(sys.modules, extra, None)
    with pytest.raises(ImportError, match=rf"tenso-ray\[{extra}\]"):
        fw.from_host(np.ones(2), device)


# --- TensoCache conversions (the two functions of cache.py that delegate here) --------------------------------------


@needs_torch
def test_cache_device_conversion_uses_frameworks():
    from tenso.cache import TensoCache

    with TensoCache("4MB") as cache:
        cache.put("bf", np.arange(6, dtype=np.float32).astype(ml_dtypes.bfloat16))
        t = cache.get("bf", device="torch")  # bfloat16 reaches torch through a byte view
        assert t.dtype == torch.bfloat16 and t.float().tolist() == list(range(6))
        t.add_(1)  # the cache's own copy: the pool is untouched
        assert float(cache.get("bf")[0]) == 0.0
        cache.put("tree", {"a": torch.ones(2, dtype=torch.bfloat16), "b": torch.arange(3)})
        got = cache.get("tree", copy=True)
        assert got["a"].dtype == np.dtype(ml_dtypes.bfloat16) and got["b"].tolist() == [0, 1, 2]
        tensors = cache.get("tree", device="torch")
        assert tensors["a"].dtype == torch.bfloat16 and tensors["b"].tolist() == [0, 1, 2]
        if jax is not None:
            assert cache.get("bf", device="jax").dtype == jnp.bfloat16
        with pytest.raises(ValueError, match="Unsupported device framework"):
            cache.get("bf", device="torch:tpu")


# --- tenso.gpu without CUDA -----------------------------------------------------------------------------------------


def test_gpu_imports_with_nothing_installed():
    code = (
        "import sys\n"
        "for m in ('torch', 'jax', 'cupy', 'ml_dtypes'): sys.modules[m] = None\n"
        "import tenso.gpu, tenso.frameworks\n"
        "assert isinstance(tenso.gpu.available(), bool)\n"
        "print(sorted(m for m in ('torch', 'jax', 'cupy', 'ml_dtypes') if sys.modules.get(m) is not None))\n"
    )
    done = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr


@pytest.fixture
def no_cuda():
    if tenso.gpu.available():  # pragma: no cover
        pytest.skip("this machine has a CUDA GPU")


def test_gpu_without_cuda_raises_after_checking_the_packet(no_cuda):
    # Issue #18: the packet is read and checked first (a bad one is a ValueError on any machine), then the missing
    # GPU is reported; host arrays are written without one.
    packet = bytes(tenso.dumps(np.arange(4, dtype=np.float32)))
    stream = io.BytesIO(packet)
    with pytest.raises(RuntimeError, match=r"read_to_device needs a CUDA GPU: .*(driver|device)"):
        tenso.gpu.read_to_device(stream, 0)
    assert stream.tell() == len(packet)  # exactly the packet was read
    out = io.BytesIO()
    assert tenso.gpu.write_from_device(np.ones(3), out) == len(out.getvalue()) > 0
    assert tenso.read_to_device is tenso.gpu.read_to_device


@needs_torch
@no_torch_cuda
def test_gpu_names_the_framework_without_cuda(monkeypatch):
    # A machine with an NVIDIA driver but a PyTorch without CUDA: the error names PyTorch, the stream stays unread.
    monkeypatch.setattr(tenso.gpu, "_cuda_problem", lambda: None)
    stream = io.BytesIO(bytes(tenso.dumps(np.ones(3, ml_dtypes.bfloat16))))
    with pytest.raises(RuntimeError, match="PyTorch .* CUDA"):
        tenso.gpu.read_to_device(stream, 0, framework="torch")
    assert stream.tell() == 0
    with pytest.raises(ValueError, match="framework"):
        tenso.gpu.read_to_device(stream, 0, framework="tensorflow")
    with pytest.raises(ValueError, match="device_id"):
        tenso.gpu.read_to_device(stream, -1, framework="torch")
    # write_from_device with the driver present takes host and CPU tensors alike (bfloat16 through ml_dtypes).
    out = io.BytesIO()
    tree = {"w": torch.arange(4, dtype=torch.float32).to(torch.bfloat16), "n": np.ones(2)}
    n = tenso.gpu.write_from_device(tree, out, check_integrity=True)
    assert n == len(out.getvalue())
    got = tenso.loads(out.getvalue())
    assert got["w"].dtype == np.dtype(ml_dtypes.bfloat16) and got["w"].astype(np.float32).tolist() == [0, 1, 2, 3]


def test_gpu_problem_is_specific(no_cuda):
    problem = tenso.gpu._cuda_problem()
    assert problem is not None and ("libcuda" in problem or "no CUDA device" in problem or "cuInit" in problem)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tenso.gpu.available() is False


# --- property: any dtype, shape and layout ----------------------------------------------------------------------------

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import example, given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@st.composite
def _layouts(draw):
    name = draw(st.sampled_from(ALL))
    shape = tuple(draw(st.lists(st.integers(0, 5), max_size=3)))
    raw = draw(st.binary(min_size=int(np.prod(shape)) * _dtype(name).itemsize,
                         max_size=int(np.prod(shape)) * _dtype(name).itemsize))
    a = np.frombuffer(raw, dtype=np.uint8).view(_dtype(name)).reshape(shape).copy()
    if name == "bool":
        a = np.asarray(a.view(np.uint8) % 2 == 1)  # only 0 and 1 are bools
    for axis in range(a.ndim):
        step = draw(st.sampled_from([1, 2, -1, -2]))
        a = a[(slice(None),) * axis + (slice(None, None, step),)]
    if a.ndim > 1 and draw(st.booleans()):
        a = a.T
    if draw(st.booleans()):
        a.flags.writeable = False
    return a


@needs_torch
@given(a=_layouts(), zero_copy=st.booleans())
@example(a=np.array([False])[::-1], zero_copy=True)  # C-contiguous with a negative stride (length-1 axis)
def test_torch_round_trip_any_layout(a, zero_copy):
    t = fw.from_host(a, "torch", zero_copy=zero_copy)
    assert tuple(t.shape) == a.shape and t.dtype == fw.torch_dtype_of(a.dtype)
    back = fw.to_host(t)
    assert back.dtype == a.dtype and _bytes(back) == _bytes(a)  # bit-exact: NaN payloads kept, no float cast
    if a.size:
        shared = t.data_ptr() == _ptr(a)
        assert shared is (zero_copy and (a.flags.c_contiguous or all(s >= 0 for s in a.strides)))


@needs_jax
@given(a=_layouts(), zero_copy=st.booleans())
def test_jax_round_trip_any_layout(a, zero_copy):
    hypothesis.assume(_jax_keeps(a.dtype.name))  # 64-bit narrowing is JAX's own rule (it warns on overflow)
    x = fw.from_host(a, "jax", zero_copy=zero_copy)
    back = fw.to_host(x)
    assert back.shape == a.shape and back.dtype == a.dtype and _bytes(back) == _bytes(a)
