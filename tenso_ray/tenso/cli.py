"""The ``tenso`` command: look into, check and convert tenso packets.

::

    tenso inspect [--json] FILE|- ...    header, kind, shapes, dtypes, flags, sizes, bundle entries
    tenso verify [--strict] FILE|- ...   full decode and integrity check; exit 0 if all valid, 1 otherwise
    tenso convert IN OUT [--protocol 3|4] [--check-integrity] [--compress]

``convert`` picks each side's format from its extension: ``.npy`` (one array),
``.npz`` (a flat bundle of arrays), ``.safetensors`` (a flat bundle of arrays;
needs the ``safetensors`` package) and anything else, or ``-`` for stdin and
stdout, a tenso packet. A value that the target format cannot hold (a sparse
matrix to ``.npy``, a nested bundle to ``.npz``) is refused, never approximated.

``verify`` and ``inspect`` also report bytes that readers ignore but a writer
must not leave behind: non-zero padding (and a non-zero reserved header byte)
and bytes after the packet. ``verify`` warns about them, or with ``--strict``
fails the file.

Exit status: 0 on success, 1 for input that is invalid or cannot be converted
(the reason on one line, no traceback), 2 for a usage error.
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import os
import struct
import sys
import warnings
import zipfile
from collections.abc import Sequence
from typing import Any, NoReturn, Optional

import numpy as np

from . import config
from . import tenso_rs as _rs
from .core import dumps, loads
from .quantize import QuantizedTensor
from .ragged import StringTensor
from .utils import get_packet_info

__all__ = ["main"]

#: Name (without ``FLAG_``) of every flag bit, in bit order.
_FLAG_NAMES = sorted(
    ((getattr(config, n), n[len("FLAG_"):]) for n in config.__all__ if n.startswith("FLAG_")),
)
_SCHEME_NAMES = {
    config.QUANT_PER_TENSOR: "per_tensor",
    config.QUANT_PER_CHANNEL: "per_channel",
    config.QUANT_PER_GROUP: "per_group",
}
_ARRAY_FORMATS = (".npy", ".npz", ".safetensors")
#: safetensors dtype codes that tenso can hold, with the NumPy dtype name of each.
_SAFETENSORS_DTYPES = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "U16": "uint16", "I16": "int16", "F16": "float16",
    "BF16": "bfloat16", "U32": "uint32", "I32": "int32", "F32": "float32", "U64": "uint64", "I64": "int64",
    "F64": "float64", "C64": "complex64",
}


class CliError(Exception):
    """An input the command cannot handle; reported on one line with exit status 1."""


def _one_line(exc: BaseException) -> str:
    """``Class: message`` on one line, for any exception."""
    message = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


# ---------------------------------------------------------------------------
# Reading and writing
# ---------------------------------------------------------------------------

def _read_input(path: str) -> bytes:
    """The bytes of ``path``, or of stdin for ``-``."""
    if path == "-":
        return sys.stdin.buffer.read()
    with open(path, "rb") as f:
        return f.read()


def _format_of(path: str) -> str:
    """``.npy``, ``.npz``, ``.safetensors`` or ``tenso`` (everything else, and ``-``)."""
    ext = os.path.splitext(path)[1].lower() if path != "-" else ""
    return ext if ext in _ARRAY_FORMATS else "tenso"


def _import_safetensors() -> Any:
    # Through importlib, so the type check of the package does not depend on the optional package being installed.
    try:
        importlib.import_module("safetensors.numpy")
    except ImportError as exc:
        raise CliError(
            "reading or writing .safetensors needs the 'safetensors' package: pip install safetensors"
        ) from exc
    return importlib.import_module("safetensors")


def _numpy_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        try:
            ml_dtypes = importlib.import_module("ml_dtypes")
        except ImportError as exc:
            raise CliError("bfloat16 needs the 'ml_dtypes' package: pip install 'tenso-ray[bfloat16]'") from exc
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _read_safetensors(data: bytes) -> dict[str, np.ndarray]:
    """The tensors of a .safetensors file, in file order. safetensors.numpy has no bfloat16, so the arrays are
    built here from the library's parse of the header."""
    st = _import_safetensors()
    try:
        tensors = st.deserialize(data)
    except st.SafetensorError as exc:
        raise CliError(f"not a valid .safetensors file: {_one_line(exc)}") from exc
    out = {}
    for name, spec in tensors:
        dtype = _SAFETENSORS_DTYPES.get(spec["dtype"])
        if dtype is None:
            raise CliError(f"tensor {name!r} has safetensors dtype {spec['dtype']}, which tenso cannot hold")
        out[name] = np.frombuffer(bytearray(spec["data"]), dtype=_numpy_dtype(dtype)).reshape(spec["shape"])
    return out


