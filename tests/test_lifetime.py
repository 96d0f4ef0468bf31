"""No shared memory outlives its owner: unnamed TensoCache/TensoShm segments go with their creator (at exit, or
after SIGKILL at the next sweep); named ones persist until unlink(). Both pickle by name."""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import signal
import subprocess
import sys
import uuid

import numpy as np
import pytest

from tenso import TensoCache
from tenso.shm import TensoShm, process_alive, sweep

SHM = "/dev/shm"
CTX = mp.get_context("spawn")


def _of(pid: int) -> list[str]:
    """The /dev/shm entries whose generated name carries ``pid``."""
    return sorted(e for e in os.listdir(SHM) if e.startswith((f"tenso_cache_{pid}_", f"tenso_shm_{pid}_")))


def _child(body: str, kill: bool) -> tuple[int, list[str]]:
    """Run ``body`` in a fresh interpreter that prints the names it created, then SIGKILLs itself or exits."""
    code = "import os, signal, sys, numpy as np\nfrom tenso import TensoCache, TensoShm\nnames = []\n" + body
    code += "\nprint(os.getpid(), *names, flush=True)\n"
    if kill:
        code += "os.kill(os.getpid(), signal.SIGKILL)\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == (-signal.SIGKILL if kill else 0), proc.stderr
    pid, *names = proc.stdout.split()
    return int(pid), names


UNNAMED = (
    "names.append(TensoCache('4MB').name)\n"
    "names.append(TensoShm(create=True, size=1 << 20).name)\n"
    "names.append(TensoShm.create_from(None, np.arange(1000)).name)\n"
)


def test_unnamed_segments_are_removed_when_their_creator_exits():
    pid, names = _child(UNNAMED, kill=False)
    assert len(names) == 3 and all(str(pid) in n for n in names)
    assert _of(pid) == []


def test_unnamed_segments_of_a_killed_creator_are_swept():
    pid, names = _child(UNNAMED, kill=True)
    assert not process_alive(pid)
    assert _of(pid) == sorted(names)  # SIGKILL: no atexit ran ...
    with TensoCache("1MB"):  # ... the next process that creates an unnamed segment sweeps them
        pass
    assert _of(pid) == []
    pid, names = _child(UNNAMED, kill=True)
    assert _of(pid) == sorted(names)
    assert sorted(set(sweep()) & set(names)) == sorted(names)  # or an explicit sweep
    assert _of(pid) == []


def test_a_creator_killed_while_creating_leaves_nothing_after_the_sweep():
    # The segment exists (shm_open) but is still 0 bytes when the creator dies.
    body = "name = f'tenso_cache_{os.getpid()}_0123456789ab'; open(f'/dev/shm/{name}', 'wb').close(); names.append(name)"
    pid, names = _child(body, kill=True)
    assert _of(pid) == names
    sweep()
    assert _of(pid) == []


@pytest.mark.parametrize("kill", [False, True])
def test_named_segments_persist_until_unlink(kill):
    tag = uuid.uuid4().hex[:8]
    body = (
        f"c = TensoCache('2MB', name='tenso-test-life-c-{tag}'); c.put('k', np.arange(7)); names.append(c.name)\n"
        f"s = TensoShm.create_from('tenso-test-life-s-{tag}', np.arange(9)); names.append(s.name)\n"
    )
    _, names = _child(body, kill=kill)
    try:
        sweep()
        assert all(os.path.exists(f"{SHM}/{n}") for n in names)
        cache = TensoCache(name=names[0], create=False)
        np.testing.assert_array_equal(cache.get("k"), np.arange(7))
        np.testing.assert_array_equal(TensoShm(names[1]).get(), np.arange(9))
        cache.unlink()
        TensoShm(names[1]).unlink()
        assert not any(os.path.exists(f"{SHM}/{n}") for n in names)
    finally:
        for n in names:
            if os.path.exists(f"{SHM}/{n}"):
                os.unlink(f"{SHM}/{n}")


def test_unlink_before_exit_is_fine():
    pid, _ = _child("c = TensoCache('1MB'); c.unlink(); s = TensoShm(create=True, size=64); s.unlink()", kill=False)
    assert _of(pid) == []


def _read_cache(cache: TensoCache) -> list[int]:
    return cache.get("k").tolist()


def _read_shm(shm: TensoShm) -> list[int]:
    return shm.get().tolist()


def test_cache_and_shm_pickle_by_name_into_spawned_workers():
    cache = TensoCache("2MB")
    shm = TensoShm.create_from(None, np.arange(4))
    try:
        cache.put("k", np.arange(6))
        again = pickle.loads(pickle.dumps(cache))
        assert again.name == cache.name and again is not cache
        np.testing.assert_array_equal(again.get("k"), np.arange(6))
        assert pickle.loads(pickle.dumps(shm)).name == shm.name
        with CTX.Pool(1) as pool:
            assert pool.apply(_read_cache, (cache,)) == list(range(6))
            assert pool.apply(_read_shm, (shm,)) == list(range(4))
        with again:  # an unpickled handle never unlinks the pool
            pass
        assert os.path.exists(f"{SHM}/{cache.name}")
    finally:
        cache.unlink()
        shm.unlink()
    assert _of(os.getpid()) == [] or all(n not in (cache.name, shm.name) for n in _of(os.getpid()))


def test_a_forked_child_does_not_remove_its_parents_segments():
    if "fork" not in mp.get_all_start_methods():
        pytest.skip("no fork")
    cache = TensoCache("1MB")
    try:
        code = (
            "import os, sys\n"
            "from tenso import TensoCache\n"
            "c = TensoCache('1MB')\n"
            "pid = os.fork()\n"
            "if pid == 0:\n"
            "    sys.exit(0)  # runs the atexit hooks inherited from the parent\n"
            "os.waitpid(pid, 0)\n"
            "assert os.path.exists(f'/dev/shm/{c.name}'), 'the child removed its parent segment'\n"
        )
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
    finally:
        cache.unlink()
