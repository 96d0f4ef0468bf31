"""Memory probes, each run in a fresh interpreter (Rust/numpy C allocations are invisible to tracemalloc).

  probe.py peak   --impl tenso|pickle5|floor --nbytes N
      extra resident memory at the peak of one dumps of an N-byte float32 array (result kept alive),
      from /proc/self/status: VmHWM after the call minus VmRSS before it, with the high-water mark
      reset through /proc/self/clear_refs ("5") just before the call.
  probe.py growth --calls 1000 --nbytes N
      RSS growth over `calls` calls of each public API (after a warm-up), one line of JSON.
  probe.py cacheloop --calls 100 --nbytes N [--idle S]
      `calls` x (dumps + loads(copy=True)) of an N-byte float32 array: RSS at the peak of the first iteration and of
      the whole loop (sampled after each call), then RSS after the buffer cache's idle period (S seconds, set
      through tenso.config.set_buffer_cache) with every packet freed.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import io
import json
import os
import socket
import sys
import tempfile
import threading

import numpy as np


def status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak(impl: str, nbytes: int) -> dict:
    a = np.empty(nbytes // 4, np.float32)
    a.fill(1.5)  # touch every page, no temporary
    small = np.ones(256, np.float32)
    if impl == "tenso":
        import tenso

        fn = tenso.dumps
    elif impl == "pickle5":
        import pickle

        def fn(x):
            return pickle.dumps(x, protocol=5)
    elif impl == "floor":
        def fn(x):
            out = np.empty(x.nbytes, np.uint8)
            out[:] = x.view(np.uint8)
            return out
    else:
        raise SystemExit(f"unknown impl {impl}")
    fn(small)  # lazy initialisation is not what we measure
    gc.collect()
    exact = reset_hwm()
    before = status("VmRSS")
    hwm_before = status("VmHWM")
    out = fn(a)
    hwm = status("VmHWM")
    after = status("VmRSS")
    size = len(memoryview(out).cast("B")) if not isinstance(out, bytes) else len(out)
    base = before if exact else max(before, hwm_before)
    return {"ok": True, "impl": impl, "payload": nbytes, "packet": size, "extra_peak": hwm - base,
            "extra_after": after - before, "hwm_reset": exact}


def growth(calls: int, nbytes: int) -> dict:
    import tenso

    a = np.random.default_rng(0).standard_normal(nbytes // 4, dtype=np.float32)
    d = {f"w{i}": a[:256].copy() for i in range(50)}
    packet = bytes(tenso.dumps(a))
    dpacket = bytes(tenso.dumps(d))
    tmp = tempfile.mkdtemp()
    path = os.path.join(tmp, "g.tnso")
    with open(path, "wb") as f:
        tenso.dump(a, f)
    s1, s2 = socket.socketpair()

    def stream_round():
        t = threading.Thread(target=tenso.write_stream, args=(a, s1))
        t.start()
        out = tenso.read_stream(s2)
        t.join()
        return out

    def file_dump():
        with open(path + ".w", "wb") as f:
            tenso.dump(a, f)

    def file_load():
        with open(path, "rb") as f:
            return tenso.load(f)

    def mmap_load():
        with open(path, "rb") as f:
            return tenso.load(f, mmap_mode=True)

    loop = asyncio.new_event_loop()
    r1, r2 = socket.socketpair()

    async def _open():
        return await asyncio.open_connection(sock=r1)

    _, writer = loop.run_until_complete(_open())

    def astream():
        from tenso.async_core import awrite_stream

        def drain():
            need = len(packet)
            buf = bytearray(need)
            mv = memoryview(buf)
            got = 0
            while got < need:
                got += r2.recv_into(mv[got:])

        t = threading.Thread(target=drain)
        t.start()

        async def go():
            await awrite_stream(a, writer)
            await writer.drain()

        loop.run_until_complete(go())
        t.join()

    apis = {
        "dumps": lambda: tenso.dumps(a),
        "dumps_integrity": lambda: tenso.dumps(a, check_integrity=True),
        "dumps_compress": lambda: tenso.dumps(a, compress=True),
        "loads": lambda: tenso.loads(packet),
        "loads_copy": lambda: tenso.loads(packet, copy=True),
        "get_packet_info": lambda: tenso.get_packet_info(packet),
        "iter_dumps": lambda: list(tenso.iter_dumps(a)),
        "dumps_dict": lambda: tenso.dumps(d),
        "loads_dict": lambda: tenso.loads(dpacket),
        "write+read_stream": stream_round,
        "awrite_stream": astream,
        "dump": file_dump,
        "load": file_load,
        "load_mmap": mmap_load,
    }
    out = {}
    for name, fn in apis.items():
        try:
            for _ in range(max(50, calls // 10)):
                fn()
            gc.collect()
            r0 = status("VmRSS")
            for _ in range(calls):
                fn()
            gc.collect()
            out[name] = status("VmRSS") - r0
        except Exception as e:
            out[name] = f"{type(e).__name__}: {e}"
    return {"ok": True, "calls": calls, "nbytes": nbytes, "growth": out}


def cacheloop(calls: int, nbytes: int, idle: float) -> dict:
    import time

    import tenso
    from tenso import config

    config.set_buffer_cache(idle_seconds=idle)
    a = np.empty(nbytes // 4, np.float32)
    a.fill(1.5)
    base = status("VmRSS")
    peaks = []
    t0 = time.perf_counter()
    for _ in range(calls):
        p = tenso.dumps(a)
        r1 = status("VmRSS")
        b = tenso.loads(p, copy=True)
        r2 = status("VmRSS")
        peaks.append(max(r1, r2))
    loop_s = time.perf_counter() - t0
    stats = config.buffer_cache_stats()
    del p, b
    held = status("VmRSS")
    time.sleep(idle * 2 + 0.5)
    after = status("VmRSS")
    return {"ok": True, "calls": calls, "packet": nbytes, "base": base, "first_peak": peaks[0], "peak": max(peaks),
            "held_after_loop": held, "after_idle": after, "idle_s": idle, "loop_s": loop_s, "cache": stats,
            "growth_packets": (max(peaks) - peaks[0]) / nbytes, "after_idle_over_base": after - base}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["peak", "growth", "cacheloop"])
    ap.add_argument("--impl", default="tenso")
    ap.add_argument("--nbytes", type=int, default=64 << 20)
    ap.add_argument("--calls", type=int, default=1000)
    ap.add_argument("--idle", type=float, default=2.0)
    args = ap.parse_args()
    if args.mode == "cacheloop":
        res = cacheloop(args.calls, args.nbytes, args.idle)
    else:
        res = peak(args.impl, args.nbytes) if args.mode == "peak" else growth(args.calls, args.nbytes)
    sys.stdout.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
