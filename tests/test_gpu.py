"""tenso.gpu on a real CUDA device (marked `gpu`: skipped here without one; scripts/gpu-check.sh runs them), plus the
no-CUDA behaviour of the native probe, which runs everywhere."""

from __future__ import annotations

import io

import numpy as np
import pytest

import tenso
import tenso.gpu
from tenso import tenso_rs

torch = pytest.importorskip("torch")
ml_dtypes = pytest.importorskip("ml_dtypes")

HAS_CUDA = tenso.gpu.available() and torch.cuda.is_available()


def test_native_probe_agrees_with_the_driver():
    # tenso-gpu checks for libcuda before any cudarc call: a bool, never a panic, on machines with or without CUDA.
    assert isinstance(tenso_rs._gpu_available(), bool)
    assert tenso_rs._gpu_available() == (tenso.gpu._cuda_problem() is None)
    assert tenso.gpu.available() == tenso_rs._gpu_available()


@pytest.mark.skipif(HAS_CUDA, reason="this machine has CUDA")
def test_device_producers_are_refused_without_a_host_copy():
    class OnCuda:
        def __dlpack__(self, **kwargs):
            raise AssertionError("not exported")

        def __dlpack_device__(self):
            return (2, 0)

    with pytest.raises(BufferError, match="write_from_device"):
        tenso.dumps(OnCuda())


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU (run scripts/gpu-check.sh on one)")
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "int64", "uint8", "bool", "complex64"])
def test_read_to_device_round_trip(dtype):
    t = (torch.arange(3 * 1024 * 1024) % 7).to(getattr(torch, dtype)).reshape(1024, -1)
    buf = io.BytesIO()
    n = tenso.gpu.write_from_device(t.cuda(), buf, check_integrity=True)
    assert n == len(buf.getvalue())
    assert buf.getvalue() == bytes(tenso.dumps(t, check_integrity=True))  # same packet as from the host tensor
    buf.seek(0)
    back = tenso.gpu.read_to_device(buf, 0, framework="torch")
    assert back.device.type == "cuda" and back.dtype == t.dtype
    assert torch.equal(back.cpu(), t)


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
