"""tenso-ray codec benchmark: ours vs tenso 0.24.0 / 0.19.4, pickle-5, .npy, safetensors, Arrow IPC and the floors.

    .venv/bin/python benchmarks/bench_codec.py [--quick] [--only NAME[,NAME]] [--out DIR]

Groups (--only): dumps loads info dict noncontig iter stream file hash memory import.
Prints the timing table and the target table (PASS/FAIL), writes benchmarks/results/<stamp>.json,
results/latest.json and results/latest.png. Method: README.md next to this file.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness as H  # noqa: E402
from harness import KiB, MiB, Target, ratio  # noqa: E402

SIZES = [1 * KiB, 64 * KiB, 1 * MiB, 16 * MiB, 64 * MiB]
TENSOS = ["ours", "tenso-0.24.0", "tenso-0.19.4"]
ALL = TENSOS + ["pickle5", "npy", "safetensors", "arrow", "floor", "memcpy", "xxhash/lz4"]
SIZE_FILTER: set[int] = set()  # --sizes
GROUPS = ["dumps", "loads", "info", "dict", "noncontig", "iter", "stream", "file", "hash", "memory", "import"]


def plan(groups: set[str], quick: bool = False) -> list[tuple[str, str, str, int, list[str]]]:
    """(group, op, kind, nbytes, impls) in run order."""
    P = []
    sizes = [n for n in SIZES if not (quick and n == 16 * MiB)]
    if SIZE_FILTER:
        sizes = [n for n in SIZES if n in SIZE_FILTER]
    codecs = TENSOS + ["pickle5", "npy", "safetensors", "arrow", "floor"]
    if "dumps" in groups:
        # memcpy: the body copied into a preallocated buffer (the floor once packet memory is reused).
        P += [("dumps", "dumps", "f32", n, codecs + ["memcpy"]) for n in sizes]
    if "loads" in groups:
        P += [("loads", "loads", "f32", n, codecs) for n in sizes]
    if "info" in groups:
        P += [("info", "info", "f32", n, TENSOS + ["floor"]) for n in sizes]
    if "dict" in groups:
        dict_impls = TENSOS + ["pickle5", "npy", "safetensors", "arrow"]
        P += [("dict", "dumps", "dict", 200 * 4 * KiB, dict_impls), ("dict", "loads", "dict", 200 * 4 * KiB, dict_impls)]
    if "noncontig" in groups:
        nc = TENSOS + ["pickle5", "npy", "safetensors", "floor"]
        P += [("noncontig", "dumps", "strided", 64 * MiB, nc), ("noncontig", "dumps", "transposed", 64 * MiB, nc)]
        if "dumps" not in groups:  # the contiguous reference
            P += [("noncontig", "dumps", "f32", 64 * MiB, ["ours", "floor"])]
    if "iter" in groups:
        P += [("iter", "iter_dumps", "f32", n, TENSOS) for n in (1 * KiB, 64 * MiB)]
        if "dumps" not in groups:
            P += [("iter", "dumps", "f32", 64 * MiB, ["floor"])]
    if "stream" in groups:
        P += [("stream", op, "f32", 64 * MiB, TENSOS + ["floor"]) for op in ("stream_recv", "stream_send", "astream_send")]
    if "file" in groups:
        fi = TENSOS + ["npy", "floor"]
        P += [("file", "file_load", "f32", n, fi) for n in (1 * MiB, 64 * MiB)]
        P += [("file", "mmap_load", "f32", n, fi) for n in (1 * KiB, 64 * MiB)]
        P += [("file", "file_dump", "f32", 64 * MiB, fi)]
    if "hash" in groups:
        P += [("hash", "xxh3", "f32", 64 * MiB, ["ours", "xxhash/lz4"]),
              ("hash", "lz4c", "compressible", 64 * MiB, ["ours", "xxhash/lz4"]),
              ("hash", "lz4d", "compressible", 64 * MiB, ["ours", "xxhash/lz4"])]
    return P


def build_targets(R: dict, probes: dict) -> list[Target]:
    """R[(op, kind, nbytes)] -> {impl: Result}. Each target names its metric (wall unless stated)."""

    absent = False

    def get(op, kind, n, impl, metric="wall"):
        nonlocal absent
        if (op, kind, n) not in R:  # case not run (--only, --quick): no target row at all
            absent = True
        r = R.get((op, kind, n), {}).get(impl)
        return getattr(r, metric) if r is not None and r.status == "ok" else None

    T = []

    def add(t: Target):
        nonlocal absent
        if not absent:
            T.append(t)
        absent = False

    for n in SIZES:
        s = H.human_size(n)
        add(Target(f"loads/frombuffer@{s}", f"loads({s} f32) <= 2x np.frombuffer on the same bytes",
                        ratio(get("loads", "f32", n, "ours"), get("loads", "f32", n, "floor")), 2.0))
    for n in SIZES:
        s = H.human_size(n)
        add(Target(f"info/frombuffer@{s}", f"get_packet_info({s}) <= 2x np.frombuffer",
                        ratio(get("info", "f32", n, "ours"), get("info", "f32", n, "floor")), 2.0))
    add(Target("loads O(1) 64M/1K", "loads time independent of body size",
                    ratio(get("loads", "f32", 64 * MiB, "ours"), get("loads", "f32", KiB, "ours")), 3.0))
    add(Target("info O(1) 64M/1K", "get_packet_info time independent of body size",
                    ratio(get("info", "f32", 64 * MiB, "ours"), get("info", "f32", KiB, "ours")), 3.0))
    for n in (1 * MiB, 16 * MiB, 64 * MiB):
        s = H.human_size(n)
        add(Target(f"dumps/copy@{s}", f"dumps({s}) <= 1.25x alloc+one body copy",
                        ratio(get("dumps", "f32", n, "ours"), get("dumps", "f32", n, "floor")), 1.25))
    for n in (1 * MiB, 64 * MiB):
        s = H.human_size(n)
        add(Target(f"dumps/memcpy@{s}", f"dumps({s}) <= 1.1x a memcpy into a preallocated buffer (buffer cache)",
                   ratio(get("dumps", "f32", n, "ours"), get("dumps", "f32", n, "memcpy")), 1.1))
        add(Target(f"dumps/arrow@{s}", f"dumps({s}) faster than Arrow IPC write_tensor",
                   ratio(get("dumps", "f32", n, "ours"), get("dumps", "f32", n, "arrow")), 1.0))
    add(Target("dumps/0.24.0@64M", "dumps(64M) vs tenso 0.24.0; the issue expects ~5x once at the copy floor",
                    ratio(get("dumps", "f32", 64 * MiB, "ours"), get("dumps", "f32", 64 * MiB, "tenso-0.24.0")), 0.2,
                    info=True, detail="derived from dumps/copy: depends on how far 0.24.0 is from the floor here"))
    add(Target("dumps/0.19.4@1K", "dumps(1K) <= 1/3 of tenso 0.19.4",
                    ratio(get("dumps", "f32", KiB, "ours"), get("dumps", "f32", KiB, "tenso-0.19.4")), 1 / 3))
    dn = 200 * 4 * KiB
    for op in ("dumps", "loads"):
        add(Target(f"dict {op}/pickle5", f"dict 200x4K {op} faster than pickle protocol 5",
                        ratio(get(op, "dict", dn, "ours"), get(op, "dict", dn, "pickle5")), 1.0))
        add(Target(f"dict {op}/0.24.0", f"dict 200x4K {op} >= 8x faster than tenso 0.24.0",
                        ratio(get(op, "dict", dn, "ours"), get(op, "dict", dn, "tenso-0.24.0")), 1 / 8))
    for kind in ("strided", "transposed"):
        add(Target(f"noncontig {kind}/contig", f"dumps(64M {kind} view) <= 2x dumps(64M contiguous)",
                        ratio(get("dumps", kind, 64 * MiB, "ours"), get("dumps", "f32", 64 * MiB, "ours")), 2.0))
    add(Target("iter_dumps@64M/copy", "iter_dumps(64M) copies no body byte (<= 0.05x one copy)",
                    ratio(get("iter_dumps", "f32", 64 * MiB, "ours"), get("dumps", "f32", 64 * MiB, "floor")), 0.05))
    add(Target("write_stream cpu/sendall", "write_stream sender CPU <= 1.2x sock.sendall(body) (64M socketpair)",
                    ratio(get("stream_send", "f32", 64 * MiB, "ours", "cpu"),
                          get("stream_send", "f32", 64 * MiB, "floor", "cpu")), 1.2))
    add(Target("awrite_stream cpu/raw", "awrite_stream sender CPU <= 1.2x writer.write(body)+drain (64M)",
                    ratio(get("astream_send", "f32", 64 * MiB, "ours", "cpu"),
                          get("astream_send", "f32", 64 * MiB, "floor", "cpu")), 1.2))
    add(Target("read_stream cpu/recv_into", "read_stream receiver CPU <= 1.2x recv_into loop (64M socketpair)",
                    ratio(get("stream_recv", "f32", 64 * MiB, "ours", "cpu"),
                          get("stream_recv", "f32", 64 * MiB, "floor", "cpu")), 1.2))
    add(Target("load/readinto@64M", "load(file 64M) <= 1.1x f.readinto(np.empty) of the same file",
                    ratio(get("file_load", "f32", 64 * MiB, "ours"), get("file_load", "f32", 64 * MiB, "floor")), 1.1))
    add(Target("load mmap O(1) 64M/1K", "load(mmap_mode=True) maps, never reads",
                    ratio(get("mmap_load", "f32", 64 * MiB, "ours"), get("mmap_load", "f32", KiB, "ours")), 3.0))
    add(Target("xxh3/xxhash@64M", "_xxh3_64 throughput >= 0.8x xxhash.xxh3_64 (time <= 1.25x)",
                    ratio(get("xxh3", "f32", 64 * MiB, "ours"), get("xxh3", "f32", 64 * MiB, "xxhash/lz4")), 1.25))
    add(Target("lz4 compress/lz4.frame", "_lz4_compress time <= lz4.frame.compress (64M)",
                    ratio(get("lz4c", "compressible", 64 * MiB, "ours"),
                          get("lz4c", "compressible", 64 * MiB, "xxhash/lz4")), 1.0))
    add(Target("lz4 decompress/lz4.frame", "_lz4_decompress time <= lz4.frame.decompress (64M)",
                    ratio(get("lz4d", "compressible", 64 * MiB, "ours"),
                          get("lz4d", "compressible", 64 * MiB, "xxhash/lz4")), 1.0))
    g = probes.get("growth")
    if g is not None:
        if g.get("ok"):
            bad = {k: v for k, v in g["growth"].items() if not isinstance(v, int)}
            worst = max(((v, k) for k, v in g["growth"].items() if isinstance(v, int)), default=(None, ""))
            T.append(Target("rss growth 1000 calls", f"no RSS growth over {g['calls']} calls of any API (MiB, worst)",
                            None if worst[0] is None else worst[0] / MiB, 1.0, unit="MiB",
                            detail=f"worst={worst[1]}; over 1 MiB: " + ", ".join(
                                f"{k}={v / MiB:.1f}" for k, v in g["growth"].items() if isinstance(v, int) and v > MiB)
                            + (f"; errors: {bad}" if bad else "")))
        else:
            T.append(Target("rss growth 1000 calls", "no RSS growth", None, 1.0, unit="MiB", detail=g.get("error", "")))
    pk = probes.get("peak", {}).get("tenso")
    if pk is not None:
        T.append(Target("dumps 64M peak/payload", "peak extra memory of dumps(64M) <= one payload (+2 MiB slack)",
                        pk["extra_peak"] / pk["payload"] if pk.get("ok") else None, 1.0 + 2 * MiB / (64 * MiB),
                        detail="" if pk.get("ok") else pk.get("error", "")))
    cl = probes.get("cacheloop")
    if cl is not None:
        ok = cl.get("ok")
        T.append(Target("cache loop peak", f"{cl.get('calls', 100)} x (dumps + loads(copy=True)) of 64M: peak RSS "
                        "minus the first iteration's, in packets (<= 4)", cl["growth_packets"] if ok else None, 4.0,
                        unit="pkts", detail=(f"hits={cl['cache']['hits']} misses={cl['cache']['misses']}"
                                             if ok else cl.get("error", ""))))
        T.append(Target("cache loop after idle", "RSS after the idle period minus RSS before the loop, in packets "
                        "(memory given back; <= 0.5)", cl["after_idle_over_base"] / cl["packet"] if ok else None, 0.5,
                        unit="pkts", detail=(f"held after loop {(cl['held_after_loop'] - cl['base']) / MiB:.0f} MiB, "
                                             f"after {cl['idle_s']} s idle {(cl['after_idle'] - cl['base']) / MiB:.0f}"
                                             " MiB" if ok else "")))
    it = probes.get("import")
    if it is not None:
        T.append(Target("import tenso - numpy", "import tenso costs <= 0.1 s more than import numpy (s, medians)",
                        it.get("delta_s"), 0.1, unit="s"))
    return T


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="~2 minutes: fewer repetitions")
    ap.add_argument("--only", default="", help="comma-separated groups: " + " ".join(GROUPS))
    ap.add_argument("--out", default=os.path.join(H.HERE, "results"))
    ap.add_argument("--ours-python", default=H.BENCH_PY, help="interpreter whose `tenso` is 'ours'")
    ap.add_argument("--sizes", default="", help="restrict dumps/loads/info sizes, e.g. 1K,1M")
    ap.add_argument("--budget", type=float, default=0, help="total seconds (default 560 full, 120 quick)")
    ap.add_argument("--no-setup", action="store_true", help="do not create refvenvs / pip install")
    args = ap.parse_args(argv)

    t_start = time.time()
    for tok in filter(None, (x.strip().upper() for x in args.sizes.split(","))):
        SIZE_FILTER.add(int(tok[:-1]) * (MiB if tok.endswith("M") else KiB))
    groups = set(GROUPS) if not args.only else {g.strip() for g in args.only.split(",") if g.strip()}
    unknown = groups - set(GROUPS)
    if unknown:
        ap.error(f"unknown group(s) {sorted(unknown)}; choose from {GROUPS}")
    bench_py = H.BENCH_PY if os.path.exists(H.BENCH_PY) else sys.executable
    ours_py = os.path.abspath(args.ours_python)
    if not args.no_setup:
        H.ensure_bench_packages(bench_py)
    refs = {v: (H.ensure_refvenv(v) if not args.no_setup else
                (os.path.join(H.REFVENVS, f"tenso-{v}", "bin", "python")
                 if os.path.exists(os.path.join(H.REFVENVS, f"tenso-{v}", "bin", "python")) else None))
            for v in H.REF_VERSIONS}

    ours_ok, ours_err = H.importable(ours_py, "tenso")
    if not ours_ok:
        H.log(f"[setup] ours is not importable with {ours_py}: {ours_err} -- reported as n/a")
    workers: dict[str, H.Worker] = {}
    try:
        if ours_ok:
            workers["ours"] = H.Worker("ours", ours_py, ["ours"])
        for v, py in refs.items():
            if py:
                workers[f"tenso-{v}"] = H.Worker(f"tenso-{v}", py, [f"tenso-{v}"])
        workers["floor"] = H.Worker("floor", bench_py, ["floor", "memcpy", "xxhash/lz4"])
        workers["others"] = H.Worker("others", bench_py, ["pickle5", "npy", "safetensors", "arrow"])
        versions = {}
        for w in workers.values():
            versions.update(w.hello["impls"])
            for n, e in w.hello.get("errors", {}).items():
                versions[n] = f"unavailable ({e})"
                H.log(f"[setup] {n}: {e}")

        quick = args.quick
        rows, R = [], {}
        P = plan(groups, quick)
        # Bounded run time: the timed repetitions of each case get a share of what is left of the
        # case budget (so slow set-ups early on shrink later cases instead of overrunning).
        probe_reserve = (25 if quick else 60) * (("memory" in groups) + ("import" in groups))
        total = (args.budget or (120 if quick else 560)) - probe_reserve
        deadline = t_start + total
        for i, (group, op, kind, n, impls) in enumerate(P):
            big = n >= 16 * MiB
            left = max(0.0, deadline - time.time())
            share = left / (len(P) - i) * (0.5 if big else 0.35)  # the rest goes to set-up and calibration
            budget = min(share, 12.0 if big else 8.0)
            max_reps = (15 if quick else 60) if big else (60 if quick else 400)
            min_reps = 3 if quick or big else 5
            t0 = time.time()
            res = H.run_case(workers, impls, group, op, kind, n, budget, max_reps, min_reps)
            rows.append(res)
            R[(op, kind, n)] = res
            for w in workers.values():  # tenso 0.24.0 leaks about one payload per dumps: keep it alive
                if w.alive() and w.rss() > 3 << 30:
                    w.restart(f"RSS {w.rss() >> 20} MiB")
            H.log(f"[{i + 1}/{len(P)}] {group}:{op}:{kind}:{H.human_size(n)} "
                  f"{time.time() - t0:.1f}s reps={max((r.reps for r in res.values()), default=0)}")
    finally:
        for w in workers.values():
            w.close()

    probes: dict = {}
    if "memory" in groups and ours_ok:
        H.log("[memory] growth probe")
        probes["growth"] = H.probe(ours_py, "growth", "--calls", "1000", "--nbytes", str(64 * KiB))
        probes["peak"] = {}
        for impl, py in (("tenso", ours_py), ("pickle5", bench_py), ("floor", bench_py)):
            probes["peak"][impl] = H.probe(py, "peak", "--impl", impl, "--nbytes", str(64 * MiB))
        H.log("[memory] buffer-cache loop")
        probes["cacheloop"] = H.probe(ours_py, "cacheloop", "--calls", "100", "--nbytes", str(64 * MiB), "--idle",
                                      "1.0")
        if refs.get("0.24.0"):
            probes["peak"]["tenso-0.24.0"] = H.probe(refs["0.24.0"], "peak", "--impl", "tenso", "--nbytes",
                                                     str(64 * MiB))
    if "import" in groups and ours_ok:
        H.log("[import] timing fresh interpreters")
        reps = 5 if args.quick else 15
        tn, tt = [], []
        for _ in range(reps):  # interleaved: numpy, tenso, numpy, tenso ...
            tn += H.import_time(ours_py, "numpy", 1)
            tt += H.import_time(ours_py, "tenso", 1)
        probes["import"] = {"numpy_s": statistics.median(tn) if tn else None,
                            "tenso_s": statistics.median(tt) if tt else None}
        probes["import"]["delta_s"] = (probes["import"]["tenso_s"] - probes["import"]["numpy_s"]
                                       if tn and tt else None)

    print(f"\n== tenso-ray codec benchmark ({'quick' if args.quick else 'full'}) -- median wall time per call; "
          f"ours/floor = wall ratio to the floor ==")
    impl_order = ALL
    table = H.print_table(rows, impl_order) if rows else ""
    if any(r.get("ours") and r["ours"].status == "ok" for r in rows):
        print("\n-- CPU time (process_time; stream ops: receiver thread / sender process) --")
        H.print_table(rows, impl_order, metric="cpu")
    if probes:
        print("\n-- probes --")
        for k, v in probes.items():
            print(f"{k}: {v}")
    print("\n== targets ==")
    targets = build_targets(R, probes) if ours_ok else []
    if not ours_ok:
        print(f"ours not importable ({ours_err}): targets not evaluated")
    ttext = H.print_targets(targets) if targets else ""
    payload = {
        "meta": {"started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t_start)),
                 "duration_s": round(time.time() - t_start, 1), "mode": "quick" if args.quick else "full",
                 "groups": sorted(groups), "command": " ".join([sys.executable] + sys.argv),
                 "machine": H.machine_info(), "versions": versions if rows else {},
                 "pythons": {"ours": ours_py, "bench": bench_py, **{f"tenso-{v}": p for v, p in refs.items()}},
                 "ours_importable": ours_ok, "ours_error": ours_err},
        "results": [vars(r) for row in rows for r in row.values()],
        "probes": probes,
        "targets": [t.as_dict() for t in targets],
        "table": table,
        "targets_table": ttext,
    }
    path, png = H.write_outputs(args.out, payload, targets)
    print(f"\nresults: {path}  chart: {png}  ({time.time() - t_start:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
