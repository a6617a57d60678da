"""``Voice``: one per bot. It joins channels, keeps one :class:`~cordvoice.session.Session` per guild, and
routes the main gateway's voice events (through a :class:`~cordvoice.gateway.adapter.VoiceAdapter`) to them.

::

    voice = Voice(client)                      # a cordvoice.gateway.Client, or any VoiceAdapter
    session = await voice.join_channel(guild_id, channel_id)
    await session.write(opus_frame)            # one 20 ms frame per call, paced by the shared clock
    await session.stop_speaking()
    await voice.leave(guild_id)
    await voice.close()

With discord.py, use ``await channel.connect(cls=cordvoice.discordpy.VoiceClient)`` or
``Voice.from_discordpy(client)``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import ssl as ssl_module
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

from cordvoice.errors import (
    DisconnectedError,
    GatewayError,
    InvalidArgumentError,
    JoinTimeoutError,
    VoiceError,
)
from cordvoice.events import SessionEvent, check_snowflake
from cordvoice.gateway.adapter import VoiceAdapter
from cordvoice.gateway.events import VoiceServerUpdate, VoiceStateUpdate
from cordvoice.reconnect import ReconnectConfig
from cordvoice.session import Session, SessionConfig, SessionState
from cordvoice.udp.connection import DialFunc

if TYPE_CHECKING:
    import discord

__all__ = ["Voice"]

logger = logging.getLogger(__name__)


class Voice:
    """A bot's voice: one per bot (per main-gateway connection).

    ``ssl``: ``True`` (default) dials ``wss://`` with verified TLS; an ``ssl.SSLContext`` trusts what it
    trusts (an emulator's CA); ``False`` dials plain ``ws://`` (only for a local emulator). ``dial`` supplies
    UDP sockets (the seed's ``udp.DialFunc``). ``dave=False`` offers no DAVE (stage channels only: DAVE
    channels refuse it with 4017). ``queue_frames`` bounds :meth:`Session.write`'s queue.
    """

    def __init__(
        self,
        adapter: VoiceAdapter,
        *,
        ssl: ssl_module.SSLContext | bool = True,
        dial: DialFunc | None = None,
        dave: bool = True,
        queue_frames: int = 5,
        reconnect: ReconnectConfig | None = None,
        join_timeout: float = 30.0,
        open_timeout: float = 10.0,
        handshake_timeout: float = 10.0,
        discovery_timeout: float = 5.0,
        idle_grace: float = 0.2,
    ) -> None:
        # By the class: reading an instance's user_id may raise before login (isinstance would read it).
        if not all(
            callable(getattr(type(adapter), name, None)) for name in ("set_listener", "update_voice_state")
        ):
            raise InvalidArgumentError(
                f"Voice takes a VoiceAdapter (cordvoice.gateway.Client or your own), not a "
                f"{type(adapter).__name__}; with discord.py use Voice.from_discordpy(client) or "
                "channel.connect(cls=cordvoice.discordpy.VoiceClient)"
            )
        if not isinstance(ssl, bool | ssl_module.SSLContext):
            raise InvalidArgumentError("ssl must be True, False or an ssl.SSLContext")
        # Checked here: each failed only inside a session (its first reconnect, its UDP socket), far away.
        if not isinstance(dave, bool):
            raise InvalidArgumentError(f"dave must be True or False, got {dave!r}")
        if reconnect is not None and not isinstance(reconnect, ReconnectConfig):
            raise InvalidArgumentError(f"reconnect must be a ReconnectConfig, got {type(reconnect).__name__}")
        if dial is not None and not callable(dial):
            raise InvalidArgumentError(f"dial must be an async function (host, port) -> socket, got {dial!r}")
        if not isinstance(queue_frames, int) or isinstance(queue_frames, bool) or queue_frames < 1:
            raise InvalidArgumentError(f"queue_frames must be an integer of at least 1, got {queue_frames!r}")
        timeouts = {
            "join_timeout": join_timeout,
            "open_timeout": open_timeout,
            "handshake_timeout": handshake_timeout,
            "discovery_timeout": discovery_timeout,
        }
        for name, seconds in timeouts.items():
            # A zero, negative or NaN wait would fail every attempt and end as a misleading join timeout.
            if not _is_number(seconds) or not 0 < seconds < math.inf:
                raise InvalidArgumentError(f"{name} must be a positive number of seconds, got {seconds!r}")
        if not _is_number(idle_grace) or not 0 <= idle_grace < math.inf:
            raise InvalidArgumentError(f"idle_grace must be a number of seconds >= 0, got {idle_grace!r}")
        self._adapter = adapter
        self.join_timeout = join_timeout
        self._config = SessionConfig(
            ssl=ssl,
            dial=dial,
            dave=dave,
            queue_frames=queue_frames,
            reconnect=reconnect or ReconnectConfig(),
            open_timeout=open_timeout,
            handshake_timeout=handshake_timeout,
            discovery_timeout=discovery_timeout,
            idle_grace=idle_grace,
        )
        self._sessions: dict[int, Session] = {}
        self._joins: dict[int, asyncio.Lock] = {}
        self._leaving: dict[int, Session] = {}
        """Sessions that leave() is disconnecting, until their op 4 (channel null) is out."""
        self._closed = False
        self.listener_errors = 0
        adapter.set_listener(self)

    @classmethod
    def from_discordpy(cls, client: discord.Client, **kwargs: Any) -> Voice:
        """The one ``Voice`` of a discord.py client (created on first use with ``kwargs``)."""
        from cordvoice.discordpy import voice_for  # noqa: PLC0415 - discord.py is optional

        return voice_for(client, **kwargs)

    def __repr__(self) -> str:
        return f"<cordvoice.Voice sessions={sorted(self._sessions)}>"

    # ---- public API ------------------------------------------------------------------------------

    @property
    def adapter(self) -> VoiceAdapter:
        return self._adapter

    @property
    def sessions(self) -> dict[int, Session]:
        """Live sessions by guild id (a copy)."""
        return dict(self._sessions)

    def session(self, guild_id: int) -> Session | None:
        return self._sessions.get(guild_id)

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has begun: joins are refused from then on."""
        return self._closed

    async def join_channel(
        self,
        guild_id: int,
        channel_id: int,
        *,
        self_mute: bool = False,
        self_deaf: bool = False,
        timeout: float | None = None,  # noqa: ASYNC109 - the join's own deadline, as the seed names it
    ) -> Session:
        """Join (or move to) ``channel_id`` and return the guild's ready :class:`Session`.

        Raises :class:`~cordvoice.errors.JoinTimeoutError` when Discord does not answer in ``timeout`` seconds
        (default: the Voice's ``join_timeout``), :class:`~cordvoice.errors.DaveRequiredError` when the channel
        demands DAVE this client cannot offer, and another :class:`~cordvoice.errors.VoiceError` when the join
        fails for good. A failed join leaves nothing behind.
        """
        self._check_open()
        self._check_loop()
        check_snowflake("guild_id", guild_id)
        check_snowflake("channel_id", channel_id)
        wait = self.join_timeout if timeout is None else timeout
        if not _is_number(wait) or not 0 < wait < math.inf:
            raise InvalidArgumentError(f"timeout must be a positive number of seconds, got {timeout!r}")
        lock = self._joins.setdefault(guild_id, asyncio.Lock())
        async with lock:
            self._check_open()  # close() may have run while this join waited for the lock
            leaving = self._leaving.get(guild_id)
            if leaving is not None:
                # Discord applies op 4s in order: our join must not overtake the leave's channel null.
                await leaving.wait_closed()
            existing = self._sessions.get(guild_id)
            if existing is not None and existing.ending:  # returns at once if already closed
                # It ended on its own and may still be leaving the channel: let its op 4 go out first,
                # then join afresh (a move on a session that is going away would fail).
                await existing.wait_closed()
            if existing is not None and not existing.closed:
                return await self._move(existing, channel_id, self_mute, self_deaf, wait)
            return await self._join(guild_id, channel_id, self_mute, self_deaf, wait)

    async def leave(self, guild_id: int) -> None:
        """Leave the guild's voice channel (no-op when not connected); also ends a join in progress."""
        # Not under the join lock: a leave must not wait for a join that may hang until its timeout, nor
        # deadlock with a DisconnectedEvent handler that joins again. Joins wait for self._leaving instead.
        check_snowflake("guild_id", guild_id)  # a str id would be a silent no-op, the bot left in the channel
        self._check_loop()
        session = self._sessions.pop(guild_id, None)
        if session is not None:
            self._leaving[guild_id] = session
            await session.disconnect()

    async def close(self) -> None:
        """Leave every channel and stop listening to the adapter."""
        self._check_loop()
        self._closed = True
        # Leaves already under way too: once close() returns, the bot may close its gateway, and a leave whose
        # op 4 has not gone out by then would leave the bot in the channel on Discord.
        sessions = [*self._sessions.values(), *self._leaving.values()]
        self._sessions.clear()
        await asyncio.gather(*(s.disconnect() for s in sessions), return_exceptions=True)
        self._adapter.set_listener(None)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # ---- joining ---------------------------------------------------------------------------------

    async def _join(
        self, guild_id: int, channel_id: int, self_mute: bool, self_deaf: bool, wait: float
    ) -> Session:
        try:
            user_id = self._adapter.user_id
        except GatewayError:
            raise
        except Exception as exc:
            raise GatewayError(f"the adapter does not know the bot's user id yet: {exc}") from exc
        session = Session(
            self._adapter,
            guild_id=guild_id,
            channel_id=channel_id,
            user_id=user_id,
            self_mute=self_mute,
            self_deaf=self_deaf,
            config=self._config,
            on_closed=self._session_closed,
        )
        self._sessions[guild_id] = session
        session.start()
        sent = False
        try:
            async with asyncio.timeout(wait):
                await self._adapter.update_voice_state(
                    guild_id, channel_id, self_mute=self_mute, self_deaf=self_deaf
                )
                sent = True
                await session.wait_ready()
        except TimeoutError:
            session._never_asked = not sent
            await self._abandon(session)
            failure = session.last_failure
            if not sent:
                # Discord was never asked: blaming the channel would send the user the wrong way.
                hint = (
                    "the join request (op 4) was not sent yet: the main gateway was not connected, or other "
                    "joins and leaves filled its send limit (Discord allows 120 payloads a minute)"
                )
            elif failure is not None:
                hint = f"every voice connection failed, the last one with: {failure}"
            else:
                hint = "check that the channel exists, is not full, and that the bot may connect to it"
            joining = f"joining voice channel {channel_id} in guild {guild_id}"
            raise JoinTimeoutError(f"{joining} took longer than {wait:.1f} s: {hint}") from None
        except BaseException:
            await self._abandon(session)
            raise
        return session

    async def _move(
        self, session: Session, channel_id: int, self_mute: bool, self_deaf: bool, wait: float
    ) -> Session:
        def arrived() -> bool:
            return session.state is SessionState.READY and session.channel_id == channel_id

        flags = (self_mute, self_deaf)
        if arrived() and session._voice_flags == flags:
            return session
        # Whichever event gets the session there: Ready after a fresh Identify, or Resumed (a repeated op 4
        # for the channel a session is resuming in brings back the same token, so no Identify follows).
        # Subscribed before op 4 and checked on every event, so no transition can be missed.
        changed = asyncio.Event()
        unsubscribe = session.on(SessionEvent, lambda _: changed.set())
        try:
            async with asyncio.timeout(wait):
                await self._adapter.update_voice_state(
                    session.guild_id, channel_id, self_mute=self_mute, self_deaf=self_deaf
                )
                session._voice_flags = flags  # rejoins ask with these; a flags-only change has arrived
                while not arrived():
                    final = session.disconnected_event
                    if final is not None:
                        raise final.error or DisconnectedError(final.reason, code=final.close_code)
                    changed.clear()
                    await changed.wait()
        except TimeoutError:
            raise JoinTimeoutError(
                f"moving to voice channel {channel_id} in guild {session.guild_id} took longer than "
                f"{wait:.1f} s"
            ) from None
        finally:
            unsubscribe()
        return session

    async def _abandon(self, session: Session) -> None:
        if self._sessions.get(session.guild_id) is session:
            del self._sessions[session.guild_id]
        await session.disconnect()

    def _session_closed(self, session: Session) -> None:
        if self._sessions.get(session.guild_id) is session:
            del self._sessions[session.guild_id]
        if self._leaving.get(session.guild_id) is session:
            del self._leaving[session.guild_id]

    def _check_open(self) -> None:
        if self._closed:
            raise VoiceError("this Voice is closed")

    def _check_loop(self) -> None:
        """Raise, before anything changes, when called off the event loop its sessions run on."""
        for session in (*self._sessions.values(), *self._leaving.values()):
            session._check_loop()

    # ---- VoiceEventListener ----------------------------------------------------------------------

    def on_voice_state_update(self, event: VoiceStateUpdate) -> None:
        """Route the bot's own voice states to its session (other users' are not needed here)."""
        try:
            if event.user_id != self._adapter.user_id:
                return
        except Exception:
            return
        session = self._sessions.get(event.guild_id)
        if session is not None:
            self._call(session._on_voice_state, event)

    def on_voice_server_update(self, event: VoiceServerUpdate) -> None:
        session = self._sessions.get(event.guild_id)
        if session is not None:
            self._call(session._on_voice_server, event)

    def on_gateway_session_lost(self) -> None:
        for session in list(self._sessions.values()):
            self._call(session._on_gateway_session_lost)

    def _call(self, method: Any, *args: Any) -> None:
        try:
            method(*args)
        except Exception:
            self.listener_errors += 1
            logger.exception("cordvoice failed to handle a main-gateway voice event")


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
