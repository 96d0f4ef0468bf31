"""Shared pytest configuration and fixtures for the tenso-ray suite."""

from __future__ import annotations

import os
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import tensohelp  # noqa: E402

try:
    from hypothesis import HealthCheck, settings

    settings.register_profile(
        "tenso",
        database=None,  # no .hypothesis/ directory in the tree
        deadline=None,  # no timing assertions anywhere
        max_examples=int(os.environ.get("TENSO_HYPOTHESIS_EXAMPLES", "60")),
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        print_blob=True,
    )
    settings.load_profile("tenso")
except ImportError:  # pragma: no cover - hypothesis is a test dependency
    pass


def pytest_sessionstart(session):
    if os.environ.get("TENSO_RAY_REQUIRE_INSTALLED"):
        import tenso

        path = pathlib.Path(tenso.__file__).resolve()
        src = (tensohelp.ROOT / "tenso_ray").resolve()
        assert src not in path.parents, f"`import tenso` resolved to the source tree ({path}), not the installed wheel"
        assert "site-packages" in path.parts, f"`import tenso` resolved to {path}, not site-packages"


@pytest.fixture(params=tensohelp.TRANSPORTS)
def transport(request, tmp_path):
    """A function wrapping packet bytes in one buffer type (bytes, bytearray, memoryview, np.uint8 array, mmap)."""
    kind = request.param

    def wrap(data: bytes):
        return tensohelp.to_transport(kind, data, tmp_path)

    wrap.kind = kind
    return wrap


@pytest.fixture(scope="session")
def tenso_mod():
    import tenso

    return tenso


@pytest.fixture(scope="session")
def errors():
    from tenso import errors

    return errors
