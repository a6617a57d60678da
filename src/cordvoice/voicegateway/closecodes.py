"""What each voice gateway close code means and what the client should do next (protocol.md §3).

:func:`describe` is the single place the reconnect policy asks. It answers for a close the client did not
initiate; when cordvoice closed the socket itself, it already knows what it wanted.

Decisions where protocol.md leaves room:

* ``None`` (the connection dropped without a close frame: TCP reset, timeout) is treated like 1006: resume.
* 1000/1001 from the server are unexpected for a voice session, so they resume like 1006.
* Unknown codes below 4000 are transport-level (WebSocket or proxy) failures: resume, as for 1006.
* Unknown codes of 4000 and above are new application-level refusals: rejoin, so the reconnect policy's
  bounded fresh-join budget applies and a code Discord adds later can never cause an endless resume loop.
* Client-bug codes 4001-4003 and 4005 rejoin with ``client_bug=True``: the policy rejoins once, then gives up.
  4012, 4016 and 4020 are client bugs too but final (retrying sends the same wrong request).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["CloseAction", "CloseCode", "CloseInfo", "describe"]


class CloseCode(enum.IntEnum):
    """Close codes the voice gateway (and the WebSocket layer under it) is known to use."""

    NORMAL = 1000
    GOING_AWAY = 1001
    ABNORMAL = 1006
    UNKNOWN_OPCODE = 4001
    DECODE_ERROR = 4002
    NOT_AUTHENTICATED = 4003
    AUTHENTICATION_FAILED = 4004
    ALREADY_AUTHENTICATED = 4005
    SESSION_NO_LONGER_VALID = 4006
    SESSION_TIMEOUT = 4009
    SERVER_NOT_FOUND = 4011
    UNKNOWN_PROTOCOL = 4012
    DISCONNECTED = 4014
    VOICE_SERVER_CRASHED = 4015
    UNKNOWN_ENCRYPTION_MODE = 4016
    E2EE_REQUIRED = 4017
    BAD_REQUEST = 4020
    RATE_LIMITED = 4021
    CALL_TERMINATED = 4022


class CloseAction(enum.Enum):
    """What the client does after a close."""

    #: Reconnect to the same endpoint and send op 7 Resume; UDP, keys and DAVE state survive.
    RESUME = "resume"
    #: Start over: main gateway op 4, new token and session, fresh Identify.
    REJOIN = "rejoin"
    #: Stop; reconnecting would fail the same way or is not wanted.
    FINAL = "final"
    #: Stop, unless a VOICE_SERVER_UPDATE / VOICE_STATE_UPDATE shows a move: then connect fresh there.
    FINAL_UNLESS_MOVED = "final_unless_moved"


@dataclass(frozen=True, slots=True)
class CloseInfo:
    """The meaning of one close code; ``message`` is written for a person reading a log or an exception."""

    code: int | None
    name: str
    action: CloseAction
    client_bug: bool
    message: str


_RESUME = CloseAction.RESUME
_REJOIN = CloseAction.REJOIN
_FINAL = CloseAction.FINAL
_MOVED = CloseAction.FINAL_UNLESS_MOVED
_BUG_REPORT = "This is a bug in cordvoice; please report it with a debug log."

_TABLE: dict[CloseCode, tuple[CloseAction, bool, str]] = {
    CloseCode.NORMAL: (
        _RESUME,
        False,
        "The voice server closed the connection normally without being asked to; resuming.",
    ),
    CloseCode.GOING_AWAY: (
        _RESUME,
        False,
        "The voice server is going away (restart or deploy); resuming.",
    ),
    CloseCode.ABNORMAL: (
        _RESUME,
        False,
        "The connection to the voice server dropped without a close frame; resuming.",
    ),
    CloseCode.UNKNOWN_OPCODE: (
        _REJOIN,
        True,
        f"The voice server did not recognise an opcode we sent. {_BUG_REPORT}",
    ),
    CloseCode.DECODE_ERROR: (
        _REJOIN,
        True,
        f"The voice server could not decode a payload we sent. {_BUG_REPORT}",
    ),
    CloseCode.NOT_AUTHENTICATED: (
        _REJOIN,
        True,
        f"We sent a payload before Identify. {_BUG_REPORT}",
    ),
    CloseCode.AUTHENTICATION_FAILED: (
        _REJOIN,
        False,
        "The voice server rejected the token; joining again to get a new one. If this repeats, "
        "check that the bot's main gateway session is still alive.",
    ),
    CloseCode.ALREADY_AUTHENTICATED: (
        _REJOIN,
        True,
        f"We sent Identify twice on one connection. {_BUG_REPORT}",
    ),
    CloseCode.SESSION_NO_LONGER_VALID: (
        _REJOIN,
        False,
        "The voice session is no longer valid (it cannot be resumed); joining again.",
    ),
    CloseCode.SESSION_TIMEOUT: (
        _REJOIN,
        False,
        "The voice session timed out; joining again.",
    ),
    CloseCode.SERVER_NOT_FOUND: (
        _REJOIN,
        False,
        "The voice server for this session was not found; joining again to get a new one.",
    ),
    CloseCode.UNKNOWN_PROTOCOL: (
        _FINAL,
        True,
        f"The voice server rejected our Select Protocol (unknown protocol). {_BUG_REPORT}",
    ),
    CloseCode.DISCONNECTED: (
        _MOVED,
        False,
        "Disconnected from the voice channel (kicked, moved, channel deleted, or the bot's main "
        "gateway session ended). cordvoice follows a move if Discord announces one.",
    ),
    CloseCode.VOICE_SERVER_CRASHED: (
        _RESUME,
        False,
        "The voice server crashed; resuming.",
    ),
    CloseCode.UNKNOWN_ENCRYPTION_MODE: (
        _FINAL,
        True,
        f"The voice server rejected our transport encryption mode. {_BUG_REPORT}",
    ),
    CloseCode.E2EE_REQUIRED: (
        _FINAL,
        False,
        "This channel requires DAVE end-to-end encryption, but this connection was opened without "
        "it. Do not disable DAVE when joining; cordvoice will not retry by itself.",
    ),
    CloseCode.BAD_REQUEST: (
        _FINAL,
        True,
        f"The voice server rejected a malformed request. {_BUG_REPORT}",
    ),
    CloseCode.RATE_LIMITED: (
        _FINAL,
        False,
        "Disconnected for rate limiting: the bot joined or reconnected too often. Wait before "
        "joining again; cordvoice will not retry by itself.",
    ),
    CloseCode.CALL_TERMINATED: (
        _MOVED,
        False,
        "The call was terminated (channel deleted or voice server changed). cordvoice connects to "
        "the new server if Discord announces one.",
    ),
}

_KNOWN: dict[int, CloseInfo] = {
    int(code): CloseInfo(int(code), code.name, action, bug, message)
    for code, (action, bug, message) in _TABLE.items()
}

_NO_CLOSE_FRAME = CloseInfo(
    None,
    "NO_CLOSE_FRAME",
    _RESUME,
    False,
    "The connection to the voice server was lost without a close frame; resuming.",
)


def describe(code: int | None) -> CloseInfo:
    """Return what a close with ``code`` means; ``None`` means no close frame was received."""
    if code is None:
        return _NO_CLOSE_FRAME
    known = _KNOWN.get(code)
    if known is not None:
        return known
    if code < 4000:
        return CloseInfo(
            code,
            "UNKNOWN",
            _RESUME,
            False,
            f"The connection closed with transport-level code {code}; resuming.",
        )
    return CloseInfo(
        code,
        "UNKNOWN",
        _REJOIN,
        False,
        f"The voice server closed with code {code}, which cordvoice does not know; joining again. "
        "If this repeats, please report the code.",
    )
