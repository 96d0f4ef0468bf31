"""DataLoader collation: torch's default_collate (file_descriptor and file_system strategies) against
tenso.torch.collate and tenso.torch.Collate(pool=...), on real DataLoaders, interleaved.

Every loader is a real ``DataLoader`` (2 workers, batch 64, persistent workers, fork), made and warmed once; then
epochs run in turn A B C D, A B C D, ... starting at a rotating offset. Per loader: batches/s over each epoch (the
main process only iterates), and the main process's receive time per batch (unpickling the worker's result:
fetching descriptors, mapping segments, adopting leases; timed around ``ForkingPickler.loads`` in the result
queue), plus the bytes that went through the pipe. Medians over epochs; ratios against default_collate with the
file_descriptor strategy (torch's default).

    .venv/bin/python benchmarks/bench_torch.py --quick         # ~1-2 minutes
    .venv/bin/python benchmarks/bench_torch.py --crossover     # in-band against one segment, by batch size

Results: ``benchmarks/results/torch-latest.json`` (and ``torch-crossover-latest.json``).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing.queues as mpq
import os
import statistics
import sys
import time
from multiprocessing.reduction import ForkingPickler
from typing import Any

import numpy as np
import torch
import torch.multiprocessing as tmp
from torch.utils.data import DataLoader, Dataset, default_collate

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import log, machine_info  # noqa: E402

import tenso.torch as tt  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
BATCH = 64


class DictDataset(Dataset):
    """Samples that are a dict of 20 small float32 arrays (64 values each)."""

    def __init__(self, n: int, fields: int = 20, width: int = 64) -> None:
        rng = np.random.default_rng(0)
        self.n = n
        self.ring = [{f"f{k}": rng.standard_normal(width, dtype=np.float32) for k in range(fields)} for _ in range(8)]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return self.ring[i % 8]


class ImageDataset(Dataset):
    """uint8 3x224x224 images (a batch of 64 is 9.6 MB) with an int label."""

    def __init__(self, n: int) -> None:
        rng = np.random.default_rng(0)
        self.n = n
        self.ring = [rng.integers(0, 255, (3, 224, 224), dtype=np.uint8) for _ in range(8)]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return self.ring[i % 8], i % 10


class _Timed(ForkingPickler):
    """The result queue's unpickler, timed: the main process's receive cost per batch is the time reading the
    message from the pipe (once it is ready) plus unpickling it."""

    current: list[float] | None = None
    nbytes: list[int] | None = None
    read_s = 0.0

    @classmethod
    def loads(cls, data: Any, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        t = time.perf_counter()
        out = ForkingPickler.loads(data, *args, **kwargs)
        if cls.current is not None and cls.nbytes is not None:
            cls.current.append(time.perf_counter() - t + cls.read_s)
            cls.nbytes.append(len(data))
        cls.read_s = 0.0
        return out


def _timed_read(recv_bytes: Any) -> Any:
    def read(*args: Any) -> Any:
        t = time.perf_counter()
        data = recv_bytes(*args)
        _Timed.read_s = time.perf_counter() - t
        return data

    return read


def make_loader(ds: Dataset, fn: Any, strategy: str) -> Any:
    tmp.set_sharing_strategy(strategy)
    loader = DataLoader(ds, batch_size=BATCH, num_workers=2, collate_fn=fn, persistent_workers=True,
                        prefetch_factor=2, multiprocessing_context="fork")
    for _ in loader:  # warm: workers start (fork) with this strategy and keep it
        pass
    tmp.set_sharing_strategy("file_descriptor")
    queue = loader._iterator._worker_result_queue
    queue._recv_bytes = _timed_read(queue._recv_bytes)
    return loader


def epoch(loader: Any) -> tuple[float, list[float], list[int]]:
    recv: list[float] = []
    nbytes: list[int] = []
    _Timed.current, _Timed.nbytes = recv, nbytes
    t = time.perf_counter()
    n = 0
    for _batch in loader:
        n += 1
    dt = time.perf_counter() - t
    _Timed.current = _Timed.nbytes = None
    return n / dt, recv, nbytes


def run_workload(name: str, ds: Dataset, methods: dict[str, tuple[Any, str]], reps: int) -> dict[str, Any]:
    loaders = {m: make_loader(ds, fn, strat) for m, (fn, strat) in methods.items()}
    per: dict[str, dict[str, list[float]]] = {m: {"bps": [], "recv": [], "pipe": []} for m in methods}
    names = list(methods)
    for r in range(reps):
        for j in range(len(names)):
            m = names[(r + j) % len(names)]
            bps, recv, nbytes = epoch(loaders[m])
            per[m]["bps"].append(bps)
            per[m]["recv"].extend(recv)
            per[m]["pipe"].extend(nbytes)
    out: dict[str, Any] = {}
    for m in names:
        out[m] = {
            "batches_per_s": statistics.median(per[m]["bps"]),
            "batches_per_s_all": per[m]["bps"],
            "receive_ms": statistics.median(per[m]["recv"]) * 1e3,
            "pipe_bytes_per_batch": statistics.median(per[m]["pipe"]),
        }
    base = out["default_fd"]
    for m in names:
        out[m]["speedup_batches"] = out[m]["batches_per_s"] / base["batches_per_s"]
        out[m]["speedup_receive"] = base["receive_ms"] / out[m]["receive_ms"]
    for loader in loaders.values():
        loader._iterator._shutdown_workers()
    log(f"== {name}")
    log(f"{'method':12} {'batches/s':>10} {'x':>6} {'recv ms':>9} {'x':>6} {'pipe B':>9}")
    for m in names:
        o = out[m]
        log(f"{m:12} {o['batches_per_s']:10.1f} {o['speedup_batches']:6.2f} {o['receive_ms']:9.3f} "
            f"{o['speedup_receive']:6.2f} {o['pipe_bytes_per_batch']:9.0f}")
    return out


def crossover(reps: int, batches: int) -> dict[str, Any]:
    """collate always in band against always one segment, on dict batches of growing size."""
    res: dict[str, Any] = {}
    for width in (4, 16, 64, 256, 1024):
        ds = DictDataset(BATCH * batches, fields=20, width=width)
        nbytes = 20 * BATCH * width * 4
        methods = {
            "default_fd": (default_collate, "file_descriptor"),
            "inband": (lambda b: tt.collate(b, inband_bytes=1 << 40), "file_descriptor"),
            "segment": (lambda b: tt.collate(b, inband_bytes=0), "file_descriptor"),
        }
        res[str(nbytes)] = run_workload(f"dict20 width {width} ({nbytes} B/batch)", ds, methods, reps)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--crossover", action="store_true")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args()
    mpq._ForkingPickler = _Timed  # type: ignore[attr-defined]
    reps = args.reps or (3 if args.quick else 7)
    os.makedirs(args.out, exist_ok=True)
    if args.crossover:
        payload = {"machine": machine_info(), "torch": torch.__version__, "crossover": crossover(reps, 20)}
        path = os.path.join(args.out, "torch-crossover-latest.json")
    else:
        pool = tt.Collate(pool="256MB")
        methods = {
            "default_fd": (default_collate, "file_descriptor"),
            "default_fs": (default_collate, "file_system"),
            "collate": (tt.collate, "file_descriptor"),
            "pool": (pool, "file_descriptor"),
        }
        dict_batches, image_batches = (30, 12) if args.quick else (100, 40)
        results = {
            "dict20": run_workload("dict of 20 small arrays", DictDataset(BATCH * dict_batches), methods, reps),
            "image": run_workload("uint8 3x224x224 images", ImageDataset(BATCH * image_batches), methods, reps),
        }
        targets = {
            "dict20 collate batches/s >= 3.5x": results["dict20"]["collate"]["speedup_batches"],
            "dict20 collate receive >= 3.5x": results["dict20"]["collate"]["speedup_receive"],
            "image collate batches/s >= 1.0x": results["image"]["collate"]["speedup_batches"],
            "image pool batches/s >= 1.5x": results["image"]["pool"]["speedup_batches"],
        }
        limits = {k: float(k.rsplit(">= ", 1)[1].rstrip("x")) for k in targets}
        log("== targets")
        for k, v in targets.items():
            log(f"{k:40} {v:6.2f}  {'PASS' if v >= limits[k] else 'MISS'}")
        payload = {
            "machine": machine_info(),
            "torch": torch.__version__,
            "method": __doc__,
            "results": results,
            "targets": {k: {"measured": v, "limit": limits[k], "pass": v >= limits[k]} for k, v in targets.items()},
            "pool_stats_after": dict(pool.pool.stats),
        }
        path = os.path.join(args.out, "torch-latest.json")
    with open(path, "w") as f:
        json.dump(payload, f, indent=1, default=str)
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
