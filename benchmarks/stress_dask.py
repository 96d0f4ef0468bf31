"""Stress check of tenso.dask on a real cluster: many transfers, random drops, one SIGKILLed worker.

Issue #11's bar: "10,000 transfers with random drops and one SIGKILLed worker: /dev/shm usage back to its start,
0 wrong values", on ``distributed.LocalCluster(processes=True, n_workers=2, threads_per_worker=1)`` (nannies on).

What runs:
  * ``tenso.dask.install(client, min_bytes=64 KiB, claim_timeout=2 s)``, so that every array (64 KiB..4 MiB, random
    size, dtype among float32/float64/int64/int16/uint8/bfloat16, C or Fortran order, ~10% torch tensors) goes
    through a lease.
  * Transfers, in batches, of three kinds: ``scatter`` (client -> worker, ``scatter(direct=True)``, checked by a task
    on that worker), ``w2w`` (a task on worker A makes the value, a task on worker B takes it as input and checks
    it) and ``gather`` (a task on worker A makes it, a task on worker B returns it as is, ``gather(direct=True)``
    from B, checked in the client: B hands on the block it received by reference). Every value is
    a function of (seed, index) (a per-index multiplier and offset drawn from ``default_rng([seed, index])``, the
    index in the first word), so a value delivered to the wrong place, stale or torn is caught: *wrong values*.
  * Random drops: in the client and in every worker (a worker plugin, so restarted workers too), the comm's
    serializer is wrapped so that, with probability ``--drop-p``, a message to a peer that advertised the pool whose
    serialization created at least one lease raises ``CommClosedError`` after the leases were made, and the
    connection is aborted: the message is never delivered and its leases are left to the sender's claim timeout.
    Dask retries (a peer's fetch, ``gather``'s fallback through the scheduler); a failed ``scatter`` is retried here.
  * Cancellations: with probability ``--cancel-p`` per transfer, a decoy (a direct scatter, or a make + a fetching
    task) is cancelled right after it is submitted.
  * Once, half way, one worker is SIGKILLed while a batch is in flight; its nanny restarts it. Transfers that Dask
    reports as failed (lost scattered data, an erred or cancelled future) are resubmitted and counted by reason, and
    so is a transfer still pending after ``--batch-timeout`` seconds (the scheduler's and the workers' states of its
    keys go into the report's ``timeouts``); only a value that arrives and differs counts as wrong.
  * At the end: every future is released, the tracebacks kept in Dask's in-memory log records are let go (a failed
    send's traceback keeps the values it carried alive, pooled arrays included; counted in the report), the pool's
    ``used_bytes`` must come back to the baseline taken before the run (waiting up to a few claim timeouts), and
    after ``uninstall`` and the cluster's close the names in ``/dev/shm`` and its used bytes must equal those at the
    start (``--shm-ours-only``, on a host other jobs share: none of this run's names is left and none of its
    processes maps an unlinked ``/dev/shm`` file).

    .venv/bin/python benchmarks/stress_dask.py [--transfers 10000] [--seed N]

Summary on stdout; JSON in benchmarks/results/dask-stress-latest.json; exit code 1 on any failure.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import logging
import math
import os
import platform
import random
import re
import shutil
import signal
import sys
import threading
import time
import types
from typing import Any, Callable, Optional

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
SHM = "/dev/shm"
KIB = 1024
MIB = 1024 * KIB
MIN_BYTES = 64 * KIB
MAX_BYTES = 4 * MIB
DTYPES = ["float32", "float64", "int64", "int16", "uint8", "bfloat16"]
TORCH_DTYPES = ["float32", "int64", "bfloat16"]
KINDS = ["scatter", "w2w", "gather"]
MAX_ATTEMPTS = 10
PLUGIN_NAME = "tenso-stress-drops"
# Where a process keeps its drop injector (see _drops). Run as a script, this file's functions reach the workers
# pickled by value (as __main__'s do); imported as a module (tests/test_dask_stress.py), by name: the workers are
# spawned with the client's sys.path, so the importer keeps benchmarks/ on it while the cluster runs.
_STATE_MODULE = "_tenso_stress_dask_state"


# ---------------------------------------------------------------------------------------------------------------
# Values: a function of (seed, index), cheap to make and to check
# ---------------------------------------------------------------------------------------------------------------
def _have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def spec_for(seed: int, index: int) -> tuple[Any, ...]:
    """(index, dtype, shape, order, torch, mult, off): what value ``index`` is."""
    rng = np.random.default_rng([seed, index])
    use_torch = bool(rng.random() < 0.1) and _have("torch")
    names = TORCH_DTYPES if use_torch else DTYPES
    dtype_name = str(rng.choice([n for n in names if n != "bfloat16" or _have("ml_dtypes")]))
    itemsize = 2 if dtype_name == "bfloat16" else np.dtype(dtype_name).itemsize
    nbytes = int(math.exp(rng.uniform(math.log(MIN_BYTES), math.log(MAX_BYTES))))
    count = max(nbytes // itemsize, MIN_BYTES // itemsize)
    if rng.random() < 0.5:
        shape: tuple[int, ...] = (count,)
        order = "C"
    else:
        rows = int(rng.integers(2, 64))
        shape = (rows, max(count // rows, 1))
        order = "F" if (not use_torch and rng.random() < 0.5) else "C"
    if shape[0] * (shape[1] if len(shape) > 1 else 1) * itemsize < MIN_BYTES:
        shape = (shape[0], shape[1] + 1) if len(shape) > 1 else shape
    mult = int(rng.integers(1, 2**62)) * 2 + 1
    off = int(rng.integers(0, 2**62))
    return (index, dtype_name, shape, order, use_torch, mult, off)


def _dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def make_value(spec: tuple[Any, ...]) -> Any:
    """The value ``spec`` names (a NumPy array, or a torch tensor)."""
    index, dtype_name, shape, order, use_torch, mult, off = spec
    dtype = _dtype(dtype_name)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    words = np.arange((nbytes + 7) // 8, dtype=np.uint64)
    words += np.uint64(off)
    words *= np.uint64(mult)
    words ^= words >> np.uint64(29)
    words[0] = index
    raw = words.view(np.uint8)[:nbytes]
    if order == "F":
        arr = raw.view(dtype).reshape(tuple(reversed(shape))).T
    else:
        arr = raw.view(dtype).reshape(shape)
    if not use_torch:
        return arr
    import torch

    if dtype_name == "bfloat16":
        return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(arr)


def _bits(dtype: np.dtype) -> np.dtype:
    return np.dtype(f"u{dtype.itemsize}")


def same_value(x: Any, spec: tuple[Any, ...]) -> Optional[str]:
    """None when ``x`` is exactly the value ``spec`` names (type, dtype, shape, order, every bit); else why not."""
    index, dtype_name, shape, order, use_torch, _, _ = spec
    want = make_value(spec)
    if use_torch:
        import torch

        if not isinstance(x, torch.Tensor):
            return f"#{index}: got {type(x).__name__}, want a torch.Tensor"
        if x.dtype != want.dtype or tuple(x.shape) != tuple(want.shape):
            return f"#{index}: got {x.dtype}{tuple(x.shape)}, want {want.dtype}{tuple(want.shape)}"
        ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[want.element_size()]
        if not torch.equal(x.contiguous().view(ints), want.contiguous().view(ints)):
            return f"#{index}: torch {dtype_name} bits differ"
        return None
    if not isinstance(x, np.ndarray):
        return f"#{index}: got {type(x).__name__}, want a numpy.ndarray"
    if x.dtype != want.dtype or x.shape != want.shape:
        return f"#{index}: got {x.dtype}{x.shape}, want {want.dtype}{want.shape}"
    if order == "F" and not x.flags.f_contiguous:
        return f"#{index}: lost Fortran order"
    bits = _bits(want.dtype)
    if not np.array_equal(x.view(bits), want.view(bits)):
        return f"#{index}: {dtype_name} bits differ"
    return None


def pass_on(x: Any) -> Any:
    """A task that returns its input as is (an array that arrived through the pool goes on by reference)."""
    return x


def check_task(x: Any, spec: tuple[Any, ...]) -> Optional[str]:
    """Runs where the value landed (a worker)."""
    return same_value(x, spec)


# ---------------------------------------------------------------------------------------------------------------
# Drop injection: a message that made leases, serialized and then never delivered
# ---------------------------------------------------------------------------------------------------------------
class _Drops:
    """One process's drop injector: probability, counters, and what it replaced."""

    def __init__(self, p: float, seed: int) -> None:
        self.p = p
        self.rng = random.Random(seed)
        self.drops = 0  # messages dropped
        self.leases_dropped = 0  # leases those messages carried
        self.messages = 0  # lease-carrying messages serialized
        self.restore: Optional[tuple[Any, Any]] = None  # (protocol.dumps, TCP.write) while installed


