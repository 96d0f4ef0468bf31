"""Host<->device bandwidth of tenso.gpu against torch's own copies, per source kind a user has (issues #13, #19).
Needs an NVIDIA GPU.

For each size (default 64 MiB and 1 GiB float32 packets), host-to-device from each source kind, tenso's row and the
nearest thing a torch user does, with the physical bound of that source:

* registered   memory the pool already page-locked (a TensoCache pool lease pinned with ``_pin_host``: what the
               DataLoader pool and the node cache hand out). tenso: ``read_to_device(lease view)``; torch:
               ``dev.copy_(batch, non_blocking=True)``. Bound: the PCIe DMA (= pinned cudaMemcpy).
* file         a file in the page cache (read once before). tenso: ``read_to_device(open(path))``; torch:
               ``torch.from_numpy(np.fromfile(path)).to("cuda")``. Bound: min(page-cache copy, PCIe DMA).
* socket       a local stream socket fed by a thread. tenso: ``read_to_device(sock)``; torch:
               ``tenso.read_stream(sock)`` then ``.to("cuda")``. Bound: min(loopback socket, PCIe DMA).
* pageable     plain process memory (a bytes object). tenso: ``read_to_device(bytes)``; torch: ``.to("cuda")`` of a
               CPU tensor. Bound: min(CPU copy into pinned memory, PCIe DMA): pageable memory cannot be DMA'd as is.
* reference    torch ``dev.copy_(pinned)`` (cudaMemcpy from page-locked memory: the copy-engine limit, "pinned") and
               ``cpu.to("cuda")`` ("pageable"): the two ratios gpu-check.sh prints for every row.
* read/alone   ``read_stream`` of the file with no device copy (for the overlap ratio).

Device-to-host: ``write_from_device(cuda_tensor, sink)`` against the pinned and pageable references.

Every tenso row's device memory comes from the consumer: when ``tenso.gpu`` allocates in torch's caching allocator,
a repetition pays no cuMemAlloc/cuMemFree, as the torch rows do not either (the warm-up run fills the cache).

Rows are appended to ``bench_gpu.jsonl`` as they are measured (a failure later keeps them), and everything goes to
``bench_gpu.json`` at the end, in $OUT if set, else benchmarks/results/. A pool too large for /dev/shm (a 64 MB
container default) skips the registered rows of that size, saying so. Medians of REPS runs (5 for <= 256 MiB, 3
above), GB/s = 1e9 bytes/s. Targets (issue #19): registered >= 0.85x pinned; file and socket >= 2x pageable;
read+copy of a file <= 1.2x the slower of read alone and pinned copy alone; no pinned staging allocated in steady
state. Without a GPU it says so and exits 0 (1 with --require-gpu).

    .venv/bin/python benchmarks/bench_gpu.py [--sizes 64M,1G] [--quick] [--require-gpu]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Optional

import numpy as np

import tenso
import tenso.gpu

MiB = 1 << 20

BOUNDS = {
    "registered": "PCIe DMA (pinned cudaMemcpy)",
    "file": "min(page-cache copy, PCIe DMA)",
    "socket": "min(loopback socket, PCIe DMA)",
    "pageable": "min(CPU copy into pinned, PCIe DMA)",
    "reference": "",
}


class _Discard(io.RawIOBase):
    """A writable sink that drops what it is given (the 'memory' destination for D2H)."""

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        return memoryview(b).nbytes


def _median_s(fn: Callable[[], Any], reps: int, sync: Callable[[], None]) -> float:
    fn()  # warm-up (allocator caches, page cache, lazy CUDA init)
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _socket_source(packet: bytes) -> Any:
    """A connected stream socket whose peer sends ``packet`` from a thread (joined when the socket is closed)."""
    ours, theirs = socket.socketpair()
    sender = threading.Thread(target=lambda: (theirs.sendall(packet), theirs.close()), daemon=True)
    sender.start()
    return ours


def _size(text: str) -> int:
    text = text.strip().upper()
    mult = {"K": 1 << 10, "M": MiB, "G": 1 << 30}.get(text[-1], 1)
    return int(text.rstrip("KMG")) * mult


class _Rows:
    """Rows kept in order and appended to a JSON-lines file as they come."""

    def __init__(self, out_dir: str) -> None:
        os.makedirs(out_dir, exist_ok=True)
        self.path = os.path.join(out_dir, "bench_gpu.jsonl")
        self.rows: list[dict[str, Any]] = []
        open(self.path, "w").close()

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def gbps(self, op: str, source: str, impl: str, nbytes: int) -> Optional[float]:
        for r in self.rows:
            if (r.get("op"), r.get("source"), r.get("impl"), r.get("bytes")) == (op, source, impl, nbytes):
                return float(r["GBps"])
        return None


def _registered_rows(torch: Any, packet: bytes, host: np.ndarray, dev: Any, nbytes: int, reps: int,
                     sync: Callable[[], None], record: Callable[..., None]) -> None:
    """The packet, and a batch, in memory the pool page-locked (TensoCache lease + _pin_host)."""
    try:
        cache = tenso.TensoCache(2 * len(packet) + 16 * MiB)
    except (OSError, MemoryError, ValueError) as e:  # a small /dev/shm (containers): skip, say why
        print(f"registered {nbytes // MiB} MiB: no room for the pool in /dev/shm ({e}); rows skipped", flush=True)
        return
    try:
        try:
            _, mem = cache.lease(len(packet))
            _, batch_mem = cache.lease(nbytes)
        except Exception as e:  # noqa: BLE001 - the pool's segment could not be filled (tmpfs quota)
            print(f"registered {nbytes // MiB} MiB: cannot lease {len(packet) // MiB} MiB ({e}); rows skipped")
            return
        np.frombuffer(mem, np.uint8)[:] = np.frombuffer(packet, np.uint8)
        t0 = time.perf_counter()
        cache._pool._pin_host(0)  # the one-time cost of Collate(pin_memory=...): every page of the pool locked
        print(f"     pool register {cache.stats['pool_size'] // MiB} MiB: "
              f"{time.perf_counter() - t0:.4f} s", flush=True)
        batch = torch.frombuffer(batch_mem, dtype=torch.float32)
        batch.copy_(torch.from_numpy(host))
        assert batch.is_pinned()
        record("h2d", "registered", "tenso", nbytes,
               _median_s(lambda: tenso.gpu.read_to_device(mem, 0, framework="torch"), reps, sync))
        record("h2d", "registered", "torch", nbytes,
               _median_s(lambda: dev.copy_(batch, non_blocking=True), reps, sync))
        sync()
        del batch, mem, batch_mem
    finally:
        cache.close()
        cache.unlink()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="64M,1G")
    parser.add_argument("--quick", action="store_true", help="one repetition each (smoke run)")
    parser.add_argument("--require-gpu", action="store_true", help="exit 1 (not 0) when there is no GPU")
    args = parser.parse_args()
    out_dir = os.environ.get("OUT") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    missing = 1 if args.require_gpu else 0

    if not tenso.gpu.available():
        print(f"bench_gpu: no CUDA GPU here ({tenso.gpu._cuda_problem()}); nothing measured")
        return missing
    import torch

    if not torch.cuda.is_available():
        print(f"bench_gpu: torch {torch.__version__} sees no CUDA device; nothing measured")
        return missing
    sync = torch.cuda.synchronize
    rows = _Rows(out_dir)
    tenso.gpu.read_to_device(bytes(tenso.dumps(np.zeros(1, np.float32))), 0, framework="torch")  # opens the pool
    staging_before = tenso.gpu.staging_stats(0)
    rows.add({"machine": {"platform": platform.platform(), "python": sys.version.split()[0],
                          "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
                          "torch_cuda": torch.version.cuda, "numpy": np.__version__, "tenso": tenso.__version__}})

    def record(op: str, source: str, impl: str, nbytes: int, seconds: float) -> None:
        row = {"op": op, "source": source, "impl": impl, "bytes": nbytes, "seconds": seconds,
               "GBps": nbytes / seconds / 1e9, "bound": BOUNDS.get(source, "")}
        rows.add(row)
        print(f"{op:4s} {source:10s} {impl:8s} {nbytes // MiB:5d} MiB  {row['GBps']:7.2f} GB/s", flush=True)

    failures = 0
    for nbytes in (_size(s) for s in args.sizes.split(",")):
        reps = 1 if args.quick else (5 if nbytes <= 256 * MiB else 3)
        host = np.arange(nbytes // 4, dtype=np.float32)
        packet = bytes(tenso.dumps(host))
        path = None
        try:
            cpu = torch.from_numpy(host)
            dev = cpu.cuda()
            pinned = cpu.pin_memory()
            record("h2d", "reference", "pinned", nbytes,
                   _median_s(lambda: dev.copy_(pinned, non_blocking=True), reps, sync))
            record("h2d", "reference", "pageable", nbytes, _median_s(lambda: cpu.to("cuda"), reps, sync))

            _registered_rows(torch, packet, host, dev, nbytes, reps, sync, record)

            with tempfile.NamedTemporaryFile(prefix="tenso-bench-", suffix=".tnso", delete=False) as tmp:
                tmp.write(packet)
                path = tmp.name

            def from_file() -> None:
                with open(path, "rb", buffering=0) as f:
                    tenso.gpu.read_to_device(f, 0, framework="torch")

            def torch_file() -> None:
                torch.from_numpy(np.fromfile(path, dtype=np.uint8)).to("cuda")

            def read_alone() -> None:
                with open(path, "rb", buffering=0) as f:
                    tenso.read_stream(f)

            record("h2d", "file", "tenso", nbytes, _median_s(from_file, reps, sync))
            record("h2d", "file", "torch", nbytes, _median_s(torch_file, reps, sync))
            record("read", "file", "alone", nbytes, _median_s(read_alone, reps, sync))

            def from_socket() -> None:
                with _socket_source(packet) as s:
                    tenso.gpu.read_to_device(s, 0, framework="torch")

            def torch_socket() -> None:
                with _socket_source(packet) as s:
                    torch.from_numpy(tenso.read_stream(s)).to("cuda")

            record("h2d", "socket", "tenso", nbytes, _median_s(from_socket, reps, sync))
            record("h2d", "socket", "torch", nbytes, _median_s(torch_socket, reps, sync))

            record("h2d", "pageable", "tenso", nbytes,
                   _median_s(lambda: tenso.gpu.read_to_device(packet, 0, framework="torch"), reps, sync))

            record("d2h", "reference", "pinned", nbytes,
                   _median_s(lambda: pinned.copy_(dev, non_blocking=True), reps, sync))
            record("d2h", "reference", "pageable", nbytes, _median_s(lambda: dev.cpu(), reps, sync))
            record("d2h", "pageable", "tenso", nbytes,
                   _median_s(lambda: tenso.gpu.write_from_device(dev, _Discard()), reps, sync))
            del pinned, dev, cpu
            torch.cuda.empty_cache()
        except Exception as e:  # noqa: BLE001 - a size that fails keeps the rows measured so far; reported
            failures += 1
            print(f"bench_gpu: {nbytes // MiB} MiB failed: {type(e).__name__}: {e}", flush=True)
        finally:
            if path is not None:
                os.unlink(path)

    targets = []

    def target(what: str, ratio: Optional[float], want: str, met: Callable[[float], bool]) -> None:
        if ratio is not None:
            row = {"what": what, "ratio": ratio, "target": want, "met": bool(met(ratio))}
            targets.append(row)
            rows.add(row)

    for nbytes in sorted({r["bytes"] for r in rows.rows if "bytes" in r}):
        mib = nbytes // MiB
        pinned_bw = rows.gbps("h2d", "reference", "pinned", nbytes)
        pageable_bw = rows.gbps("h2d", "reference", "pageable", nbytes)
        reg = rows.gbps("h2d", "registered", "tenso", nbytes)
        if reg and pinned_bw:
            target(f"h2d {mib} MiB registered / pinned", reg / pinned_bw, ">= 0.85", lambda r: r >= 0.85)
        for source in ("file", "socket"):
            bw = rows.gbps("h2d", source, "tenso", nbytes)
            if bw and pageable_bw:
                target(f"h2d {mib} MiB {source} / pageable", bw / pageable_bw, ">= 2", lambda r: r >= 2)
        both, alone = rows.gbps("h2d", "file", "tenso", nbytes), rows.gbps("read", "file", "alone", nbytes)
        if both and alone and pinned_bw:
            target(f"overlap {mib} MiB file: (read+copy) / max(read, copy)",
                   (1 / both) / max(1 / alone, 1 / pinned_bw), "<= 1.2", lambda r: r <= 1.2)
    staging_after = tenso.gpu.staging_stats(0)
    target("pinned staging buffers allocated during the run", float(staging_after["allocations"]
           - staging_before["allocations"]), "== 0", lambda r: r == 0)
    for t in targets:
        print(f"target {t['what']}: {t['ratio']:.2f} (want {t['target']}){'' if t['met'] else '  NOT MET'}")
    payload = {"bench": "bench_gpu", "results": rows.rows, "targets": targets,
               "staging": {"before": staging_before, "after": staging_after}}
    path = os.path.join(out_dir, "bench_gpu.json")
    with open(path, "w") as out:
        json.dump(payload, out, indent=1)
    print(f"bench_gpu: wrote {path} (rows also in {rows.path})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
