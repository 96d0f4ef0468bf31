"""Golden corpus: decode every fixture of both reference versions exactly, and
re-encode each expected value to the fixture's bytes (FORMAT.md §18)."""

from __future__ import annotations

import gc
import struct

import numpy as np
import pytest

import tensohelp
from tensohelp import Case

CASES = tensohelp.golden_cases()
IDS = [f"{f}/{n}" for f, n in CASES]


def _case(folder, name) -> Case:
    return Case(folder, name)


def test_manifest_counts():
    # FORMAT.md §18 / fixtures README: 55 v3 cases and 58 v4 cases.
    assert sum(1 for f, _ in CASES if f == "v3-0.19.4") == 55
    assert sum(1 for f, _ in CASES if f == "v4-0.24.0") == 58


@pytest.mark.parametrize("folder,name", CASES, ids=IDS)
def test_decode(folder, name, transport):
    import tenso

    case = _case(folder, name)
    buf = transport(case.packet)
    got = tenso.loads(buf)
    tensohelp.assert_matches(got, case.expected, case.npz, case.name)
    if case.kind == "ragged":
        rows = tenso.RaggedArray.loads(case.packet).to_list()
        exp_rows = [case.npz[r["array"]] for r in case.expected["rows"]]
        assert len(rows) == case.expected["count"] == len(exp_rows)
        for r, e in zip(rows, exp_rows):
            tensohelp.assert_dense_equal(np.asarray(r), e, f"{name} row")
    del got
    gc.collect()


@pytest.mark.parametrize("folder,name", CASES, ids=IDS)
def test_decode_copy_is_writeable(folder, name):
    import tenso

    case = _case(folder, name)
    got = tenso.loads(case.packet, copy=True)
    tensohelp.assert_matches(got, case.expected, case.npz, case.name)
    if case.kind == "dense":
        assert got.flags.writeable
        assert got.ctypes.data % 64 == 0 or got.nbytes == 0


def _encode_opts(case: Case) -> dict:
    o = case.options
    kw = dict(
        check_integrity=bool(o["check_integrity"]),
        compress=bool(o["compress"]),
        alignment=int(o["alignment"]),
        strict=bool(o.get("strict", False)),
    )
    if case.protocol == 3:
        kw["protocol"] = 3
    return kw


def _reencode(case: Case) -> bytes:
    import tenso

    value = tensohelp.build_value(case.expected, case.npz, case.input_layout)
    kw = _encode_opts(case)
    if case.kind == "string":
        via_method = bytes(value.dumps(check_integrity=kw["check_integrity"]))
        via_dumps = bytes(tenso.dumps(value, **kw))
        assert via_method == via_dumps
        return via_dumps
    if case.kind == "ragged":
        via_method = bytes(value.dumps(check_integrity=kw["check_integrity"]))
        via_dumps = bytes(tenso.dumps(value, **kw))
        assert via_method == via_dumps
        return via_dumps
    out = tenso.dumps(value, **kw)
    assert isinstance(out, memoryview)
    return bytes(out)