def _drops() -> Optional[_Drops]:
    # Kept in a module of its own in sys.modules: run as a script, this file's functions reach the workers pickled
    # by value, each call with a globals dict of its own.
    mod = sys.modules.get(_STATE_MODULE)
    return None if mod is None else getattr(mod, "drops", None)


def install_drops(p: float, seed: int) -> None:
    """Wrap this process's comm serializer and TCP write so that a fraction ``p`` of lease-carrying messages to
    pool peers is dropped after serialization (idempotent; :func:`uninstall_drops` undoes it)."""
    import distributed.protocol as protocol
    from distributed.comm.core import CommClosedError
    from distributed.comm.tcp import TCP

    import tenso.dask as td

    state = _drops()
    if state is not None and state.restore is not None:
        state.p = p
        return
    state = _Drops(p, seed)
    mod = sys.modules.setdefault(_STATE_MODULE, types.ModuleType(_STATE_MODULE))
    setattr(mod, "drops", state)

    class InjectedDrop(CommClosedError):
        pass

    orig_dumps = protocol.dumps
    orig_write = TCP.write
    lock = threading.Lock()

    def dumps(msg: Any, *args: Any, **kwargs: Any) -> Any:
        context = kwargs.get("context") or {}
        recipient = context.get("recipient") if isinstance(context, dict) else None
        if not isinstance(recipient, dict) or td.HANDSHAKE_KEY not in recipient:
            return orig_dumps(msg, *args, **kwargs)  # the scheduler, or a peer without the pool: never dropped
        with lock:  # one serialization at a time, so the counter's change is this message's leases
            before = td.counts()["leases_sent"]
            out = orig_dumps(msg, *args, **kwargs)
            made = td.counts()["leases_sent"] - before
            if made:
                state.messages += 1
                if state.rng.random() < state.p:
                    state.drops += 1
                    state.leases_dropped += made
                    raise InjectedDrop(f"tenso stress: dropped a message carrying {made} lease(s)")
        return out

    async def write(self: Any, msg: Any, serializers: Any = None, on_error: str = "message") -> Any:
        try:
            return await orig_write(self, msg, serializers=serializers, on_error=on_error)
        except InjectedDrop:
            self.abort()  # as if the connection died between serializing and sending
            raise

    state.restore = (orig_dumps, orig_write)
    setattr(protocol, "dumps", dumps)
    setattr(TCP, "write", write)


