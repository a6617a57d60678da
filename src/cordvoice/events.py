"""What a :class:`~cordvoice.session.Session` tells its observers, as frozen dataclasses.

Subscribe with ``session.on(EventType, handler)`` (sync or async handler; returns an unsubscribe callable) or
wait once with ``await session.wait_for(EventType, check=..., timeout=...)``. Every event carries the guild id
so one handler can serve several sessions.

Order of a normal life: :class:`ReadyEvent` (joined), then any of the others, then exactly one
:class:`DisconnectedEvent`. A resume is :class:`ReconnectingEvent` then :class:`ResumedEvent`; a rejoin or a
server move is :class:`ReconnectingEvent` (or :class:`MovedEvent`) then a new :class:`ReadyEvent`.
"""

from __future__ import annotations

import contextlib
import enum
import inspect
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeAlias, TypeVar

from cordvoice.errors import InvalidArgumentError, VoiceError

__all__ = [
    "ClientConnectEvent",
    "ClientDisconnectEvent",
    "DaveEpochEvent",
    "DisconnectedEvent",
    "EventHub",
    "MovedEvent",
    "ReadyEvent",
    "ReconnectAction",
    "ReconnectingEvent",
    "ResumedEvent",
    "SessionEvent",
    "SpeakingEvent",
]


@dataclass(frozen=True, slots=True)
class SessionEvent:
    """Base class of every session event."""

    guild_id: int


@dataclass(frozen=True, slots=True)
class ReadyEvent(SessionEvent):
    """A fresh voice connection is ready to send: after the join, a rejoin or a server move."""

    channel_id: int
    endpoint: str
    ssrc: int
    mode: str
    dave_protocol_version: int


@dataclass(frozen=True, slots=True)
class ResumedEvent(SessionEvent):
    """The voice WebSocket came back with op 9; UDP, SSRC, keys and DAVE state were kept."""

    attempt: int


class ReconnectAction(enum.Enum):
    """What the session does about a lost connection."""

    RESUME = "resume"
    """Reconnect the WebSocket to the same server and send op 7; media keeps flowing meanwhile."""
    IDENTIFY = "identify"
    """Open a fresh voice connection with the credentials already held (the first one never got ready)."""
    REJOIN = "rejoin"
    """Ask the main gateway again (op 4) for new credentials, then a fresh voice connection."""
    WAIT_FOR_MOVE = "wait_for_move"
    """The server said "disconnected" (4014/4022): wait briefly for Discord to announce a move."""
    WAIT_FOR_SERVER = "wait_for_server"
    """Discord announced ``endpoint: null``: wait for the next voice server."""


@dataclass(frozen=True, slots=True)
class ReconnectingEvent(SessionEvent):
    """The connection was lost and the session is recovering; ``delay`` seconds pass before the attempt."""

    action: ReconnectAction
    attempt: int
    delay: float
    close_code: int | None
    reason: str


@dataclass(frozen=True, slots=True)
class MovedEvent(SessionEvent):
    """Discord moved the session (another channel or another voice server); a fresh connection follows."""

    previous_channel_id: int
    channel_id: int
    previous_endpoint: str | None
    endpoint: str


@dataclass(frozen=True, slots=True)
class DisconnectedEvent(SessionEvent):
    """The session ended for good; sent exactly once. ``error`` is None for a leave the bot asked for."""

    reason: str
    close_code: int | None
    error: VoiceError | None


@dataclass(frozen=True, slots=True)
class SpeakingEvent(SessionEvent):
    """Another member's op 5: ``ssrc`` now belongs to ``user_id`` (flags 0: stopped speaking)."""

    user_id: int
    ssrc: int
    flags: int


@dataclass(frozen=True, slots=True)
class ClientConnectEvent(SessionEvent):
    """Op 11: these users are in the call."""

    user_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ClientDisconnectEvent(SessionEvent):
    """Op 13: this user left the call."""

    user_id: int


@dataclass(frozen=True, slots=True)
class DaveEpochEvent(SessionEvent):
    """The DAVE group changed; ``epoch`` None means no usable group (yet, or any more)."""

    epoch: int | None
    privacy_code: str | None


E = TypeVar("E", bound=SessionEvent)
Handler: TypeAlias = Callable[[Any], "Awaitable[None] | None"]
Spawn: TypeAlias = Callable[[Awaitable[None], str], object]

logger = logging.getLogger(__name__)


def check_snowflake(name: str, value: object) -> None:
    """Raise InvalidArgumentError unless ``value`` is a Discord id: an int (not a bool) in 1..2**64-1."""
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 1 << 64:
        raise InvalidArgumentError(f"{name} must be a positive integer snowflake, got {value!r}")


def check_event_type(event_type: object) -> None:
    """Raise InvalidArgumentError unless ``event_type`` is a :class:`SessionEvent` class."""
    if not (isinstance(event_type, type) and issubclass(event_type, SessionEvent)):
        raise InvalidArgumentError(f"{event_type!r} is not a cordvoice session event type")


class EventHub:
    """Subscribers of one event source. Handlers registered for a class also get its subclasses' events.

    Sync handlers run inline; an awaitable result is handed to ``spawn`` (the owner runs it as a tracked
    task and logs its exception). A handler that raises is logged and skipped: one bad handler never stops
    the others or the session.
    """

    def __init__(self, spawn: Spawn) -> None:
        self._spawn = spawn
        self._handlers: dict[type[SessionEvent], list[Handler]] = {}

    def on(self, event_type: type[E], handler: Callable[[E], Awaitable[None] | None]) -> Callable[[], None]:
        """Subscribe ``handler`` to ``event_type``; returns a callable that unsubscribes it."""
        check_event_type(event_type)
        if not callable(handler):
            raise InvalidArgumentError(f"an event handler must be callable, got {handler!r:.60}")
        handlers = self._handlers.setdefault(event_type, [])
        handlers.append(handler)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                handlers.remove(handler)

        return unsubscribe

    def emit(self, event: SessionEvent) -> None:
        handlers: list[Handler] = []
        for cls in type(event).__mro__:
            handlers.extend(self._handlers.get(cls, ()))
        for handler in handlers:
            try:
                result = handler(event)
            except Exception:
                logger.exception("a %s handler failed", type(event).__name__)
                continue
            if inspect.isawaitable(result):
                self._spawn(result, f"cordvoice-event-{type(event).__name__}")
