"""Shared benchmark machinery: worker processes, interleaved timing, probes, reporting.

Method (see README.md): every implementation runs in its own worker process started with
its own interpreter (tenso 0.24.0 / 0.19.4 share the import name ``tenso``, so they live in
their own virtualenvs). For each case the harness sets the case up in every worker, warms it,
calibrates a per-worker batch size ``k`` (so one batch lasts >= ~2 ms), then runs repetitions
INTERLEAVED: rep r asks A, B, C, ... for one batch each, starting at a rotating offset so no
implementation always runs first. Medians over repetitions of per-call CPU and wall time.
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WORKER = os.path.join(HERE, "workers", "worker.py")
PROBE = os.path.join(HERE, "workers", "probe.py")
BENCH_PY = os.path.join(ROOT, ".venv", "bin", "python")
REFVENVS = os.path.join(ROOT, ".refvenvs")
REF_VERSIONS = ("0.24.0", "0.19.4")

KiB, MiB = 1 << 10, 1 << 20


def human_size(n: int) -> str:
    if n >= MiB:
        return f"{n // MiB}M"
    if n >= KiB:
        return f"{n // KiB}K"
    return str(n)


def human_ns(ns) -> str:
    if ns is None:
        return "n/a"
    if ns >= 1e9:
        return f"{ns / 1e9:.2f}s"
    if ns >= 1e6:
        return f"{ns / 1e6:.2f}ms"
    if ns >= 1e3:
        return f"{ns / 1e3:.1f}us"
    return f"{ns:.0f}ns"


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- environments

def ensure_refvenv(ver: str) -> str | None:
    """Return the python of .refvenvs/tenso-<ver>, creating it if missing (reuses scripts/refvenvs.sh's)."""
    d = os.path.join(REFVENVS, f"tenso-{ver}")
    py = os.path.join(d, "bin", "python")
    if os.path.exists(py) and subprocess.run([py, "-c", "import tenso, numpy"], capture_output=True).returncode == 0:
        return py
    log(f"[setup] creating {d}")
    try:
        subprocess.run([sys.executable if not os.path.exists(BENCH_PY) else "python3", "-m", "venv", d], check=True)
        subprocess.run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check", f"tenso=={ver}", "numpy"],
                       check=True)
        return py
    except Exception as e:  # offline machine: the comparison is reported as n/a
        log(f"[setup] could not create {d}: {e}")
        return None


def ensure_bench_packages(py: str, quiet=True) -> None:
    """safetensors, pyarrow, matplotlib, xxhash, lz4 into the bench environment if missing."""
    need = []
    for mod, pkg in (("safetensors", "safetensors"), ("pyarrow", "pyarrow"), ("matplotlib", "matplotlib"),
                     ("xxhash", "xxhash"), ("lz4", "lz4")):
        if subprocess.run([py, "-c", f"import {mod}"], capture_output=True).returncode != 0:
            need.append(pkg)
    if need:
        log(f"[setup] pip install {' '.join(need)}")
        subprocess.run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check", *need])


def importable(py: str, mod: str) -> tuple[bool, str]:
    r = subprocess.run([py, "-c", f"import {mod}"], capture_output=True, text=True)
    return r.returncode == 0, (r.stderr.strip().splitlines() or [""])[-1]


def machine_info() -> dict:
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"model name\s*:\s*(.*)", f.read())
            cpu = m.group(1) if m else cpu
    except OSError:
        pass
    mem = None
    try:
        with open("/proc/meminfo") as f:
            mem = int(re.search(r"MemTotal:\s*(\d+)", f.read()).group(1)) * 1024
    except (OSError, AttributeError):
        pass
    return {"cpu_model": cpu, "cores": os.cpu_count(), "mem_bytes": mem, "platform": platform.platform(),
            "kernel": platform.release(), "harness_python": sys.version.split()[0]}


# ----------------------------------------------------------------------------- workers

