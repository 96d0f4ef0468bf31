"""tenso.ray against Ray's default, Ray's zero-copy torch flag and tenso 0.24.0's register(), on one Ray cluster.

Method: this script starts one local cluster (ray.init(num_cpus=2)), pre-touches its object store (plasma pages are
slow until first written), then starts one driver process per implementation, each a separate Ray job connected to
that cluster:

  default    Ray 2.60 as installed, nothing registered
  ray_zc     RAY_ENABLE_ZERO_COPY_TORCH_TENSORS=1 (driver and workers)
  ref024     tenso 0.24.0's tenso.ray.register(include_torch=True), from .refvenvs/tenso-0.24.0 (ray + torch installed
             there); its workers run that venv's python (runtime_env py_executable)
  tenso      this package: tenso.ray.register(include_torch=True) + ray.init(runtime_env=tenso.ray.runtime_env(...));
             torch tensors in the default safe mode (private copy-on-write views of the store; the torch_zero_copy
             mode this script used to compare is deprecated: the safe mode is as fast). bench_ray_cow.py has the
             issue #17 rows (torch, bfloat16, state dict; Ray's zero-copy flag; memory).

Cells run interleaved: for every repetition and cell, each driver in turn (rotating who goes first) runs one batch.
Per cell we record medians of driver wall and CPU time per operation:
  put_get   ray.put then ray.get in the driver (put and get also reported alone)
  task_in   a task that receives the payload as an argument (returns a scalar)
  task_out  an actor method (a task in a long-lived worker) returns the payload, built once and kept by the actor

    .venv/bin/python benchmarks/bench_ray.py [--reps 7] [--quick]

JSON goes to benchmarks/results/ray-latest.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MAIN_PY = os.path.join(ROOT, ".venv", "bin", "python")
REF_PY = os.path.join(ROOT, ".refvenvs", "tenso-0.24.0", "bin", "python")
MIB = 1 << 20
PAYLOADS = ["f32_64MiB", "f32_1KiB", "dict_200x4KiB", "torch_64MiB", "noncontig_64MiB", "bf16_64MiB"]
OPS = ["put_get", "task_in", "task_out"]


def make(name: str):
    import numpy as np

    if name == "f32_64MiB":
        return np.ones(16 * MIB, np.float32)
    if name == "f32_1KiB":
        return np.ones(256, np.float32)
    if name == "dict_200x4KiB":
        return {f"t{i}": np.full(1024, i, np.float32) for i in range(200)}
    if name == "torch_64MiB":
        import torch

        return torch.ones(16 * MIB, dtype=torch.float32)
    if name == "noncontig_64MiB":
        return np.ones((4096, 8192), np.float32)[:, ::2]  # a strided 64 MiB view of a 128 MiB array
    if name == "bf16_64MiB":
        import ml_dtypes

        return np.ones(32 * MIB, ml_dtypes.bfloat16)
    raise KeyError(name)


def batch(name, op, k, x, producer, receive) -> dict:
    import ray

    walls, cpus, puts, gets = [], [], [], []
    if op == "task_out":
        ray.get(producer.produce.remote(name))  # untimed: the actor builds the payload once
    for _ in range(k):
        w0, c0 = time.perf_counter(), time.process_time()
        if op == "put_get":
            ref = ray.put(x)
            w1 = time.perf_counter()
            y = ray.get(ref)
            w2 = time.perf_counter()
            puts.append(w1 - w0)
            gets.append(w2 - w1)
        elif op == "task_in":
            y = ray.get(receive.remote(x))
        else:
            y = ray.get(producer.produce.remote(name))
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
        del y
        ref = None
    res = {"wall": statistics.median(walls), "cpu": statistics.median(cpus)}
    if puts:
        res["put"] = statistics.median(puts)
        res["get"] = statistics.median(gets)
    return res


def driver(mode: str, address: str) -> None:
    """One Ray job: read 'payload op k' lines, answer with per-op (wall, cpu, put, get) of one batch of k."""
    import ray

    env: dict = {}
    if mode == "ray_zc":
        env = {"env_vars": {"RAY_ENABLE_ZERO_COPY_TORCH_TENSORS": "1"}}
    elif mode == "ref024":
        env = {"py_executable": REF_PY}
    if mode == "tenso":
        import tenso.ray

        env = tenso.ray.runtime_env(include_torch=True)
    ray.init(address=address, runtime_env=env, logging_level="ERROR", log_to_driver=False)
    if mode == "tenso":
        tenso.ray.register(include_torch=True)
    elif mode == "ref024":
        import tenso.ray

        tenso.ray.register(include_torch=True)

    @ray.remote
    def receive(x):
        return len(x)

    @ray.remote(max_restarts=-1, max_task_retries=3)
    class Producer:
        def __init__(self):
            self.name, self.value = None, None

        def produce(self, name):
            if name != self.name:
                self.name, self.value = name, None
                self.value = make(name)
            return self.value

    @ray.remote
    def warm():
        import ml_dtypes  # noqa: F401
        import torch  # noqa: F401

        return 0

    producer = Producer.remote()
    ray.get([warm.remote() for _ in range(4)])  # start the job's workers and import what they will need
    payloads: dict = {}
    print("@@ready", flush=True)
    for line in sys.stdin:
        name, op, k = line.split()
        k = int(k)
        if name not in payloads:
            payloads.clear()
            payloads[name] = make(name)
        try:
            res = batch(name, op, k, payloads[name], producer, receive)
        except Exception as exc:  # e.g. Ray's memory monitor killed a worker: report it, skip the sample
            res = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        print("@@" + json.dumps(res), flush=True)


def _close_drivers(procs: dict) -> None:
    """Ends every driver subprocess (closing its stdin asks it to exit), also when one died; kills a stuck one."""
    for p in procs.values():
        if p.poll() is None:
            p.stdin.close()
    for p in procs.values():
        try:
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()


def _reply(p: subprocess.Popen, mode: str) -> str:
    # Ray or a plug-in may print to stdout too: our lines carry a prefix.
    while True:
        out = p.stdout.readline()
        if not out:
            raise RuntimeError(f"driver {mode} died")
        if out.startswith("@@"):
            return out[2:].strip()
        print(f"[{mode}] {out.rstrip()}", file=sys.stderr)


def run_reps(procs: dict, modes: list, reps: int, samples: dict) -> None:
    for r in range(reps):
        for name in PAYLOADS:
            k = 50 if name == "f32_1KiB" else (5 if name == "dict_200x4KiB" else 1)
            for op in OPS:
                order = modes[r % len(modes):] + modes[: r % len(modes)]
                for mode in order:
                    p = procs[mode]
                    p.stdin.write(f"{name} {op} {k}\n")
                    p.stdin.flush()
                    res = json.loads(_reply(p, mode))
                    if "error" in res:
                        print(f"[{mode}] {name} {op}: sample skipped: {res['error']}", file=sys.stderr, flush=True)
                        continue
                    samples.setdefault((name, op, mode), []).append(res)
        print(f"rep {r + 1}/{reps} done", file=sys.stderr, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="3 repetitions")
    ap.add_argument("--driver")
    ap.add_argument("--address")
    ap.add_argument("--modes", default="default,ray_zc,ref024,tenso")
    args = ap.parse_args()
    if args.driver:
        driver(args.driver, args.address)
        return
    reps = 3 if args.quick else args.reps

    import numpy as np
    import ray

    ray.init(
        num_cpus=2,
        include_dashboard=False,
        logging_level="ERROR",
        object_store_memory=1536 * MIB,
        # Four jobs share two CPUs: keep their idle workers alive instead of restarting them (and re-importing torch).
        _system_config={"num_workers_soft_limit": 64},
    )
    # Pre-touch the object store: fill it once so every page is mapped before anything is timed.
    refs = [ray.put(np.ones(16 * MIB, np.float32)) for _ in range(22)]
    del refs
    address = ray.get_runtime_context().gcs_address
    modes = args.modes.split(",")
    procs = {}
    for mode in modes:
        py = REF_PY if mode == "ref024" else MAIN_PY
        if mode == "ref024" and not os.path.exists(REF_PY):
            print("skipping ref024: .refvenvs/tenso-0.24.0 missing", file=sys.stderr)
            continue
        env = dict(os.environ)
        if mode == "ray_zc":
            env["RAY_ENABLE_ZERO_COPY_TORCH_TENSORS"] = "1"
        procs[mode] = subprocess.Popen(
            [py, os.path.abspath(__file__), "--driver", mode, "--address", address],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=HERE,
        )
    for mode, p in procs.items():
        assert _reply(p, mode) == "ready", mode
    modes = [m for m in modes if m in procs]
    samples: dict = {}
    try:
        run_reps(procs, modes, reps, samples)
    finally:
        _close_drivers(procs)
        ray.shutdown()

    results = []
    for (name, op, mode), runs in samples.items():
        row = {"payload": name, "op": op, "impl": mode}
        for key in runs[0]:
            row[key] = statistics.median(run[key] for run in runs)
        results.append(row)
    report(results, modes, reps)


def check_targets(by: dict, modes: list) -> list:
    """The issue's targets, as speed-ups over Ray's default (wall medians) and over tenso 0.24.0."""
    out = []

    def add(what, payload, op, metric, target, impl="tenso", base="default"):
        a, b = by.get((payload, op, base), {}).get(metric), by.get((payload, op, impl), {}).get(metric)
        if a and b:
            out.append({"what": what, "ratio": a / b, "target": target, "ok": a / b >= target})

    for payload in ("f32_64MiB", "f32_1KiB", "dict_200x4KiB"):
        for op in OPS:
            add(f"{payload} {op} wall vs default", payload, op, "wall", 0.95)
    for payload, put_target in (("torch_64MiB", 5), ("bf16_64MiB", 5), ("noncontig_64MiB", 3)):
        add(f"{payload} put vs default", payload, "put_get", "put", put_target)
        add(f"{payload} get vs default", payload, "put_get", "get", 50 if payload != "torch_64MiB" else 20)
        for op in ("task_in", "task_out"):
            add(f"{payload} {op} wall vs default", payload, op, "wall", 5)
    if "ref024" in modes:
        for payload in PAYLOADS:
            for op in OPS:
                add(f"{payload} {op} wall vs tenso 0.24.0", payload, op, "wall", 1.0, base="ref024")
    return out


def report(results: list, modes: list, reps: int) -> None:
    by = {(r["payload"], r["op"], r["impl"]): r for r in results}
    lines = []
    head = f"{'payload':<16} {'op':<9} {'metric':<5} " + " ".join(f"{m:>10}" for m in modes) + "   tenso/default  tenso/ref024"
    lines.append(head)
    for name in PAYLOADS:
        for op in OPS:
            metrics = ["put", "get", "wall", "cpu"] if op == "put_get" else ["wall", "cpu"]
            for metric in metrics:
                vals = {m: by.get((name, op, m), {}).get(metric) for m in modes}
                cells = " ".join(f"{vals[m] * 1e3:>8.3f}ms" if vals[m] is not None else f"{'-':>10}" for m in modes)
                speed = lambda a, b: f"{a / b:>8.2f}x" if a and b else f"{'-':>9}"  # noqa: E731
                lines.append(
                    f"{name:<16} {op:<9} {metric:<5} {cells}   {speed(vals.get('default'), vals.get('tenso'))}"
                    f"      {speed(vals.get('ref024'), vals.get('tenso'))}"
                )
    text = "\n".join(lines)
    print(text)
    print("(ratios are speed-ups of tenso: baseline time / tenso time; > 1 means tenso is faster)")
    targets = check_targets(by, modes)
    for t in targets:
        print(f"{'PASS' if t['ok'] else 'MISS'}  {t['what']:<58} {t['ratio']:>8.2f}x  (target {t['target']}x)")
    import numpy as np
    import ray

    payload = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "versions": {"ray": ray.__version__, "numpy": np.__version__},
        "reps": reps,
        "method": __doc__,
        "targets": targets,
        "results": results,
    }
    try:
        import torch

        payload["versions"]["torch"] = torch.__version__
    except ImportError:
        pass
    out = os.path.join(HERE, "results", "ray-latest.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(payload, f, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
