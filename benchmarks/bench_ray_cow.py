"""tenso.ray's default safe mode (copy-on-write views of the object store) against Ray's default and Ray's own
zero-copy torch mode (issue #17's Ray rows).

Method: one local cluster (ray.init(num_cpus=2)) whose object store is pre-touched, and one driver process per
implementation, each a separate Ray job on that cluster with its own workers:

  default   Ray as installed, nothing registered (torch tensors are pickled in band and copied for each reader)
  ray_zc    RAY_ENABLE_ZERO_COPY_TORCH_TENSORS=1 in the driver and the job's workers: torch tensors come back as
            views of the store itself (fast; one reader's write reaches every other, see tests/test_ray_cow.py)
  tenso     tenso.ray.register(include_torch=True) + runtime_env(): the default safe mode, every CPU tensor a
            private copy-on-write view of the store (a write stays with its writer)

Payloads: a 64 MiB torch float32 tensor, a 64 MiB torch bfloat16 tensor, a state dict of 8 x 8 MiB float32
tensors, and a 64 MiB builtin numpy float32 array (Ray's own zero-copy path; tenso must never be slower there).
Ops, timed in wall time (medians over repetitions; cells interleaved A B C, rotating who goes first):

  put        ray.put in the driver
  get        ray.get in the driver of the object it just put
  actor_get  ray.get inside a long-lived actor (timed in the actor) of an object the driver put
  actor_read ray.get inside the actor followed by a full read (sum) of the value: the deferred cost of a mapping
             (first-touch page faults) is in this row, not in `get`
  task_in    a task that receives the payload as its argument and returns a scalar (driver wall time)
  task_echo  a task that receives the payload and returns it (driver wall time, result received)

Ratios: for every implementation, its speed-up over Ray's default = default time / its time, per cell (each
driver is its own process). Issue #17's targets compare tenso's speed-up with ray_zc's: get within 2x of ray_zc
(tenso speed-up >= ray_zc speed-up / 2), put / task_in / task_echo within 1.25x, get >= 20x over Ray's default,
and builtin numpy never slower than Ray's default (>= 0.95x, the noise allowance of the other Ray targets).

Memory: in each job, 4 actors each hold ray.get of one 64 MiB tensor; the figure is the sum of the 4 actors'
Private_Dirty growth (/proc/<pid>/smaps_rollup) across that get and a full read. Target: tenso < 1 copy.

    .venv/bin/python benchmarks/bench_ray_cow.py                     # figures (about 5 minutes on 2 cores)
    .venv/bin/python benchmarks/bench_ray_cow.py --reps 1 --size-mib 4   # smoke: does it run

JSON and a chart go to benchmarks/results/ray-cow-latest.{json,png} (``--out`` to change the stem).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time

from bench_ray import _close_drivers, _reply
from harness import log, machine_info

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MAIN_PY = os.path.join(ROOT, ".venv", "bin", "python")
MIB = 1 << 20
PAYLOADS = ["torch_f32", "torch_bf16", "state_dict_8x", "numpy_f32"]
OPS = ["put", "get", "actor_get", "actor_read", "task_in", "task_echo"]
MODES = ["default", "ray_zc", "tenso"]
ZC_ENV = "RAY_ENABLE_ZERO_COPY_TORCH_TENSORS"


def make(name: str, size: int):
    """A payload of ``size`` bytes (the state dict: 8 tensors of size / 8)."""
    import numpy as np
    import torch

    if name == "torch_f32":
        return torch.ones(size // 4, dtype=torch.float32)
    if name == "torch_bf16":
        return torch.ones(size // 2, dtype=torch.bfloat16)
    if name == "state_dict_8x":
        return {f"layer{i}.weight": torch.ones(size // 32, dtype=torch.float32) for i in range(8)}
    if name == "numpy_f32":
        return np.ones(size // 4, np.float32)
    raise KeyError(name)


def checksum(value) -> float:
    """Reads every byte of a payload; allocates nothing large."""
    import numpy as np
    import torch

    if isinstance(value, dict):
        return sum(checksum(v) for v in value.values())
    if isinstance(value, np.ndarray):
        return float(value.sum(dtype=np.float64))
    return float(value.sum(dtype=torch.float64))


def private_dirty() -> int:
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("Private_Dirty:"):
                return int(line.split()[1]) * 1024
    return 0


def driver(mode: str, address: str, size: int) -> None:
    """One Ray job: reads 'payload op' lines, answers each with one timed sample (seconds) as JSON."""
    import ray

    env: dict = {}
    if mode == "ray_zc":
        env = {"env_vars": {ZC_ENV: "1"}}
    elif mode == "tenso":
        import tenso.ray

        env = tenso.ray.runtime_env(include_torch=True)
    ray.init(address=address, runtime_env=env, logging_level="ERROR", log_to_driver=False)
    if mode == "tenso":
        tenso.ray.register(include_torch=True)

    @ray.remote
    def receive(x):
        return 0

    @ray.remote
    def echo(x):
        return x

    @ray.remote(num_cpus=0)
    class Reader:
        def get(self, refs, read):
            t0 = time.perf_counter()
            value = ray.get(refs[0])
            if read:
                checksum(value)
            return time.perf_counter() - t0

        def hold(self, refs):
            gc.collect()
            before = private_dirty()
            self.value = ray.get(refs[0])
            checksum(self.value)
            return private_dirty() - before

        def warm(self):
            import ml_dtypes  # noqa: F401
            import torch  # noqa: F401

            return 0

    @ray.remote
    def warm():
        import ml_dtypes  # noqa: F401
        import torch  # noqa: F401

        return 0

    reader = Reader.remote()
    ray.get([warm.remote() for _ in range(4)] + [reader.warm.remote()])  # start the job's workers, import torch
    payloads: dict = {}
    print("@@ready", flush=True)
    for line in sys.stdin:
        name, op = line.split()
        try:
            if op == "memory":
                res = {"added": memory(ray, Reader, size)}
            else:
                if name not in payloads:
                    payloads.clear()
                    payloads[name] = make(name, size)
                res = {"t": sample(ray, op, payloads[name], reader, receive, echo)}
        except Exception as exc:  # e.g. Ray's memory monitor killed a worker: report it, skip the sample
            res = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        print("@@" + json.dumps(res), flush=True)


def sample(ray, op: str, x, reader, receive, echo) -> float:
    if op == "put":
        t0 = time.perf_counter()
        ref = ray.put(x)
        return time.perf_counter() - t0
    if op == "get":
        ref = ray.put(x)
        t0 = time.perf_counter()
        y = ray.get(ref)
        t = time.perf_counter() - t0
        del y
        return t
    if op in ("actor_get", "actor_read"):
        ref = ray.put(x)
        return float(ray.get(reader.get.remote([ref], op == "actor_read")))
    t0 = time.perf_counter()
    y = ray.get((receive if op == "task_in" else echo).remote(x))
    t = time.perf_counter() - t0
    del y
    return t


def memory(ray, reader_cls, size: int) -> int:
    """4 actors each hold ray.get of one tensor of ``size`` bytes: their Private_Dirty growth, summed."""
    import torch

    ref = ray.put(torch.ones(size // 4, dtype=torch.float32))
    holders = [reader_cls.remote() for _ in range(4)]
    try:
        ray.get([h.warm.remote() for h in holders])
        warm_ref = ray.put(torch.ones(MIB // 4))
        ray.get([h.get.remote([warm_ref], True) for h in holders])  # the store mapped, tenso loaded
        return int(sum(ray.get([h.hold.remote([ref]) for h in holders])))
    finally:
        for h in holders:
            ray.kill(h)


def run(procs: dict, reps: int) -> tuple[dict, dict]:
    samples: dict = {}
    modes = list(procs)
    for r in range(reps):
        for name in PAYLOADS:
            for op in OPS:
                order = modes[r % len(modes):] + modes[: r % len(modes)]
                for mode in order:
                    p = procs[mode]
                    p.stdin.write(f"{name} {op}\n")
                    p.stdin.flush()
                    res = json.loads(_reply(p, mode))
                    if "error" in res:
                        log(f"[{mode}] {name} {op}: sample skipped: {res['error']}")
                        continue
                    samples.setdefault((name, op, mode), []).append(res["t"])
        log(f"rep {r + 1}/{reps} done")
    mem = {}
    for mode, p in procs.items():  # one at a time: 4 actors each
        p.stdin.write("torch_f32 memory\n")
        p.stdin.flush()
        res = json.loads(_reply(p, mode))
        mem[mode] = res.get("added", res.get("error"))
    return samples, mem


def targets(by: dict, mem: dict, size: int) -> list:
    out = []

    def speedup(name, op, mode):
        base, t = by.get((name, op, "default")), by.get((name, op, mode))
        return base / t if base and t else None

    for name in PAYLOADS[:3]:
        for op, within in (("get", 2.0), ("actor_get", 2.0), ("put", 1.25), ("task_in", 1.25), ("task_echo", 1.25)):
            ours, theirs = speedup(name, op, "tenso"), speedup(name, op, "ray_zc")
            if ours and theirs:
                out.append({"what": f"{name} {op}: tenso speed-up >= ray_zc's / {within}", "tenso": ours,
                            "ray_zc": theirs, "ok": ours >= theirs / within})
        for op in ("get", "actor_get"):
            ours = speedup(name, op, "tenso")
            if ours:
                out.append({"what": f"{name} {op}: tenso >= 20x Ray's default", "tenso": ours, "ok": ours >= 20})
    for op in OPS:
        ours = speedup("numpy_f32", op, "tenso")
        if ours:
            out.append({"what": f"numpy_f32 {op}: tenso never slower than Ray (>= 0.95x)", "tenso": ours,
                        "ok": ours >= 0.95})
    if isinstance(mem.get("tenso"), int):
        out.append({"what": "4 actors holding one tensor add < 1 copy of Private_Dirty", "tenso_bytes": mem["tenso"],
                    "copy_bytes": size, "ok": mem["tenso"] < size})
    return out


def chart(path: str, by: dict, mem: dict, size: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PAYLOADS) + 1, figsize=(4 * (len(PAYLOADS) + 1), 4.2))
    for ax, name in zip(axes, PAYLOADS):
        xs = range(len(OPS))
        for k, mode in enumerate(("ray_zc", "tenso")):
            vals = [(by.get((name, op, "default")) or 0) / (by.get((name, op, mode)) or float("inf")) for op in OPS]
            ax.bar([x + 0.4 * k for x in xs], vals, width=0.4, label=mode)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_yscale("log")
        ax.set_xticks([x + 0.2 for x in xs], OPS, rotation=45, ha="right", fontsize=8)
        ax.set_title(f"{name} ({size // MIB} MiB)", fontsize=9)
        ax.set_ylabel("speed-up over Ray's default (log)", fontsize=8)
    axes[0].legend(fontsize=8)
    ax = axes[-1]
    modes = [m for m in MODES if isinstance(mem.get(m), int)]
    ax.bar(modes, [mem[m] / MIB for m in modes], color=["tab:gray", "tab:blue", "tab:orange"][: len(modes)])
    ax.axhline(size / MIB, color="k", lw=0.8, ls="--")
    ax.set_title("4 actors hold one tensor: Private_Dirty added", fontsize=9)
    ax.set_ylabel("MiB (dashed: one copy)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--size-mib", type=int, default=64, help="payload size (64 is the issue's; 4 for a smoke run)")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "ray-cow-latest"))
    ap.add_argument("--driver")
    ap.add_argument("--address")
    args = ap.parse_args()
    size = args.size_mib * MIB
    if args.driver:
        driver(args.driver, args.address, size)
        return

    import numpy as np
    import ray

    store = max(512 * MIB, 16 * size)
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        logging_level="ERROR",
        object_store_memory=store,
        _system_config={"num_workers_soft_limit": 64},  # three jobs on two CPUs: keep idle workers, not restart them
    )
    refs = [ray.put(np.ones(16 * MIB, np.float32)) for _ in range(store // (64 * MIB) - 1)]  # pre-touch the store
    del refs
    address = ray.get_runtime_context().gcs_address
    procs = {}
    for mode in MODES:
        env = dict(os.environ)
        env.pop(ZC_ENV, None)
        if mode == "ray_zc":
            env[ZC_ENV] = "1"
        procs[mode] = subprocess.Popen(
            [MAIN_PY, os.path.abspath(__file__), "--driver", mode, "--address", address, "--size-mib",
             str(args.size_mib)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=HERE,
        )
    for mode, p in procs.items():
        assert _reply(p, mode) == "ready", mode
    try:
        samples, mem = run(procs, args.reps)
    finally:
        _close_drivers(procs)
        ray.shutdown()

    by = {key: statistics.median(ts) for key, ts in samples.items()}
    lines = [f"{'payload':<14} {'op':<10} " + " ".join(f"{m:>10}" for m in MODES) + "   ray_zc/def  tenso/def"]
    for name in PAYLOADS:
        for op in OPS:
            cells = " ".join(
                f"{by[(name, op, m)] * 1e3:>8.3f}ms" if (name, op, m) in by else f"{'-':>10}" for m in MODES
            )
            base = by.get((name, op, "default"))
            sp = [f"{base / by[(name, op, m)]:>9.2f}x" if base and (name, op, m) in by else f"{'-':>10}"
                  for m in ("ray_zc", "tenso")]
            lines.append(f"{name:<14} {op:<10} {cells}  {sp[0]}  {sp[1]}")
    lines.append("memory (4 actors, Private_Dirty added): " + ", ".join(
        f"{m} {v / MIB:.1f} MiB" if isinstance(v, int) else f"{m} {v}" for m, v in mem.items()))
    print("\n".join(lines))
    checks = targets(by, mem, size)
    for t in checks:
        detail = ", ".join(f"{k} {v:.2f}x" for k, v in t.items() if k in ("tenso", "ray_zc"))
        print(f"{'PASS' if t['ok'] else 'MISS'}  {t['what']:<66} {detail}")

    import torch

    versions = {"ray": ray.__version__, "numpy": np.__version__, "torch": torch.__version__}
    payload = {
        "machine": machine_info(),
        "versions": versions,
        "reps": args.reps,
        "size_bytes": size,
        "method": __doc__,
        "results": [{"payload": n, "op": o, "impl": m, "wall": t, "samples": len(samples[(n, o, m)])}
                    for (n, o, m), t in sorted(by.items())],
        "memory_private_dirty_added": mem,
        "targets": checks,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(payload, f, indent=1)
    try:
        chart(args.out + ".png", by, mem, size)
    except Exception as exc:  # matplotlib missing: the JSON is the record
        log(f"no chart: {exc}")
    print(f"wrote {args.out}.json")


if __name__ == "__main__":
    main()
