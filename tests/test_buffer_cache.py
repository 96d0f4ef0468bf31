"""The large-buffer cache (rust/tenso-py/src/bufcache.rs, tenso.config.set_buffer_cache): fresh buffers of the codec
are reused once their last view is freed, memory stays bounded over a loop of large packets, and it is given back
to the system after the idle period. Pass/fail on counters and RSS, never on time."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import tenso
from tenso import config

MIB = 1 << 20


@pytest.fixture
def fresh_cache():
    before = config.buffer_cache_stats()
    config.set_buffer_cache(idle_seconds=60.0)  # no idle trim in the middle of a test
    tenso.tenso_rs._buffer_cache_clear()
    yield
    tenso.tenso_rs._buffer_cache_clear()
    config.set_buffer_cache(max_bytes=int(before["max_bytes"]), idle_seconds=float(before["idle_seconds"]))


def _owner(obj):
    """The object at the end of an array's (or memoryview's) chain of bases: the memory's owner."""
    while True:
        if isinstance(obj, memoryview):
            obj = obj.obj
        elif getattr(obj, "base", None) is not None:
            obj = obj.base
        else:
            return obj


def test_block_returns_when_the_last_view_is_freed(fresh_cache):
    x = np.arange(MIB, dtype=np.float32)  # 4 MiB
    packet = tenso.dumps(x)
    assert type(_owner(packet)).__name__ == "_CachedBuffer"
    out = tenso.loads(packet, copy=True)
    assert type(_owner(out)).__name__ == "_CachedBuffer" and out.flags.writeable
    np.testing.assert_array_equal(out, x)
    view = out[10:20]
    retained = config.buffer_cache_stats()["retained_bytes"]
    del out
    assert config.buffer_cache_stats()["retained_bytes"] == retained, "a view still uses the block"
    del view
    assert config.buffer_cache_stats()["retained_bytes"] >= retained + x.nbytes
    # The next buffer of that size is the retained block, not a fresh one.
    hits = config.buffer_cache_stats()["hits"]
    again = tenso.loads(packet, copy=True)
    assert config.buffer_cache_stats()["hits"] == hits + 1
    np.testing.assert_array_equal(again, x)


async def _aread(packet):
    reader = asyncio.StreamReader()
    reader.feed_data(packet)
    reader.feed_eof()
    return await tenso.aread_stream(reader)


def _load(path):
    with open(path, "rb") as f:
        return tenso.load(f)


def test_every_fresh_buffer_comes_from_the_cache(fresh_cache, tmp_path):
    x = np.arange(MIB, dtype=np.float64)  # 8 MiB
    packet = bytes(tenso.dumps({"x": x}))
    outputs = {
        "dumps": lambda: np.frombuffer(tenso.dumps(x), np.uint8),
        "loads(copy=True)": lambda: tenso.loads(packet, copy=True)["x"],
        "read_stream": lambda: tenso.read_stream(io.BytesIO(packet))["x"],
        "load": lambda: _load(path)["x"],
        "aread_stream": lambda: asyncio.run(_aread(packet))["x"],
    }
    path = tmp_path / "p.tenso"
    path.write_bytes(packet)
    for name, make in outputs.items():
        arr = make()
        assert type(_owner(arr)).__name__ == "_CachedBuffer", name


def test_cap_bounds_retained_bytes_and_zero_turns_it_off(fresh_cache):
    x = np.ones(MIB, dtype=np.float32)
    config.set_buffer_cache(max_bytes=6 * MIB)
    arrays = [tenso.loads(tenso.dumps(x), copy=True) for _ in range(4)]
    del arrays
    stats = config.buffer_cache_stats()
    assert 0 < stats["retained_bytes"] <= 6 * MIB
    config.set_buffer_cache(max_bytes=0)
    assert config.buffer_cache_stats()["retained_bytes"] == 0
    out = tenso.loads(tenso.dumps(x), copy=True)
    assert type(_owner(out)).__name__ != "_CachedBuffer"
    np.testing.assert_array_equal(out, x)
    with pytest.raises(ValueError):
        config.set_buffer_cache(idle_seconds=-1.0)


