"""cordvoice inside a discord.py bot: ``await channel.connect(cls=cordvoice.discordpy.VoiceClient)``.

discord.py keeps the main gateway; cordvoice does everything voice. :class:`VoiceClient` is a
``discord.VoiceProtocol``: discord.py creates it per guild and hands it the bot's own VOICE_STATE_UPDATE and
VOICE_SERVER_UPDATE payloads, which it forwards to the bot's single :class:`~cordvoice.Voice` (one per
``discord.Client``, made by :func:`voice_for`). ``vc.session`` is the cordvoice
:class:`~cordvoice.session.Session`::

    vc = await channel.connect(cls=cordvoice.discordpy.VoiceClient)
    vc.play(discord.FFmpegPCMAudio("song.mp3"), after=lambda error: print("done", error))
    await vc.session.write(opus_frame)  # or all of cordvoice's Session
    await vc.disconnect()

``vc.play``, ``is_playing``, ``is_paused``, ``pause``, ``resume``, ``stop`` and ``source`` take discord.py
``AudioSource`` objects and behave as discord.py's (``after`` runs once, on a thread of its own, with the
source's exception or None); they play through the session's :class:`~cordvoice.audio.player.Player`.

To choose the Voice's options (for example ``ssl`` for a local emulator), create it first with
``cordvoice.Voice.from_discordpy(client, ssl=...)``; later ``connect`` calls reuse it (or, once it is
closed, a new Voice with the same options).

Limitation: discord.py does not tell protocols when its gateway session is replaced, so such a session loss
reaches cordvoice as the voice server's close code (4014/4006) instead of ``on_gateway_session_lost``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

import discord

from cordvoice.audio.sources import AudioSource
from cordvoice.audio.track import Track
from cordvoice.errors import AudioError, GatewayError, ProtocolError, VoiceError
from cordvoice.events import DisconnectedEvent
from cordvoice.gateway.adapter import VoiceEventListener
from cordvoice.gateway.events import parse_voice_server_update, parse_voice_state_update
from cordvoice.session import Session
from cordvoice.voice import Voice

__all__ = ["DiscordPyAdapter", "VoiceClient", "voice_for"]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

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
        if channel_id is not None and not self._has_voice_client(guild):
            # discord.py hands the answers (VOICE_STATE_UPDATE, VOICE_SERVER_UPDATE) only to the voice client
            # it registered for the guild: without one the join would wait out its timeout in the channel.
            raise GatewayError(
                f"discord.py has no cordvoice voice client for guild {guild_id} to pass the join's answer "
                "to: join with `await channel.connect(cls=cordvoice.discordpy.VoiceClient)`, not "
                "Voice.join_channel"
            )
        channel = None if channel_id is None else discord.Object(id=channel_id)
        try:
            await guild.change_voice_state(channel=channel, self_mute=self_mute, self_deaf=self_deaf)
        except (ConnectionError, discord.DiscordException) as exc:
            raise GatewayError(f"discord.py could not send the voice state update: {exc}") from exc

    def set_listener(self, listener: VoiceEventListener | None) -> None:
        self._listener = listener

    def _has_voice_client(self, guild: discord.Guild) -> bool:
        """Whether discord.py forwards this guild's voice events to one of this adapter's voice clients."""
        voice_client = guild.voice_client
        return isinstance(voice_client, VoiceClient) and voice_client._adapter is self

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


class _DiscordPySource(AudioSource):
    """A discord.py ``AudioSource`` (20 ms of PCM or one Opus packet per read) as a cordvoice source."""

    def __init__(self, source: discord.AudioSource) -> None:
        self.source = source
        self.kind = "opus" if source.is_opus() else "pcm"
        self.name = type(source).__name__
        self.error: Exception | None = None
        """What the source's read() raised, for ``after`` (discord.py passes the source's own exception)."""

    def read(self) -> bytes | None:
        try:
            data = self.source.read()
        except Exception as exc:
            self.error = exc
            raise
        return data or None  # discord.py: an empty read is the end

    def close(self) -> None:
        self.source.cleanup()


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
        self._loop: asyncio.AbstractEventLoop | None = None
        self._track: Track | None = None
        self._playing: _DiscordPySource | None = None
        self._after_tasks: set[asyncio.Task[None]] = set()

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

    @property
    def average_latency(self) -> float:
        """The same as :attr:`latency`: cordvoice keeps only the last heartbeat's round trip."""
        return self.latency

    def is_connected(self) -> bool:
        return self._session is not None and not self._session.closed

    # ==== discord.py's playback API =======================================================================

    def play(
        self,
        source: discord.AudioSource,
        *,
        after: Callable[[Exception | None], Any] | None = None,
        **encoder_options: Any,
    ) -> None:
        """Play a discord.py ``AudioSource``; ``after(error)`` runs once, on a thread of its own, at the end.

        As in discord.py: ``ClientException`` when not connected or already playing, ``TypeError`` for
        anything but an ``AudioSource``. ``encoder_options`` (bitrate, fec, ...) are ignored: cordvoice's
        Player encodes (``vc.session.player.bitrate``). May be called from any thread (``after`` included).
        """
        self._on_loop(self._play, source, after)

    def _play(self, source: discord.AudioSource, after: Callable[[Exception | None], Any] | None) -> None:
        if not self.is_connected():
            raise discord.ClientException("Not connected to voice.")
        if self.is_playing():
            raise discord.ClientException("Already playing audio.")
        if not isinstance(source, discord.AudioSource):
            raise TypeError(f"source must be an AudioSource not {source.__class__.__name__}")
        if after is not None and not callable(after):
            raise TypeError('Expected a callable for the "after" parameter.')
        self._stop()  # a paused source ends (its after runs) rather than playing on under the new one
        playing = _DiscordPySource(source)
        track = self.session.play(playing, kind=playing.kind)
        self._track, self._playing = track, playing
        task = asyncio.get_running_loop().create_task(self._call_after(track, playing, after))
        self._after_tasks.add(task)
        task.add_done_callback(self._after_tasks.discard)

    async def _call_after(
        self, track: Track, playing: _DiscordPySource, after: Callable[[Exception | None], Any] | None
    ) -> None:
        error: Exception | None = None
        try:
            await track.wait()
        except AudioError as exc:
            error = playing.error or exc
        if self._track is track:
            self._track = self._playing = None
        if after is None:
            if error is not None:
                logger.error("guild %d: a discord.py source failed", self.guild.id, exc_info=error)
            return
        # On a thread of its own, as discord.py does: an after that blocks on run_coroutine_threadsafe(...)
        # .result() (discord.py's FAQ) must not block the event loop, nor hold one of the default executor's
        # few threads that the coroutine it waits for may need (run_in_executor(None, ...)).
        threading.Thread(
            target=self._run_after, args=(after, error), name="cordvoice-discordpy-after", daemon=True
        ).start()

    def _run_after(self, after: Callable[[Exception | None], Any], error: Exception | None) -> None:
        try:
            after(error)
        except Exception:
            logger.exception("guild %d: calling the after function failed", self.guild.id)

    def is_playing(self) -> bool:
        track = self._track
        return track is not None and not track.done and not track.paused

    def is_paused(self) -> bool:
        track = self._track
        return track is not None and not track.done and track.paused

    def stop(self) -> None:
        """Stop playing; ``after`` runs with None."""
        self._on_loop(self._stop)

    def _stop(self) -> None:
        track = self._track
        self._track = self._playing = None
        if track is not None:
            track.stop()

    def pause(self) -> None:
        self._on_loop(self._pause, True)

    def resume(self) -> None:
        self._on_loop(self._pause, False)

    def _pause(self, pause: bool) -> None:
        track = self._track
        if track is not None:
            (track.pause if pause else track.resume)()

    @property
    def source(self) -> discord.AudioSource | None:
        """The discord.py ``AudioSource`` being played; setting it switches sources without ``after``."""
        playing = self._playing
        return None if playing is None else playing.source

    @source.setter
    def source(self, value: discord.AudioSource) -> None:
        if not isinstance(value, discord.AudioSource):
            raise TypeError(f"expected AudioSource not {value.__class__.__name__}.")
        playing = self._playing
        if playing is None:
            raise ValueError("Not playing anything.")
        if value.is_opus() != (playing.kind == "opus"):
            raise TypeError("the new source must be Opus (or PCM) like the one it replaces")
        playing.source = value

    def _on_loop(self, call: Callable[..., _T], *args: Any) -> _T:
        """``call(*args)`` on the event loop, waiting for it from another thread (``after`` calls play())."""
        loop = self._loop
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if loop is None or running is loop:
            return call(*args)
        done: concurrent.futures.Future[_T] = concurrent.futures.Future()

        def run() -> None:
            try:
                done.set_result(call(*args))
            except BaseException as exc:
                done.set_exception(exc)

        loop.call_soon_threadsafe(run)
        return done.result()

    async def on_voice_state_update(self, data: Any, /) -> None:
        self._adapter.feed_voice_state(data)
        channel_id = data.get("channel_id") if isinstance(data, dict) else None
        if channel_id is not None:
            channel = self.guild.get_channel(int(channel_id))
            if channel is not None:
                self.channel = channel
            # A bot (un)deafens itself with guild.change_voice_state(): like discord.py's voice client,
            # rejoins and moves keep the flags its voice state has now, not those connect() was given.
            self._self_mute, self._self_deaf = data.get("self_mute") is True, data.get("self_deaf") is True
            session = self._session
            if session is not None and self._owns_guild_session():
                session._voice_flags = (self._self_mute, self._self_deaf)

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
        self._loop = asyncio.get_running_loop()
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
