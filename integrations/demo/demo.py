"""tenso-ray demonstration: real tensors through a real socket and a real file, between two processes.

    .venv/bin/python integrations/demo/demo.py [--no-bench] [--scale 1.0]

1. Builds a set of tensors: several dtypes (float32, float16, bfloat16, int64, uint8, bool, complex64),
   a non-contiguous view, a bundle of model-like weights, a CSR sparse matrix, and int8/int4
   quantized tensors.
2. Streams every object over a socketpair to a forked receiver process (write_stream -> read_stream),
   and writes each to a file that the receiver loads (load, and load(mmap_mode=True) for dense ones).
3. The receiver decodes, fingerprints every decoded object (dtype, shape, bytes) and sends the
   fingerprints back; the sender checks them against its own.
4. Prints what moved and how fast, then a short comparison table from the benchmark harness
   (benchmarks/bench_codec.py --quick on a few groups).
Exit status 0 only if every object verified.
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing as mp
import os
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

import tenso

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ----------------------------------------------------------------------------- the payloads

def build(scale: float = 1.0) -> list[tuple[str, object]]:
    rng = np.random.default_rng(7)

    def n(x):
        return max(8, int(x * scale))

    items: list[tuple[str, object]] = []
    items.append(("images f32", rng.standard_normal((8, 3, n(224), 224), dtype=np.float32)))
    items.append(("activations f16", rng.standard_normal((n(4096), 1024), dtype=np.float32).astype(np.float16)))
    try:
        import ml_dtypes

        items.append(("weights bf16", rng.standard_normal((n(2048), 2048), dtype=np.float32).astype(ml_dtypes.bfloat16)))
    except ImportError:
        print("(ml_dtypes missing: no bfloat16 tensor)")
    items.append(("token ids i64", rng.integers(0, 50_000, (64, n(2048)), dtype=np.int64)))
    items.append(("pixels u8", rng.integers(0, 256, (n(1080), 1920, 3), dtype=np.uint8)))
    items.append(("mask bool", rng.random((n(512), 512)) > 0.5))
    items.append(("spectrum c64", np.fft.fft(rng.standard_normal((n(256), 1024))).astype(np.complex64)))
    base = rng.standard_normal((n(1024), 2048), dtype=np.float32)
    items.append(("transposed view", base.T))  # non-contiguous: gathered once by the encoder

    # a bundle shaped like a small transformer checkpoint (mixed dtypes, nested)
    d_model, vocab, layers = 512, n(8000), 4
    bf = np.float32
    try:
        import ml_dtypes

        bf = ml_dtypes.bfloat16
    except ImportError:
        pass
    model = {"embed.weight": rng.standard_normal((vocab, d_model), dtype=np.float32).astype(bf)}
    for i in range(layers):
        model[f"layers.{i}"] = {
            "attn.qkv.weight": rng.standard_normal((3 * d_model, d_model), dtype=np.float32).astype(bf),
            "attn.out.weight": rng.standard_normal((d_model, d_model), dtype=np.float32).astype(bf),
            "mlp.up.weight": rng.standard_normal((4 * d_model, d_model), dtype=np.float32).astype(bf),
            "mlp.down.weight": rng.standard_normal((d_model, 4 * d_model), dtype=np.float32).astype(bf),
            "norm.weight": np.ones(d_model, np.float32),
            "norm.bias": np.zeros(d_model, np.float32),
        }
    model["lm_head.bias"] = np.zeros(vocab, np.float32)
    items.append(("model bundle", model))

    try:
        import scipy.sparse as sp

        items.append(("sparse csr", sp.random(n(20_000), 20_000, density=0.0005, format="csr", dtype=np.float32,
                                              random_state=3)))
        items.append(("sparse coo", sp.random(n(5_000), 5_000, density=0.001, format="coo", dtype=np.float64,
                                              random_state=4)))
    except ImportError:
        print("(scipy missing: no sparse matrix)")

    w = rng.standard_normal((n(1024), 1024), dtype=np.float32)
    items.append(("qint8 per-channel", tenso.QuantizedTensor.quantize(w, "qint8", scheme="per_channel", axis=0)))
    items.append(("qint4 per-group", tenso.QuantizedTensor.quantize(w, "qint4", scheme="per_group", group_size=128)))
    return items


# ----------------------------------------------------------------------------- fingerprints

def fingerprint(obj) -> str:
    """dtype + shape + bytes of everything an object carries, order-independent for dicts."""
    h = hashlib.sha256()

    def arr(a):
        a = np.asarray(a)
        h.update(f"{a.dtype.name}|{a.shape}|".encode())
        h.update(np.ascontiguousarray(a).tobytes())

    def walk(o):
        if isinstance(o, np.ndarray):
            arr(o)
        elif isinstance(o, dict):
            for k in sorted(o):
                h.update(f"<{k}>".encode())
                walk(o[k])
        elif isinstance(o, tenso.QuantizedTensor):
            h.update(f"q|{o.dtype_name}|{tuple(o.shape)}|{getattr(o, 'quant_scheme', '')}|"
                     f"{getattr(o, 'group_size', '')}|".encode())
            for part in (o.data, o.scales, o.zero_points):
                arr(part)
        elif hasattr(o, "format") and o.format in ("csr", "csc", "coo"):
            h.update(f"sp|{o.format}|{o.shape}|".encode())
            if o.format == "coo":
                parts = (o.row, o.col, o.data)
            else:
                parts = (o.indptr, o.indices, o.data)
            for part in parts:
                arr(part)
        else:
            raise TypeError(type(o))

    walk(obj)
    return h.hexdigest()[:16]


def describe(obj) -> str:
    if isinstance(obj, np.ndarray):
        c = "" if obj.flags.c_contiguous else " (strided)"
        return f"{obj.dtype.name}{list(obj.shape)}{c}"
    if isinstance(obj, dict):
        leaves = []

        def walk(o):
            for v in o.values():
                walk(v) if isinstance(v, dict) else leaves.append(v)

        walk(obj)
        dts = sorted({v.dtype.name for v in leaves})
        return f"{len(leaves)} tensors ({'/'.join(dts)})"
    if isinstance(obj, tenso.QuantizedTensor):
        return f"{obj.dtype_name}{list(obj.shape)}"
    return f"{obj.format} {obj.shape} nnz={obj.nnz}"


def nbytes_of(obj) -> int:
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if isinstance(obj, dict):
        return sum(nbytes_of(v) for v in obj.values())
    if isinstance(obj, tenso.QuantizedTensor):
        return obj.nbytes
    return sum(getattr(obj, p).nbytes for p in (("row", "col", "data") if obj.format == "coo"
                                                  else ("indptr", "indices", "data")))


def send(obj, sock) -> int:
    """write_stream for everything it takes; a packet from dumps otherwise."""
    try:
        return tenso.write_stream(obj, sock)
    except TypeError:
        pkt = tenso.dumps(obj)
        sock.sendall(pkt)
        return memoryview(pkt).nbytes


# ----------------------------------------------------------------------------- the receiver process

def receiver(sock: socket.socket, conn, names: list[str], files: list[str]) -> None:
    out = []
    try:
        for name in names:  # 1) the socket: one packet per object, in order
            t0 = time.perf_counter()
            obj = tenso.read_stream(sock)
            t1 = time.perf_counter()
            out.append(("socket", name, fingerprint(obj), t1 - t0))
        for name, path in zip(names, files):  # 2) the files
            t0 = time.perf_counter()
            with open(path, "rb") as f:
                obj = tenso.load(f)
            t1 = time.perf_counter()
            out.append(("file", name, fingerprint(obj), t1 - t0))
            if isinstance(obj, np.ndarray):
                t0 = time.perf_counter()
                with open(path, "rb") as f:
                    m = tenso.load(f, mmap_mode=True)
                t1 = time.perf_counter()
                fp = fingerprint(m)  # reading the map pages it in; the load itself did not
                out.append(("mmap", name, fp, t1 - t0))
                del m
        conn.send(("ok", out))
    except BaseException as e:  # report, don't hang the parent
        conn.send(("error", f"{type(e).__name__}: {e}", out))
    finally:
        conn.close()


# ----------------------------------------------------------------------------- main

def mbps(n, s):
    return f"{n / s / 1e6:8.0f}" if s > 0 else "     inf"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-bench", action="store_true", help="skip the comparison table")
    ap.add_argument("--scale", type=float, default=1.0, help="size multiplier for the payloads")
    args = ap.parse_args()
    t_start = time.time()

    items = build(args.scale)
    names = [n for n, _ in items]
    expected = {n: fingerprint(o) for n, o in items}
    tmp = tempfile.mkdtemp(prefix="tenso-demo-")
    files = [os.path.join(tmp, f"{i:02d}.tnso") for i in range(len(items))]

    print(f"tenso {getattr(tenso, '__version__', '')} from {os.path.dirname(tenso.__file__)}")
    print(f"{len(items)} objects, {sum(nbytes_of(o) for _, o in items) / 1e6:.1f} MB of tensor data\n")

    # packets and metadata without decoding
    packet_len = {}
    for name, obj in items:
        pkt = tenso.dumps(obj)
        packet_len[name] = memoryview(pkt).nbytes
    info = tenso.get_packet_info(tenso.dumps(items[0][1]))
    print(f"get_packet_info({names[0]}): dtype={info.get('dtype')} shape={info.get('shape')} "
          f"version={info.get('version')} aligned={info.get('aligned')}")
    comp = np.repeat(np.arange(1024, dtype=np.float32), 4096)
    zp = tenso.dumps(comp, compress=True, check_integrity=True)
    assert np.array_equal(tenso.loads(zp), comp)
    print(f"compress+integrity: {comp.nbytes / 1e6:.1f} MB -> {memoryview(zp).nbytes / 1e6:.2f} MB, round-trip ok\n")

    # file side: the sender writes, the receiver loads
    t_file = {}
    for (name, obj), path in zip(items, files):
        t0 = time.perf_counter()
        with open(path, "wb") as f:
            tenso.dump(obj, f) if isinstance(obj, np.ndarray) else f.write(tenso.dumps(obj))
        t_file[name] = time.perf_counter() - t0

    # socket side: a forked receiver process on the other end of a socketpair
    ctx = mp.get_context("fork")
    a, b = socket.socketpair()
    parent_conn, child_conn = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=receiver, args=(b, child_conn, names, files), daemon=True)
    proc.start()
    b.close()
    child_conn.close()
    t_send = {}
    for name, obj in items:
        t0 = time.perf_counter()
        send(obj, a)
        t_send[name] = time.perf_counter() - t0
    if not parent_conn.poll(120):
        print("receiver timed out")
        proc.kill()
        return 1
    msg = parent_conn.recv()
    proc.join(10)
    a.close()
    if msg[0] != "ok":
        print(f"receiver failed: {msg[1]}")
        return 1
    got = {(route, name): (fp, dt) for route, name, fp, dt in msg[1]}

    ok_all = True
    hdr = (f"{'object':<19}{'what':<36}{'packet MB':>10}{'sock tx':>9}{'sock rx':>9}{'file wr':>9}{'file rd':>9}"
           f"{'mmap':>9}  verified")
    print("throughput in MB/s of packet bytes (tx/wr: sender process, rx/rd: receiver process incl. decode)")
    print(hdr)
    print("-" * len(hdr))
    for name, obj in items:
        n = packet_len[name]
        row = f"{name:<19}{describe(obj)[:35]:<36}{n / 1e6:>10.2f}{mbps(n, t_send[name]):>9}"
        checks = []
        for route in ("socket", "file", "mmap"):
            r = got.get((route, name))
            if route == "socket":
                row += f"{mbps(n, r[1]):>9}" if r else f"{'-':>9}"
                row += f"{mbps(n, t_file[name]):>9}"
            else:
                row += f"{mbps(n, r[1]):>9}" if r else f"{'-':>9}"
            if r:
                checks.append(r[0] == expected[name])
        ok = bool(checks) and all(checks)
        ok_all &= ok
        row += "  " + ("yes" if ok else "NO  <-- mismatch")
        print(row)
    total = sum(packet_len.values())
    print(f"\nmoved {total / 1e6:.1f} MB twice (socket, file); all verified: {ok_all}")
    print(f"(mmap column: load(mmap_mode=True) maps and parses only the header, so its 'MB/s' is not a copy rate)")
    for p in files:
        os.unlink(p)
    os.rmdir(tmp)

    print(f"(transfer part: {time.time() - t_start:.0f}s)")
    if not args.no_bench:
        print("\n== comparison (benchmarks/bench_codec.py --quick --only dumps,loads,dict --sizes 1K,1M) ==",
              flush=True)
        out_dir = tempfile.mkdtemp(prefix="tenso-demo-bench-")
        try:
            r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_codec.py"), "--quick",
                            "--only", "dumps,loads,dict", "--sizes", "1K,1M", "--no-setup", "--budget", "30",
                            "--out", out_dir], capture_output=True, text=True, timeout=100)
        except subprocess.TimeoutExpired:
            print("(comparison skipped: the machine is too loaded to finish it in 100 s; "
                  "run benchmarks/bench_codec.py --quick)")
            r = subprocess.CompletedProcess([], 0, "", "")
        keep = False
        for line in r.stdout.splitlines():
            if line.startswith("== tenso-ray codec benchmark"):
                keep = True
            if line.startswith("-- CPU time"):
                keep = False
            if line.startswith("== targets"):
                keep = True
            if keep:
                print(line)
        if r.returncode != 0:
            print(r.stderr[-2000:])
    print(f"\ndemo finished in {time.time() - t_start:.0f}s")
    return 0 if ok_all else 1


if __name__ == "__main__":
    sys.exit(main())
