"""The connection handshake: every connection a registered process opens or accepts (on comms that deserialize)
advertises ``{pool, peer token}``; a forwarding scheduler advertises on the connections it opens to workers."""

from __future__ import annotations

import sys
from typing import Any

from distributed.comm.core import Comm

from . import state
from .state import HANDSHAKE_KEY

_orig_handshake: Any = None


def _handshake_info(self: Any) -> dict[str, Any]:
    info: dict[str, Any] = _orig_handshake(self)
    st = state._state
    if st is None:
        return info
    if getattr(self, "deserialize", True):
        info[HANDSHAKE_KEY] = {"pool": st.pool_name, "peer": st.token}
    elif state._forwarding and _opened_here():
        # The scheduler forwards data undecoded. On the connections it opens itself (to workers: get_data for a
        # gather, run for a broadcast) every reply is consumed by the handler that asked and forwarded at once,
        # and that handler hands a lease only to a proven same-host requester (see _forward_or_materialize).
        # Connections that clients open to it (scatter, queues, variables: data the scheduler may keep for
        # longer than a claim timeout) never advertise.
        info[HANDSHAKE_KEY] = {"pool": st.pool_name, "peer": st.token, "fwd": True}
    return info


def _opened_here() -> bool:
    # True when the handshake is being built by distributed.comm.core.connect (an outgoing connection), not by a
    # listener accepting one. Anything else (a future distributed that renames it) advertises nothing: frames.
    frame = sys._getframe(2)
    return frame.f_code.co_name == "connect" and frame.f_globals.get("__name__") == "distributed.comm.core"


def _install_handshake() -> None:
    global _orig_handshake
    current = Comm.__dict__.get("handshake_info")
    if current is _handshake_info:
        return
    _orig_handshake = current
    Comm.handshake_info = _handshake_info  # type: ignore[method-assign]


def _uninstall_handshake() -> None:
    global _orig_handshake
    if Comm.__dict__.get("handshake_info") is _handshake_info and _orig_handshake is not None:
        Comm.handshake_info = _orig_handshake  # type: ignore[method-assign]
    _orig_handshake = None

