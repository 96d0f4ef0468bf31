"""tenso.ray.cached_get (the node-local shared-memory object cache) against plain ray.get, on the same Ray cluster.

Two jobs, one after the other, each on its own local cluster (ray.init(num_cpus=2)):

  ray        Ray 2.60 as installed, nothing registered: what users have without tenso
  tenso      tenso.ray.register(include_torch=True) (torch in its default safe mode: every get copies)

Inside each job, plain ``ray.get`` and ``cached_get`` run interleaved (alternating which goes first) on the same
objects, and we report medians of:

  get        per-call time of one get of an object already on the node, inside a long-lived actor (the object is
             touched: one element per array), i.e. what a task pays to read shared weights each time
  task       wall time per task of a batch of 20 tasks that each read the object (the ref passed as [ref]) and
             return a scalar, driver side: task overhead included
  first      the first read of a fresh object on the node (a miss: cached_get pays ray.get plus one encode)
  memory     the growth of the summed private (anonymous) memory of 4 actors that each read the object and keep it,
             every page touched: the copies each reader makes. Both paths also hold one shared copy per node (the
             plasma object; cached_get adds its pool copy)

Payloads: a 64 MiB float32 array; a "state dict" of 200 float32 arrays (64 MiB); the same as torch tensors;
a 64 MiB torch tensor; a 64 MiB bfloat16 array; a 1 MiB float32 array; a 16 KiB array (below min_bytes).

    .venv/bin/python benchmarks/bench_ray_cache.py [--reps 5] [--quick] [--jobs ray,tenso]

JSON goes to benchmarks/results/ray-cache-latest.json.
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
sys.path.insert(0, HERE)
import harness  # noqa: E402

ROOT = os.path.dirname(HERE)
MAIN_PY = os.path.join(ROOT, ".venv", "bin", "python")
MIB = 1 << 20
PAYLOADS = ["f32_64MiB", "dict200_f32_64MiB", "torch_dict200_64MiB", "torch_64MiB", "bf16_64MiB", "f32_1MiB",
            "f32_16KiB"]
MODES = ["plain", "cached"]
TASKS = 20
HOLDERS = 4


def make(name: str):
    import numpy as np

    if name == "f32_64MiB":
        return np.ones(16 * MIB, np.float32)
    if name == "f32_1MiB":
        return np.ones(MIB // 4, np.float32)
    if name == "f32_16KiB":
        return np.ones(4096, np.float32)
    if name == "bf16_64MiB":
        import ml_dtypes

        return np.ones(32 * MIB, ml_dtypes.bfloat16)
    if name == "dict200_f32_64MiB":
        return {f"layer{i}.weight": np.full(16 * MIB // 200, i, np.float32) for i in range(200)}
    import torch

    if name == "torch_64MiB":
        return torch.ones(16 * MIB, dtype=torch.float32)
    if name == "torch_dict200_64MiB":
        return {f"layer{i}.weight": torch.full((16 * MIB // 200,), float(i)) for i in range(200)}
    raise ValueError(name)


def device_for(name: str):
    return "torch" if name.startswith("torch") else None


def touch(value) -> float:
    """Read one element of every array (what a consumer does at the least)."""
    if isinstance(value, dict):
        return float(sum(float(v[0]) for v in value.values()))
    return float(value[0])


def touch_all(value) -> int:
    """Read one byte of every page of every array (so that PSS counts them all)."""
    import numpy as np

    if isinstance(value, dict):
        return sum(touch_all(v) for v in value.values())
    array = value if isinstance(value, np.ndarray) else value.numpy()
    return int(array.reshape(-1).view(np.uint8)[::4096].sum())


def private_kib() -> int:
    """This process's anonymous (private) memory: copies it made, not shared mappings (plasma, the node cache)."""
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("Anonymous:"):
                return int(line.split()[1])
    return 0


