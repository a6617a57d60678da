"""cordvoice inside a discord.py bot: ``await channel.connect(cls=cordvoice.discordpy.VoiceClient)``.

discord.py keeps the main gateway; cordvoice does everything voice. :class:`VoiceClient` is a
``discord.VoiceProtocol``: discord.py creates it per guild and hands it the bot's own VOICE_STATE_UPDATE and
VOICE_SERVER_UPDATE payloads, which it forwards to the bot's single :class:`~cordvoice.Voice` (one per
``discord.Client``, made by :func:`voice_for`). ``vc.session`` is the cordvoice
:class:`~cordvoice.session.Session`::

    vc = await channel.connect(cls=cordvoice.discordpy.VoiceClient)
    await vc.session.write(opus_frame)
    await vc.disconnect()

To choose the Voice's options (for example ``ssl`` for a local emulator), create it first with
``cordvoice.Voice.from_discordpy(client, ssl=...)``; later ``connect`` calls reuse it (or, once it is
closed, a new Voice with the same options).

Limitation: discord.py does not tell protocols when its gateway session is replaced, so such a session loss
reaches cordvoice as the voice server's close code (4014/4006) instead of ``on_gateway_session_lost``.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any

import discord

from cordvoice.errors import GatewayError, ProtocolError, VoiceError
from cordvoice.events import DisconnectedEvent
from cordvoice.gateway.adapter import VoiceEventListener
from cordvoice.gateway.events import parse_voice_server_update, parse_voice_state_update
from cordvoice.session import Session
from cordvoice.voice import Voice

__all__ = ["DiscordPyAdapter", "VoiceClient", "voice_for"]

logger = logging.getLogger(__name__)

_voices: weakref.WeakKeyDictionary[Any, tuple[Voice, dict[str, Any]]] = weakref.WeakKeyDictionary()
"""Each client's Voice and the options it was made with."""


class DiscordPyAdapter:
    """A :class:`~cordvoice.gateway.adapter.VoiceAdapter` over a ``discord.Client``'s gateway."""

    def __init__(self, client: discord.Client) -> None:
        self._client = client
        self._listener: VoiceEventListener | None = None
        self.malformed = 0

    @property
    def user_id(self) -> int:
        user = self._client.user
        if user is None:
            raise GatewayError("the discord.py client is not logged in yet")
        return int(user.id)

    async def update_voice_state(
        self, guild_id: int, channel_id: int | None, *, self_mute: bool = False, self_deaf: bool = False
    ) -> None:
        guild = self._client.get_guild(guild_id)
        if guild is None:
            raise GatewayError(f"discord.py does not know guild {guild_id}")
        channel = None if channel_id is None else discord.Object(id=channel_id)
        try:
            await guild.change_voice_state(channel=channel, self_mute=self_mute, self_deaf=self_deaf)
        except (ConnectionError, discord.DiscordException) as exc:
            raise GatewayError(f"discord.py could not send the voice state update: {exc}") from exc

    def set_listener(self, listener: VoiceEventListener | None) -> None:
        self._listener = listener

    def feed_voice_state(self, data: Any) -> None:
        """A raw VOICE_STATE_UPDATE payload from discord.py."""
        listener = self._listener
        if listener is None:
            return
        try:
            event = parse_voice_state_update(data)
        except ProtocolError as exc:
            self.malformed += 1
            logger.warning("ignored a malformed VOICE_STATE_UPDATE from discord.py: %s", exc)
            return
        listener.on_voice_state_update(event)

    def feed_voice_server(self, data: Any) -> None:
        """A raw VOICE_SERVER_UPDATE payload from discord.py."""
        listener = self._listener
        if listener is None:
            return
        try:
            event = parse_voice_server_update(data)
        except ProtocolError as exc:
            self.malformed += 1
            logger.warning("ignored a malformed VOICE_SERVER_UPDATE from discord.py: %s", exc)
            return
        listener.on_voice_server_update(event)


def voice_for(client: discord.Client, **kwargs: Any) -> Voice:
    """The one open :class:`~cordvoice.Voice` of ``client``; ``kwargs`` are used only when it is created.

    Once that Voice is closed, the next call creates another with these ``kwargs``, or without any, with the
    closed one's: a bot may close its Voice and connect again later, still to the same (emulator) endpoints.
    """
    known = _voices.get(client)
    if known is not None and not known[0].closed:
        if kwargs:
            logger.debug("voice_for(): a Voice already exists for this client; ignoring %s", sorted(kwargs))
        return known[0]
    options = kwargs if kwargs or known is None else known[1]
    voice = Voice(DiscordPyAdapter(client), **options)
    _voices[client] = voice, options
    return voice


