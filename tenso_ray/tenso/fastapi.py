"""FastAPI integration: stream tensors out of endpoints and read them from requests.

Requires FastAPI (``pip install 'tenso-ray[fastapi]'``); importing this module
without it raises ImportError naming that extra. ``import tenso`` never
imports FastAPI.

Examples
--------
::

    from fastapi import Depends, FastAPI
    from tenso.fastapi import TensoResponse, get_tenso_data

    app = FastAPI()

    @app.post("/double")
    async def double(x=Depends(get_tenso_data)):
        return TensoResponse(x * 2)
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Optional, Union

try:
    from fastapi import HTTPException, Request
    from fastapi.responses import StreamingResponse
    from starlette.requests import ClientDisconnect
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "tenso.fastapi requires FastAPI; install it with: pip install 'tenso-ray[fastapi]'"
    ) from exc

from .core import _parts, loads
from .errors import TensoError

__all__ = ["TensoResponse", "get_tenso_data", "MEDIA_TYPE"]

#: Content type of tenso packets over HTTP (the one the reference package uses).
MEDIA_TYPE = "application/octet-stream"


async def _iterate(parts: list[Union[bytes, memoryview]]) -> AsyncIterator[Union[bytes, memoryview]]:
    # The parts already exist; an async generator hands them to the server
    # without the thread-pool hop Starlette uses for synchronous iterators.
    for part in parts:
        yield part


class TensoResponse(StreamingResponse):
    """A streaming response whose body is one tenso packet.

    The packet is sent as its parts (header bytes, then each array body as a
    view of the array), so a large tensor is not copied into a packet first.
    ``Content-Length`` is set from the parts, along with ``X-Tenso-Version``
    and, for objects that have them, ``X-Tenso-Shape`` and ``X-Tenso-Dtype``.

    Parameters
    ----------
    tensor : Any
        Any object :func:`tenso.dumps` accepts. Arrays must not be modified
        until the response has been sent.
    filename : str, optional
        If given, sent as ``Content-Disposition: attachment; filename="..."``.
    strict : bool, default False
        If True, refuse arrays that are not C-contiguous.
    check_integrity : bool, default False
        If True, the packet carries an XXH3-64 footer.
    **kwargs
        Passed to :class:`starlette.responses.StreamingResponse` (``status_code``,
        ``headers``, ``background``, or a different ``media_type``).

    Raises
    ------
    TypeError, ValueError
        As for :func:`tenso.dumps`, when the response is built.
    """

    def __init__(
        self,
        tensor: Any,
        filename: Optional[str] = None,
        strict: bool = False,
        check_integrity: bool = False,
        **kwargs: Any,
    ) -> None:
        parts = _parts(tensor, strict, check_integrity, 4)
        kwargs.setdefault("media_type", MEDIA_TYPE)
        super().__init__(_iterate(parts), **kwargs)
        self.headers["Content-Length"] = str(sum(len(p) for p in parts))
        self.headers["X-Tenso-Version"] = "4"
        shape = getattr(tensor, "shape", None)
        if shape is not None:
            self.headers["X-Tenso-Shape"] = str(tuple(shape))
        dtype = getattr(tensor, "dtype", None)
        if dtype is not None:
            self.headers["X-Tenso-Dtype"] = str(dtype)
        if filename:
            safe = filename.replace("\\", "\\\\").replace('"', '\\"')
            self.headers["Content-Disposition"] = f'attachment; filename="{safe}"'


async def get_tenso_data(request: Request) -> Any:
    """FastAPI dependency that decodes the request body as one tenso packet.

    Parameters
    ----------
    request : fastapi.Request
        The incoming request; its ``Content-Type`` must be
        ``application/octet-stream`` (parameters such as ``; charset=`` are ignored).

    Returns
    -------
    Any
        The decoded object, with writeable arrays that own their memory (the
        request body is not kept alive).

    Raises
    ------
    fastapi.HTTPException
        400 if the content type is missing or different (as the reference
        package does), or if the client disconnects before sending the whole
        body (as FastAPI's own body parsing does: an aborted upload is the
        client's error, so nothing is logged as a server exception); 422 if
        the body is not a valid packet (malformed, truncated or failing its
        integrity check).
    """
    content_type = request.headers.get("content-type", "")
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type != MEDIA_TYPE:
        raise HTTPException(status_code=400, detail=f"Expected {MEDIA_TYPE} content type.")
    try:
        body = await request.body()
    except ClientDisconnect as exc:
        raise HTTPException(
            status_code=400, detail="Client disconnected before the request body was complete."
        ) from exc
    try:
        return loads(body, copy=True)
    except (TensoError, ValueError, EOFError) as exc:
        raise HTTPException(status_code=422, detail=f"Invalid Tenso packet: {exc}") from exc
