"""tenso.gpu on a real CUDA device (marked `gpu`: skipped here without one; scripts/gpu-check.sh runs them), plus the
no-CUDA behaviour of the native probe, which runs everywhere."""

from __future__ import annotations

import io
import socket
import threading

import numpy as np
import pytest

import tenso
import tenso.gpu
from tenso import frameworks, tenso_rs

torch = pytest.importorskip("torch")
ml_dtypes = pytest.importorskip("ml_dtypes")

HAS_CUDA = tenso.gpu.available() and torch.cuda.is_available()


def test_native_probe_agrees_with_the_driver():
    # tenso-gpu checks for libcuda before any cudarc call: a bool, never a panic, on machines with or without CUDA.
    assert isinstance(tenso_rs._gpu_available(), bool)
    assert tenso_rs._gpu_available() == (tenso.gpu._cuda_problem() is None)
    assert tenso.gpu.available() == tenso_rs._gpu_available()
    assert (tenso_rs._gpu_problem() is None) == tenso_rs._gpu_available()


@pytest.mark.skipif(tenso.gpu.available(), reason="this machine has CUDA")
def test_without_cuda_every_call_is_a_clear_runtime_error_after_the_packet_is_checked():
    # Issue #18: read_to_device reads and checks the packet before it looks for a GPU (so a bad packet is a
    # ValueError and an empty stream None on any machine; tests/test_gpu_cpu.py), then says what is missing.
    problem = tenso.gpu._cuda_problem()
    assert problem and ("libcuda" in problem or "no CUDA device" in problem or "macOS" in problem)
    packet = bytes(tenso.dumps(np.arange(4)))
    src = io.BytesIO(packet + packet)

    class OnCuda:
        def __dlpack__(self, **kwargs):
            raise AssertionError("not exported")

        def __dlpack_device__(self):
            return (2, 0)

    for call in (
        lambda: tenso.gpu.read_to_device(src, 0, framework="torch"),
        lambda: tenso.gpu.write_from_device(OnCuda(), io.BytesIO()),
        lambda: tenso.gpu.staging_stats(0),
    ):
        with pytest.raises(RuntimeError, match="needs a CUDA GPU") as info:
            call()
        assert problem in str(info.value)
    assert src.tell() == len(packet), "exactly one packet was read"
    # Host tensors need no GPU: written as write_stream writes them.
    out = io.BytesIO()
    assert tenso.gpu.write_from_device(torch.zeros(3), out) == len(out.getvalue()) == len(tenso.dumps(np.zeros(3, np.float32)))
    # The native entry points check too (cudarc would panic on a missing libcuda).
    with pytest.raises(RuntimeError, match="CUDA"):
        tenso_rs._gpu_read_to_device(bytes(tenso.dumps(np.arange(4))), 0)
    with pytest.raises(RuntimeError, match="CUDA"):
        tenso_rs._gpu_write_from_device(np.arange(3), lambda view: None)
    with pytest.raises(RuntimeError, match="CUDA"):
        tenso_rs._gpu_staging_stats(0)


@pytest.mark.skipif(HAS_CUDA, reason="this machine has CUDA")
def test_device_producers_are_refused_without_a_host_copy():
    class OnCuda:
        def __dlpack__(self, **kwargs):
            raise AssertionError("not exported")

        def __dlpack_device__(self):
            return (2, 0)

    with pytest.raises(BufferError, match="write_from_device"):
        tenso.dumps(OnCuda())


