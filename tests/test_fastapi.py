"""FastAPI integration over a real uvicorn server on 127.0.0.1 and a real httpx client."""

from __future__ import annotations

import logging
import socket
import threading
import time

import numpy as np
import pytest

import tensohelp

pytestmark = pytest.mark.server

fastapi = pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
tenso = pytest.importorskip("tenso")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Records(logging.Handler):
    """Keeps every record uvicorn logs, so a test can assert the server logged no exception."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture(scope="module")
def server_state():
    """What the server saw: uvicorn's log records and, per finished request, (path, status sent, exception)."""
    return {"log": _Records(), "done": []}


@pytest.fixture(scope="module")
def server(server_state):
    from fastapi import Depends, FastAPI
    from tenso.fastapi import TensoResponse, get_tenso_data

    app = FastAPI()

    @app.post("/echo")
    async def echo(data=Depends(get_tenso_data)):
        return TensoResponse(data)

    @app.post("/double")
    async def double(data=Depends(get_tenso_data)):
        return TensoResponse(np.asarray(data) * 2, check_integrity=True, filename="double.tenso")

    @app.get("/ones/{n}")
    async def ones(n: int):
        return TensoResponse(np.ones(n, dtype=np.float32))

    async def recorded(scope, receive, send):
        # A pure ASGI wrapper (no middleware semantics of its own): records the status the app sent and whatever
        # the app let escape, which is what uvicorn would log as "Exception in ASGI application".
        status = []

        async def send_recorded(message):
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        try:
            await app(scope, receive, send_recorded)
        except BaseException as exc:
            server_state["done"].append((scope.get("path"), status[:1], exc))
            raise
        server_state["done"].append((scope.get("path"), status[:1], None))

    port = _free_port()
    config = uvicorn.Config(recorded, host="127.0.0.1", port=port, log_level="warning", lifespan="off",
                            interface="asgi3")
    # Config() has just applied uvicorn's logging setup; attach after it so the handler stays.
    uv_logger = logging.getLogger("uvicorn")
    uv_logger.addHandler(server_state["log"])
    srv = uvicorn.Server(config)
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        if time.monotonic() > deadline or not th.is_alive():
            srv.should_exit = True
            pytest.fail("uvicorn did not start")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    th.join(30)
    uv_logger.removeHandler(server_state["log"])
    assert not th.is_alive()


HEADERS = {"content-type": "application/octet-stream"}


def test_echo_dense(server):
    arr = np.arange(24, dtype=np.float64).reshape(4, 6)
    with httpx.Client(timeout=30) as c:
        r = c.post(server + "/echo", content=bytes(tenso.dumps(arr)), headers=HEADERS)
    assert r.status_code == 200, r.text
    tensohelp.assert_dense_equal(tenso.loads(r.content), arr)


def test_echo_large_and_bundle(server):
    big = np.random.default_rng(1).standard_normal((512, 512)).astype(np.float32)
    with httpx.Client(timeout=60) as c:
        r = c.post(server + "/echo", content=bytes(tenso.dumps(big, check_integrity=True)), headers=HEADERS)
        assert r.status_code == 200
        tensohelp.assert_dense_equal(tenso.loads(r.content), big)
        r2 = c.post(server + "/double", content=bytes(tenso.dumps(np.arange(5))), headers=HEADERS)
        assert r2.status_code == 200
        assert tenso.loads(r2.content).tolist() == [0, 2, 4, 6, 8]
        assert bytes(r2.content)[5] & 0x02  # integrity requested on the response
        assert "double.tenso" in r2.headers.get("content-disposition", "")


def test_get_response(server):
    with httpx.Client(timeout=30) as c:
        r = c.get(server + "/ones/7")
    assert r.status_code == 200
    assert tenso.loads(r.content).tolist() == [1.0] * 7


