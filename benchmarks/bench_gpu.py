"""Host<->device bandwidth of tenso.gpu against torch's own copies (issue #13). Needs an NVIDIA GPU.

For 64 MiB and 1 GiB float32 packets, from memory (BytesIO, and the bytes object itself), a file (page cache) and
shm (/dev/shm: read as a file, and mapped with mmap, the TensoCache/TensoShm case), measures:

* h2d/tenso      tenso.gpu.read_to_device(source, 0, "torch")  (parse + read + pinned staging + host-to-device,
                 synchronised; the tensor is tenso's device allocation handed over through DLPack)
* d2h/tenso      tenso.gpu.write_from_device(cuda_tensor, dest) (device-to-host + write)
* h2d|d2h/pinned torch pinned tensor .copy_ (cudaMemcpy from page-locked memory: the copy-engine limit)
* h2d|d2h/pageable  torch CPU tensor .to("cuda") / cuda tensor .cpu()
* h2d|d2h/cupy   cupy.asarray / .get() (if CuPy is installed)
* h2d/pool/pageable|pinned  a DataLoader batch as tenso.torch.Collate delivers it (a view of a TensoCache pool lease)
                 .copy_ to the device before and after the pool is page-locked (Collate(pin_memory=...))
* read/alone     read_stream of the same source with no device copy (for the overlap ratio)

The pinned staging pool's allocation count is recorded before and after (it must not grow: 0 cuMemHostAlloc in
steady state). Medians of REPS runs (5 for 64 MiB, 3 for 1 GiB), reported as GB/s (1e9 bytes/s), and the targets of the issue:
tenso >= 0.85x pinned, >= 2x pageable, read+copy of 1 GiB <= 1.2x the slower of read alone and pinned copy alone.
Writes JSON to $OUT/bench_gpu.json if OUT is set, else benchmarks/results/bench_gpu.json. Without a GPU it says so
and exits 0 having measured nothing.

    .venv/bin/python benchmarks/bench_gpu.py [--sizes 64M,1G] [--quick]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

import numpy as np

import tenso
import tenso.gpu

MiB = 1 << 20


class _Discard(io.RawIOBase):
    """A writable sink that drops what it is given (the 'memory' destination for D2H)."""

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        return memoryview(b).nbytes


class _Borrowed:
    """A bytes-like source handed to read_to_device as it is (read from memory without the GIL)."""

    def __init__(self, data: bytes) -> None:
        self.buffer: Any = data

    def close(self) -> None:
        pass


class _Mapped:
    """A read-only mmap of a /dev/shm file (what TensoShm / TensoCache readers see), handed over as a buffer."""

    def __init__(self, path: str) -> None:
        import mmap

        with open(path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.buffer: Any = memoryview(self._map)

    def close(self) -> None:
        self.buffer.release()
        self._map.close()


def _median_s(fn: Callable[[], Any], reps: int, sync: Callable[[], None]) -> float:
    fn()  # warm-up (allocator, page cache, lazy CUDA init)
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _pool_batch_h2d(torch: Any, host: np.ndarray, dev: Any, nbytes: int, reps: int, sync: Callable[[], None],
                    record: Callable[[str, str, str, int, float], None]) -> None:
    """A DataLoader batch as tenso.torch.Collate hands it over (a view of a pool lease) copied to the device, before
    and after the pool is page-locked (Collate(pin_memory=...) does _pin_host in the main process)."""
    try:
        cache = tenso.TensoCache(nbytes + nbytes // 8 + 16 * MiB)
    except (OSError, MemoryError) as e:  # a small /dev/shm (containers): skip, say why
        print(f"h2d pool: no room for a {nbytes // MiB} MiB pool in /dev/shm ({e}); skipped")
        return
    try:
        _, mem = cache.lease(nbytes)
        batch = torch.frombuffer(mem, dtype=torch.float32)
        batch.copy_(torch.from_numpy(host))
        record("h2d", "pool", "pageable", nbytes,
               _median_s(lambda: dev.copy_(batch, non_blocking=True), reps, sync))
        t0 = time.perf_counter()
        cache._pool._pin_host(0)
        print(f"     pool register {nbytes // MiB} MiB: {time.perf_counter() - t0:.4f} s", flush=True)
        assert batch.is_pinned()
        record("h2d", "pool", "pinned", nbytes, _median_s(lambda: dev.copy_(batch, non_blocking=True), reps, sync))
        sync()
        del batch, mem
    finally:
        cache.close()
        cache.unlink()


def _size(text: str) -> int:
    text = text.strip().upper()
    mult = {"K": 1 << 10, "M": MiB, "G": 1 << 30}.get(text[-1], 1)
    return int(text.rstrip("KMG")) * mult


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="64M,1G")
    parser.add_argument("--quick", action="store_true", help="one repetition each (smoke run)")
    args = parser.parse_args()
    out_dir = os.environ.get("OUT") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

    if not tenso.gpu.available():
        print(f"bench_gpu: no CUDA GPU here ({tenso.gpu._cuda_problem()}); nothing measured")
        return 0
    import torch

    if not torch.cuda.is_available():
        print(f"bench_gpu: torch {torch.__version__} sees no CUDA device; nothing measured")
        return 0
    try:
        import cupy
    except ImportError:
        cupy = None
    sync = torch.cuda.synchronize
    results: list[dict[str, Any]] = []
    tenso.gpu.read_to_device(bytes(tenso.dumps(np.zeros(1, np.float32))), 0, framework="torch")  # opens the pool
    staging_before = tenso.gpu.staging_stats(0)

    def record(op: str, source: str, impl: str, nbytes: int, seconds: float) -> None:
        row = {"op": op, "source": source, "impl": impl, "bytes": nbytes, "seconds": seconds,
               "GBps": nbytes / seconds / 1e9}
        results.append(row)
        print(f"{op:4s} {source:7s} {impl:9s} {nbytes // MiB:5d} MiB  {row['GBps']:7.2f} GB/s", flush=True)

    shm_dir = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    for nbytes in (_size(s) for s in args.sizes.split(",")):
        reps = 1 if args.quick else (5 if nbytes <= 256 * MiB else 3)
        host = np.arange(nbytes // 4, dtype=np.float32)
        packet = bytes(tenso.dumps(host))
        paths = {}
        with tempfile.NamedTemporaryFile(prefix="tenso-bench-", suffix=".tnso", delete=False) as tmp:
            tmp.write(packet)
            paths["file"] = tmp.name
        paths["shm"] = os.path.join(shm_dir, f"tenso-bench-gpu-{os.getpid()}.tnso")
        with open(paths["shm"], "wb") as shm_file:
            shm_file.write(packet)
        try:
            def opener(source: str) -> Callable[[], Any]:
                if source == "memory":
                    return lambda: io.BytesIO(packet)
                if source == "bytes":
                    return lambda: _Borrowed(packet)
                if source == "shm-map":
                    return lambda: _Mapped(paths["shm"])
                return lambda: open(paths[source], "rb", buffering=0)

            for source in ("memory", "bytes", "file", "shm", "shm-map"):
                make = opener(source)

                def h2d(make: Callable[[], Any] = make) -> None:
                    src = make()
                    try:
                        tenso.gpu.read_to_device(getattr(src, "buffer", src), 0, framework="torch")
                    finally:
                        src.close()

                def read_alone(make: Callable[[], Any] = make) -> None:
                    src = make()
                    try:
                        buffer = getattr(src, "buffer", None)
                        tenso.loads(buffer) if buffer is not None else tenso.read_stream(src)
                    finally:
                        src.close()

                record("h2d", source, "tenso", nbytes, _median_s(h2d, reps, sync))
                record("read", source, "alone", nbytes, _median_s(read_alone, reps, sync))

            cpu = torch.from_numpy(host)
            pinned = cpu.pin_memory()
            dev = cpu.cuda()
            record("h2d", "memory", "pinned", nbytes, _median_s(lambda: dev.copy_(pinned, non_blocking=True), reps, sync))
            record("h2d", "memory", "pageable", nbytes, _median_s(lambda: cpu.to("cuda"), reps, sync))
            _pool_batch_h2d(torch, host, dev, nbytes, reps, sync, record)
            record("d2h", "memory", "pinned", nbytes, _median_s(lambda: pinned.copy_(dev, non_blocking=True), reps, sync))
            record("d2h", "memory", "pageable", nbytes, _median_s(lambda: dev.cpu(), reps, sync))
            if cupy is not None:
                record("h2d", "memory", "cupy", nbytes, _median_s(lambda: cupy.asarray(host), reps,
                                                                  cupy.cuda.Device().synchronize))
                cdev = cupy.asarray(host)
                record("d2h", "memory", "cupy", nbytes, _median_s(lambda: cdev.get(), reps,
                                                                  cupy.cuda.Device().synchronize))
            record("d2h", "memory", "tenso", nbytes,
                   _median_s(lambda: tenso.gpu.write_from_device(dev, _Discard()), reps, sync))
            for source in ("file", "shm"):
                def d2h(path: str = paths[source]) -> None:
                    with open(path, "wb", buffering=0) as dest:
                        tenso.gpu.write_from_device(dev, dest)

                record("d2h", source, "tenso", nbytes, _median_s(d2h, reps, sync))
            del pinned, dev
            torch.cuda.empty_cache()
        finally:
            for path in paths.values():
                os.unlink(path)

    def gbps(op: str, source: str, impl: str, nbytes: int) -> float:
        return next(r["GBps"] for r in results if (r["op"], r["source"], r["impl"], r["bytes"]) == (op, source, impl, nbytes))

    targets = []
    for nbytes in sorted({r["bytes"] for r in results}):
        for op in ("h2d", "d2h"):
            tenso_bw = gbps(op, "memory", "tenso", nbytes)
            targets.append({"what": f"{op} {nbytes // MiB} MiB tenso/pinned", "ratio": tenso_bw / gbps(op, "memory", "pinned", nbytes),
                            "target": ">= 0.85"})
            targets.append({"what": f"{op} {nbytes // MiB} MiB tenso/pageable", "ratio": tenso_bw / gbps(op, "memory", "pageable", nbytes),
                            "target": ">= 2"})
        t_both = nbytes / gbps("h2d", "file", "tenso", nbytes)
        t_slower = max(nbytes / gbps("read", "file", "alone", nbytes), nbytes / gbps("h2d", "memory", "pinned", nbytes))
        targets.append({"what": f"overlap {nbytes // MiB} MiB file: (read+copy)/max(read, copy)",
                        "ratio": t_both / t_slower, "target": "<= 1.2"})
    staging_after = tenso.gpu.staging_stats(0)
    targets.append({"what": "pinned staging buffers allocated during the run (steady state)",
                    "ratio": staging_after["allocations"] - staging_before["allocations"], "target": "== 0"})
    for t in targets:
        print(f"target {t['what']}: {t['ratio']:.2f} (want {t['target']})")
    payload = {
        "bench": "bench_gpu",
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0], "gpu": torch.cuda.get_device_name(0),
                    "torch": torch.__version__, "torch_cuda": torch.version.cuda, "numpy": np.__version__,
                    "tenso": tenso.__version__, "cupy": getattr(cupy, "__version__", None)},
        "results": results,
        "targets": targets,
        "staging": {"before": staging_before, "after": staging_after},
    }
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "bench_gpu.json")
    with open(path, "w") as out:
        json.dump(payload, out, indent=1)
    print(f"bench_gpu: wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