class VoiceClient(discord.VoiceProtocol):
    """discord.py's voice protocol backed by cordvoice; ``session`` is the cordvoice Session."""

    def __init__(self, client: discord.Client, channel: Any) -> None:
        super().__init__(client, channel)
        self.voice = voice_for(client)
        adapter = self.voice.adapter
        if not isinstance(adapter, DiscordPyAdapter):
            raise GatewayError("this client's Voice is not driven by discord.py")
        self._adapter = adapter
        self._session: Session | None = None
        self._joining = False
        self._cleaned = False
        self._self_mute = False
        self._self_deaf = False

    @property
    def session(self) -> Session:
        """The cordvoice :class:`~cordvoice.session.Session` once ``connect`` has joined (still readable after
        it ends: see :meth:`is_connected`); :class:`~cordvoice.errors.VoiceError` before that."""
        session = self._session
        if session is None:
            raise VoiceError("this voice client has not joined yet: use the one channel.connect() returns")
        return session

    @property
    def guild(self) -> Any:
        channel: Any = self.channel
        return channel.guild

    @property
    def latency(self) -> float:
        """Voice heartbeat round trip in seconds (inf before the first ACK), like discord.py's."""
        latency = None if self._session is None else self._session.latency
        return float("inf") if latency is None else latency

    def is_connected(self) -> bool:
        return self._session is not None and not self._session.closed

    async def on_voice_state_update(self, data: Any, /) -> None:
        self._adapter.feed_voice_state(data)
        channel_id = data.get("channel_id") if isinstance(data, dict) else None
        if channel_id is not None:
            channel = self.guild.get_channel(int(channel_id))
            if channel is not None:
                self.channel = channel

    async def on_voice_server_update(self, data: Any, /) -> None:
        self._adapter.feed_voice_server(data)

    async def connect(
        self,
        *,
        timeout: float,  # noqa: ASYNC109 - discord.py's VoiceProtocol signature
        reconnect: bool,
        self_deaf: bool = False,
        self_mute: bool = False,
    ) -> None:
        """Join through cordvoice; ``reconnect`` is cordvoice's policy and always on."""
        channel: Any = self.channel
        self._self_mute, self._self_deaf = self_mute, self_deaf
        self._joining = True
        try:
            session = await self.voice.join_channel(
                self.guild.id, channel.id, self_mute=self_mute, self_deaf=self_deaf, timeout=timeout
            )
        except BaseException:
            # discord.py cleans up only after a timeout: after any other failure this client would stay
            # registered, and every later channel.connect() would say "Already connected".
            self.cleanup()
            raise
        finally:
            self._joining = False
        self._session = session
        session.on(DisconnectedEvent, self._session_ended)

    async def disconnect(self, *, force: bool = False) -> None:
        """Leave the channel (if this client still holds the guild's session) and forget this voice client."""
        try:
            if self._owns_guild_session():
                await self.voice.leave(self.guild.id)
        finally:
            self.cleanup()

    async def move_to(self, channel: Any, *, timeout: float | None = 30.0) -> None:  # noqa: ASYNC109
        """Move to another channel of the same guild; ``None`` disconnects, as in discord.py."""
        if channel is None:
            await self.disconnect()
            return
        session = self._session
        if session is None or not self._owns_guild_session():
            raise VoiceError("this voice client is not connected: connect again with channel.connect()")
        moved = await self.voice.join_channel(
            self.guild.id, channel.id, self_mute=self._self_mute, self_deaf=self._self_deaf, timeout=timeout
        )
        if moved is not session:
            # Ours ended while the move waited its turn, so join_channel joined afresh: that session belongs
            # to no voice client discord.py knows of, so leave rather than adopt it.
            await self.voice.leave(self.guild.id)
            raise VoiceError("the voice session ended before the move: connect again with channel.connect()")
        self.channel = channel

    def _owns_guild_session(self) -> bool:
        """Whether the guild's cordvoice session is this client's. A bot may still hold a stale client (its
        session ended, a newer client connected since); acting on the guild would end the newer session."""
        if self._cleaned:
            return False
        if self._session is None:
            return self._joining  # disconnect() during connect() ends that join, as Voice.leave does
        return self.voice.session(self.guild.id) is self._session

    def _session_ended(self, event: DisconnectedEvent) -> None:
        self.cleanup()

    def cleanup(self) -> None:
        if self._cleaned:
            return
        self._cleaned = True
        # discord.py forgets a guild's voice client by guild id: only remove it if it is this one.
        if self.guild.voice_client is self:
            super().cleanup()
