"""Stress: several processes put/get/delete 1 KiB-4 MiB self-checking values in one TensoCache while a writer is
SIGKILLed over and over. Every value read with copy=True must be whole (its first 8 bytes are the XXH3-64 of the
rest), and the pool's invariants and counters must hold at the end.

Runs for TENSO_STRESS_SECONDS (default 15, at most 60 in the default suite).
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import random
import signal
import time
import uuid

import numpy as np
import pytest

from tenso import tenso_rs
from tenso.cache import TensoCache

CTX = mp.get_context("spawn")
SECONDS = min(float(os.environ.get("TENSO_STRESS_SECONDS", "15")), 60.0)
KEYS = 400  # x ~0.5 MiB average value: about twice the pool, so puts evict all the time
MIN_SIZE, MAX_SIZE = 1024, 4 << 20


class Values:
    """Cheap self-checking values: a slice of one random buffer, a counter, and the checksum in front."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.noise = np.random.default_rng(seed).integers(0, 256, size=2 * MAX_SIZE, dtype=np.uint8)
        self.counter = seed << 32

    def make(self, size: int = 0) -> np.ndarray:
        size = size or int(math.exp(self.rng.uniform(math.log(MIN_SIZE), math.log(MAX_SIZE))))
        start = self.rng.randrange(0, MAX_SIZE)
        value = self.noise[start : start + size].copy()
        self.counter += 1
        value[8:16] = np.frombuffer(np.uint64(self.counter).tobytes(), np.uint8)
        value[:8] = np.frombuffer(np.uint64(tenso_rs._xxh3_64(value[8:])).tobytes(), np.uint8)
        return value


def whole(value: np.ndarray) -> bool:
    stored = int(np.frombuffer(value[:8].tobytes(), "<u8")[0])
    return value.dtype == np.uint8 and stored == tenso_rs._xxh3_64(np.ascontiguousarray(value[8:]))


def _worker(name: str, seed: int, deadline: float, out) -> None:
    cache = TensoCache(name=name, create=False)
    values = Values(seed)
    rng = values.rng
    counts = {"put": 0, "full": 0, "get": 0, "bad": 0, "delete": 0}
    while time.time() < deadline:
        key = f"k{rng.randrange(KEYS)}"
        r = rng.random()
        if r < 0.45:
            try:
                cache.put(key, values.make())
                counts["put"] += 1
            except MemoryError:
                counts["full"] += 1
        elif r < 0.80:
            counts["get"] += 1
            v = cache.get(key, copy=True)
            if v is not None and not whole(v):
                counts["bad"] += 1
        elif r < 0.90:
            counts["get"] += 1
            v = cache.get(key)  # zero-copy: may change after return if the key is rewritten in place
            if v is not None:
                assert v.ndim == 1 and len(v) >= MIN_SIZE and not v.flags.writeable
            del v
        else:
            cache.delete(key)
            counts["delete"] += 1
    cache.close()
    out.put(counts)


def _victim(name: str, seed: int) -> None:
    cache = TensoCache(name=name, create=False)
    values = Values(seed)
    while True:
        key = f"k{values.rng.randrange(KEYS)}"
        value = values.make()
        cache.put(key, value)
        cache.put(key, values.make(len(value)))  # same size: rewritten in place


@pytest.mark.slow
def test_stress_multiprocess_with_kills():
    name = f"tenso-stress-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    with TensoCache("96MB", name=name) as cache:
        deadline = time.time() + SECONDS
        queues = [CTX.Queue() for _ in range(3)]
        workers = [CTX.Process(target=_worker, args=(name, i + 1, deadline, q)) for i, q in enumerate(queues)]
        for w in workers:
            w.start()
        kills = 0
        rng = random.Random(99)
        while time.time() < deadline - 1.0:
            victim = CTX.Process(target=_victim, args=(name, 1000 + kills))
            victim.start()
            time.sleep(rng.uniform(0.3, 1.2))  # spawn takes a while: this kills it at varied points of its loop
            os.kill(victim.pid, signal.SIGKILL)
            victim.join(10)
            kills += 1
            # Nobody is blocked by the dead writer: a put and a get complete promptly.
            start = time.monotonic()
            cache.put("probe", np.full(100, kills, np.uint8))
            assert cache.get("probe")[0] == kills % 256
            assert time.monotonic() - start < 2.0
        results = [q.get(timeout=SECONDS + 120) for q in queues]
        for w in workers:
            w.join(60)
            assert w.exitcode == 0
        total = {k: sum(r[k] for r in results) for k in results[0]}
        print(f"stress: {SECONDS:.0f}s, {kills} kills, {total}, stats {cache.stats}")
        assert total["bad"] == 0, total
        assert total["put"] > 0 and total["get"] > 0
        assert kills >= 1

        cache._check()
        final_gets = 0
        for key in cache.keys():
            v = cache.get(key, copy=True)
            final_gets += 1
            if v is not None and key != "probe":
                assert whole(v), key
        s = cache.stats
        assert s["used_bytes"] + s["free_bytes"] == s["data_region_size"]
        assert s["entries"] == len(cache.keys())
        assert s["pending"] == 0
        # Every get of every process counted exactly once: the workers', the probes', and ours just now.
        assert s["hits"] + s["misses"] == total["get"] + kills + final_gets