def test_torch_tensors_are_made_exportable_before_the_native_write(monkeypatch):
    # torch's __dlpack__ refuses tensors that require grad or carry a conj/neg bit (BufferError), and CUDA tensors off
    # its current device: write_from_device hands the engine detached, resolved tensors, inside a device guard.
    seen = []
    monkeypatch.setattr(tenso.gpu, "_require_cuda", lambda what: None)
    monkeypatch.setattr(tenso.gpu, "_is_cuda", lambda obj: True)
    monkeypatch.setattr(tenso.gpu, "_gpu_write_from_device", lambda t, write, check: seen.append(t) or 0)
    grad = torch.ones(3, requires_grad=True)
    conj = torch.tensor([1 + 2j, 3 - 1j]).conj()
    tenso.gpu.write_from_device(grad, io.BytesIO())
    tenso.gpu.write_from_device({"g": grad, "c": conj, "n": torch.arange(3).neg()}, io.BytesIO())
    single, bundle = seen
    assert not single.requires_grad and single.data_ptr() == grad.data_ptr()
    assert list(bundle) == ["g", "c", "n"] and not bundle["g"].requires_grad
    assert not bundle["c"].is_conj() and torch.equal(bundle["c"], conj)
    single.__dlpack__(), bundle["c"].__dlpack__()  # what the engine will ask for: no BufferError
    t, guard = tenso.frameworks._cuda_export(np.arange(3))
    assert isinstance(t, np.ndarray)
    with guard:
        pass


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU (run scripts/gpu-check.sh on one)")
def test_write_from_device_takes_grad_tensors_and_any_device_and_keeps_torchs_current_device():
    last = torch.cuda.device_count() - 1
    t = torch.arange(1000, dtype=torch.float32, device=f"cuda:{last}").requires_grad_()
    out = io.BytesIO()
    before = torch.cuda.current_device()
    tenso.gpu.write_from_device(t, out)
    assert torch.cuda.current_device() == before, "the engine restores the thread's CUDA context"
    np.testing.assert_array_equal(tenso.loads(out.getvalue()), np.arange(1000, dtype=np.float32))
    back = tenso.gpu.read_to_device(out.getvalue(), last, framework="torch")
    assert back.device == t.device and torch.cuda.current_device() == before
    del back
    assert torch.cuda.current_device() == before


DTYPES = ["float32", "float64", "float16", "bfloat16", "int8", "int16", "int32", "int64", "uint8", "uint16",
          "uint32", "uint64", "bool", "complex64", "complex128"]


def _sample(dtype: str, shape=(1024, 3 * 1024 + 7)):
    t = torch.arange(int(np.prod(shape))) % 7
    return t.to(getattr(torch, dtype)).reshape(shape)


def _sources(packet: bytes, tmp_path):
    """The same packet from memory, a BytesIO, a file and a socket."""
    yield "bytes", packet
    yield "bytesio", io.BytesIO(packet)
    path = tmp_path / "p.tenso"
    path.write_bytes(packet)
    with open(path, "rb") as f:
        yield "file", f
    a, b = socket.socketpair()
    sender = threading.Thread(target=lambda: (a.sendall(packet), a.close()))
    sender.start()
    try:
        yield "socket", b
    finally:
        sender.join()
        b.close()


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU (run scripts/gpu-check.sh on one)")
@pytest.mark.parametrize("dtype", DTYPES)
def test_read_to_device_round_trip(dtype, tmp_path):
    t = _sample(dtype)
    buf = io.BytesIO()
    n = tenso.gpu.write_from_device(t.cuda(), buf, check_integrity=True)
    assert n == len(buf.getvalue())
    assert buf.getvalue() == bytes(tenso.dumps(t, check_integrity=True))  # same packet as from the host tensor
    for name, source in _sources(buf.getvalue(), tmp_path):
        back = tenso.gpu.read_to_device(source, 0, framework="torch")
        assert back.device.type == "cuda" and back.dtype == t.dtype, name
        assert torch.equal(back.cpu(), t), name


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU (run scripts/gpu-check.sh on one)")
def test_device_memory_is_handed_over_without_a_copy_and_staging_is_reused():
    packet = bytes(tenso.dumps(np.arange(5 << 20, dtype=np.float32)))  # 20 MiB: several staging chunks
    dev = tenso_rs._gpu_read_to_device(packet, 0)
    assert isinstance(dev, tenso_rs.DeviceTensor) and dev.nbytes == 20 << 20 and dev.dtype == "float32"
    a = torch.from_dlpack(dev)
    b = torch.from_dlpack(dev)
    assert a.data_ptr() == b.data_ptr(), "both imports share tenso's allocation"
    a[0] = 42
    assert b[0].item() == 42
    del dev  # the capsules' deleters keep the memory alive
    assert torch.equal(b[1:].cpu(), torch.arange(1, 5 << 20, dtype=torch.float32))
    before = tenso.gpu.staging_stats(0)
    for _ in range(5):
        out = io.BytesIO()
        tenso.gpu.write_from_device(tenso.gpu.read_to_device(packet, 0, framework="torch"), out)
        assert out.getvalue() == packet
    after = tenso.gpu.staging_stats(0)
    assert after["allocations"] == before["allocations"] == 2, "steady state allocates no pinned memory"
    assert after["idle"] == 2


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU (run scripts/gpu-check.sh on one)")
def test_bundles_errors_and_strided_tensors():
    d = {"w": torch.randn(64, 33, device="cuda"), "b": torch.arange(7, device="cuda").to(torch.bfloat16)}
    out = io.BytesIO()
    tenso.gpu.write_from_device(d, out, check_integrity=True)
    assert out.getvalue() == bytes(tenso.dumps({k: v.cpu() for k, v in d.items()}, check_integrity=True))
    back = tenso.gpu.read_to_device(out.getvalue(), 0, framework="torch")
    assert list(back) == ["w", "b"] and all(torch.equal(back[k], d[k]) for k in d)
    bad = bytearray(out.getvalue())
    bad[-9] ^= 1
    with pytest.raises(tenso.TensoIntegrityError):
        tenso.gpu.read_to_device(bytes(bad), 0, framework="torch")
    with pytest.raises(EOFError):
        tenso.gpu.read_to_device(io.BytesIO(out.getvalue()[:-3]), 0, framework="torch")
    with pytest.raises(BufferError, match="contiguous"):
        tenso.gpu.write_from_device(d["w"].t(), io.BytesIO())
    with pytest.raises(TypeError, match="quantized|sparse|cannot be read to a device"):
        tenso.gpu.read_to_device(bytes(tenso.dumps(tenso.QuantizedTensor.quantize(np.ones(8, np.float32)))), 0,
                                 framework="torch")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU (run scripts/gpu-check.sh on one)")