def uninstall_drops() -> None:
    import distributed.protocol as protocol
    from distributed.comm.tcp import TCP

    state = _drops()
    if state is not None and state.restore is not None:
        setattr(protocol, "dumps", state.restore[0])
        setattr(TCP, "write", state.restore[1])
        state.restore = None


def process_report(dask_worker: Any = None) -> dict[str, Any]:
    """This process's pid, tenso.dask counters and drop counters."""
    import tenso.dask as td

    from tenso.dask import leases

    state = _drops()
    st = td._state
    held = [h for h in list(leases._held.values()) if h.root() is not None]
    return {
        "pid": os.getpid(),
        "counts": td.counts(),
        # What this process still holds in the pool: arrays over blocks, references sent and not yet claimed.
        "blocks_held": len(held),
        "blocks_held_bytes": sum(h.nbytes for h in held),
        "held_by": sorted({type(r).__name__ for h in held for r in gc.get_referrers(h.root())})[:10],
        "references_pending": len(st.pending) if st is not None else 0,
        "drops": state.drops if state else 0,
        "leases_dropped": state.leases_dropped if state else 0,
        "lease_messages": state.messages if state else 0,
    }


def _collect_garbage(dask_worker: Any = None) -> int:
    return gc.collect()


def _forget_logged_tracebacks(dask_worker: Any = None) -> int:
    """Drop the tracebacks in this process's in-memory Dask log records; how many there were.

    Dask keeps each process's recent log records (``client.get_worker_logs``, 10,000 by default), tracebacks
    included, and the traceback of a send that failed (every injected drop) keeps that message's frames alive: the
    values it carried, among them arrays that arrived through the pool and hold their blocks. The run counts
    them and lets them go before it checks that the pool is back to its baseline."""
    from distributed.utils import DequeHandler

    n = 0
    for handler in list(DequeHandler._instances):
        for record in list(handler.deque):
            if record.exc_info:
                record.exc_info = None
                n += 1
    return n


def _drop_plugin(p: float, seed: int) -> Any:
    from distributed.diagnostics.plugin import WorkerPlugin

    class DropPlugin(WorkerPlugin):
        name = PLUGIN_NAME

        def __init__(self, p: float, seed: int) -> None:
            self.p = p
            self.seed = seed

        def setup(self, worker: Any) -> None:
            install_drops(self.p, self.seed * 1_000_003 + os.getpid())

        def teardown(self, worker: Any) -> None:
            uninstall_drops()

    return DropPlugin(p, seed)


# ---------------------------------------------------------------------------------------------------------------
# /dev/shm
# ---------------------------------------------------------------------------------------------------------------
def shm_snapshot() -> dict[str, Any]:
    names: dict[str, int] = {}
    for name in os.listdir(SHM):
        try:
            names[name] = os.stat(os.path.join(SHM, name)).st_blocks * 512
        except FileNotFoundError:
            continue
    return {"names": names, "used_bytes": shutil.disk_usage(SHM).used}


