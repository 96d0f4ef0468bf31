"""Scripts the Ray tests run in their own interpreter (each needs a cluster of its own).

Run as ``python ray_helpers.py SCENARIO``; prints one JSON line with the outcome.
"""

from __future__ import annotations

import json
import sys

import numpy as np


def lineage() -> dict:
    """An object whose only copy is lost with its node is rebuilt from lineage, through the plug-in."""
    import ml_dtypes
    import ray
    from ray.cluster_utils import Cluster

    import tenso.ray

    cluster = Cluster()
    cluster.add_node(num_cpus=1, resources={"head": 1}, object_store_memory=100 * 1024 * 1024)
    ray.init(address=cluster.address, runtime_env=tenso.ray.runtime_env())
    tenso.ray.register()
    worker_node = cluster.add_node(num_cpus=1, resources={"worker": 1}, object_store_memory=100 * 1024 * 1024)
    cluster.wait_for_nodes()
    try:

        @ray.remote(max_retries=2, resources={"worker": 0.1})
        def produce(seed: int) -> np.ndarray:
            import tenso.ray as tr

            assert tr.is_registered()
            return (np.arange(1 << 20, dtype=np.float32) + seed).astype(ml_dtypes.bfloat16)[::2]

        @ray.remote(resources={"head": 0.1})
        def consume(x: np.ndarray) -> float:
            return float(x.astype(np.float32).sum())

        ref = produce.remote(3)
        first = ray.get(consume.remote(ref))
        cluster.remove_node(worker_node, allow_graceful=False)
        cluster.add_node(num_cpus=1, resources={"worker": 1}, object_store_memory=100 * 1024 * 1024)
        cluster.wait_for_nodes()
        second = ray.get(consume.remote(ref))
        arr = ray.get(ref)
        return {"first": first, "second": second, "dtype": str(arr.dtype), "shape": list(arr.shape)}
    finally:
        ray.shutdown()
        cluster.shutdown()


def hook() -> dict:
    """ray.init(runtime_env=tenso.ray.runtime_env()): a worker that never receives a payload is registered too."""
    import ray

    import tenso.ray

    ray.init(
        num_cpus=1,
        include_dashboard=False,
        logging_level="ERROR",
        object_store_memory=100 << 20,
        runtime_env=tenso.ray.runtime_env(),
    )
    try:

        @ray.remote
        def state() -> list:
            import ray.cloudpickle as cp

            import tenso.ray as tr

            return [tr.is_registered(), getattr(cp.CloudPickler.dispatch.get(np.ndarray), "__name__", None)]

        before = ray.get(state.remote())  # the hook alone, before the driver registers
        tenso.ray.register()
        after_register = ray.get(state.remote())
        tenso.ray.unregister()
        after_unregister = ray.get(state.remote())
        return {"before": before, "after_register": after_register, "after_unregister": after_unregister}
    finally:
        ray.shutdown()


def zero_copy_leak() -> dict:
    """One actor writes to the torch tensor it got with ray.get: what do the driver and the next task read?

    ``TENSO_HELPER_MODE=ray`` with ``RAY_ENABLE_ZERO_COPY_TORCH_TENSORS=1`` in the environment: Ray's own zero-copy
    mode; ``TENSO_HELPER_MODE=tenso``: tenso.ray's default safe mode.
    """
    import os

    import ray
    import torch

    tenso_mode = os.environ.get("TENSO_HELPER_MODE") == "tenso"
    env: dict = {"env_vars": {k: v for k, v in os.environ.items() if k == "RAY_ENABLE_ZERO_COPY_TORCH_TENSORS"}}
    if tenso_mode:
        import tenso.ray

        env = tenso.ray.runtime_env(include_torch=True)
    ray.init(
        num_cpus=1, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
        object_store_memory=100 << 20, runtime_env=env,
    )
    try:
        if tenso_mode:
            tenso.ray.register(include_torch=True)
        ref = ray.put(torch.zeros(1 << 18))

        @ray.remote
        class Reader:
            def write(self, refs):
                x = ray.get(refs[0])
                x[0] = -1
                return float(x[0])

        @ray.remote
        def read(refs):
            return float(ray.get(refs[0])[0])

        reader = Reader.remote()
        wrote = ray.get(reader.write.remote([ref]))
        return {"wrote": wrote, "driver": float(ray.get(ref)[0]), "next_task": ray.get(read.remote([ref]))}
    finally:
        ray.shutdown()


if __name__ == "__main__":
    import warnings

    warnings.simplefilter("ignore")  # Ray's zero-copy mode warns about non-writable arrays; the outcome is the JSON
    scenarios = {"lineage": lineage, "hook": hook, "zero_copy_leak": zero_copy_leak}
    print(json.dumps(scenarios[sys.argv[1]]()))
