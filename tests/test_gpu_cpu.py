"""The GPU path's rules that hold on any machine (issue #19): converting CPU data never initialises CUDA, and
tenso.gpu checks a packet before it looks for a GPU (issue #18).

How "never initialises CUDA" is observed without a GPU: every probe tenso makes of the driver (``cuInit`` where a
driver is installed; the same call, refused for want of ``libcuda``, where none is) is counted natively
(``tenso_rs._gpu_init_calls``), and ``torch.cuda.is_initialized()`` must stay False. The conversions run in a fresh
interpreter so that nothing else of the test session has probed the driver already.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import tenso
import tenso.gpu
from tenso import tenso_rs

torch = pytest.importorskip("torch")

_PRELUDE = """
import json, sys
import numpy as np
import torch
import tenso
from tenso import tenso_rs
from tenso import frameworks as fw
try:
    import jax, jax.numpy as jnp
except ImportError:
    jax = None

def probes():
    return {"init_calls": tenso_rs._gpu_init_calls(), "torch_cuda": torch.cuda.is_initialized()}

def cpu_values():
    values = {"numpy": np.arange(12, dtype=np.float32).reshape(3, 4),
              "torch": torch.arange(12, dtype=torch.float32).reshape(3, 4),
              "bf16": torch.ones(5, dtype=torch.bfloat16)}
    if jax is not None:
        values["jax"] = jnp.arange(6, dtype=jnp.float32)
    return values
