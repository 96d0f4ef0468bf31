"""tenso.dask against Dask's default serialization, side by side on one LocalCluster(processes=True, n_workers=2,
threads_per_worker=1).

Method: one cluster, one client. Every repetition runs every cell once per mode, alternating which mode goes first
(a sample is one operation at 64 MiB, the median of INNER operations for the small payloads);
a mode is switched in every process (the client and both workers) with tenso.dask.register() / unregister() before
each batch, so both modes share the same processes, connections and warm caches. Medians over repetitions of the
client's wall time per operation.

Modes:
  default   Dask as installed (nothing registered)
  tenso     tenso.dask registered in the client and both workers (same-host hand-off through the node pool)
  other     tenso.dask registered, but worker B pretends to be on another host (a pool of its own); the data lives on
            B, so every hop (client <-> B, B -> A) goes as Dask's frames through tenso.dask's fallback; compared
            with default in the same roles

Operations (worker A holds the input, B computes):
  scatter_gather  client.scatter(x, workers=[A], direct=True) then client.gather(future, direct=True): the pair's
                  total time (issue #17 target >= 3x at 64 MiB; one copy into the pool in all, the gather goes back
                  by reference)
  task_in         x is scattered to A (not timed), then a task on B that takes it as an argument (returns a scalar):
                  A sends the block it holds by reference (no copy). Target: >= 0.9 of the zero-copy ceiling (Dask's
                  default at 64 MiB over Dask's own task round trip with a 1 KiB input), column ``of_ceiling``
  via_scheduler   client.scatter(x, workers=[A]) then client.gather(future), both through the scheduler (the
                  client -> scheduler leg stays Dask's frames by design, see integrations/dask/README.md; the
                  scheduler leases it for A; the gather leg goes by reference)
  result          x is scattered to A (not timed), then future.result(): worker -> scheduler -> client, the path
                  of every compute() result

Payloads: 64 MiB numpy float32, torch float32, bfloat16 (ml_dtypes) and a strided float32 view; 1 KiB, 1 MiB, a dict
of 200 x 4 KiB and a list of 200 x 4 KiB (these keep Dask's frames: never slower, >= 0.95x).

After the timing, each 64 MiB cell runs once more in tenso mode with the counters of every process (client
included) read around its timed part: ``pool_copies`` is how many times its bytes were copied into or out of the pool
(new leases filled + received arrays copied out of a lease), ``forwarded`` how many hops went by reference. Expected:
scatter_gather 1 copy (the scatter's) + 1 by reference; task_in and result 0 copies + 1 by reference; via_scheduler
1 copy (the scheduler's, after the client's frames reached it) + 1 by reference.

    .venv/bin/python benchmarks/bench_dask.py [--reps 7] [--quick] [--smoke]

``--smoke`` (1 repetition, 1 operation per sample, no 'other host' cells) only checks that the script runs.
JSON (and a PNG of the ratios when matplotlib is importable) go to benchmarks/results/dask-latest.*.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
MIB = 1 << 20
PAYLOADS = [
    "f32_64MiB",
    "torch_64MiB",
    "bf16_64MiB",
    "noncontig_64MiB",
    "f32_1KiB",
    "f32_1MiB",
    "dict_200x4KiB",
    "list_200x4KiB",
]
OPS = ["scatter_gather", "task_in", "via_scheduler", "result"]
TARGETS = {"large": 3.0, "small": 0.95, "other": 0.95, "of_ceiling": 0.9}
INNER = 9  # operations per sample for payloads under 64 MiB


def make(name: str):
    import numpy as np

    if name == "f32_64MiB":
        return np.ones(16 * MIB, np.float32)
    if name == "torch_64MiB":
        import torch

        return torch.ones(16 * MIB, dtype=torch.float32)
    if name == "bf16_64MiB":
        import ml_dtypes

        return np.ones(32 * MIB, ml_dtypes.bfloat16)
    if name == "noncontig_64MiB":
        return np.ones((4096, 8192), np.float32)[:, ::2]  # a strided 64 MiB view of a 128 MiB array
    if name == "f32_1KiB":
        return np.ones(256, np.float32)
    if name == "f32_1MiB":
        return np.ones(256 * 1024, np.float32)
    if name == "dict_200x4KiB":
        return {f"t{i}": np.full(1024, i, np.float32) for i in range(200)}
    if name == "list_200x4KiB":
        return [np.full(1024, i, np.float32) for i in range(200)]
    raise ValueError(name)


def consume(x) -> int:
    if isinstance(x, (dict, list)):
        return len(x)
    return int(x.shape[0])


def set_mode(client, mode: str, scope: str, b: str) -> None:
    import tenso.dask as td

    def on(host=None):
        import tenso.dask as t

        t.register(scope, host=host)

    def off():
        import tenso.dask as t

        t.unregister()

    if mode == "default":
        td.unregister()
        client.run(off)
    else:
        td.register(scope)
        client.run(on)
        if mode == "other":
            client.run(on, host="elsewhere", workers=[b])


def one(client, op: str, x, a: str, b: str, mark=None) -> float:
    """One operation; the client's wall time of its timed part. ``mark`` (if given) is called right before it."""
    mark = mark or (lambda: None)
    # Scattered as a one-element list: a dict given to scatter() would be taken as {key: value}.
    if op == "scatter_gather":
        mark()
        t = time.perf_counter()
        fut = client.scatter([x], workers=[a], direct=True, hash=False)[0]
        client.gather(fut, direct=True)
        dt = time.perf_counter() - t
    elif op == "task_in":
        fut = client.scatter([x], workers=[a], direct=True, hash=False)[0]
        mark()
        t = time.perf_counter()
        client.submit(consume, fut, workers=[b], pure=False).result()
        dt = time.perf_counter() - t
    elif op == "via_scheduler":
        mark()
        t = time.perf_counter()
        fut = client.scatter([x], workers=[a], direct=False, hash=False)[0]
        client.gather(fut, direct=False)
        dt = time.perf_counter() - t
    elif op == "result":
        fut = client.scatter([x], workers=[a], direct=True, hash=False)[0]
        mark()
        t = time.perf_counter()
        fut.result()
        dt = time.perf_counter() - t
    else:
        raise ValueError(op)
    del fut
    return dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="5 repetitions, fewer cells for the 'other host' mode")
    ap.add_argument("--smoke", action="store_true", help="1 repetition of 1 operation per cell: checks it runs")
    args = ap.parse_args()
    reps = 1 if args.smoke else 5 if args.quick else args.reps
    inner_small = 1 if args.smoke else INNER

    import dask
    import distributed
    import numpy as np
    from distributed import Client, LocalCluster

    import tenso.dask as td

    cells = [(p, op, "tenso") for p in PAYLOADS for op in OPS]
    other_payloads = [] if args.smoke else ["f32_64MiB", "f32_1MiB"] if args.quick else PAYLOADS
    cells += [(p, op, "other") for p in other_payloads for op in ("scatter_gather", "task_in")]
    samples: dict[tuple[str, str, str, str], list[float]] = {}
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None, memory_limit=0
    ) as cluster, Client(cluster) as client:
        a, b = sorted(client.scheduler_info()["workers"])
        scope = td.scope_for(client.scheduler.address)
        # install() once: the worker plugin and the scheduler's forwarder plugin; then warm up with tenso on, so
        # the connections it needs carry its handshake.
        td.install(client)
        set_mode(client, "tenso", scope, b)
        data = {p: make(p) for p in PAYLOADS}
        for p in PAYLOADS:
            for op in OPS:
                one(client, op, data[p], a, b)
        counts_before = client.run(td.counts)
        floor_src = np.ones(64 * MIB, np.uint8)
        floor_dst = np.zeros_like(floor_src)
        floor: list[float] = []
        for r in range(reps):
            for i, (p, op, mode) in enumerate(cells):
                order = ["default", mode] if (r + i) % 2 == 0 else [mode, "default"]
                for m in order:
                    set_mode(client, m, scope, b)
                    # "other": the data lives on B, the worker that pretends to be on another host, so every
                    # hop of the cell crosses "hosts" (client <-> B, B -> A); default runs the same roles.
                    src, dst = (b, a) if mode == "other" else (a, b)
                    # Small payloads take a few ms, where scheduling jitter is as large as the effect: each
                    # sample is the median of INNER operations.
                    inner = 1 if p.endswith("64MiB") else inner_small
                    runs = []
                    for _ in range(inner):
                        try:
                            runs.append(one(client, op, data[p], src, dst))
                        except Exception as exc:  # an overloaded machine can lose a worker's reply: retry once
                            print(f"retrying {p} {op} {m}: {exc!r}", file=sys.stderr, flush=True)
                            runs.append(one(client, op, data[p], src, dst))
                    dt = statistics.median(runs)
                    samples.setdefault((p, op, mode, m), []).append(dt)
            # The physical floor of one same-host hop: one 64 MiB memcpy into warm memory, in this process.
            t = time.perf_counter()
            np.copyto(floor_dst, floor_src)
            floor.append(time.perf_counter() - t)
            print(f"rep {r + 1}/{reps} done", file=sys.stderr, flush=True)
        counts_after = client.run(td.counts)
        copies = count_copies(client, data, a, b, scope)
        set_mode(client, "default", scope, b)

    memcpy = statistics.median(floor)
    hops = {"scatter_gather": 2, "task_in": 1, "via_scheduler": 2, "result": 1}
    rows = []
    for p, op, mode in cells:
        base = statistics.median(samples[(p, op, mode, "default")])
        new = statistics.median(samples[(p, op, mode, mode)])
        large = p.endswith("64MiB")
        target = TARGETS["other"] if mode == "other" else TARGETS["large" if large else "small"]
        if op in ("via_scheduler", "result") and large:
            target = TARGETS["large"]
        rows.append(
            {
                "payload": p,
                "op": op,
                "mode": mode,
                "default_ms": round(base * 1e3, 3),
                "tenso_ms": round(new * 1e3, 3),
                "ratio": round(base / new, 3),
                "target": target,
                "met": base / new >= target,
                # one memcpy per same-host hop: what a one-copy design cannot beat (64 MiB payloads only)
                "floor_ms": round(hops[op] * memcpy * 1e3, 3) if large else None,
                **(copies.get((p, op), {}) if mode == "tenso" else {}),
            }
        )
    annotate(rows)
    payload = {
        "bench": "bench_dask",
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "reps": reps,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "versions": {"dask": dask.__version__, "distributed": distributed.__version__, "numpy": np.__version__},
        "memcpy_64MiB_ms": round(memcpy * 1e3, 3),
        "worker_counts_during_timing": {
            w: {k: counts_after[w][k] - counts_before[w][k] for k in counts_after[w]} for w in counts_after
        },
        "rows": rows,
    }
    payload["dispatch_overhead"] = dispatch_overhead()
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, "dask-latest.json")
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
    print(f"{'payload':<16} {'op':<15} {'mode':<6} {'default':>10} {'tenso':>10} {'ratio':>7}  target")
    for row in rows:
        print(
            f"{row['payload']:<16} {row['op']:<15} {row['mode']:<6} {row['default_ms']:>8.2f}ms "
            f"{row['tenso_ms']:>8.2f}ms {row['ratio']:>6.2f}x  >={row['target']} {'ok' if row['met'] else 'MISS'}"
        )
    for row in rows:
        if "zero_copy_ceiling" in row:
            print(
                f"{row['payload']:<16} {row['op']:<15} {row['mode']:<6} Dask's own cost (1 KiB) {row['dask_op_ms']:.2f}ms:"
                f" zero-copy ceiling {row['zero_copy_ceiling']:.2f}x (reached {row['of_ceiling']:.2f} of it); moving"
                f" 64 MiB added {row['extra_ms']:.2f}ms (floor {row['floor_ms']:.2f}ms)"
            )
    for row in rows:
        if "pool_copies" in row:
            print(
                f"{row['payload']:<16} {row['op']:<15} copies into/out of the pool: {row['pool_copies']}, hops by "
                f"reference: {row['forwarded']}"
            )
    print(f"one 64 MiB memcpy (warm): {memcpy * 1e3:.2f} ms")
    for name, o in payload["dispatch_overhead"].items():
        print(
            f"in-process message round trip, {name}: default {o['default_us']:.1f} us, registered "
            f"{o['tenso_us']:.1f} us ({o['ratio']:.3f}x)"
        )
    print(f"wrote {path}")
    chart(rows)