@pytest.mark.parametrize("framework", ["cupy", "jax"])
def test_other_frameworks_share_the_device_memory(framework):
    fw = pytest.importorskip(framework)
    if framework == "jax":
        try:
            fw.devices("cuda")
        except RuntimeError as e:  # a CPU-only jaxlib (no jax-cuda plugin): nothing of ours to test
            pytest.skip(f"JAX has no CUDA backend here ({e})")
    packet = bytes(tenso.dumps(np.arange(1000, dtype=np.float32).reshape(10, 100)))
    back = tenso.gpu.read_to_device(packet, 0, framework=framework)
    np.testing.assert_array_equal(np.asarray(back.get() if framework == "cupy" else back),
                                  np.arange(1000, dtype=np.float32).reshape(10, 100))
    out = io.BytesIO()
    tenso.gpu.write_from_device(back, out)
    assert out.getvalue() == packet
    del fw


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU (run scripts/gpu-check.sh on one)")
def test_cuda_tensors_through_dlpack():
    t = torch.arange(12, dtype=torch.float32, device="cuda").reshape(3, 4)
    with pytest.raises(BufferError, match="tenso.gpu"):
        tenso.dumps(t)
    with pytest.raises(BufferError, match="copy=True"):
        tenso.from_dlpack(t)
    host = tenso.from_dlpack(t, copy=True)
    np.testing.assert_array_equal(host, t.cpu().numpy())


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU (run scripts/gpu-check.sh on one)")
def test_pinned_host_memory_is_host_memory():
    t = torch.arange(8, dtype=torch.bfloat16).pin_memory()
    a = tenso.from_dlpack(t)  # kDLCPU (torch reports pinned tensors as CPU): zero-copy
    assert a.dtype == ml_dtypes.bfloat16 and a.__array_interface__["data"][0] == t.data_ptr()


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU (run scripts/gpu-check.sh on one)")
@pytest.mark.parametrize("dtype", DTYPES + ["float8_e4m3fn"])
def test_framework_conversions_use_the_staging(dtype):
    # frameworks.to_host / torch_bytes / torch_from_bytes (the cache's, Ray's and Dask's device paths) stage CUDA
    # copies through tenso-gpu: same values, every dtype, and no new pinned buffer once the pool is warm.
    from tenso import frameworks

    t = _sample(dtype, (33, 65)) if hasattr(torch, dtype) else None
    if t is None:
        pytest.skip(f"torch has no {dtype}")
    on_cuda = t.cuda()
    frameworks.to_host(on_cuda)  # warm the pool
    before = tenso.gpu.staging_stats(0)["allocations"]
    host = frameworks.to_host(on_cuda)
    assert host.shape == tuple(t.shape)
    assert torch.equal(frameworks.from_host(host, "torch"), t)
    assert torch.equal(frameworks.to_host(on_cuda.t()).view(host.dtype), frameworks.to_host(t.t().contiguous()))
    raw = frameworks.torch_bytes(on_cuda)
    assert raw.tobytes() == frameworks.torch_bytes(t).tobytes()
    back = frameworks.torch_from_bytes(raw, t.dtype, tuple(t.shape), "cuda:0")
    assert back.device.type == "cuda" and torch.equal(back.cpu(), t)
    on_device = frameworks.from_host(host, "torch:cuda:0")
    assert on_device.device.type == "cuda" and torch.equal(on_device.cpu(), t)
    assert tenso.gpu.staging_stats(0)["allocations"] == before


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU (run scripts/gpu-check.sh on one)")
def test_cache_get_to_a_cuda_device():
    with tenso.TensoCache("16MB") as cache:
        cache.put("w", np.arange(1 << 20, dtype=np.float32))
        t = cache.get("w", device="torch:cuda:0")
        assert t.device.type == "cuda"
        assert torch.equal(t.cpu(), torch.arange(1 << 20, dtype=torch.float32))