class Worker:
    def __init__(self, label: str, python: str, impls: list[str], env: dict | None = None):
        self.label = label
        self.python = python
        self.impls = impls
        self.env = env
        self.start()

    def start(self):
        self.proc = subprocess.Popen([self.python, WORKER, "--impls", ",".join(self.impls)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=sys.stderr, text=True, bufsize=1,
                                     cwd=HERE, env=self.env)
        self.hello = self.call({"cmd": "hello"})

    def alive(self) -> bool:
        return self.proc.poll() is None

    def rss(self) -> int:
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def restart(self, why: str):
        log(f"[worker] restarting {self.label}: {why}")
        if self.alive():
            self.close()
        self.start()

    def call(self, msg: dict) -> dict:
        self.send(msg)
        return self.recv()

    def send(self, msg: dict) -> None:
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()

    def recv(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.label} died (rc={self.proc.poll()})")
        return json.loads(line)

    def close(self):
        try:
            self.call({"cmd": "quit"})
        except Exception:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@dataclass
class Result:
    group: str
    op: str
    kind: str
    nbytes: int
    impl: str
    status: str = "ok"            # ok | n/a | error
    note: str = ""
    k: int = 0
    reps: int = 0
    wall: float | None = None     # median ns per call
    cpu: float | None = None
    extra: dict = field(default_factory=dict)   # other medians (e.g. peer_cpu)
    wall_iqr: float | None = None


_case_id = 0


def run_case(workers: dict[str, Worker], impls: list[str], group: str, op: str, kind: str, nbytes: int,
             budget_s: float, max_reps: int, min_reps: int = 3, batch_ns: float = 2e6, max_k: int = 20000,
             ) -> dict[str, Result]:
    """Set up (op, kind, nbytes) in every impl's worker, then time it interleaved. Returns impl -> Result."""
    global _case_id
    _case_id += 1
    cid = f"c{_case_id}"
    res: dict[str, Result] = {}
    live: list[str] = []
    owner = {}
    pending = []
    for impl in impls:  # set up in every worker at once (input generation runs in parallel)
        r = Result(group, op, kind, nbytes, impl)
        res[impl] = r
        w = next((w for w in workers.values() if impl in w.impls), None)
        if w is None:
            r.status, r.note = "n/a", "no environment"
            continue
        if not w.alive():
            w.restart("it died in an earlier case")
        owner[impl] = w
        w.send({"cmd": "setup", "id": cid + impl, "impl": impl, "op": op, "kind": kind, "nbytes": nbytes})
        pending.append(impl)
    for impl in pending:
        r = res[impl]
        rep = owner[impl].recv()
        if rep.get("ok"):
            live.append(impl)
        elif "unsupported" in rep:
            r.status, r.note = "n/a", rep["unsupported"]
        else:
            r.status, r.note = "error", rep.get("error", "?")
            log(f"[{group}] {impl}: {r.note}\n{rep.get('tb', '')}")

    if op.startswith("mmap"):
        max_k = min(max_k, 100)  # each call maps a file: bound the fds a batch can hold before gc runs
    # warm-up + calibration: one call, then a batch sized to last ~batch_ns
    per_call = {}
    for impl in list(live):
        w = owner[impl]
        first = w.call({"cmd": "run", "id": cid + impl, "k": 1})
        if not first.get("ok"):
            res[impl].status, res[impl].note = "error", first.get("error", "?")
            log(f"[{group}] {impl}: {first.get('error')}\n{first.get('tb', '')}")
            live.remove(impl)
            continue
        k = max(1, min(max_k, int(batch_ns / max(first["wall"], 1))))
        second = w.call({"cmd": "run", "id": cid + impl, "k": k})
        k = max(1, min(max_k, int(batch_ns / max(second["wall"], 1))))
        res[impl].k = k
        per_call[impl] = second["wall"]

    per_rep_s = sum(per_call[i] * res[i].k for i in live) / 1e9 + 0.0005 * len(live)
    reps = int(max(min_reps, min(max_reps, budget_s / max(per_rep_s, 1e-6))))
    samples: dict[str, list[dict]] = {i: [] for i in live}
    for r in range(reps):
        n = len(live)
        for j in range(n):
            impl = live[(r + j) % n]     # rotate the starting implementation each repetition
            try:
                rep = owner[impl].call({"cmd": "run", "id": cid + impl, "k": res[impl].k})
            except RuntimeError as e:  # killed (e.g. the OOM killer): the others go on
                log(f"[{group}] {impl}: {e}")
                res[impl].status, res[impl].note = "error", str(e)
                live.remove(impl)
                samples.pop(impl, None)
                break
            if rep.get("ok"):
                samples[impl].append(rep)
    for impl in live:
        s = samples.get(impl, [])
        r = res[impl]
        r.reps = len(s)
        if not s:
            r.status = "error"
            continue
        walls = sorted(x["wall"] for x in s)
        r.wall = statistics.median(walls)
        r.cpu = statistics.median(x["cpu"] for x in s)
        if len(walls) >= 4:
            q = statistics.quantiles(walls, n=4)
            r.wall_iqr = q[2] - q[0]
        for key in s[0]:
            if key not in ("ok", "cpu", "wall"):
                r.extra[key] = statistics.median(x[key] for x in s)
    alive = [i for i in owner if owner[i].alive()]
    for impl in alive:
        owner[impl].send({"cmd": "drop", "id": cid + impl})
    for impl in alive:
        try:
            owner[impl].recv()
        except RuntimeError:
            pass
    return res


# ----------------------------------------------------------------------------- probes (fresh subprocesses)

def probe(py: str, *args: str, timeout: float = 300) -> dict:
    r = subprocess.run([py, PROBE, *args], capture_output=True, text=True, timeout=timeout, cwd=HERE)
    if r.returncode != 0:
        return {"ok": False, "error": (r.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def import_time(py: str, mod: str, reps: int) -> list[float]:
    """Seconds to import `mod` in fresh interpreters (in-process perf_counter around the import)."""
    code = f"import time; t=time.perf_counter(); import {mod}; print(time.perf_counter()-t)"
    out = []
    for _ in range(reps):
        r = subprocess.run([py, "-c", code], capture_output=True, text=True, cwd="/")
        if r.returncode == 0:
            out.append(float(r.stdout.strip()))
    return out


# ----------------------------------------------------------------------------- targets & report

@dataclass
class Target:
    tid: str
    desc: str
    value: float | None      # measured ratio (or seconds / bytes, as described)
    limit: float
    cmp: str = "<="          # value <= limit passes (or ">=")
    unit: str = "x"
    detail: str = ""
    info: bool = False       # reported, never PASS/FAIL (a derived expectation, not a target)

    @property
    def status(self) -> str:
        if self.value is None:
            return "N/A"
        if self.info:
            return "INFO"
        ok = self.value <= self.limit if self.cmp == "<=" else self.value >= self.limit
        return "PASS" if ok else "FAIL"

    def as_dict(self):
        return {"id": self.tid, "desc": self.desc, "value": self.value, "limit": self.limit, "cmp": self.cmp,
                "unit": self.unit, "status": self.status, "detail": self.detail}


def ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


def print_table(results: list[dict[str, Result]], impls: list[str], metric: str = "wall") -> str:
    short = {"ours": "ours", "tenso-0.24.0": "t0.24.0", "tenso-0.19.4": "t0.19.4", "pickle5": "pickle5",
             "npy": "npy", "safetensors": "safetens", "arrow": "arrow", "floor": "floor", "xxhash/lz4": "xxh/lz4"}
    cols = [i for i in impls if any(i in r for r in results)]
    head = f"{'op':<16}{'input':<12}{'size':>6} " + "".join(f"{short.get(c, c):>10}" for c in cols) + \
        f"{'ours/floor':>11}"
    lines = [head, "-" * len(head)]
    for row in results:
        any_r = next(iter(row.values()))
        cells = []
        for c in cols:
            r = row.get(c)
            if r is None:
                cells.append(f"{'':>10}")
            elif r.status != "ok":
                cells.append(f"{r.status:>10}")
            else:
                cells.append(f"{human_ns(getattr(r, metric)):>10}")
        o, f = row.get("ours"), row.get("floor") or row.get("xxhash/lz4")
        rr = ratio(getattr(o, metric, None) if o and o.status == "ok" else None,
                   getattr(f, metric, None) if f and f.status == "ok" else None)
        size = human_size(any_r.nbytes) if any_r.kind != "dict" else "200x4K"
        lines.append(f"{any_r.op:<16}{any_r.kind:<12}{size:>6} " + "".join(cells) +
                     (f"{rr:>10.2f}x" if rr is not None else f"{'':>11}"))
    text = "\n".join(lines)
    print(text)
    return text


def print_targets(targets: list[Target]) -> str:
    lines = [f"{'target':<28}{'measured':>11}{'limit':>12}  {'result':<6} description", "-" * 110]
    for t in targets:
        v = "n/a" if t.value is None else (f"{t.value:.3f}{t.unit}" if t.unit else f"{t.value:.3f}")
        lim = f"{t.cmp}{t.limit:g}{t.unit}"
        lines.append(f"{t.tid:<28}{v:>11}{lim:>12}  {t.status:<6} {t.desc}" + (f"  [{t.detail}]" if t.detail else ""))
    n_pass = sum(t.status == "PASS" for t in targets)
    n_fail = sum(t.status == "FAIL" for t in targets)
    n_na = sum(t.status == "N/A" for t in targets)
    n_info = sum(t.status == "INFO" for t in targets)
    lines.append(f"-- {n_pass} PASS, {n_fail} FAIL, {n_na} N/A, {n_info} INFO (informational, not a target)")
    text = "\n".join(lines)
    print(text)
    return text


def write_outputs(out_dir: str, payload: dict, targets: list[Target]) -> tuple[str, str | None]:
    os.makedirs(out_dir, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    path = os.path.join(out_dir, f"{stamp}.json")
    data = json.dumps(payload, indent=1, default=str)
    for p in (path, os.path.join(out_dir, "latest.json")):
        tmp = p + ".tmp"
        with open(tmp, "w") as f:
            f.write(data)
        os.replace(tmp, p)
    png = os.path.join(out_dir, "latest.png")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        ts = [t for t in targets if t.value is not None and t.limit]
        if ts:
            fig, ax = plt.subplots(figsize=(10, 0.32 * len(ts) + 1.5))
            # normalise so that 1.0 is the limit and smaller is better for every target
            vals = [(t.value / t.limit) if t.cmp == "<=" else (t.limit / t.value if t.value else float("inf"))
                    for t in ts]
            colors = [{"PASS": "tab:green", "FAIL": "tab:red"}.get(t.status, "tab:gray") for t in ts]
            ax.barh([t.tid for t in ts], vals, color=colors)
            ax.axvline(1.0, color="k", lw=1)
            ax.set_xscale("log")
            ax.invert_yaxis()
            ax.set_xlabel("measured / limit (log; < 1 passes)")
            ax.set_title(f"tenso-ray targets  {payload['meta'].get('started', '')}  "
                         f"{payload['meta'].get('machine', {}).get('cpu_model', '')}", fontsize=9)
            fig.tight_layout()
            fig.savefig(png, dpi=110)
            plt.close(fig)
        else:
            png = None
    except Exception as e:
        log(f"[report] no chart: {e}")
        png = None
    return path, png