def count_copies(client, data: dict, a: str, b: str, scope: str) -> dict:
    """Each 64 MiB cell once more in tenso mode, with every process's counters read around it: how many copies of
    its bytes went into or out of the pool, and how many hops went by reference."""
    import tenso.dask as td

    def total() -> dict:
        per = list(client.run(td.counts).values()) + [td.counts()]
        return {k: sum(c.get(k, 0) for c in per) for k in per[0]}

    set_mode(client, "tenso", scope, b)
    out = {}
    for p, x in data.items():
        if not p.endswith("64MiB"):
            continue
        for op in OPS:
            before: dict = {}
            one(client, op, x, a, b, mark=lambda: before.update(total()))  # the timed part only
            time.sleep(0.2)  # the last hop's counters are bumped as its message is read
            after = total()
            d = {k: after[k] - before[k] for k in after}
            out[(p, op)] = {
                "pool_copies": d["leases_sent"] - d["leases_forwarded"] + d["received_copies"],
                "forwarded": d["leases_forwarded"],
                "frames_sent": d["frames_sent"],
            }
    return out


def annotate(rows: list) -> None:
    """Add to each 64 MiB row what bounds its ratio: Dask's own cost of the operation, measured as the same operation
    on a 1 KiB array in tenso mode (``dask_op_ms``). No transfer mechanism, zero-copy included, can make the
    operation cheaper than that, so ``zero_copy_ceiling`` = default / dask_op_ms is the best ratio this run allowed;
    ``extra_ms`` is what moving 64 MiB added on top of it (compare ``floor_ms``, one memcpy per hop)."""
    small = {(r["op"], r["mode"]): r["tenso_ms"] for r in rows if r["payload"] == "f32_1KiB"}
    for r in rows:
        op_cost = small.get((r["op"], r["mode"]))
        if r.get("floor_ms") is None or op_cost is None:
            continue
        r["dask_op_ms"] = op_cost
        r["zero_copy_ceiling"] = round(r["default_ms"] / op_cost, 3)
        r["extra_ms"] = round(r["tenso_ms"] - op_cost, 3)
        r["of_ceiling"] = round(r["ratio"] / r["zero_copy_ceiling"], 3)
        if r["op"] == "task_in" and r["mode"] == "tenso":
            # The target for a task input from the worker that holds a pooled array: the ceiling, not 3x.
            r["target"] = f"{TARGETS['of_ceiling']} of ceiling"
            r["met"] = r["of_ceiling"] >= TARGETS["of_ceiling"]


