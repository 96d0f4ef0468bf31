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