def _is_ours(name: str, scope: str, pids: set[int]) -> bool:
    """A name this run made: our pool or a link to it, or one carrying the pid of one of our processes."""
    return scope in name or any(int(tok) in pids for tok in re.findall(r"\d+", name))


def shm_diff(start: dict[str, Any], end: dict[str, Any], scope: str, pids: set[int]) -> dict[str, Any]:
    """/dev/shm at the end against the start. ``strict_ok``: no new name and no more bytes used (issue #11's bar,
    for a host nobody else uses); ``ours_ok``: none of this run's names is left and none of its processes still maps
    an unlinked /dev/shm file (whose bytes would stay used): the bar on a host other jobs share."""
    new = sorted(set(end["names"]) - set(start["names"]))
    ours = [n for n in new if _is_ours(n, scope, pids)]
    mapped = {pid: files for pid, files in _mapped_deleted().items() if pid in pids}
    foreign_bytes = sum(end["names"][n] for n in new if n not in ours)
    return {
        "new_names": new,
        "new_names_ours": ours,
        "new_names_foreign": [n for n in new if n not in ours],
        "gone_names": sorted(set(start["names"]) - set(end["names"])),
        "used_bytes_start": start["used_bytes"],
        "used_bytes_end": end["used_bytes"],
        "used_bytes_end_less_foreign_names": end["used_bytes"] - foreign_bytes,
        "unlinked_still_mapped_by_ours": {str(k): v for k, v in mapped.items()},
        "strict_ok": not new and end["used_bytes"] <= start["used_bytes"],
        "ours_ok": not ours and not mapped,
    }


