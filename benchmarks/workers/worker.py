"""Benchmark worker: one process per implementation group, driven over a pipe.

Launched by harness.py as ``<python> worker.py --impls a,b,c`` with the interpreter of the
environment under test (the bench .venv for ours, a reference virtualenv for tenso 0.24.0 /
0.19.4). Protocol: one JSON object per line on stdin; one JSON reply per line on the
original stdout (library prints are redirected to stderr so they cannot corrupt it).

  {"cmd": "hello"}                                  -> {"ok": true, "impls": {name: version}, "pid": ...}
  {"cmd": "setup", "id": ID, "impl": I, "op": OP, "kind": K, "nbytes": N}
                                                    -> {"ok": true} | {"ok": false, "unsupported"|"error": msg}
  {"cmd": "run", "id": ID, "k": K}                  -> {"ok": true, "cpu": ns/call, "wall": ns/call, ...}
  {"cmd": "drop", "id": ID}                         -> {"ok": true}
  {"cmd": "quit"}

Timing happens here, next to the code under test: ``k`` back-to-back calls with the garbage
collector disabled; process CPU (time.process_time_ns) and wall (time.perf_counter_ns) per call.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import impls as bc  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--impls", required=True)
    args = ap.parse_args()

    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # stray prints go to stderr
    sys.stdout = sys.stderr

    def reply(obj):
        out.write(json.dumps(obj) + "\n")
        out.flush()

    try:  # Python's mmap dups the fd; objects freed only by the (disabled) gc keep it open during a batch
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):
        pass
    impls = {}
    errors = {}
    for name in args.impls.split(","):
        try:
            impls[name] = bc.build(name)[0]
        except Exception as e:  # missing optional package: reported, not fatal
            errors[name] = f"{type(e).__name__}: {e}"
    cases = {}

    for line in sys.stdin:
        msg = json.loads(line)
        cmd = msg["cmd"]
        try:
            if cmd == "hello":
                reply({"ok": True, "pid": os.getpid(), "python": sys.version.split()[0],
                       "impls": {n: i.version() for n, i in impls.items()}, "errors": errors})
            elif cmd == "setup":
                impl = impls.get(msg["impl"])
                if impl is None:
                    reply({"ok": False, "unsupported": errors.get(msg["impl"], "not loaded")})
                    continue
                try:
                    m = impl.setup(msg["op"], msg["kind"], msg["nbytes"])
                except bc.Unsupported as e:
                    reply({"ok": False, "unsupported": f"no {e}"})
                    continue
                cases[msg["id"]] = m
                gc.collect()
                reply({"ok": True})
            elif cmd == "run":
                m = cases[msg["id"]]
                k = int(msg["k"])
                gc.disable()
                try:
                    if hasattr(m, "measure"):
                        res = m.measure(k)
                    else:
                        r = None
                        c0 = time.process_time_ns()
                        w0 = time.perf_counter_ns()
                        for _ in range(k):
                            r = m()
                            r = None  # noqa: F841  (drop the result inside the loop, like a real caller)
                        w1 = time.perf_counter_ns()
                        c1 = time.process_time_ns()
                        res = {"cpu": (c1 - c0) / k, "wall": (w1 - w0) / k}
                finally:
                    gc.enable()
                res["ok"] = True
                reply(res)
            elif cmd == "drop":
                m = cases.pop(msg["id"], None)
                if m is not None and hasattr(m, "close"):
                    m.close()
                bc._CACHE.clear()
                gc.collect()
                reply({"ok": True})
            elif cmd == "quit":
                for m in cases.values():
                    if hasattr(m, "close"):
                        m.close()
                reply({"ok": True})
                break
        except Exception as e:
            reply({"ok": False, "error": f"{type(e).__name__}: {e}", "tb": traceback.format_exc()[-2000:]})


if __name__ == "__main__":
    main()
