"""What a voice session does after it loses its connection (protocol.md §3 and §7), sans-IO.

:class:`ReconnectPolicy` is given each failure and the time, and answers with a :class:`Decision`: the action,
the delay before it, and, when it gives up, the error to report. It never sleeps or touches a socket; the
session carries the decision out. Its counters are the "history" that keeps it from looping.

The table (``describe(code)`` in :mod:`cordvoice.voicegateway.closecodes` classifies close codes):

=============================================  ==========================================================
failure                                        decision
=============================================  ==========================================================
4015, 1000/1001/1006, other codes < 4000,      RESUME while the voice session is established: the first
no close frame, 3 missed heartbeat ACKs,       attempt at once, then jittered exponential backoff; after
handshake timeout                              ``max_resumes`` resumes that did not last, REJOIN.
                                               Before the session was ever established: IDENTIFY again
                                               (same credentials), counted like a rejoin.
4004, 4006, 4009, 4011, unknown codes >= 4000  REJOIN with jittered exponential backoff, at most
                                               ``max_rejoins`` times, then give up.
4001-4003, 4005 (client bugs)                  REJOIN once in the session's whole life, then give up.
4012, 4016, 4020, 4021                         give up (``DisconnectedError``).
4017                                           give up (``DaveRequiredError``, saying what is missing).
4014, 4022                                     WAIT_FOR_MOVE for ``move_wait`` s; no move: give up.
UDP socket failure                             REJOIN (a new socket needs a fresh Select Protocol).
main-gateway session lost                      REJOIN, the first one at once.
a rejoin that got no credentials in time       the next REJOIN, or give up when the budget is spent.
=============================================  ==========================================================

Kicks, leaves and moves are not failures: the session learns them from the main gateway and acts directly.

Counters reset only after a connection stayed ready for ``stable_after`` seconds, so a server that accepts
every attempt and drops it at once still exhausts the budget. The client-bug allowance never resets.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass

from cordvoice.errors import DaveRequiredError, DisconnectedError, InvalidArgumentError, VoiceError
from cordvoice.events import ReconnectAction
from cordvoice.voicegateway.closecodes import CloseAction, CloseCode, describe

__all__ = [
    "ConnectionEnd",
    "Decision",
    "EndKind",
    "ReconnectConfig",
    "ReconnectPolicy",
]


class EndKind(enum.Enum):
    """How a voice connection ended (or failed to start)."""

    CLOSED = "closed"
    """The server closed the WebSocket; ``code`` says with what (None: no close frame, like 1006)."""
    NETWORK = "network"
    """The WebSocket could not be opened, or dropped without a close frame."""
    ZOMBIE = "zombie"
    """Three heartbeats went unacknowledged; we closed the socket."""
    HANDSHAKE_TIMEOUT = "handshake_timeout"
    """The server did not complete Identify/Resume in time."""
    UDP_FAILED = "udp_failed"
    """The UDP socket failed or IP discovery got no answer."""
    GATEWAY_SESSION_LOST = "gateway_session_lost"
    """The main gateway started a new session: the voice session is invalid."""
    NO_CREDENTIALS = "no_credentials"
    """A rejoin's op 4 could not be sent, or got no usable VOICE_STATE/SERVER_UPDATE in time."""


@dataclass(frozen=True, slots=True)
class ConnectionEnd:
    """One failure, as the session saw it."""

    kind: EndKind
    code: int | None = None
    reason: str = ""
    established: bool = False
    """The voice session had completed Session Description (so it can be resumed)."""


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do next. ``action`` None means give up: report ``error`` and stop."""

    action: ReconnectAction | None
    delay: float
    attempt: int
    reason: str
    close_code: int | None = None
    error: VoiceError | None = None

    @property
    def gives_up(self) -> bool:
        return self.action is None


@dataclass(frozen=True, slots=True)
class ReconnectConfig:
    """Tuning of the reconnect policy; the defaults suit real Discord, tests shrink the waits."""

    max_resumes: int = 5
    """Consecutive resumes that did not last before falling back to a rejoin."""
    max_rejoins: int = 5
    """Fresh joins (and fresh identifies) before giving up."""
    backoff_base: float = 0.5
    """First backoff step in seconds; each further attempt doubles it, jittered down by up to half."""
    backoff_cap: float = 30.0
    move_wait: float = 5.0
    """After 4014/4022, how long to wait for Discord to announce a move before ending the session."""
    server_wait: float = 30.0
    """After ``endpoint: null``, how long to wait for the next voice server."""
    rejoin_timeout: float = 10.0
    """How long a rejoin waits for the main gateway's answer to its op 4."""
    stable_after: float = 60.0
    """A connection ready this long resets the resume and rejoin counters."""

    def __post_init__(self) -> None:
        waits = ("backoff_base", "backoff_cap", "move_wait", "server_wait", "rejoin_timeout", "stable_after")
        for name in waits:
            value = getattr(self, name)
            if not isinstance(value, int | float) or not value >= 0:  # NaN too
                raise InvalidArgumentError(f"ReconnectConfig.{name} must be a number >= 0, got {value!r}")
        if not self.rejoin_timeout > 0:  # no answer can come in no time: every rejoin would fail
            raise InvalidArgumentError("ReconnectConfig.rejoin_timeout must be > 0")
        for name in ("max_resumes", "max_rejoins"):
            # Counts compare against it: NaN never compared true, so the budget never ran out.
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise InvalidArgumentError(f"ReconnectConfig.{name} must be an integer >= 0, got {value!r}")