class _LogCounter(logging.Handler):
    """Counts the client process's Dask warnings and errors by logger and message (the run expects many)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.counts: dict[str, int] = {}

    def emit(self, record: logging.LogRecord) -> None:
        key = f"{record.name}: {str(record.msg)[:70]}"
        self.counts[key] = self.counts.get(key, 0) + 1


# ---------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------
class _Transfer:
    __slots__ = ("index", "kind", "spec", "attempts", "futures", "result_future", "src", "dst")

    def __init__(self, index: int, kind: str, spec: tuple[Any, ...]) -> None:
        self.index = index
        self.kind = kind
        self.spec = spec
        self.attempts = 0
        self.futures: list[Any] = []
        self.result_future: Any = None
        self.src = self.dst = ""


def _workers(client: Any) -> list[str]:
    return sorted(client.scheduler_info()["workers"])


def _wait_for_workers(client: Any, n: int, not_pid: Optional[int] = None, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            pids = client.run(os.getpid)
        except OSError:
            pids = {}
        if len(pids) == n and (not_pid is None or not_pid not in pids.values()):
            return
        time.sleep(0.2)
    raise RuntimeError(f"the cluster did not get back to {n} workers within {timeout:.0f} s")


def _scheduler_states(keys: list[Any], dask_scheduler: Any = None) -> dict[str, Any]:
    return {str(k): getattr(dask_scheduler.tasks.get(k), "state", None) for k in keys}


def _worker_states(keys: list[Any], dask_worker: Any = None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k in keys:
        ts = dask_worker.state.tasks.get(k)
        if ts is not None:
            out[str(k)] = {"state": ts.state, "exception": str(ts.exception_text)[:300] or None}
    return out


def _mapped_deleted() -> dict[int, list[str]]:
    """Processes on this host that still map an unlinked /dev/shm file (its bytes stay used)."""
    found: dict[int, list[str]] = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/maps") as f:
                hits = {line.split(None, 5)[-1].strip() for line in f if SHM in line and "(deleted)" in line}
        except OSError:
            continue
        if hits:
            found[int(pid)] = sorted(hits)
    return found


def _diagnose(client: Any, t: _Transfer) -> dict[str, Any]:
    """Where a transfer that timed out is stuck: the scheduler's and each worker's state of its keys."""
    keys = [f.key for f in t.futures]
    info: dict[str, Any] = {"index": t.index, "kind": t.kind, "attempt": t.attempts, "src": t.src, "dst": t.dst}
    try:
        info["scheduler"] = client.run_on_scheduler(_scheduler_states, keys)
        info["workers"] = client.run(_worker_states, keys)
    except Exception as exc:  # noqa: BLE001 - diagnostics only
        info["error"] = repr(exc)
    return info


def _poke(cache: Any) -> None:
    """One small allocation (the pool frees a dead process's leases at the next one); no view of it is kept, since
    a view would keep the pool mapped after it is unlinked."""
    try:
        handle, view = cache.lease(64)
        del view
        cache.release(handle)
    except Exception:  # noqa: BLE001 - a full or closed pool: nothing to poke
        pass


def _settle(futures: list[Any], timeout: float) -> None:
    """Wait until no future is pending, or ``timeout`` (statuses are read, never raised: a cancelled or lost future
    is a transfer to resubmit, not an error of the run)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(f.status == "pending" for f in futures):
        time.sleep(0.01)


def run_stress(
    transfers: int = 10_000,
    seed: int = 0,
    *,
    drop_p: float = 0.03,
    cancel_p: float = 0.02,
    kill: bool = True,
    batch: int = 32,
    pool_size: str = "512MB",
    claim_timeout: float = 2.0,
    batch_timeout: float = 15.0,
    strict_shm: bool = True,
    log: Callable[[str], None] = print,
    verbose: bool = False,
) -> dict[str, Any]:
    """Run the stress check; a dict of results (``result["ok"]`` is the verdict, ``result["failures"]`` why not)."""
    from distributed import Client, LocalCluster

    import tenso.dask as td

    t_start = time.monotonic()
    shm_start = shm_snapshot()
    rng = random.Random(seed)
    out: dict[str, Any] = {
        "transfers": transfers,
        "seed": seed,
        "drop_p": drop_p,
        "cancel_p": cancel_p,
        "claim_timeout_s": claim_timeout,
        "pool_size": pool_size,
        "min_bytes": MIN_BYTES,
        "by_kind": {k: {"done": 0, "wrong": 0} for k in KINDS},
        "retries": {},
        "scatter_retries": {},
        "cancelled_decoys": 0,
        "kills": 0,
        "wrong": 0,
        "wrong_examples": [],
        "gave_up": 0,
        "timeouts": [],
    }
    failures: list[str] = []
    reports: dict[str, Any] = {}
    killed_reports: list[dict[str, Any]] = []

    def retry_reason(reason: str) -> None:
        out["retries"][reason] = out["retries"].get(reason, 0) + 1

    def record_wrong(t: _Transfer, why: str) -> None:
        out["wrong"] += 1
        out["by_kind"][t.kind]["wrong"] += 1
        if len(out["wrong_examples"]) < 20:
            out["wrong_examples"].append(f"{t.kind} {why}")

    silence = logging.DEBUG if verbose else logging.CRITICAL
    log_counter = _LogCounter()
    dask_logger = logging.getLogger("distributed")
    saved = dask_logger.propagate, list(dask_logger.handlers)
    if not verbose:  # counted into the report: tracebacks of the expected failures would drown the output
        for h in saved[1]:
            dask_logger.removeHandler(h)
        dask_logger.propagate = False
    dask_logger.addHandler(log_counter)
    our_pids = {os.getpid()}
    try:
        with LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            memory_limit=0,
            silence_logs=silence,
        ) as cluster, Client(cluster) as client:
            td.install(client, pool_size=pool_size, min_bytes=MIN_BYTES, claim_timeout=claim_timeout)
            client.register_plugin(_drop_plugin(drop_p, seed), name=PLUGIN_NAME)
            install_drops(drop_p, seed)
            st = td._state
            assert st is not None
            scope = st.scope
            our_pids.update(client.run(os.getpid).values())
            client.run(_collect_garbage)
            gc.collect()
            baseline = int(st.cache.stats["used_bytes"])
            out["pool_used_bytes_baseline"] = baseline
            out["pool_bytes"] = int(st.cache.stats["pool_size"])
            counts_start = td.counts()

            queue = [_Transfer(i, KINDS[rng.randrange(3)], spec_for(seed, i)) for i in range(transfers)]
            queue.reverse()  # pop() from the end: index order
            kill_at = transfers // 2 if kill else -1
            started = 0
            last_log = time.monotonic()

            def requeue(t: _Transfer, reason: str) -> None:
                retry_reason(reason)
                if t.futures:
                    client.cancel(t.futures)
                t.futures = []
                t.result_future = None
                if t.attempts < MAX_ATTEMPTS:
                    queue.append(t)
                else:
                    out["gave_up"] += 1
                    if len(failures) < 20:
                        failures.append(f"transfer #{t.index} ({t.kind}) failed {t.attempts} times")

            def scatter(values: list[Any], worker: str, reason_key: str = "scatter") -> Optional[list[Any]]:
                """A direct scatter to ``worker``, retried (to whichever workers exist) when it fails."""
                for attempt in range(MAX_ATTEMPTS):
                    try:
                        return list(client.scatter(values, workers=[worker], direct=True, hash=False))
                    except Exception as exc:  # noqa: BLE001 - every failure of a scatter is retried
                        name = type(exc).__name__
                        out["scatter_retries"][name] = out["scatter_retries"].get(name, 0) + 1
                        time.sleep(0.05 * (attempt + 1))
                        ws = _workers(client)
                        worker = worker if worker in ws else rng.choice(ws)
                return None

            def submit(todo: list[_Transfer], ws: list[str]) -> None:
                to_scatter: dict[str, list[_Transfer]] = {}
                for t in todo:
                    t.attempts += 1
                    t.src, t.dst = rng.sample(ws, 2)
                    if t.kind == "scatter":
                        to_scatter.setdefault(t.dst, []).append(t)
                        continue
                    # Loose restrictions: a value whose maker's worker was killed is recomputed elsewhere.
                    made = client.submit(make_value, t.spec, workers=[t.src], allow_other_workers=True, pure=False)
                    if t.kind == "w2w":
                        chk = client.submit(
                            check_task, made, t.spec, workers=[t.dst], allow_other_workers=True, pure=False
                        )
                        t.futures, t.result_future = [made, chk], chk
                    else:
                        # Through the other worker: it receives the value and returns that very object, which
                        # then travels on to the client by reference to its block (no copy).
                        fwd = client.submit(pass_on, made, workers=[t.dst], allow_other_workers=True, pure=False)
                        t.futures, t.result_future = [made, fwd], fwd
                for dst, group in to_scatter.items():
                    futs = scatter([make_value(t.spec) for t in group], dst)
                    for j, t in enumerate(group):
                        if futs is not None:
                            chk = client.submit(
                                check_task, futs[j], t.spec, workers=[dst], allow_other_workers=True, pure=False
                            )
                            t.futures, t.result_future = [futs[j], chk], chk

            def submit_decoys(todo: list[_Transfer], ws: list[str]) -> None:
                """Values sent and cancelled at once: the cancelled side's leases must be freed too."""
                for t in todo:
                    if rng.random() >= cancel_p:
                        continue
                    a, b = rng.sample(ws, 2)
                    decoy = spec_for(seed + 1, t.index)
                    if rng.random() < 0.5:
                        made = client.submit(make_value, decoy, workers=[a], pure=False)
                        chk = client.submit(check_task, made, decoy, workers=[b], pure=False)
                        client.cancel([chk, made])
                    else:
                        try:
                            client.cancel(client.scatter(make_value(decoy), workers=[b], direct=True, hash=False))
                        except Exception:  # noqa: BLE001 - a dropped decoy is fine
                            pass
                    out["cancelled_decoys"] += 1

            def error_name(t: _Transfer) -> str:
                for f in t.futures:
                    if f.status == "error":
                        try:
                            return type(f.exception(timeout=5)).__name__
                        except Exception:  # noqa: BLE001 - only names the reason
                            return "?"
                return "?"

            def take(finished: list[_Transfer]) -> bool:
                """Check the finished transfers' values (or their landing checks); False to look again later."""
                try:
                    got = client.gather([t.result_future for t in finished], direct=True, errors="skip")
                except Exception as exc:  # noqa: BLE001 - looked at again next round
                    retry_reason(f"gather:{type(exc).__name__}")
                    return False
                if len(got) != len(finished):
                    return False  # some future erred or was lost between its status and the gather
                for t, value in zip(finished, got):
                    why = value if t.kind != "gather" else same_value(value, t.spec)
                    if why is not None:
                        record_wrong(t, str(why))
                    out["by_kind"][t.kind]["done"] += 1
                    t.futures, t.result_future = [], None
                return True

            def collect(todo: list[_Transfer], killed: bool) -> None:
                pending = []
                for t in todo:
                    if t.result_future is None:
                        requeue(t, "scatter:gave-up")
                    else:
                        pending.append(t)
                deadline = time.monotonic() + batch_timeout
                while pending:
                    _settle([t.result_future for t in pending], 1.0)
                    alive = set(_workers(client)) if killed else None
                    still: list[_Transfer] = []
                    finished: list[_Transfer] = []
                    for t in pending:
                        statuses = [f.status for f in t.futures]
                        bad = next((s for s in statuses if s in ("error", "cancelled", "lost")), None)
                        if t.result_future.status == "finished":
                            finished.append(t)
                        elif bad == "error":
                            requeue(t, f"{t.kind}:error:{error_name(t)}")
                        elif bad is not None:
                            requeue(t, f"{t.kind}:{bad}")
                        elif alive is not None and t.kind == "scatter" and t.dst not in alive:
                            requeue(t, f"{t.kind}:worker-killed")  # the scattered value died with its holder
                        elif time.monotonic() > deadline:
                            if len(out["timeouts"]) < 20:
                                out["timeouts"].append(_diagnose(client, t))
                            requeue(t, f"{t.kind}:timeout")
                        else:
                            still.append(t)
                    if finished and not take(finished):
                        still.extend(finished)
                    pending = still

            while queue:
                ws = _workers(client)
                if len(ws) < 2:
                    _wait_for_workers(client, 2)
                    ws = _workers(client)
                todo = [queue.pop() for _ in range(min(batch, len(queue)))]
                submit(todo, ws)
                submit_decoys(todo, ws)
                started += len(todo)
                victim_pid = None
                if 0 <= kill_at <= started and out["kills"] == 0:
                    victim = rng.choice(ws)
                    info = client.run(process_report, workers=[victim]).get(victim)
                    if info is not None:
                        info["address"] = victim
                        info["killed"] = True
                        killed_reports.append(info)
                        log(f"SIGKILL worker {victim} (pid {info['pid']}) at transfer {started}")
                        victim_pid = int(info["pid"])
                        os.kill(victim_pid, signal.SIGKILL)
                        out["kills"] += 1
                collect(todo, victim_pid is not None)
                if victim_pid is not None:
                    _wait_for_workers(client, 2, not_pid=victim_pid)
                    our_pids.update(client.run(os.getpid).values())
                    out["shm_mid_run_ours"] = sorted(n for n in os.listdir(SHM) if _is_ours(n, scope, our_pids))
                    log(f"  the nanny restarted it: workers {_workers(client)}")
                if time.monotonic() - last_log > 15:
                    last_log = time.monotonic()
                    done = sum(v["done"] for v in out["by_kind"].values())
                    log(f"  {done}/{transfers} transfers done, {time.monotonic() - t_start:.0f} s")
            del todo

            out["logged_tracebacks_dropped"] = sum(client.run(_forget_logged_tracebacks).values())
            out["logged_tracebacks_dropped"] += _forget_logged_tracebacks()
            gc.collect()
            client.run(_collect_garbage)
            out["run_s"] = round(time.monotonic() - t_start, 1)

            # Every future is released: the pool must come back to its baseline once unclaimed leases time out.
            deadline = time.monotonic() + max(4 * claim_timeout, 10.0)
            used = int(st.cache.stats["used_bytes"])
            while time.monotonic() < deadline:
                # The pool frees a dead process's leases at its next allocation; one small lease makes sure one happens.
                _poke(st.cache)
                gc.collect()
                client.run(_collect_garbage)
                used = int(st.cache.stats["used_bytes"])
                if used <= baseline:
                    break
                time.sleep(0.25)
            out["pool_used_bytes_end"] = used
            out["pool_stats_end"] = {k: v for k, v in dict(st.cache.stats).items() if isinstance(v, (int, float, str))}
            if used != baseline:
                failures.append(f"pool used bytes {used} != baseline {baseline} ({used - baseline:+d})")

            counts_end = td.counts()
            reports = dict(client.run(process_report))
            client_report = process_report()
            client_report["counts_during_run"] = {k: counts_end[k] - counts_start.get(k, 0) for k in counts_end}
            reports["client"] = client_report
            for info in killed_reports:
                reports[f"killed:{info['address']}"] = info
            client.unregister_worker_plugin(PLUGIN_NAME)
            uninstall_drops()
            td.uninstall(client)
            del st  # this process's last reference to the pool's handle: its mapping goes with it

    finally:
        dask_logger.removeHandler(log_counter)
        dask_logger.propagate = saved[0]
        for h in saved[1]:
            if h not in dask_logger.handlers:
                dask_logger.addHandler(h)
    out["client_log"] = log_counter.counts

    # After uninstall and the cluster's close: /dev/shm as it was (the pool's watcher may take a moment).
    verdict = "strict_ok" if strict_shm else "ours_ok"
    deadline = time.monotonic() + 20.0
    while True:
        diff = shm_diff(shm_start, shm_snapshot(), scope, our_pids)
        if diff[verdict] or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    out["shm"] = diff
    if not diff["strict_ok"]:
        out["shm"]["unlinked_still_mapped"] = {str(k): v for k, v in _mapped_deleted().items()}
    out["shm_check"] = "strict" if strict_shm else "ours"
    if not diff["ours_ok"]:
        failures.append(
            f"/dev/shm: this run's names are left: {diff['new_names_ours']}, or its unlinked files still mapped: "
            f"{diff['unlinked_still_mapped_by_ours']}"
        )
    if strict_shm and not diff["strict_ok"]:
        failures.append(
            f"/dev/shm not back to start: new names {diff['new_names']} (not this run's: "
            f"{diff['new_names_foreign']}), used bytes {diff['used_bytes_start']} -> {diff['used_bytes_end']}"
        )
    if not out.get("shm_mid_run_ours") and kill:
        failures.append("the pool was not seen in /dev/shm during the run: the check is vacuous")
    out["processes"] = reports
    out["drops_injected"] = sum(r.get("drops", 0) for r in reports.values())
    out["leases_dropped"] = sum(r.get("leases_dropped", 0) for r in reports.values())
    out["leases_sent"] = sum(r["counts"]["leases_sent"] for r in reports.values())
    out["leases_received"] = sum(r["counts"]["leases_received"] for r in reports.values())
    # Of the leases sent, those that handed on a block the sender held (a new reference, no copy).
    out["leases_forwarded"] = sum(r["counts"].get("leases_forwarded", 0) for r in reports.values())
    out["frames_sent"] = sum(r["counts"]["frames_sent"] for r in reports.values())
    out["done"] = sum(v["done"] for v in out["by_kind"].values())
    if out["wrong"]:
        failures.append(f"{out['wrong']} wrong values: {out['wrong_examples'][:5]}")
    if out["done"] != transfers:
        failures.append(f"{transfers - out['done']} transfers not completed ({out['gave_up']} gave up)")
    if out["leases_received"] == 0:
        failures.append("no lease was received: the run did not exercise tenso.dask")
    if drop_p > 0 and out["drops_injected"] == 0:
        failures.append("no drop was injected")
    if kill and out["kills"] != 1:
        failures.append("the worker was not killed")
    out["duration_s"] = round(time.monotonic() - t_start, 1)
    out["failures"] = failures
    out["ok"] = not failures
    return out