def dispatch_overhead(reps: int = 15, inner: int = 50) -> dict:
    """What registering costs a message that keeps Dask's frames (small arrays, dicts of them), measured in this
    process without a cluster: Dask's own dumps/loads of a message, registered or not, interleaved, medians. On the
    cluster these cells differ by that much and by the noise of the run."""
    import numpy as np
    from distributed.protocol.core import dumps, loads
    from distributed.protocol.serialize import Serialize

    import tenso.dask as td

    cases = {
        "f32_1KiB": make("f32_1KiB"),
        "f32_1MiB": make("f32_1MiB"),
        "dict_200x4KiB": make("dict_200x4KiB"),
    }

    def message(x):
        return {"x": {k: Serialize(v) for k, v in x.items()} if isinstance(x, dict) else Serialize(x)}

    samples: dict[tuple[str, str], list[float]] = {}
    scope = f"bench-dask-overhead-{os.getpid()}"
    try:
        for r in range(reps):
            for mode in ("default", "tenso") if r % 2 else ("tenso", "default"):
                if mode == "tenso":
                    td.register(scope, pool_size="16MB")
                    st = td._state
                    ctx = {"recipient": {td.HANDSHAKE_KEY: {"pool": st.pool_name, "peer": st.token}}}
                else:
                    td.unregister()
                    ctx = {"recipient": {}}
                for name, x in cases.items():
                    runs = []
                    for _ in range(inner):
                        t = time.perf_counter()
                        loads(dumps(message(x), context=ctx))
                        runs.append(time.perf_counter() - t)
                    samples.setdefault((name, mode), []).append(statistics.median(runs))
    finally:
        td.unregister()
        from tenso.nodecache import drop

        drop(scope)
    out = {}
    for name in cases:
        d = statistics.median(samples[(name, "default")])
        t = statistics.median(samples[(name, "tenso")])
        out[name] = {"default_us": round(d * 1e6, 2), "tenso_us": round(t * 1e6, 2), "ratio": round(d / t, 4)}
    return out


def chart(rows: list) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    labels = [f"{r['payload']} {r['op']}{' (other host)' if r['mode'] == 'other' else ''}" for r in rows]
    fig, ax = plt.subplots(figsize=(9, 0.28 * len(rows) + 1))
    ax.barh(labels, [r["ratio"] for r in rows], color=["tab:green" if r["met"] else "tab:red" for r in rows])
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_xlabel("speed-up over Dask's default (default time / tenso time)")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(os.path.join(RESULTS, "dask-latest.png"), dpi=90)


if __name__ == "__main__":
    main()