# ---------------------------------------------------------------------------------------------------------------
# tenso.torch.Collate(pin_memory=...): the DataLoader pool page-locked in the main process
# ---------------------------------------------------------------------------------------------------------------
class _Fields(torch.utils.data.Dataset):
    """Samples of 256 KiB (module level: DataLoader workers may pickle it)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return {"x": np.full((256, 256), i, dtype=np.float32), "y": i}


_fork_warning = pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU (run scripts/gpu-check.sh on one)")
def test_pool_pin_host_once_and_views_are_pinned():
    cache = tenso.TensoCache("8MB")
    try:
        native = cache._pool
        assert native._host_pinned() is False
        _, mem = cache.lease(4096)
        t = torch.frombuffer(mem, dtype=torch.float32)
        t.copy_(torch.arange(1024, dtype=torch.float32))
        assert not t.is_pinned()
        assert native._pin_host(0) is True
        assert native._pin_host(0) is False  # once per mapping and process
        assert native._host_pinned() is True
        assert t.is_pinned()  # the whole mapping: views made before count too
        on_device = t.to("cuda", non_blocking=True)
        torch.cuda.synchronize()
        assert torch.equal(on_device.cpu(), torch.arange(1024, dtype=torch.float32))
        cache.close()
        assert t.is_pinned()  # the view keeps the mapping, and the mapping keeps its registration
        del mem, t
    finally:
        cache.close()
        cache.unlink()


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU (run scripts/gpu-check.sh on one)")
@_fork_warning
def test_collate_pool_batches_are_pinned_and_the_pin_thread_copies_nothing():
    import gc

    import tenso.torch as tt
    from torch.utils.data import DataLoader, default_collate

    torch.zeros(1, device="cuda")  # torch uses CUDA in this process: pin_memory=None pins from the first batch
    ds = _Fields(32)
    fn = tt.Collate("64MB", inband_bytes=0)
    fn.close()  # a fresh pool for this test
    kept = None
    for pin_thread in (False, True):
        loader = DataLoader(ds, batch_size=8, num_workers=2, collate_fn=fn, pin_memory=pin_thread,
                            multiprocessing_context="fork")
        for _epoch in range(2):  # the second epoch forks its workers after this process pinned the pool
            for i, batch in enumerate(loader):
                want = default_collate([ds[j] for j in range(i * 8, i * 8 + 8)])
                x, y = batch["x"], batch["y"]
                assert x.is_pinned() and y.is_pinned(), pin_thread
                # One storage for the batch, as the worker wrote it: a pin-thread copy gives each tensor its own.
                assert x.untyped_storage().data_ptr() == y.untyped_storage().data_ptr()
                assert x.pin_memory().data_ptr() == x.data_ptr()  # Tensor.pin_memory() returns pinned tensors as is
                xd, yd = x.to("cuda", non_blocking=True), y.to("cuda", non_blocking=True)
                torch.cuda.synchronize()
                assert torch.equal(xd.cpu(), want["x"]) and torch.equal(yd.cpu(), want["y"])
                kept = batch
        del loader, batch, x, y
    assert fn.pinned
    gc.collect()
    tt._drain_fences(wait=True)
    assert fn.pool.stats["used_bytes"] > 0  # `kept` holds its lease
    fn.close()  # the pool goes; the kept batch keeps its mapping, still pinned, until it is freed
    assert kept["x"].is_pinned()
    assert torch.equal(kept["x"].to("cuda").cpu()[0], torch.full((256, 256), 24.0))
    del kept
    gc.collect()


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU (run scripts/gpu-check.sh on one)")
def test_a_pinned_batch_freed_during_its_copy_goes_back_after_the_copy():
    import gc
    import pickle
    from multiprocessing.reduction import ForkingPickler

    import tenso.torch as tt

    fn = tt.Collate("64MB", inband_bytes=0, pin_memory=True)
    fn.close()
    sample = np.full((1024, 1024), 3, dtype=np.float32)
    packed = tt.PackedBatch(*tt._pack([sample] * 4, fn._lease))  # 16 MiB, as a worker writes it
    batch = pickle.loads(ForkingPickler.dumps(packed))  # adopted (and the pool pinned) as in the main process
    del packed
    assert batch.is_pinned() and fn.pinned
    used = fn.pool.stats["used_bytes"]
    torch.cuda._sleep(1_000_000_000)  # keep the current stream busy (~0.5 s): the copy queues behind it
    out = batch.to("cuda", non_blocking=True)
    del batch
    gc.collect()
    assert fn.pool.stats["used_bytes"] == used  # freed, but its block waits for the copy
    torch.cuda.synchronize()
    tt._drain_fences()
    assert fn.pool.stats["used_bytes"] == 0
    assert torch.equal(out.cpu(), torch.full((4, 1024, 1024), 3.0))
    fn.close()


# ---------------------------------------------------------------------------------------------------------------
# Issue #19 on the device: consumer allocator (3), forked child (6), multi-GPU guards (7)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU (run scripts/gpu-check.sh on one)")
def test_torch_tensors_live_in_torchs_caching_allocator():
    # Counted and reused by torch (memory_allocated), freed into its cache (no cuMemFree, no device-wide sync).
    packet = bytes(tenso.dumps(np.arange(1 << 20, dtype=np.float32)))
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated(0)
    t = tenso.gpu.read_to_device(packet, 0, framework="torch")
    assert torch.cuda.memory_allocated(0) - before >= 4 << 20
    assert torch.equal(t.cpu(), torch.arange(1 << 20, dtype=torch.float32))
    reserved = torch.cuda.memory_reserved(0)
    del t
    assert torch.cuda.memory_allocated(0) == before
    for _ in range(3):  # the cached block is reused: nothing new reserved
        assert tenso.gpu.read_to_device(packet, 0, framework="torch").shape == (1 << 20,)
    assert torch.cuda.memory_reserved(0) == reserved
    # On a side stream: the copy waits for that stream's pending work on the block, and the result is right.
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        busy = torch.ones(4 << 20, device="cuda")
        busy.mul_(2)
        del busy  # its block may be handed to the read below while the multiply still runs
        x = torch.from_numpy(np.arange(12, dtype=np.int64).reshape(3, 4)).to("cuda")
        y = frameworks.from_host(np.arange(12, dtype=np.int64).reshape(3, 4), "torch:cuda:0")
    side.synchronize()
    assert torch.equal(x, y)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU (run scripts/gpu-check.sh on one)")
def test_a_forked_child_is_refused_with_a_clear_error():
    import os

    packet = bytes(tenso.dumps(np.arange(4, dtype=np.float32)))
    tenso.gpu.read_to_device(packet, 0, framework="torch")  # the device is opened in this process
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            tenso.tenso_rs._gpu_read_to_device(packet, 0)
            msg = b"no error"
        except RuntimeError as e:
            msg = str(e).encode()[:500]
        except BaseException as e:  # noqa: BLE001
            msg = repr(e).encode()[:500]
        os.write(w, msg)
        os._exit(0)
    os.close(w)
    msg = os.read(r, 1000).decode()
    os.waitpid(pid, 0)
    assert "forked" in msg and "spawn" in msg, msg


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA or torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_tensors_on_a_non_current_device_export_under_their_guard():
    packet = bytes(tenso.dumps(np.arange(1000, dtype=np.float32)))
    assert torch.cuda.current_device() == 0
    t = tenso.gpu.read_to_device(packet, 1, framework="torch")
    assert t.device.index == 1
    out = io.BytesIO()
    tenso.gpu.write_from_device(t, out)
    assert out.getvalue() == packet
    try:
        import cupy
    except ImportError:
        return
    a = tenso.gpu.read_to_device(packet, 1, framework="cupy")
    assert a.device.id == 1 and cupy.cuda.Device().id == 0
    out = io.BytesIO()
    tenso.gpu.write_from_device(a, out)
    assert out.getvalue() == packet
    assert np.array_equal(frameworks.to_host(a), np.arange(1000, dtype=np.float32))