LOOP = textwrap.dedent(
    """
    import json, os, sys, time
    import numpy as np
    import tenso
    from tenso import config

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    a = np.ones(16 << 20, dtype=np.float32)  # 64 MiB
    base = rss()
    peaks = []
    for i in range(100):
        p = tenso.dumps(a)
        r1 = rss()
        b = tenso.loads(p, copy=True)
        r2 = rss()
        assert b[12345] == 1.0
        peaks.append(max(r1, r2))
    stats = config.buffer_cache_stats()
    del p, b
    held = rss()
    deadline = time.monotonic() + 60
    while config.buffer_cache_stats()["retained_bytes"] and time.monotonic() < deadline:
        time.sleep(0.05)
    after = rss()
    print(json.dumps({"n": a.nbytes, "base": base, "peaks": peaks, "held": held, "after": after, "stats": stats,
                      "end": config.buffer_cache_stats()}))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads RSS from /proc/self/statm")
def test_loop_of_large_packets_stays_bounded_and_memory_returns_when_idle(tmp_path):
    script = tmp_path / "loop.py"
    script.write_text(LOOP)
    env = {**__import__("os").environ, "TENSO_BUFFER_CACHE_IDLE_S": "0.3"}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout)
    n = r["n"]
    # Packets reuse retained blocks: after the first two iterations, every dumps and loads(copy=True) is a hit.
    assert r["stats"]["hits"] >= 190, r["stats"]
    assert r["stats"]["misses"] <= 10, r["stats"]
    # Peak RSS over the loop within 4 packets of the first iteration's.
    assert max(r["peaks"]) <= r["peaks"][0] + 4 * n, (r["peaks"][0], max(r["peaks"]))
    # Idle: everything retained is given back, and the process is back near where it started.
    assert r["end"]["retained_bytes"] == 0 and r["end"]["idle_trims"] >= 1, r["end"]
    assert r["held"] - r["after"] >= 2 * n, (r["held"], r["after"])
    assert r["after"] <= r["base"] + n, (r["base"], r["after"])


# Forks while another thread keeps leasing and giving back blocks, with an idle period of 0 so that the trimmer
# thread takes the cache lock after every give-back too. A child that inherited the lock held by a thread it does
# not have would hang on its first large allocation; each child must allocate from the cache and exit. A child still
# running after a generous limit is a hang (killed, and the run stops there): never a judgement on speed.
FORKS = r"""
import json, os, signal, sys, threading, time, warnings
import numpy as np
import tenso
from tenso import config

warnings.simplefilter("ignore", DeprecationWarning)  # Python 3.12+: fork() of a multi-threaded process
config.set_buffer_cache(idle_seconds=0.0)
x = np.arange(256 * 1024, dtype=np.float32)  # 1 MiB
small = np.arange(96 * 1024, dtype=np.float32)  # 384 KiB, above the cache's smallest block
stop = threading.Event()
rounds = [0]

def hammer():
    while not stop.is_set():
        packet = tenso.dumps(x)
        back = tenso.loads(packet, copy=True)
        del packet, back
        rounds[0] += 1

def owner(obj):
    while getattr(obj, "base", None) is not None:
        obj = obj.base
    return obj

def child():
    code = 3
    try:
        for _ in range(3):
            packet = tenso.dumps(small)
            back = tenso.loads(packet, copy=True)
            ok = np.array_equal(back, small) and type(owner(back)).__name__ == "_CachedBuffer"
            del packet, back
            if not ok:
                code = 4
                break
        else:
            code = 0
    finally:
        os._exit(code)

threads = [threading.Thread(target=hammer, daemon=True) for _ in range(2)]
for t in threads:
    t.start()
forks, limit = int(sys.argv[1]), float(sys.argv[2])
result = {"forks": 0, "hung": 0, "bad": []}
for _ in range(forks):
    pid = os.fork()
    if pid == 0:
        child()
    deadline = time.monotonic() + limit
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            code = os.waitstatus_to_exitcode(status)
            if code != 0:
                result["bad"].append(code)
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            result["hung"] += 1
            break
        time.sleep(0.002)
    result["forks"] += 1
    if result["hung"]:
        break
stop.set()
for t in threads:
    t.join()
result["rounds"] = rounds[0]
result["stats"] = config.buffer_cache_stats()
print(json.dumps(result))
"""


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_forked_children_allocate_while_other_threads_use_the_cache(tmp_path):
    script = tmp_path / "forks.py"
    script.write_text(FORKS)
    proc = subprocess.run([sys.executable, str(script), "1000", "30"], capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout)
    assert r["hung"] == 0, f"a forked child hung on its first large allocation after {r['forks']} forks: {r}"
    assert r["bad"] == [], r
    assert r["forks"] == 1000 and r["rounds"] > 0, r
    # The hammering threads really went through the cache (and the trimmer) while the children were forked.
    assert r["stats"]["hits"] + r["stats"]["misses"] >= 2 * r["rounds"], r["stats"]