def job(plugin: str, reps: int, payloads: list[str]) -> dict:
    import ray

    import tenso.ray

    env = tenso.ray.runtime_env(include_torch=True, node_cache="1GB") if plugin == "tenso" else {
        "env_vars": {tenso.ray.NODE_CACHE_ENV: "1GB"}}
    os.environ[tenso.ray.NODE_CACHE_ENV] = "1GB"
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
             object_store_memory=1536 * MIB, runtime_env=env)
    if plugin == "tenso":
        tenso.ray.register(include_torch=True)

    def read(refs, mode, name):
        import tenso.ray as tr

        if mode == "plain":
            return ray.get(refs[0])
        return tr.cached_get(refs[0], device=device_for(name))

    @ray.remote
    class Reader:
        def gets(self, refs, mode, name, k):
            t0 = time.perf_counter_ns()
            for _ in range(k):
                touch(read(refs, mode, name))
            return (time.perf_counter_ns() - t0) / k

        def first(self, refs, mode, name):
            t0 = time.perf_counter_ns()
            touch(read(refs, mode, name))
            return time.perf_counter_ns() - t0

    @ray.remote
    class Holder:
        def __init__(self):
            self.value = None
            tenso.ray.node_cache()  # opened (and pre-faulted) before anything is measured

        def hold(self, refs, mode, name):
            import gc

            self.value = None
            gc.collect()
            before = private_kib()
            self.value = read(refs, mode, name)
            touch_all(self.value)
            return private_kib() - before

        def drop(self):
            self.value = None
            return 0

    @ray.remote
    def task(refs, mode, name):
        return touch(read(refs, mode, name))

    @ray.remote
    def warm():
        import ml_dtypes  # noqa: F401
        import torch  # noqa: F401

        return 0

    ray.get([warm.remote() for _ in range(4)])
    reader = Reader.remote()
    holders = [Holder.remote() for _ in range(HOLDERS)]
    samples: dict = {}

    def add(name, metric, mode, value):
        samples.setdefault((name, metric, mode), []).append(value)

    for name in payloads:
        value = make(name)
        ref = ray.put(value)
        k = 200 if name == "f32_16KiB" else 20
        for mode in MODES:  # warm both paths (fills the node cache for "cached")
            ray.get(reader.gets.remote([ref], mode, name, 2))
            ray.get([task.remote([ref], mode, name) for _ in range(4)])
        for r in range(reps):
            order = MODES if r % 2 == 0 else MODES[::-1]
            for mode in order:
                add(name, "get", mode, ray.get(reader.gets.remote([ref], mode, name, k)))
                t0 = time.perf_counter_ns()
                ray.get([task.remote([ref], mode, name) for _ in range(TASKS)])
                add(name, "task", mode, (time.perf_counter_ns() - t0) / TASKS)
                fresh = ray.put(value)  # a new object: the first read of it on the node
                add(name, "first", mode, ray.get(reader.first.remote([fresh], mode, name)))
                tenso.ray.uncache(fresh)
                del fresh
            if r == 0:  # memory: once per mode (stable; PSS needs the pages touched)
                for mode in order:
                    growth = ray.get([h.hold.remote([ref], mode, name) for h in holders])
                    add(name, "memory", mode, sum(growth) * 1024)
                    ray.get([h.drop.remote() for h in holders])
        tenso.ray.uncache(ref)
        del ref
        print(f"[{plugin}] {name} done", file=sys.stderr, flush=True)
    tenso.ray.drop_node_cache()
    ray.shutdown()
    rows = []
    for (name, metric, mode), values in samples.items():
        rows.append({"job": plugin, "payload": name, "metric": metric, "mode": mode,
                     "median": statistics.median(values), "n": len(values)})
    return {"rows": rows}


def fmt(metric: str, v: float) -> str:
    return f"{v / MIB:.1f} MiB" if metric == "memory" else harness.human_ns(v)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="2 repetitions")
    ap.add_argument("--jobs", default="ray,tenso")
    ap.add_argument("--payloads", default=",".join(PAYLOADS))
    ap.add_argument("--job")
    args = ap.parse_args()
    reps = 2 if args.quick else args.reps
    payloads = args.payloads.split(",")
    if args.job:
        print("@@" + json.dumps(job(args.job, reps, payloads)), flush=True)
        return
    rows = []
    for plugin in args.jobs.split(","):
        out = subprocess.run([MAIN_PY, os.path.abspath(__file__), "--job", plugin, "--reps", str(reps),
                              "--payloads", ",".join(payloads)], stdout=subprocess.PIPE, text=True, cwd=HERE,
                             check=True).stdout
        line = next(x for x in out.splitlines() if x.startswith("@@"))
        rows += json.loads(line[2:])["rows"]
    by = {(r["job"], r["payload"], r["metric"], r["mode"]): r["median"] for r in rows}
    lines = [f"{'job':6} {'payload':22} {'metric':7} {'ray.get':>11} {'cached_get':>11} {'ratio':>7}"]
    for plugin in args.jobs.split(","):
        for name in payloads:
            for metric in ("get", "task", "first", "memory"):
                plain, cached = by.get((plugin, name, metric, "plain")), by.get((plugin, name, metric, "cached"))
                if plain is None or cached is None:
                    continue
                # Memory: absolute MiB of private copies; a ratio means nothing next to zero.
                ratio = "-" if metric == "memory" else f"{plain / cached:.2f}x"
                lines.append(f"{plugin:6} {name:22} {metric:7} {fmt(metric, plain):>11} {fmt(metric, cached):>11} "
                             f"{ratio:>7}")
    table = "\n".join(lines)
    print(table)
    print("ratio = ray.get / cached_get (above 1: the cache is faster or smaller)")
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    payload = {"when": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": platform.platform(), "cpus": os.cpu_count(),
               "reps": reps, "command": " ".join(sys.argv), "rows": rows, "table": table}
    with open(os.path.join(HERE, "results", "ray-cache-latest.json"), "w") as f:
        json.dump(payload, f, indent=1)


if __name__ == "__main__":
    main()
