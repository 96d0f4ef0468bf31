"""A short run of benchmarks/stress_dask.py (issue #11's stress check) on its own LocalCluster.

300 transfers (direct scatter, worker to worker, direct gather) with lease-carrying messages dropped after
serialization, decoys cancelled at once and one worker SIGKILLed half way: no value arrives wrong, every transfer
completes (Dask's failures are resubmitted), the pool's used bytes come back to the baseline and none of the run's
/dev/shm names is left. The full run is ``benchmarks/stress_dask.py --transfers 10000``.
"""

from __future__ import annotations

import importlib
import pathlib
import sys

import pytest

pytest.importorskip("distributed")

pytestmark = [
    pytest.mark.dask,
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:Port .* is already in use:UserWarning"),
    # distributed leaves an unconnected socket to the garbage collector when a cluster closes after a worker was
    # SIGKILLed (not ours: tenso.dask opens no sockets).
    pytest.mark.filterwarnings("ignore:unclosed <socket.socket:ResourceWarning"),
]

BENCHMARKS = str(pathlib.Path(__file__).resolve().parent.parent / "benchmarks")


@pytest.fixture
def stress():
    # benchmarks/ is not a package: import the script from its directory, which stays on sys.path while the test
    # runs, because the cluster's workers are spawned with this process's sys.path and import the script's
    # functions by name.
    sys.path.insert(0, BENCHMARKS)
    try:
        yield importlib.import_module("stress_dask")
    finally:
        sys.path.remove(BENCHMARKS)


def test_stress_drops_kill_and_cancel_leave_nothing_behind(stress):
    # drop_p is higher than the script's default so that a 300-transfer run always drops some messages.
    r = stress.run_stress(300, seed=11, drop_p=0.1, cancel_p=0.05, batch=24, strict_shm=False, log=lambda _: None)
    print(stress.summary(r))
    assert r["wrong"] == 0, r["wrong_examples"]
    assert r["done"] == 300, r["retries"]
    assert r["kills"] == 1
    assert r["drops_injected"] > 0
    assert r["leases_received"] > 0
    assert r["pool_used_bytes_end"] == r["pool_used_bytes_baseline"]
    assert r["shm_mid_run_ours"], "the run's pool was never seen in /dev/shm"
    assert r["shm"]["ours_ok"], r["shm"]["new_names_ours"]
    assert r["ok"], r["failures"]