def summary(r: dict[str, Any]) -> str:
    lines = [
        f"tenso.dask stress: {r['done']}/{r['transfers']} transfers in {r['duration_s']} s "
        f"(seed {r['seed']}, drop p={r['drop_p']}, claim timeout {r['claim_timeout_s']} s)",
        "  by kind: " + ", ".join(f"{k} {v['done']} ({v['wrong']} wrong)" for k, v in r["by_kind"].items()),
        f"  wrong values: {r['wrong']}",
        f"  leases sent {r['leases_sent']} ({r['leases_forwarded']} by reference), received {r['leases_received']}, "
        f"frames sent {r['frames_sent']}",
        f"  drops injected {r['drops_injected']} (messages carrying {r['leases_dropped']} leases), "
        f"cancelled decoys {r['cancelled_decoys']}, workers SIGKILLed {r['kills']}",
        f"  resubmitted: {r['retries'] or 0}; scatter retries: {r['scatter_retries'] or 0}",
        f"  pool used bytes: baseline {r['pool_used_bytes_baseline']}, end {r['pool_used_bytes_end']}",
        f"  /dev/shm used bytes: start {r['shm']['used_bytes_start']}, end {r['shm']['used_bytes_end']}; "
        f"new names {r['shm']['new_names']} (this run's: {r['shm']['new_names_ours']}; check: {r['shm_check']})",
        "  verdict: " + ("OK" if r["ok"] else "FAILED: " + "; ".join(r["failures"])),
    ]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--transfers", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--drop-p", type=float, default=0.03, help="probability of dropping a lease-carrying message")
    ap.add_argument("--cancel-p", type=float, default=0.02, help="probability of a cancelled decoy per transfer")
    ap.add_argument("--no-kill", action="store_true", help="do not SIGKILL a worker")
    ap.add_argument("--batch", type=int, default=32, help="transfers in flight together")
    ap.add_argument("--pool-size", default="512MB")
    ap.add_argument("--claim-timeout", type=float, default=2.0)
    ap.add_argument(
        "--batch-timeout", type=float, default=15.0, help="seconds before a pending transfer is resubmitted"
    )
    ap.add_argument("--out", default=os.path.join(RESULTS, "dask-stress-latest.json"))
    ap.add_argument(
        "--shm-ours-only",
        action="store_true",
        help="on a host shared with other jobs: /dev/shm must lose every name this run made, others may come and go",
    )
    ap.add_argument("--verbose", action="store_true", help="keep Dask's worker logs")
    args = ap.parse_args(argv)
    r = run_stress(
        args.transfers,
        args.seed,
        drop_p=args.drop_p,
        cancel_p=args.cancel_p,
        kill=not args.no_kill,
        batch=args.batch,
        pool_size=args.pool_size,
        claim_timeout=args.claim_timeout,
        batch_timeout=args.batch_timeout,
        verbose=args.verbose,
        strict_shm=not args.shm_ours_only,
    )
    r["host"] = {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()}
    r["when"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    print(summary(r))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(r, f, indent=1, sort_keys=True, default=str)
        print(f"wrote {args.out}")
    return 0 if r["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
