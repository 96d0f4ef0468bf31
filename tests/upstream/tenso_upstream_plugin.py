"""pytest plugin for ``scripts/upstream-tests.sh``: applies ``expected-failures.txt`` to upstream's test suites.

Each line of the file (``#`` starts a comment)::

    VERSIONS  KIND   TEST-ID                                    REASON
    both      xfail  tests/test_core.py::test_something         why ours differs and is right
    0.24.0    xfail  tests/test_cache.py                        a whole module that cannot be imported

Whole-line comments only. ``VERSIONS`` is ``0.24.0``, ``0.19.4`` or ``both``; ``KIND`` is ``xfail`` (strict: a listed test that passes fails
the run, so the list cannot go stale) or ``skip`` (needs hardware this machine lacks, e.g. CUDA). A ``TEST-ID`` without
``::`` names a module whose import fails against our package: it is collected as one strict-xfail item that imports
it. Entries that match nothing in the suite fail the run too. The version under test comes from
``TENSO_UPSTREAM_VERSION``.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
from dataclasses import dataclass
from typing import Any, Optional

import pytest

LIST = pathlib.Path(__file__).resolve().parent / "expected-failures.txt"


@dataclass
class Entry:
    kind: str
    test_id: str
    reason: str
    used: bool = False


def _load(version: str) -> dict[str, Entry]:
    entries: dict[str, Entry] = {}
    for number, raw in enumerate(LIST.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(None, 3)
        if len(parts) != 4 or parts[1] not in ("xfail", "skip") or parts[0] not in ("both", "0.24.0", "0.19.4"):
            raise pytest.UsageError(f"{LIST}:{number}: expected 'VERSIONS KIND TEST-ID REASON', got {raw!r}")
        versions, kind, test_id, reason = parts
        if versions in ("both", version):
            entries[test_id] = Entry(kind, test_id, reason)
    return entries


_ENTRIES: dict[str, Entry] = {}


# upstream's test_cache.py imports four private names of its pure-Python pool at module level. We give the module
# those names here, in the harness and not in the package, so that its ~60 tests of the public TensoCache API run;
# the few tests that then poke upstream's pool internals through them are listed one by one in expected-failures.txt.
# _MAX_KEY_LEN is a real limit of ours too (128 bytes of UTF-8); the layout offsets have no counterpart in our pool.
_CACHE_PRIVATE_NAMES = {"_MAX_KEY_LEN": 128, "_H_LOCK": None, "_H_LOCK_TIME": None, "_STATUS_ACTIVE": None}


def _provide_cache_private_names() -> None:
    import tenso.cache

    for name, value in _CACHE_PRIVATE_NAMES.items():
        if not hasattr(tenso.cache, name):
            setattr(tenso.cache, name, value)


def pytest_configure(config: pytest.Config) -> None:
    _provide_cache_private_names()
    version = os.environ.get("TENSO_UPSTREAM_VERSION", "")
    if version not in ("0.24.0", "0.19.4"):
        raise pytest.UsageError("set TENSO_UPSTREAM_VERSION to 0.24.0 or 0.19.4 (scripts/upstream-tests.sh does)")
    _ENTRIES.clear()
    _ENTRIES.update(_load(version))


class _ImportItem(pytest.Item):
    """Imports a module that is expected not to import against our package."""

    def runtest(self) -> None:
        spec = importlib.util.spec_from_file_location(f"_upstream_{self.path.stem}", self.path)
        assert spec is not None and spec.loader is not None
        spec.loader.exec_module(importlib.util.module_from_spec(spec))

    def reportinfo(self) -> tuple[Any, Optional[int], str]:
        return self.path, None, f"import {self.path.name}"


class _ImportCollector(pytest.File):
    def collect(self) -> Any:
        yield _ImportItem.from_parent(self, name="import")


def _rel(config: pytest.Config, path: pathlib.Path) -> str:
    return path.relative_to(config.rootpath).as_posix()


@pytest.hookimpl(tryfirst=True)
def pytest_pycollect_makemodule(module_path: pathlib.Path, parent: Any) -> Any:
    entry = _ENTRIES.get(_rel(parent.config, module_path))
    if entry is None:
        return None
    entry.used = True
    collector = _ImportCollector.from_parent(parent, path=module_path)
    return collector


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if isinstance(item, _ImportItem):
            entry = _ENTRIES[_rel(config, item.path)]
            item.add_marker(pytest.mark.xfail(reason=entry.reason, strict=True, raises=ImportError))
            continue
        entry = _ENTRIES.get(item.nodeid)
        if entry is None:
            continue
        entry.used = True
        if entry.kind == "skip":
            item.add_marker(pytest.mark.skip(reason=entry.reason))
        else:
            item.add_marker(pytest.mark.xfail(reason=entry.reason, strict=True))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if session.config.option.collectonly or session.config.args != ["tests"]:
        return  # a partial run cannot judge which entries are stale
    stale = [e.test_id for e in _ENTRIES.values() if not e.used]
    if stale:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.ensure_newline()
            reporter.write_line("expected-failures.txt entries that match no test (remove them):", red=True)
            for test_id in stale:
                reporter.write_line(f"  {test_id}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
