"""The main gateway client's sans-IO core: payloads in, decisions and payloads out.

:class:`GatewayProtocol` holds one bot's gateway session (session id, sequence number, resume URL, heartbeat
ACKs and the socket's zlib stream) and decides what a message or a close code means. It opens no socket and
keeps no clock: the shell, :class:`~cordvoice.gateway.client.Client`, passes the time in.
"""

from __future__ import annotations

import enum
import json
import sys
import zlib
from dataclasses import dataclass
from typing import Any

from cordvoice.errors import GatewayError, ProtocolError
from cordvoice.gateway.events import parse_snowflake

__all__ = [
    "DEFAULT_INTENTS",
    "GATEWAY_VERSION",
    "MAX_MESSAGE_SIZE",
    "CloseVerdict",
    "Dispatch",
    "GatewayProtocol",
    "Hello",
    "Intents",
    "Signal",
]

GATEWAY_VERSION = 10
_ZLIB_SUFFIX = b"\x00\x00\xff\xff"
MAX_MESSAGE_SIZE = 64 * 1024 * 1024
"""The largest gateway message (after inflating) the client accepts."""
_MAX_HEARTBEAT_MS = 86_400_000  # a day; Discord asks for about 41 s


class Intents(enum.IntFlag):
    """Gateway intents cordvoice's client uses."""

    GUILDS = 1 << 0
    GUILD_VOICE_STATES = 1 << 7


DEFAULT_INTENTS = Intents.GUILDS | Intents.GUILD_VOICE_STATES

# Close codes after which reconnecting cannot help, with what to tell the user.
_FATAL_CLOSES = {
    4004: "Discord rejected the bot token (close 4004): check the token",
    4010: "Discord rejected the shard (close 4010)",
    4011: "the bot needs sharding (close 4011), which the standalone client does not do",
    4012: "Discord rejected the gateway API version (close 4012)",
    4013: "Discord rejected the intents (close 4013)",
    4014: "Discord refused a privileged intent (close 4014): enable it for the bot in the Developer Portal",
}
# Close codes after which the session cannot be resumed: identify again.
_SESSION_ENDING_CLOSES = frozenset({4007, 4009})


class Signal(enum.Enum):
    """Non-dispatch messages the shell must act on."""

    HEARTBEAT_REQUESTED = "heartbeat_requested"  # op 1 from the server: beat now
    HEARTBEAT_ACK = "heartbeat_ack"
    RECONNECT = "reconnect"  # op 7: close and resume
    INVALID_RESUMABLE = "invalid_resumable"  # op 9 true: close and resume
    INVALID = "invalid"  # op 9 false: session gone, identify again on this socket


@dataclass(frozen=True, slots=True)
class Hello:
    heartbeat_interval: float


@dataclass(frozen=True, slots=True)
class Dispatch:
    name: str
    data: Any


@dataclass(frozen=True, slots=True)
class CloseVerdict:
    """What follows a closed socket: ``fatal`` set means stop; else reconnect (resume when still possible)."""

    fatal: GatewayError | None
    session_lost: bool