"""


def _run(body: str, timeout: float = 240) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="", RAY_DEDUP_LOGS="0")
    script = _PRELUDE + textwrap.dedent(body)
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout, env=env, check=False
    )
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_probe_counter_sees_a_probe() -> None:
    """The observation can fail: asking for a GPU is counted (else the tests below would prove nothing)."""
    got = _run(
        """
        before = probes()
        import tenso.gpu
        tenso.gpu.available()
        print(json.dumps({"before": before, "after": probes()}))
        """
    )
    assert got["before"]["init_calls"] == 0
    assert got["after"]["init_calls"] >= 1


def test_cpu_conversions_never_initialise_cuda() -> None:
    """frameworks, the node cache, Ray's serializers and Dask's, for numpy, torch and JAX CPU values (defect 2 of
    #19: `_staged()` ran cuInit before the tensor's device was looked at)."""
    got = _run(
        """
        from tenso.cache import TensoCache
        values = cpu_values()
        for v in values.values():
            fw.to_host(v)
            fw.map_arrays({"x": [v]}, fw.to_host, tensors=True)
        fw.torch_bytes(values["torch"])
        fw.torch_from_bytes(np.zeros(8, np.uint8), "float32", (2,))
        for device in ["numpy", "torch", "torch:cpu"] + (["jax", "jax:cpu"] if jax is not None else []):
            fw.from_host(values["numpy"], device)
            fw.check_device(device)
        tenso.loads(tenso.dumps(values["numpy"]))
        cache = TensoCache(max_memory="8MB")
        try:
            for i, v in enumerate(values.values()):
                cache.put(f"k{i}", v)
                cache.get(f"k{i}", copy=True)
                cache.get(f"k{i}", device="torch")
        finally:
            cache.close()
        after_frameworks = probes()

        import tenso.dask
        from distributed.protocol import deserialize, serialize
        tenso.dask.register(scope=f"gpucpu{__import__('os').getpid()}", pool_size="8MB")
        try:
            for v in (values["numpy"], values["torch"], values["bf16"]):
                deserialize(*serialize(v))
        finally:
            tenso.dask.unregister()
        print(json.dumps({"frameworks": after_frameworks, "dask": probes()}))
        """
    )
    assert got["frameworks"] == {"init_calls": 0, "torch_cuda": False}
    assert got["dask"] == {"init_calls": 0, "torch_cuda": False}


def test_ray_round_trips_never_initialise_cuda() -> None:
    """A real (one-CPU) Ray: the driver serialises and deserialises, and so does a worker, which reports its own
    probes."""
    pytest.importorskip("ray")
    got = _run(
        """
        import ray, tenso.ray
        ray.init(num_cpus=1, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
                 object_store_memory=96 << 20)
        tenso.ray.register(include_torch=True, include_jax=jax is not None)
        try:
            @ray.remote
            def echo(values):
                import torch as t
                from tenso import tenso_rs as rs
                return values, {"init_calls": rs._gpu_init_calls(), "torch_cuda": t.cuda.is_initialized()}

            values = cpu_values()
            values["big"] = torch.zeros(1 << 18)  # out of band
            back, worker = ray.get(echo.remote(values))
            assert torch.equal(back["torch"], values["torch"])
        finally:
            tenso.ray.unregister()
            ray.shutdown()
        print(json.dumps({"driver": probes(), "worker": worker}))
        """
    )
    assert got["driver"] == {"init_calls": 0, "torch_cuda": False}
    assert got["worker"] == {"init_calls": 0, "torch_cuda": False}


def test_dataloader_collate_never_initialises_cuda() -> None:
    """tenso.torch.Collate through a real DataLoader with one worker process (pooled batches) and in-process."""
    got = _run(
        """
        import tenso.torch as tt
        from torch.utils.data import DataLoader

        class Data(torch.utils.data.Dataset):
            def __len__(self):
                return 16
            def __getitem__(self, i):
                return {"x": torch.full((256,), float(i)), "y": i}

        collate = tt.Collate(pool="4MB", inband_bytes=0)
        seen = 0
        try:
            for workers in (0, 1):
                for batch in DataLoader(Data(), batch_size=4, collate_fn=collate, num_workers=workers):
                    seen += int(batch["x"].shape[0])
                    del batch
        finally:
            collate.close()
        print(json.dumps({"seen": seen, **probes()}))
        """
    )
    assert got == {"seen": 32, "init_calls": 0, "torch_cuda": False}


# ---------------------------------------------------------------------------------------------------------------
# tenso.gpu reads and checks the packet before it looks for a GPU (issue #18)
# ---------------------------------------------------------------------------------------------------------------
needs_no_gpu = pytest.mark.skipif(tenso.gpu.available(), reason="checks the behaviour on a machine without a GPU")


@needs_no_gpu
def test_read_to_device_checks_the_packet_first(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tenso.gpu, "BACKEND", "torch")
    with pytest.raises(ValueError, match="Invalid tenso packet"):
        tenso.gpu.read_to_device(io.BytesIO(b"JUNK____" + b"\x00" * 100))
    assert tenso.gpu.read_to_device(io.BytesIO(b"")) is None
    assert tenso.gpu.read_to_device(b"") is None
    with pytest.raises(EOFError):
        tenso.gpu.read_to_device(io.BytesIO(b"TNSO"))
    # A valid packet still cannot go anywhere: the GPU error, after the packet was read.
    stream = io.BytesIO(bytes(tenso.dumps(np.arange(4, dtype=np.float32))) * 2)
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        tenso.gpu.read_to_device(stream)
    assert tenso.loads(stream.read()).tolist() == [0.0, 1.0, 2.0, 3.0]  # exactly one packet consumed


@needs_no_gpu
def test_backend_is_validated_and_write_from_device_takes_host_arrays(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tenso.gpu, "BACKEND", "mxnet")
    with pytest.raises(ValueError, match="framework must be one of"):
        tenso.gpu.read_to_device(io.BytesIO(b""))
    out = io.BytesIO()
    x = np.arange(6, dtype=np.int16)
    n = tenso.gpu.write_from_device({"x": x, "t": torch.ones(2)}, out)
    assert n == len(out.getvalue())
    back = tenso.loads(out.getvalue())
    assert back["x"].tolist() == x.tolist() and back["t"].tolist() == [1.0, 1.0]
    assert tenso_rs._gpu_init_calls() >= 0  # the native counter is importable in-process as well
