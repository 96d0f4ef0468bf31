"""A Ray job that moves tensors between the driver, tasks and an actor, with tenso.ray off and then on.

It starts its own local cluster (ray.init(num_cpus=2)), so it needs nothing but the package:

    pip install 'tenso-ray[ray,bfloat16]'          # add [torch] to include torch tensors
    python integrations/ray/job.py [--mib 64] [--reps 3]

For each payload it prints how many bytes moved and the median time of each hop, with Ray's default serialization
("off") and with tenso ("on"), and checks that every value arrived intact. Then eight tasks read one set of "model
weights" with plain ray.get and through tenso.ray.cached_get (the node-local shared-memory cache), and it prints what
each read cost.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import ray

import tenso.ray

try:
    import torch
except ImportError:
    torch = None

try:
    import ml_dtypes
except ImportError:
    ml_dtypes = None


@ray.remote
def echo(x):
    """A task that receives a tensor and returns it."""
    return x


@ray.remote
def shape_of(x):
    """A task that receives a tensor and returns something small."""
    return tuple(x.shape)


@ray.remote
class Store:
    """An actor that keeps the last tensor it was given and hands it back."""

    def __init__(self):
        self.value = None

    def keep(self, x):
        self.value = x
        return x.shape

    def give(self):
        return self.value


def payloads(mib: int) -> dict:
    n = mib * (1 << 20) // 4
    out = {
        "float32 (contiguous)": np.random.default_rng(0).random(n, dtype=np.float32),
        "float32 (strided view)": np.random.default_rng(1).random(2 * n, dtype=np.float32).reshape(-1, 256)[:, ::2],
    }
    if ml_dtypes is not None:
        out["bfloat16"] = np.random.default_rng(2).random(2 * n, dtype=np.float32).astype(ml_dtypes.bfloat16)
    if torch is not None:
        out["torch float32"] = torch.rand(n)
    return out


def to_f64(x) -> np.ndarray:
    if torch is not None and isinstance(x, torch.Tensor):
        return x.double().numpy()
    return np.asarray(x).astype(np.float64)


def hops(x, store) -> dict:
    """Time each way a tensor can travel; return seconds per hop."""
    t = {}
    t0 = time.perf_counter()
    ref = ray.put(x)
    t["put"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    y = ray.get(ref)
    t["get"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    assert ray.get(shape_of.remote(x)) == tuple(x.shape)
    t["task in"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    z = ray.get(echo.remote(ref))
    t["task out"] = time.perf_counter() - t0  # a task gets it from the store and returns it
    t0 = time.perf_counter()
    ray.get(store.keep.remote(x))
    w = ray.get(store.give.remote())
    t["actor"] = time.perf_counter() - t0
    assert np.array_equal(to_f64(y), to_f64(x)) and np.array_equal(to_f64(w), to_f64(x))
    assert np.array_equal(to_f64(z), to_f64(x))
    return t


@ray.remote
def read_weights(refs, cached: bool) -> tuple[float, float]:
    """Reads the weights (plain ray.get or the node cache) and returns (checksum, seconds spent reading)."""
    t0 = time.perf_counter()
    w = tenso.ray.cached_get(refs[0], device="torch" if torch is not None else None) if cached else ray.get(refs[0])
    spent = time.perf_counter() - t0
    return float(sum(float(v[-1]) for v in w.values())), spent


def node_cache_demo(mib: int, reps: int, use_torch: bool) -> None:
    layers = 32
    n = (mib << 20) // 4 // layers
    if use_torch:
        weights = {f"layer{i}.weight": torch.full((n,), float(i)) for i in range(layers)}
    else:
        weights = {f"layer{i}.weight": np.full(n, i, np.float32) for i in range(layers)}
    ref = ray.put(weights)
    expected = float(sum(range(layers)))
    timings: dict = {False: [], True: []}
    for _ in range(reps + 1):  # the first round warms workers and fills the node cache
        for cached in (False, True):
            out = ray.get([read_weights.remote([ref], cached) for _ in range(8)])
            assert all(checksum == expected for checksum, _ in out), out
            timings[cached].append(statistics.median(spent for _, spent in out))
    plain, cached = (statistics.median(timings[c][1:]) for c in (False, True))
    stats = tenso.ray.node_cache().stats
    kind = "torch state dict" if use_torch else "dict of float32 arrays"
    print(f"\nmodel weights ({kind}, {layers} tensors, {mib} MiB) read by 8 tasks: ray.get {plain * 1e3:.2f} ms, "
          f"cached_get {cached * 1e3:.3f} ms per read ({plain / cached:.0f}x); the node cache holds "
          f"{stats['entries']} entries, {stats['used_bytes'] / (1 << 20):.0f} MiB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=64, help="size of each tensor in MiB (default 64)")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()

    use_torch = torch is not None
    # The runtime_env makes every worker of the job register when it starts; register()/unregister() in the driver
    # switch the whole job on and off.
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        logging_level="ERROR",
        object_store_memory=1 << 30,
        runtime_env=tenso.ray.runtime_env(include_torch=use_torch),
    )
    try:
        store = Store.remote()
        data = payloads(args.mib)
        results: dict = {}
        for mode in ("off", "on"):
            if mode == "on":
                tenso.ray.register(include_torch=use_torch)
            else:
                tenso.ray.unregister()
            time.sleep(0.01)
            for name, x in data.items():
                hops(x, store)  # warm: workers start, pages get touched
                runs = [hops(x, store) for _ in range(args.reps)]
                results[(name, mode)] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print(f"\nRay {ray.__version__}, tenso.ray {'with' if use_torch else 'without'} torch; median of {args.reps} "
              f"runs, milliseconds (off = Ray's default, on = tenso.ray)\n")
        cols = list(next(iter(results.values())))
        print(f"{'payload':<24}{'MiB':>6}  " + "".join(f"{c + ' off / on':>23}" for c in cols))
        for name, x in data.items():
            nbytes = x.nbytes if hasattr(x, "nbytes") else x.numel() * x.element_size()
            off, on = results[(name, "off")], results[(name, "on")]
            cells = "".join(f"{off[c] * 1e3:>9.1f} /{on[c] * 1e3:>7.1f} {off[c] / on[c]:>5.1f}x" for c in cols)
            print(f"{name:<24}{nbytes / (1 << 20):>6.0f}  {cells}")
        node_cache_demo(args.mib, args.reps, use_torch)
        print("\nall values arrived intact")
    finally:
        tenso.ray.drop_node_cache()
        tenso.ray.unregister()
        ray.shutdown()


if __name__ == "__main__":
    main()
