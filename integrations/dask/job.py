"""A Dask job that moves tensors between the client and two worker processes, with tenso.dask off and then on.

It starts its own LocalCluster(processes=True, n_workers=2, threads_per_worker=1), so it needs nothing but the
package:

    pip install 'tenso-ray[dask,bfloat16]'          # add [torch] to include torch tensors
    python integrations/dask/job.py [--mib 64] [--reps 3]

For each payload it times the three same-host hand-offs of one round trip (client -> worker A with a direct
scatter, A -> worker B as a task input, B -> client with a direct gather), checks that every value arrived intact,
and prints the medians with Dask's default serialization ("off") and with tenso.dask ("on"), and which path the
messages took. Then it computes (x @ x.T).sum() on a chunked dask.array both ways and checks the results agree.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

try:
    import dask.array as da
    from distributed import Client, LocalCluster, wait
except ImportError as exc:  # pragma: no cover
    raise SystemExit("this job needs Dask: pip install 'tenso-ray[dask]'") from exc

import tenso.dask

try:
    import torch
except ImportError:
    torch = None

try:
    import ml_dtypes
except ImportError:
    ml_dtypes = None


def echo(x):
    """A task that receives a tensor and returns it."""
    return x


def payloads(mib: int) -> dict:
    n = mib * (1 << 20) // 4
    out = {
        "float32": np.arange(n, dtype=np.float32),
        "strided view": np.arange(2 * n, dtype=np.float32).reshape(-1, 1024)[:, ::2],
    }
    if ml_dtypes is not None:
        out["bfloat16"] = np.arange(2 * n).astype(ml_dtypes.bfloat16)
    if torch is not None:
        out["torch float32"] = torch.arange(n, dtype=torch.float32)
    return out


def same(x, y) -> bool:
    if torch is not None and isinstance(x, torch.Tensor):
        return isinstance(y, torch.Tensor) and torch.equal(x, y)
    return isinstance(y, np.ndarray) and x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()


def round_trip(client: Client, x, a: str, b: str) -> tuple[list[float], bool]:
    t0 = time.perf_counter()
    fut = client.scatter(x, workers=[a], direct=True, hash=False)
    t1 = time.perf_counter()
    out = client.submit(echo, fut, workers=[b], pure=False)
    wait(out)
    t2 = time.perf_counter()
    y = client.gather(out, direct=True)
    t3 = time.perf_counter()
    return [t1 - t0, t2 - t1, t3 - t2], same(x, y)


def counts(client: Client) -> dict:
    total = dict(tenso.dask.counts())
    for c in client.run(tenso.dask.counts).values():
        for k, v in c.items():
            total[k] += v
    return total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        with Client(cluster) as client:
            a, b = sorted(client.scheduler_info()["workers"])
            data = payloads(args.mib)
            print(f"{'payload':<14} {'mode':<4} {'client->A':>10} {'A->B task':>10} {'B->client':>10}  intact")
            results = {}
            for mode in ("off", "on"):
                if mode == "on":
                    tenso.dask.install(client)
                before = counts(client)
                for name, x in data.items():
                    round_trip(client, x, a, b)  # warm-up: connections, imports
                    times, ok = [], True
                    for _ in range(args.reps):
                        t, good = round_trip(client, x, a, b)
                        times.append(t)
                        ok &= good
                    med = [statistics.median(col) * 1e3 for col in zip(*times)]
                    print(f"{name:<14} {mode:<4} " + " ".join(f"{m:>8.1f}ms" for m in med) + f"  {ok}")
                    if not ok:
                        raise SystemExit(f"{name}: a value arrived changed")
                after = counts(client)
                moved = {k: after[k] - before[k] for k in after}
                print(f"  ({mode}: {moved['leases_sent']} messages through the node pool, "
                      f"{moved['frames_sent']} as Dask frames)")
                x = da.random.RandomState(0).random_sample((3000, 3000), chunks=(750, 750))
                t = time.perf_counter()
                results[mode] = float((x @ x.T).sum().compute())
                print(f"  (x @ x.T).sum() with tenso.dask {mode}: {results[mode]:.6e} in "
                      f"{time.perf_counter() - t:.2f}s")
            tenso.dask.uninstall(client)
            if results["on"] != results["off"]:
                raise SystemExit("the dask.array results differ between on and off")
            print("all values intact; the dask.array result is identical on and off")


if __name__ == "__main__":
    main()
