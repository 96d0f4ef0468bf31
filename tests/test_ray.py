"""tenso.ray on a real local Ray cluster (ray.init(num_cpus=2)), started and stopped by a module fixture."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest
from tensohelp import is_private_view as _cow

ray = pytest.importorskip("ray")
ml_dtypes = pytest.importorskip("ml_dtypes")

import tenso.cow  # noqa: E402
import tenso.ray  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

try:
    import torch
except ImportError:  # torch is heavy (GBs of CUDA wheels from PyPI): its tests run where it is installed
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="PyTorch is not installed (pip install 'tenso-ray[torch]')")
HERE = pathlib.Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def cluster():
    ray.init(
        num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False, object_store_memory=256 << 20
    )
    tenso.ray.register(include_torch=torch is not None)
    try:
        yield
    finally:
        tenso.ray.unregister()
        ray.shutdown()


@pytest.fixture
def registered(cluster):
    tenso.ray.register(include_torch=torch is not None)
    yield
    tenso.ray.register(include_torch=torch is not None)


@ray.remote
def _echo(x):
    return x


@ray.remote
def _worker_state(_x=None):
    import ray.cloudpickle as cp

    import tenso.ray as tr

    registered = tr.is_registered()
    return registered, getattr(cp.CloudPickler.dispatch.get(np.ndarray), "__name__", None)


@ray.remote
class _Holder:
    def __init__(self):
        self.value = None

    def put(self, x):
        self.value = x
        return x

    def get(self):
        return self.value


def _arrays():
    base = np.arange(4 * 6 * 5, dtype=np.float32).reshape(4, 6, 5)
    mm_path = pathlib.Path(tempfile.gettempdir()) / f"tenso-ray-memmap-{os.getpid()}.bin"
    return {
        "c_float32": base,
        "fortran": np.asfortranarray(base),
        "strided": base[:, ::2, 1:],
        "transposed_int64": np.arange(30).reshape(5, 6).T,
        "bfloat16": base.astype(ml_dtypes.bfloat16),
        "bfloat16_strided": base.astype(ml_dtypes.bfloat16)[::2],
        "float8": base.astype(ml_dtypes.float8_e4m3fn),
        # NumPy gives float8_e5m2 the builtin kind 'f', yet it is a user-defined type: it must travel as bytes too.
        "float8_e5m2": base.astype(ml_dtypes.float8_e5m2),
        "big_endian": base.astype(">f4"),
        "complex128": (base + 1j).astype(np.complex128),
        "bool": base > 10,
        "zero_d": np.array(7.5, dtype=np.float64),
        "empty": np.zeros((0, 3), dtype=np.int16),
        "datetime": np.array(["2024-01-01", "2025-06-30"], dtype="datetime64[D]"),
        "object": np.array(["a", None, 3], dtype=object),
        "memmap": _memmap(mm_path, base),
    }


def _memmap(path, base):
    mm = np.memmap(path, dtype=base.dtype, mode="w+", shape=base.shape)
    mm[:] = base
    mm.flush()
    return mm


ARRAY_KEYS = list(_arrays())


def _check_same(got, want):
    assert type(got) is np.ndarray  # memmap policy: arrives as a plain ndarray
    assert got.dtype == want.dtype and got.shape == want.shape
    if want.dtype == object:
        assert got.tolist() == want.tolist()
    else:
        as_bytes = lambda a: np.ascontiguousarray(a).reshape(-1).view(np.uint8)  # noqa: E731
        assert np.array_equal(as_bytes(got), as_bytes(want))


@pytest.mark.parametrize("key", ARRAY_KEYS)
def test_numpy_round_trips_everywhere(registered, key):
    x = _arrays()[key]
    _check_same(ray.get(ray.put(x)), x)  # driver put + get
    _check_same(ray.get(_echo.remote(x)), x)  # argument and return value
    holder = _Holder.remote()
    _check_same(ray.get(holder.put.remote(x)), x)  # actor argument and return
    _check_same(ray.get(holder.get.remote()), x)
    ray.kill(holder)




@pytest.mark.parametrize("key", ["bfloat16", "strided", "fortran", "c_float32"])
def test_bodies_travel_out_of_band(registered, key):
    # An in-band (pickled) body would come back as a fresh copy. Out of band, arrays of builtin dtypes in C or
    # Fortran order come back as Ray's read-only views of the object store; the layouts Ray's default copies come
    # back writeable, as copy-on-write views of the store (no copy either).
    base = np.arange(256 * 256 * 4, dtype=np.float32).reshape(256, 256, 4)  # 1 MiB: mapped, not copied
    x = {"bfloat16": base.astype(ml_dtypes.bfloat16), "strided": base[:, ::3, 1:], "fortran": np.asfortranarray(base),
         "c_float32": base}[key]
    got = ray.get(ray.put(x))
    _check_same(got, x)
    assert not got.flags.owndata
    if key in ("bfloat16", "strided"):
        assert got.flags.writeable and _cow(got)
    else:
        assert not got.flags.writeable and not _cow(got)


@pytest.mark.parametrize("step", [2, 4])
def test_large_strided_views(registered, step):
    # step 2: the elements fill half of their span, which travels whole with its strides (no gather, a strided view
    # comes back); step 4: too sparse, gathered once into C order.
    base = np.arange(1024 * 1024, dtype=np.float32).reshape(1024, 1024)
    x = base[:, ::step]
    for echo, got in enumerate((ray.get(ray.put(x)), ray.get(_echo.remote(x)))):
        assert np.array_equal(got, x) and got.dtype == x.dtype
        assert got.strides == (x.strides if step == 2 else (x.shape[1] * 4, 4))
        if echo and step == 4:  # the task received it gathered, C-contiguous: it returns Ray's read-only view
            assert not got.flags.writeable and not _cow(got)
        else:
            assert got.flags.writeable and _cow(got)  # as writeable as Ray's copy, without the copy


def test_owned_copy_is_private_and_aligned():
    from tenso.tenso_rs import _owned_copy

    for n in (0, 1, 1000, (9 << 20) + 3):
        src = np.frombuffer(bytes(range(256)) * (n // 256) + bytes(n % 256), dtype=np.uint8)
        out = _owned_copy(src)
        assert out.flags.writeable and out.ctypes.data % 64 == 0
        assert np.array_equal(out, src) and not np.shares_memory(out, src)


def test_default_ray_copies_bfloat16_in_band(cluster):
    tenso.ray.unregister()
    try:
        got = ray.get(ray.put(_arrays()["bfloat16"]))
        assert got.flags.writeable  # the in-band copy this plug-in removes
    finally:
        tenso.ray.register(include_torch=torch is not None)


def test_dict_of_arrays_uses_the_array_path(registered):
    d = {f"k{i}": np.full(1024, i, dtype=np.float32) for i in range(20)}
    d["bf"] = np.ones(8, ml_dtypes.bfloat16)
    d["bf_big"] = np.ones(1 << 17, ml_dtypes.bfloat16)
    got = ray.get(_echo.remote(d))
    assert set(got) == set(d)
    assert got["bf"].dtype == ml_dtypes.bfloat16 and got["bf"].flags.writeable  # small: a copy
    assert _cow(got["bf_big"]) and not got["k3"].flags.writeable  # a view of the store; Ray's read-only view


def test_sparse_and_quantized_ride_the_array_path(registered):
    import scipy.sparse

    from tenso import QuantizedTensor

    m = scipy.sparse.random(200, 300, density=0.05, format="csr", random_state=0, dtype=np.float32)
    got = ray.get(_echo.remote(m))
    assert (got != m).nnz == 0 and got.format == "csr"
    q = QuantizedTensor(np.arange(12, dtype=np.uint8), [0.5], [0.0], (12,), 17)
    got = ray.get(ray.put(q))
    assert np.array_equal(got.data, q.data) and got.shape == q.shape and not got.data.flags.writeable


def test_register_is_idempotent_and_unregister_restores(cluster):
    table = ray.cloudpickle.CloudPickler.dispatch

    class Marker:
        pass

    def sentinel(obj):  # what "someone else" registered before us
        return Marker, ()

    tenso.ray.unregister()
    table[np.memmap] = sentinel
    try:
        tenso.ray.register()
        tenso.ray.register()
        assert table[np.ndarray].__module__ == "tenso.ray"
        assert table[np.memmap].__module__ == "tenso.ray"
        tenso.ray.unregister()
        assert np.ndarray not in table
        assert table[np.memmap] is sentinel
        tenso.ray.unregister()  # twice is fine
        assert table[np.memmap] is sentinel
    finally:
        table.pop(np.memmap, None)
        tenso.ray.register(include_torch=torch is not None)


def test_every_deserializer_is_module_level(registered):
    import inspect

    for name in dir(tenso.ray):
        fn = getattr(tenso.ray, name)
        if name.startswith(("_rebuild", "_reduce")):
            assert inspect.isfunction(fn) and fn.__qualname__ == name


def test_worker_started_before_register_adopts_on_first_payload(registered):
    # The module's workers were started by a plain ray.init(); they pick the registration up from the payload.
    state = ray.get([_worker_state.remote(np.ones(3, np.float32)) for _ in range(4)])
    assert all(s == (True, "_reduce_ndarray") for s in state)


def _helper(scenario):
    out = subprocess.run(
        [sys.executable, str(HERE / "ray_helpers.py"), scenario], capture_output=True, text=True, timeout=240
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_setup_hook_registers_every_worker():
    # ray.init(runtime_env=tenso.ray.runtime_env()): a worker registers at start, even one that receives no payload;
    # unregister() in the driver still switches it off.
    assert tenso.ray.runtime_env()["worker_process_setup_hook"] == "tenso.ray.setup_worker"
    result = _helper("hook")
    assert result["before"] == [True, "_reduce_ndarray"]
    assert result["after_register"] == [True, "_reduce_ndarray"]
    assert result["after_unregister"] == [False, None]


def test_unregister_reaches_workers(registered):
    ray.get([_worker_state.remote(np.ones(3)) for _ in range(4)])
    tenso.ray.unregister()
    try:
        time.sleep(0.01)
        env = tenso.ray.runtime_env()
        state = ray.get([_worker_state.remote() for _ in range(4)] + [_worker_state.options(runtime_env=env).remote()])
        assert all(s == (False, None) for s in state), state
        # and a worker-side reduction after unregister already uses Ray's own path (an in-band copy)
        got = ray.get(_echo.remote(np.ones(1 << 17, ml_dtypes.bfloat16)))
        assert got.flags.writeable and not _cow(got)
    finally:
        tenso.ray.register(include_torch=torch is not None)
    # registering again reaches the workers that were switched off, with their next payload
    time.sleep(0.01)
    state = ray.get([_worker_state.remote(np.ones(3)) for _ in range(4)])
    assert all(s == (True, "_reduce_ndarray") for s in state), state
    got = ray.get(_echo.remote(np.ones(1 << 17, ml_dtypes.bfloat16)))
    assert _cow(got)  # the worker's return went out of band again


def test_register_needs_ray_init(monkeypatch):
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    with pytest.raises(RuntimeError, match="ray.init"):
        tenso.ray.register()


@pytest.mark.parametrize("flag,extra", [("include_torch", "torch"), ("include_jax", "jax")])
def test_missing_framework_names_the_extra(cluster, monkeypatch, flag, extra):
    monkeypatch.setitem(sys.modules, extra, None)
    with pytest.raises(ImportError, match=rf"tenso-ray\[{extra}\]"):
        tenso.ray.register(**{flag: True})
    assert tenso.ray.is_registered()  # a failed register changes nothing


def test_missing_ray_names_the_extra():
    code = "import sys; sys.modules['ray'] = None\ntry:\n import tenso.ray\nexcept ImportError as e: print(e)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout
    assert "tenso-ray[ray]" in out


# --- failures with the plug-in on -----------------------------------------------------------------------------------


@ray.remote(max_retries=0)
def _raises(x):
    raise ValueError(f"bad input of shape {x.shape}")


def test_task_that_raises(registered):
    with pytest.raises(ray.exceptions.RayTaskError) as info:
        ray.get(_raises.remote(_arrays()["bfloat16"]))
    assert isinstance(info.value, ValueError)
    assert "bad input of shape (4, 6, 5)" in str(info.value)


@ray.remote(max_retries=2)
def _die_once(x, marker):
    if not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(1)  # the worker dies mid-task
    return x[::-1]


def test_worker_killed_mid_task_is_retried(registered, tmp_path):
    x = _arrays()["bfloat16_strided"]
    got = ray.get(_die_once.remote(x, str(tmp_path / "died")))
    _check_same(got, x[::-1])


@ray.remote(max_restarts=1, max_task_retries=1)
class _Fragile:
    def __init__(self, marker):
        self.marker = marker

    def work(self, x):
        if not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os._exit(1)
        return x * 2


def test_actor_restarted(registered, tmp_path):
    actor = _Fragile.remote(str(tmp_path / "died"))
    x = _arrays()["strided"]
    _check_same(ray.get(actor.work.remote(x)), x * 2)
    ray.kill(actor)


@pytest.mark.slow
def test_object_reconstructed_from_lineage():
    # Two nodes (ray.cluster_utils.Cluster): the producing node dies, the object is rebuilt by re-running its task.
    result = _helper("lineage")
    assert result["first"] == result["second"]
    assert result["dtype"] == "bfloat16" and result["shape"] == [1 << 19]


# --- torch ----------------------------------------------------------------------------------------------------------


@needs_torch
@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.arange(24, dtype=torch.float32).reshape(4, 6),
        lambda: torch.arange(24, dtype=torch.float32).reshape(4, 6).T,
        lambda: torch.arange(24, dtype=torch.float32).to(torch.bfloat16),
        lambda: torch.arange(24, dtype=torch.float32).to(torch.float8_e5m2).reshape(4, 6).T,
        lambda: torch.arange(24, dtype=torch.int8),
        lambda: torch.tensor(3.5),
        lambda: torch.zeros(0, 4),
        lambda: torch.ones(3, requires_grad=True),
    ],
    ids=["float32", "transposed", "bfloat16", "float8_e5m2_transposed", "int8", "zero_d", "empty", "requires_grad"],
)
def test_torch_round_trips(registered, make):
    t = make()
    for got in (ray.get(ray.put(t)), ray.get(_echo.remote(t))):
        assert type(got) is torch.Tensor
        assert got.dtype == t.dtype and got.shape == t.shape and got.requires_grad == t.requires_grad
        assert torch.equal(got.detach(), t.detach())


@needs_torch
def test_torch_unusual_tensors(registered):
    conj = torch.tensor([1 + 2j, 3 - 1j], dtype=torch.complex64).conj()  # lazy conjugate bit
    got = ray.get(_echo.remote(conj))
    assert torch.equal(got, conj.resolve_conj())
    sparse = torch.eye(4).to_sparse()  # not strided: keeps Ray's default path
    got = ray.get(_echo.remote(sparse))
    assert got.is_sparse and torch.equal(got.to_dense(), torch.eye(4))


def test_strided_payload_is_checked():
    from tenso.ray import _rebuild_strided

    buf = np.zeros(16, np.float32)
    with pytest.raises(ValueError, match="cannot hold"):
        _rebuild_strided(buf, "<f4", (4, 4), (64, 8))
    assert _rebuild_strided(buf, "<f4", (4, 2), (16, 8)).shape == (4, 2)


@needs_torch
def test_torch_safe_by_default(registered):
    ref = ray.put(torch.zeros(1024))
    a = ray.get(ref)
    a += 1  # writeable, and the write stays private
    assert torch.count_nonzero(ray.get(ref)) == 0


@needs_torch
def test_torch_zero_copy_is_deprecated_and_as_safe_as_the_default(cluster):
    with pytest.warns(DeprecationWarning, match="torch_zero_copy is deprecated"):
        tenso.ray.register(include_torch=True, torch_zero_copy=True)
    with pytest.warns(DeprecationWarning, match="torch_zero_copy is deprecated"):
        env = tenso.ray.runtime_env(include_torch=True, torch_zero_copy=True)
    assert "torch_zero_copy" not in json.loads(env["env_vars"][tenso.ray.OPTIONS_ENV])
    try:
        ref = ray.put(torch.zeros(1 << 18))
        views = tenso.cow.stats()["views"]
        a, b = ray.get(ref), ray.get(ref)
        assert tenso.cow.stats()["views"] == views + 2  # two copy-on-write views, no copy
        a[0] = 1.0
        assert float(b[0]) == 0.0 and float(ray.get(ref)[0]) == 0.0  # the flag no longer shares writes
    finally:
        tenso.ray.register(include_torch=True)


@needs_torch
def test_torch_parameter_policy(registered):
    p = torch.nn.Parameter(torch.arange(6, dtype=torch.float32))
    got = ray.get(_echo.remote(p))
    assert type(got) is torch.nn.Parameter and got.requires_grad
    assert torch.equal(got.detach(), p.detach())
    got.data += 1  # a parameter owns its memory


@needs_torch
def test_unregister_restores_rays_torch_reducer(cluster):
    table = ray.cloudpickle.CloudPickler.dispatch
    tenso.ray.unregister()

    def rays_own(t):
        return torch.tensor, (t.tolist(),)

    table[torch.Tensor] = rays_own
    try:
        tenso.ray.register(include_torch=True)
        assert table[torch.Tensor] is not rays_own
        tenso.ray.unregister()
        assert table[torch.Tensor] is rays_own
    finally:
        table.pop(torch.Tensor, None)
        tenso.ray.register(include_torch=True)


# --- JAX ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
def test_jax_round_trips(cluster, dtype):
    jnp = pytest.importorskip("jax.numpy")
    tenso.ray.register(include_torch=torch is not None, include_jax=True)
    try:
        x = jnp.arange(24, dtype=dtype).reshape(4, 6)
        for got in (ray.get(ray.put(x)), ray.get(_echo.remote(x))):
            assert type(got) is type(x) and got.dtype == x.dtype and got.shape == x.shape
            assert bool((got == x).all())
    finally:
        tenso.ray.register(include_torch=torch is not None)