class GatewayProtocol:
    """The client's session state and protocol decisions. No IO: callers pass payloads and the time."""

    def __init__(self, token: str, intents: int, *, compress: bool) -> None:
        self._token = token
        self.intents = intents
        self.compress = compress
        self.session_id: str | None = None
        self.seq: int | None = None
        self.resume_url: str | None = None
        self.user_id: int | None = None
        self.latency: float | None = None
        self._awaiting_ack = False
        self._hello_seen = False
        self._heartbeat_sent_at = 0.0
        self._inflater: Any = None
        self._buffer = bytearray()
        self.stream_broken = False
        """The zlib stream of this socket is unusable (corrupt or oversized message): reconnect."""

    def __repr__(self) -> str:  # the token must never reach a log line
        return f"<GatewayProtocol session={self.session_id is not None} seq={self.seq}>"

    @property
    def can_resume(self) -> bool:
        return self.session_id is not None and self.seq is not None

    def connect_url(self, gateway_url: str) -> str:
        """The URL to dial now: the resume URL when resuming, else the discovered gateway."""
        base = self.resume_url if self.can_resume and self.resume_url else gateway_url
        url = f"{base.rstrip('/')}/?v={GATEWAY_VERSION}&encoding=json"
        return url + "&compress=zlib-stream" if self.compress else url

    def connection_started(self) -> None:
        """A new socket: fresh zlib stream, no heartbeat outstanding."""
        self._inflater = zlib.decompressobj() if self.compress else None
        self._buffer.clear()
        self.stream_broken = False
        self._awaiting_ack = False
        self._hello_seen = False

    def decode(self, message: str | bytes) -> dict[str, Any] | None:
        """One WebSocket message to a payload; ``None`` while a zlib-stream message is incomplete."""
        if isinstance(message, bytes):
            if self._inflater is None:
                raise ProtocolError("binary gateway message without zlib-stream")
            self._buffer += message
            if len(self._buffer) > MAX_MESSAGE_SIZE:
                self._buffer.clear()
                self.stream_broken = True
                raise ProtocolError(f"compressed gateway message over {MAX_MESSAGE_SIZE} bytes")
            if not self._buffer.endswith(_ZLIB_SUFFIX):
                return None
            try:
                # Bounded: a small compressed message must not inflate into gigabytes.
                text: str | bytes = self._inflater.decompress(bytes(self._buffer), MAX_MESSAGE_SIZE + 1)
            except zlib.error as exc:
                self.stream_broken = True
                raise ProtocolError(f"corrupt zlib-stream data: {exc}") from None
            finally:
                self._buffer.clear()
            if len(text) > MAX_MESSAGE_SIZE:
                self.stream_broken = True
                raise ProtocolError(f"gateway message inflates to more than {MAX_MESSAGE_SIZE} bytes")
        else:
            text = message
        try:
            payload = json.loads(text)
        except (ValueError, UnicodeDecodeError):
            raise ProtocolError("gateway message is not JSON") from None
        except RecursionError:  # nesting deeper than the interpreter's stack: hostile, not a crash
            raise ProtocolError("gateway message is nested too deeply") from None
        if not isinstance(payload, dict) or not isinstance(payload.get("op"), int):
            raise ProtocolError("gateway message has no integer op")
        return payload

    def opening_payload(self) -> dict[str, Any]:
        """Resume when the session is resumable, else Identify."""
        if self.can_resume:
            return {"op": 6, "d": {"token": self._token, "session_id": self.session_id, "seq": self.seq}}
        return {
            "op": 2,
            "d": {
                "token": self._token,
                "intents": int(self.intents),
                "properties": {"os": sys.platform, "browser": "cordvoice", "device": "cordvoice"},
                "compress": False,
                "large_threshold": 50,
            },
        }

    def heartbeat(self, now: float) -> dict[str, Any] | None:
        """The next heartbeat, or ``None`` when the previous one was never acknowledged (zombie socket)."""
        if self._awaiting_ack:
            return None
        return self.forced_heartbeat(now)

    def forced_heartbeat(self, now: float) -> dict[str, Any]:
        """A heartbeat regardless of ACK state (the server asked for one with op 1)."""
        self._awaiting_ack = True
        self._heartbeat_sent_at = now
        return {"op": 1, "d": self.seq}

    def receive(self, payload: dict[str, Any], now: float) -> Hello | Dispatch | Signal | None:
        """Interpret one payload; tracks ``seq``, the session and heartbeat ACKs."""
        op = payload["op"]
        data = payload.get("d")
        seq = payload.get("s")
        if op == 0:
            if isinstance(seq, int) and not isinstance(seq, bool):
                self.seq = seq
            name = payload.get("t")
            if not isinstance(name, str):
                raise ProtocolError("dispatch without an event name")
            if name == "READY":
                self._ready(data)
            return Dispatch(name, data)
        if op == 10:
            interval = data.get("heartbeat_interval") if isinstance(data, dict) else None
            # NaN fails the comparison; the cap keeps out Infinity and integers too big for a float.
            if (
                not isinstance(interval, int | float)
                or isinstance(interval, bool)
                or not 0 < interval <= _MAX_HEARTBEAT_MS
            ):
                raise ProtocolError("Hello without a heartbeat_interval between 0 and a day")
            if self._hello_seen:  # acting on it would start a second heartbeat loop and a second Identify
                raise ProtocolError("a second Hello on one connection")
            self._hello_seen = True
            return Hello(interval / 1000)
        if op == 11:
            self._awaiting_ack = False
            self.latency = now - self._heartbeat_sent_at
            return Signal.HEARTBEAT_ACK
        if op == 1:
            return Signal.HEARTBEAT_REQUESTED
        if op == 7:
            return Signal.RECONNECT
        if op == 9:
            return Signal.INVALID_RESUMABLE if data is True else Signal.INVALID
        return None

    def _ready(self, data: object) -> None:
        if not isinstance(data, dict):
            raise ProtocolError("READY payload is not an object")
        session_id = data.get("session_id")
        user = data.get("user")
        if not isinstance(session_id, str) or not session_id or not isinstance(user, dict):
            raise ProtocolError("READY has no session_id or user")
        self.user_id = parse_snowflake(user.get("id"), "user.id")
        self.session_id = session_id
        resume_url = data.get("resume_gateway_url")
        self.resume_url = resume_url if isinstance(resume_url, str) and resume_url else None

    def forget_session(self) -> bool:
        """Drop the session (it cannot be resumed); returns whether there was one."""
        had = self.session_id is not None
        self.session_id = None
        self.seq = None
        self.resume_url = None
        return had

    def connection_closed(self, code: int | None) -> CloseVerdict:
        """Decide what a close code means for the session."""
        if code in _FATAL_CLOSES:
            lost = self.forget_session()
            return CloseVerdict(GatewayError(_FATAL_CLOSES[code]), lost)
        if code in _SESSION_ENDING_CLOSES:
            return CloseVerdict(None, self.forget_session())
        return CloseVerdict(None, False)