def test_compressed_body_accepted(server):
    # HTTP gives external framing, so a top-level compressed packet is fine here
    arr = np.zeros(10_000)
    with httpx.Client(timeout=30) as c:
        r = c.post(server + "/echo", content=bytes(tenso.dumps(arr, compress=True)), headers=HEADERS)
    assert r.status_code == 200
    tensohelp.assert_dense_equal(tenso.loads(r.content), arr)


@pytest.mark.parametrize("body", [b"", b"not a tenso packet", b"TNSO\x04\x01\x00\x01\x01\x00\x03\x00",
                                  b"TNSO\x09" + b"\x00" * 60])
def test_invalid_body_is_rejected(server, body):
    # Seed (0.19.4) and 0.24.0 answer 422 for a body that is not a valid packet; 400 is for a wrong content type.
    with httpx.Client(timeout=30) as c:
        r = c.post(server + "/echo", content=body, headers=HEADERS)
    assert r.status_code == 422, (r.status_code, r.text)
    assert "Invalid Tenso packet" in r.json()["detail"]


def test_integrity_failure_is_rejected(server):
    pkt = bytearray(tenso.dumps(np.arange(10), check_integrity=True))
    pkt[64] ^= 1
    with httpx.Client(timeout=30) as c:
        r = c.post(server + "/echo", content=bytes(pkt), headers=HEADERS)
    assert r.status_code == 422


def test_wrong_content_type_is_400(server):
    with httpx.Client(timeout=30) as c:
        r = c.post(server + "/echo", content=bytes(tenso.dumps(np.arange(3))), headers={"content-type": "text/plain"})
        r2 = c.post(server + "/echo", content=bytes(tenso.dumps(np.arange(3))),
                    headers={"content-type": "application/octet-stream; charset=binary"})
    assert r.status_code == 400
    assert r2.status_code == 200 and tenso.loads(r2.content).tolist() == [0, 1, 2]


def test_async_client(server):
    import asyncio

    async def main():
        async with httpx.AsyncClient(timeout=30) as c:
            rs = await asyncio.gather(*[
                c.post(server + "/echo", content=bytes(tenso.dumps(np.full(3, i))), headers=HEADERS)
                for i in range(8)
            ])
        return [tenso.loads(r.content).tolist() for r in rs]

    assert asyncio.run(main()) == [[i] * 3 for i in range(8)]


def test_aborted_upload_is_a_clean_400(server, server_state):
    """Issue 9 part 5: a client that sends 32 KiB of a declared 64 KiB body and closes gets the 400 FastAPI's own
    body parsing gives (ClientDisconnect does not escape), the server logs no exception and serves the next request."""
    host, port = server.removeprefix("http://").split(":")
    packet = bytes(tenso.dumps(np.zeros(64 * 1024 // 8 - 8)))
    assert len(packet) == 64 * 1024
    done_before = len(server_state["done"])
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: %s\r\nContent-Type: application/octet-stream\r\n"
                  b"Content-Length: %d\r\n\r\n" % (host.encode(), len(packet)))
        s.sendall(packet[: 32 * 1024])
    deadline = time.monotonic() + 30
    while len(server_state["done"]) == done_before:
        assert time.monotonic() < deadline, "the server never finished the aborted request"
        time.sleep(0.02)
    path, status, exc = server_state["done"][done_before]
    assert (path, status, exc) == ("/echo", [400], None), (path, status, exc)
    # The server is healthy: the next request on a new connection is answered.
    arr = np.arange(10, dtype=np.int32)
    with httpx.Client(timeout=30) as c:
        r = c.post(server + "/echo", content=bytes(tenso.dumps(arr)), headers=HEADERS)
    assert r.status_code == 200
    tensohelp.assert_dense_equal(tenso.loads(r.content), arr)
    logged = [rec.getMessage() for rec in server_state["log"].records if rec.levelno >= logging.WARNING]
    assert not [m for m in logged if "Exception in ASGI application" in m], logged
    assert not logged, logged