_RESUMABLE_KINDS = frozenset({EndKind.NETWORK, EndKind.ZOMBIE, EndKind.HANDSHAKE_TIMEOUT})


class ReconnectPolicy:
    """Decides recovery for one session; see the module docstring for the table."""

    def __init__(self, config: ReconnectConfig | None = None, *, rng: random.Random | None = None) -> None:
        self.config = config or ReconnectConfig()
        self._rng = rng or random.Random()
        self.resumes = 0
        """Consecutive resume attempts since the last stable connection."""
        self.rejoins = 0
        """Rejoin (and fresh identify) attempts since the last stable connection."""
        self.client_bug_rejoins = 0
        self._healthy_since: float | None = None

    # ---- history ---------------------------------------------------------------------------------

    def connection_ready(self, now: float) -> None:
        """A connection completed Session Description or Resumed; the stability clock starts."""
        self._healthy_since = now

    def connection_lost(self, now: float) -> None:
        """Reset the counters if the connection that just ended had been stable long enough."""
        since, self._healthy_since = self._healthy_since, None
        if since is not None and now - since >= self.config.stable_after:
            self.resumes = 0
            self.rejoins = 0

    # ---- decisions -------------------------------------------------------------------------------

    def decide(self, end: ConnectionEnd, now: float) -> Decision:
        """The decision for one failure; call once per failure, in order."""
        self.connection_lost(now)
        kind = end.kind
        if kind is EndKind.GATEWAY_SESSION_LOST:
            return self._rejoin(end, "the main gateway session was replaced", immediate=True)
        if kind is EndKind.UDP_FAILED:
            return self._rejoin(end, end.reason or "the UDP connection failed")
        if kind is EndKind.NO_CREDENTIALS:
            return self._rejoin(end, end.reason or "Discord did not answer the rejoin")
        if kind in _RESUMABLE_KINDS:
            return self._resume(end, end.reason or kind.value)
        info = describe(end.code)
        reason = end.reason or info.message
        if info.action is CloseAction.RESUME:
            return self._resume(end, reason)
        if info.action is CloseAction.FINAL_UNLESS_MOVED:
            return Decision(ReconnectAction.WAIT_FOR_MOVE, self.config.move_wait, 1, info.message, end.code)
        if info.action is CloseAction.FINAL:
            return self._give_up(end, info.message, dave=end.code == CloseCode.E2EE_REQUIRED)
        if info.client_bug:
            if self.client_bug_rejoins >= 1:
                return self._give_up(end, f"{info.message} It happened again after a rejoin; giving up.")
            self.client_bug_rejoins += 1
        return self._rejoin(end, info.message)

    def move_wait_expired(self, end: ConnectionEnd) -> Decision:
        """No move followed a 4014/4022 (or a null endpoint) in time: the session is over."""
        if end.code is None:
            message = "Discord removed the voice server and announced no new one in time."
        else:
            message = describe(end.code).message.split(" cordvoice ")[0]
        return self._give_up(end, message)

    # ---- internals -------------------------------------------------------------------------------

    def _resume(self, end: ConnectionEnd, reason: str) -> Decision:
        if not end.established:
            return self._rejoin(end, reason, action=ReconnectAction.IDENTIFY)
        if self.resumes >= self.config.max_resumes:
            self.resumes = 0
            return self._rejoin(end, f"{reason} ({self.config.max_resumes} resumes did not last)")
        self.resumes += 1
        delay = 0.0 if self.resumes == 1 else self._backoff(self.resumes - 1)
        return Decision(ReconnectAction.RESUME, delay, self.resumes, reason, end.code)

    def _rejoin(
        self,
        end: ConnectionEnd,
        reason: str,
        *,
        immediate: bool = False,
        action: ReconnectAction = ReconnectAction.REJOIN,
    ) -> Decision:
        if self.rejoins >= self.config.max_rejoins:
            return self._give_up(end, f"{reason} Gave up after {self.rejoins} attempts to connect again.")
        self.rejoins += 1
        delay = 0.0 if immediate and self.rejoins == 1 else self._backoff(self.rejoins)
        return Decision(action, delay, self.rejoins, reason, end.code)

    def _backoff(self, attempt: int) -> float:
        step: float = min(self.config.backoff_cap, self.config.backoff_base * 2.0 ** (attempt - 1))
        return step * self._rng.uniform(0.5, 1.0)

    def _give_up(self, end: ConnectionEnd, message: str, *, dave: bool = False) -> Decision:
        error: DisconnectedError
        if dave:
            error = DaveRequiredError(message, code=end.code, reason=end.reason)
        else:
            error = DisconnectedError(message, code=end.code, reason=end.reason)
        return Decision(None, 0.0, 0, message, end.code, error)