@pytest.mark.parametrize("folder,name", CASES, ids=IDS)
def test_reencode(folder, name):
    import tenso
    import xxhash

    case = _case(folder, name)
    ours = _reencode(case)
    # header: version byte is always the requested protocol
    assert ours[:4] == b"TNSO"
    assert ours[4] == case.protocol
    if case.compressed:
        # LZ4 encoders may differ (FORMAT.md §6.3): compare decoded values both ways.
        tensohelp.assert_matches(tenso.loads(ours), case.expected, case.npz, case.name + " (ours)")
        tensohelp.assert_matches(tenso.loads(case.packet), case.expected, case.npz, case.name + " (fixture)")
        assert len(ours) > 0
        return
    if case.protocol == 3 and name == "large_uint8_1100000_integrity":
        # 0.19.4 wrote the chunked XXH3 variant; we write plain XXH3-64 (FORMAT.md §5.3).
        assert len(ours) == len(case.packet)
        assert ours[:-8] == case.packet[:-8]
        body = ours[64:-8]
        assert len(body) == 1_100_000
        (footer,) = struct.unpack("<Q", ours[-8:])
        assert footer == xxhash.xxh3_64_intdigest(body)
        assert ours[-8:] != case.packet[-8:], "fixture carries the chunked variant, ours must not"
        # And both decode to the same values.
        tensohelp.assert_matches(tenso.loads(ours), case.expected, case.npz, name)
        return
    assert len(ours) == len(case.packet), f"length {len(ours)} != {len(case.packet)}"
    if ours != case.packet:
        first = next(i for i, (a, b) in enumerate(zip(ours, case.packet)) if a != b)
        pytest.fail(
            f"bytes differ from offset {first}: ours {ours[first:first + 16].hex()} "
            f"fixture {case.packet[first:first + 16].hex()}"
        )


@pytest.mark.parametrize("folder,name", [c for c in CASES if c[1] in ("dtype_float32", "bundle_nested_mixed")])
def test_trailing_bytes_accepted_at_top_level(folder, name):
    import tenso

    case = _case(folder, name)
    got = tenso.loads(case.packet + b"\x00" * 100)
    tensohelp.assert_matches(got, case.expected, case.npz, name)


@pytest.mark.parametrize("folder,name", CASES, ids=IDS)
def test_packet_info_matches_header(folder, name):
    import tenso

    case = _case(folder, name)
    info = tenso.get_packet_info(case.packet)
    hdr = case.meta["packet"]
    assert info["version"] == hdr["version"] == case.protocol
    assert info["flags"] == hdr["flags"]
    assert info["integrity_protected"] == bool(hdr["flags"] & 0x2)
    assert info["aligned"] == bool(hdr["flags"] & 0x1)
    if case.kind == "dense":
        assert tuple(info["shape"]) == tuple(case.expected["shape"])
        assert info["ndim"] == len(case.expected["shape"])
        n = int(np.prod(case.expected["shape"], dtype=np.int64))
        assert info["total_elements"] == n
        assert info["data_size_bytes"] == n * tensohelp._dense_expected(case.expected, case.npz).dtype.itemsize
    if case.kind == "quantized":
        assert info["dtype"] == case.expected["dtype_name"]
        assert info.get("quantized") is True
        n = int(np.prod(case.expected["shape"], dtype=np.int64))
        exp_size = (n + 1) // 2 if case.expected["dtype_name"].endswith("4") else n
        assert info["data_size_bytes"] == exp_size


@pytest.mark.parametrize("folder,name", CASES, ids=IDS)
def test_read_stream_and_load_file(folder, name, tmp_path):
    """Every framable fixture streams (FORMAT.md §13); a top-level compressed dense packet is refused."""
    import io

    import tenso
    from tenso import errors

    case = _case(folder, name)
    path = tmp_path / "p.tenso"
    path.write_bytes(case.packet)
    with open(path, "rb") as f:
        got = tenso.load(f, mmap_mode=True)
        tensohelp.assert_matches(got, case.expected, case.npz, name + " (load mmap)")
        del got
    with open(path, "rb") as f:
        if case.kind == "dense" and case.compressed:
            # load(fp) streams (seed and both references): a compressed dense packet cannot be framed.
            with pytest.raises(errors.TensoFormatError):
                tenso.load(f)
        else:
            tensohelp.assert_matches(tenso.load(f), case.expected, case.npz, name + " (load)")
    stream = io.BytesIO(case.packet + case.packet)
    if case.kind == "dense" and case.compressed:
        with pytest.raises(errors.TensoFormatError):
            tenso.read_stream(stream)
        return
    for _ in range(2):
        tensohelp.assert_matches(tenso.read_stream(stream), case.expected, case.npz, name + " (stream)")
    assert tenso.read_stream(stream) is None