def _read_value(path: str) -> Any:
    """Decode ``path`` according to its extension (a tenso packet unless .npy/.npz/.safetensors)."""
    fmt = _format_of(path)
    if fmt == "tenso":
        return loads(_read_input(path), copy=True)
    data = _read_input(path)
    if fmt == ".safetensors":
        return _read_safetensors(data)
    # allow_pickle=False: an input file is untrusted, and a pickled object array could run code.
    loaded = np.load(io.BytesIO(data), allow_pickle=False)
    if fmt == ".npz":
        with loaded:
            return {k: loaded[k] for k in loaded.files}
    if not isinstance(loaded, np.ndarray):
        raise CliError(f"{path}: not a .npy file holding one array")
    return loaded


def _kind_of(value: Any) -> str:
    """A short description of a decoded value, for refusals."""
    if isinstance(value, np.ndarray):
        return f"an array of {value.dtype}"
    if isinstance(value, dict):
        return "a bundle"
    if isinstance(value, QuantizedTensor):
        return "a quantized tensor"
    if isinstance(value, StringTensor):
        return "a string tensor"
    if getattr(value, "format", None) in ("coo", "csr", "csc"):
        return f"a sparse {value.format} matrix"
    return f"a {type(value).__name__}"


def _plain_array(value: Any, where: str, target: str) -> np.ndarray:
    """``value`` if it is an array ``target`` can record, else a refusal naming ``where``."""
    if not isinstance(value, np.ndarray):
        raise CliError(f"{where} is {_kind_of(value)}, which {target} cannot hold (only dense arrays)")
    if target != ".safetensors" and value.dtype.name == "bfloat16":
        # NumPy would store it as the anonymous void type 'V2' and lose the dtype.
        raise CliError(f"{where} is bfloat16, which {target} cannot record (use .safetensors or a tenso packet)")
    if target == ".safetensors" and value.dtype.name not in _SAFETENSORS_DTYPES.values():
        raise CliError(f"{where} is {value.dtype.name}, which .safetensors cannot record")
    return value


def _flat_arrays(value: Any, target: str) -> dict[str, np.ndarray]:
    """A bundle of dense arrays as a dict, or a refusal that says what does not fit."""
    if not isinstance(value, dict):
        hint = " (write one array to .npy)" if isinstance(value, np.ndarray) else ""
        raise CliError(f"the input is {_kind_of(value)}; {target} holds a bundle of arrays{hint}")
    return {k: _plain_array(v, f"entry {k!r}", target) for k, v in value.items()}


def _write_output(value: Any, path: str, args: argparse.Namespace) -> None:
    """Encode ``value`` into ``path`` according to its extension."""
    fmt = _format_of(path)
    if fmt == "tenso":
        packet = dumps(value, check_integrity=args.check_integrity, compress=args.compress, protocol=args.protocol)
        if path == "-":
            sys.stdout.buffer.write(packet)
            sys.stdout.buffer.flush()
        else:
            with open(path, "wb") as f:
                f.write(packet)
        return
    if fmt == ".npy":
        arr = _plain_array(value, "the input", ".npy")
        with open(path, "wb") as f:
            np.save(f, arr, allow_pickle=False)
        return
    arrays = _flat_arrays(value, fmt)
    if fmt == ".npz":
        # The archive np.savez writes (one NAME.npy member per entry), built here because np.savez takes the names
        # as keyword arguments, so an entry called "file" or "allow_pickle" would collide with its parameters.
        compression = zipfile.ZIP_DEFLATED if args.compress else zipfile.ZIP_STORED
        with zipfile.ZipFile(path, "w", compression=compression, allowZip64=True) as archive:
            for key, arr in arrays.items():
                with archive.open(f"{key}.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, arr, allow_pickle=False)
        return
    if "__metadata__" in arrays:
        # safetensors would write it into the header's metadata slot, giving a file no reader accepts.
        raise CliError("entry '__metadata__' is a name .safetensors reserves for its header")
    st = _import_safetensors()
    try:
        # np.asarray(order="C"), not np.ascontiguousarray: the latter turns a 0-d array into a 1-d one.
        blob = st.numpy.save({k: np.asarray(v, order="C") for k, v in arrays.items()})
    except st.SafetensorError as exc:
        raise CliError(f".safetensors cannot hold this bundle: {_one_line(exc)}") from exc
    with open(path, "wb") as f:
        f.write(blob)


# ---------------------------------------------------------------------------
# Describing a packet
# ---------------------------------------------------------------------------

def _flag_names(flags: int) -> list[str]:
    names = [name for bit, name in _FLAG_NAMES if flags & bit]
    unknown = flags & ~sum(bit for bit, _ in _FLAG_NAMES)
    if unknown:
        names.append(f"0x{unknown:x}")
    return names


def _header_size(version: int) -> int:
    return config.HEADER_SIZE_V3 if version == 3 else config.HEADER_SIZE_V4


def _alignment(view: memoryview, info: dict[str, Any], exponent_at: int) -> int:
    """The body alignment of a dense or quantized packet (FORMAT.md section 4.2)."""
    if info["flags"] & config.FLAG_CUST_ALIGN:
        return 1 << view[exponent_at]
    return config.DEFAULT_ALIGNMENT if info["flags"] & config.FLAG_ALIGNED else 1


def _bundle_entries(view: memoryview, version: int) -> list[tuple[str, int, memoryview]]:
    """The (key, offset, value packet) triples of a bundle that :func:`tenso.loads` has already accepted."""
    count = view[_header_size(version) - (2 if version == 4 else 1)]
    pos = _header_size(version)
    out = []
    for _ in range(count):
        (klen,) = struct.unpack_from("<I", view, pos)
        key = bytes(view[pos + 4:pos + 4 + klen]).decode("utf-8")
        pos += 4 + klen
        (vlen,) = struct.unpack_from("<I", view, pos)
        out.append((key, pos + 4, view[pos + 4:pos + 4 + vlen]))
        pos += 4 + vlen
    return out


def _own_regions(regions: list[dict[str, Any]], start: int, length: int, depth: int) -> list[dict[str, Any]]:
    """The non-zero padding regions of the packet at ``start`` (``depth`` bundle levels down), sparse components
    included, from a :func:`tenso_rs._padding_report` of the whole input."""
    return [r for r in regions
            if start <= r["offset"] < start + length and sum(isinstance(p, str) for p in r["path"]) == depth]


def _describe(view: memoryview, value: Any, regions: list[dict[str, Any]], start: int = 0,
              depth: int = 0) -> dict[str, Any]:
    """Everything ``inspect`` reports about one valid packet and its decoded ``value``; ``regions`` are the non-zero
    padding regions of the whole input and ``start`` the packet's offset in it."""
    info = get_packet_info(view)
    version, flags = info["version"], info["flags"]
    node: dict[str, Any] = {
        "kind": info["kind"],
        "version": version,
        "flags": flags,
        "flag_names": _flag_names(flags),
        "dtype_code": info["dtype_code"],
        "integrity": bool(info["integrity_protected"]),
        "compressed": bool(info.get("compressed", False)),
        "canonical_padding": not _own_regions(regions, start, len(view), depth),
    }
    shape_end = _header_size(version) + 4 * info["ndim"]
    if isinstance(value, dict):
        entries = []
        # Walk the wire entries rather than the dict: a key repeated on the wire is listed each time.
        for key, offset, sub in _bundle_entries(view, version):
            entry: dict[str, Any] = {"key": key, "packet_bytes": len(sub)}
            entry.update(_describe(sub, loads(sub), regions, start + offset, depth + 1))
            entries.append(entry)
        node["entry_count"] = len(entries)
        node["entries"] = entries
    elif isinstance(value, QuantizedTensor):
        num_scales = int(value.scales.size)
        node.update(
            dtype=value.dtype_name,
            shape=list(value.shape),
            elements=int(info["total_elements"]),
            body_bytes=int(value.nbytes),
            scheme=_SCHEME_NAMES.get(value.quant_scheme, str(value.quant_scheme)),
            axis=int(value.axis),
            group_size=int(value.group_size),
            num_scales=num_scales,
            alignment=_alignment(view, info, shape_end + (10 if version == 4 else 9) + 8 * num_scales),
        )
    elif isinstance(value, StringTensor):
        node.update(shape=[len(value)], count=len(value), payload_bytes=int(value.nbytes))
    elif isinstance(value, np.ndarray):
        node.update(
            dtype=value.dtype.name,
            shape=list(value.shape),
            elements=int(value.size),
            body_bytes=int(value.nbytes),
            alignment=_alignment(view, info, shape_end),
        )
    else:  # a SciPy sparse matrix
        node.update(
            format=value.format,
            shape=[int(d) for d in value.shape],
            dtype=value.dtype.name,
            nnz=int(value.nnz),
            index_dtype=(value.row if value.format == "coo" else value.indices).dtype.name,
        )
    return node


def _count_footers(node: dict[str, Any]) -> int:
    return int(node["integrity"]) + sum(_count_footers(e) for e in node.get("entries", []))


def _region_text(region: dict[str, Any]) -> str:
    """``non-zero body padding at offset 20 (2 of 50 bytes) in entry 'w'``."""
    where = "".join(f" in entry {p!r}" if isinstance(p, str) else f" in sparse component {p}" for p in region["path"])
    count = f" ({region['nonzero_bytes']} of {region['length']} bytes)" if region["length"] > 1 else ""
    return f"non-zero {region['kind']} at offset {region['first_nonzero']}{count}{where}"


def _non_canonical(padding: dict[str, Any], size: int) -> list[str]:
    """What a canonical writer would have written differently, one phrase each; empty if nothing."""
    problems = [_region_text(r) for r in padding["nonzero"]]
    end = padding["end"]
    if end is not None and end < size:
        problems.append(f"{size - end} trailing byte{'s' if size - end > 1 else ''} after the packet at offset {end}")
    return problems


def _inspect_one(path: str) -> tuple[dict[str, Any], bool]:
    """The report for one input and whether it is a valid packet."""
    report: dict[str, Any] = {"file": path}
    try:
        data = _read_input(path)
    except OSError as exc:
        report["valid"] = False
        report["error"] = {"class": type(exc).__name__, "message": str(exc)}
        return report, False
    report["size"] = len(data)
    try:
        value = loads(data)
    except Exception as exc:  # noqa: BLE001 - any failure is the verdict on this input
        report["valid"] = False
        report["error"] = {"class": type(exc).__name__, "message": " ".join(str(exc).split())}
        try:  # the header may still be readable
            info = get_packet_info(data)
            report["header"] = {
                "version": info["version"],
                "flags": info["flags"],
                "flag_names": _flag_names(info["flags"]),
                "dtype_code": info["dtype_code"],
                "kind": info.get("kind"),
            }
        except Exception:  # noqa: BLE001, S110 - no readable header: the error above says why
            pass
        return report, False
    padding = _rs._padding_report(data)
    report["valid"] = True
    report["error"] = None
    end = padding["end"]
    report["trailing_bytes"] = None if end is None else len(data) - end
    report["nonzero_padding"] = padding["nonzero"]
    report["canonical"] = not _non_canonical(padding, len(data))
    report["packet"] = _describe(memoryview(data), value, padding["nonzero"])
    return report, True


def _summary(node: dict[str, Any]) -> str:
    """One line for a described packet: kind, dtype, shape and sizes."""
    kind = node["kind"]
    flags = "|".join(node["flag_names"]) or "none"
    if kind == "bundle":
        count = node["entry_count"]
        text = f"bundle of {count} {'entry' if count == 1 else 'entries'}"
    elif kind == "sparse":
        text = f"sparse {node['format']} {node['dtype']} {tuple(node['shape'])}, nnz {node['nnz']}"
    elif kind == "string":
        text = f"string tensor of {node['count']} strings, {node['payload_bytes']} payload bytes"
    elif kind == "quantized":
        text = (f"quantized {node['dtype']} {tuple(node['shape'])} {node['scheme']}"
                f" (axis {node['axis']}, group {node['group_size']}, {node['num_scales']} scales),"
                f" {node['body_bytes']} code bytes")
    else:
        text = f"dense {node['dtype']} {tuple(node['shape'])}, {node['body_bytes']} body bytes"
    return f"{text}; v{node['version']}, flags 0x{node['flags']:04x} ({flags})"


def _print_tree(node: dict[str, Any], indent: str, out: Any) -> None:
    for entry in node.get("entries", []):
        print(f"{indent}{entry['key']!r}: {_summary(entry)}, packet {entry['packet_bytes']} bytes", file=out)
        _print_tree(entry, indent + "  ", out)


def _print_report(report: dict[str, Any], out: Any) -> None:
    print(f"file: {report['file']}" + (f" ({report['size']} bytes)" if "size" in report else ""), file=out)
    if not report.get("valid"):
        header = report.get("header")
        if header:
            names = "|".join(header["flag_names"]) or "none"
            print(f"header: v{header['version']}, flags 0x{header['flags']:04x} ({names}),"
                  f" dtype code {header['dtype_code']}, kind {header['kind']}", file=out)
        err = report["error"]
        print(f"invalid: {err['class']}: {err['message']}", file=out)
        return
    node = report["packet"]
    print(f"packet: {_summary(node)}", file=out)
    if "alignment" in node:
        print(f"alignment: {node['alignment']}", file=out)
    if node["integrity"]:
        print("integrity: xxh3-64 footer verified", file=out)
    for region in report["nonzero_padding"]:
        print(f"padding: {_region_text(region)} (writers must write zeros)", file=out)
    if report["trailing_bytes"]:
        print(f"trailing: {report['trailing_bytes']} bytes after the packet (ignored by readers)", file=out)
    _print_tree(node, "  ", out)


# ---------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------

def _cmd_inspect(args: argparse.Namespace) -> int:
    status = 0
    for i, path in enumerate(args.files):
        report, ok = _inspect_one(path)
        status |= not ok
        if args.json:
            print(json.dumps(report, ensure_ascii=False))
        else:
            if i:
                print()
            _print_report(report, sys.stdout)
    return status


def _cmd_verify(args: argparse.Namespace) -> int:
    status = 0
    for path in args.files:
        try:
            data = _read_input(path)
            value = loads(data)
            if isinstance(value, StringTensor):
                value.to_list()  # every string decodes as UTF-8
            padding = _rs._padding_report(data)
        except Exception as exc:  # noqa: BLE001 - any failure is the verdict on this input
            print(f"{path}: {_one_line(exc)}")
            status = 1
            continue
        problems = "; ".join(_non_canonical(padding, len(data)))
        if problems and args.strict:
            print(f"{path}: not canonical: {problems}")
            status = 1
            continue
        node = _describe(memoryview(data), value, padding["nonzero"])
        footers = _count_footers(node)
        checked = f", {footers} integrity footer{'s' if footers > 1 else ''} verified" if footers else ""
        print(f"{path}: ok, {node['kind']} v{node['version']} packet, {len(data)} bytes{checked}")
        if problems:
            print(f"{path}: warning: {problems}")
    return status


def _cmd_convert(args: argparse.Namespace) -> int:
    out_fmt = _format_of(args.output)
    if out_fmt != "tenso" and (args.protocol is not None or args.check_integrity):
        _usage_error(args, f"--protocol and --check-integrity apply to tenso output, not {out_fmt}")
    if out_fmt not in ("tenso", ".npz") and args.compress:
        _usage_error(args, f"--compress applies to tenso and .npz output, not {out_fmt}")
    if args.protocol is None:
        args.protocol = config.PROTOCOL_VERSION
    value = _read_value(args.input)
    _write_output(value, args.output, args)
    return 0


def _usage_error(args: argparse.Namespace, message: str) -> NoReturn:
    args.parser_for_errors.error(message)
    raise AssertionError("unreachable: ArgumentParser.error exits")  # pragma: no cover


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tenso",
        description="Inspect, verify and convert tenso packets (protocol versions 3 and 4).",
        epilog="Exit status: 0 success, 1 invalid input or a value the target cannot hold, 2 usage error.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("inspect", help="describe packets: header, kind, shapes, dtypes, flags, sizes, entries",
                       description="Describe tenso packets without changing them. The packet is decoded and "
                                   "validated as a whole; bundles are listed entry by entry.")
    p.add_argument("files", nargs="+", metavar="FILE", help="a packet file, or - for stdin")
    p.add_argument("--json", action="store_true", help="print one JSON object per file, one per line")
    p.set_defaults(func=_cmd_inspect, parser_for_errors=p)

    p = sub.add_parser("verify", help="decode and validate packets, integrity footers included",
                       description="Decode every packet fully (structure, limits, sparse indices, UTF-8 strings, "
                                   "XXH3 footers). One line per file: 'FILE: ok, ...' or 'FILE: ErrorClass: "
                                   "message'. A valid packet with non-zero padding (or reserved header byte) or "
                                   "bytes after its end gets a second line 'FILE: warning: ...'; with --strict it "
                                   "is 'FILE: not canonical: ...' instead and counts as invalid. Exit status 0 if "
                                   "all are valid, 1 otherwise.")
    p.add_argument("files", nargs="+", metavar="FILE", help="a packet file, or - for stdin")
    p.add_argument("--strict", action="store_true",
                   help="fail a packet with non-zero padding or trailing bytes (writers must pad with zeros)")
    p.set_defaults(func=_cmd_verify, parser_for_errors=p)

    p = sub.add_parser("convert", help="convert between protocols 3 and 4, .npy, .npz and .safetensors",
                       description="Convert IN to OUT; each side's format follows its extension: .npy (one "
                                   "array), .npz or .safetensors (a flat bundle of arrays), anything else a tenso "
                                   "packet ('-' is stdin or stdout). Values the target cannot hold are refused.")
    p.add_argument("input", metavar="IN", help="input file, or - for a packet on stdin")
    p.add_argument("output", metavar="OUT", help="output file, or - for a packet on stdout")
    p.add_argument("--protocol", type=int, choices=(3, 4), default=None,
                   help="wire version of a tenso OUT (default 4; 3 is read by tenso 0.19)")
    p.add_argument("--check-integrity", action="store_true", help="give a tenso OUT an XXH3-64 footer")
    p.add_argument("--compress", action="store_true", help="LZ4-compress a tenso OUT's dense bodies; "
                                                           "deflate an .npz OUT")
    p.set_defaults(func=_cmd_convert, parser_for_errors=p)
    return parser


def _version() -> str:
    from . import __version__

    return __version__


def _show_warning(message: Any, category: Any, filename: str, lineno: int, file: Any = None,
                  line: Optional[str] = None) -> None:
    print(f"tenso: warning: {message}", file=sys.stderr)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``tenso`` command with ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    warnings.showwarning = _show_warning
    try:
        status = int(args.func(args))
        sys.stdout.flush()
        return status
    except BrokenPipeError:
        # The reader of our output went away (`tenso inspect x | head`): stop quietly, and keep the
        # interpreter's final flush from failing again on the closed pipe.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except CliError as exc:
        print(f"tenso {args.command}: {exc}", file=sys.stderr)
    except (OSError, ValueError, TypeError, EOFError, ImportError, MemoryError) as exc:
        # Bad input (malformed packet, unreadable file, a dtype the target lacks) is a verdict, not a crash.
        print(f"tenso {args.command}: {_one_line(exc)}", file=sys.stderr)
    except KeyboardInterrupt:
        return 130
    return 1
