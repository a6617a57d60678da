"""``Emulator``: the local Discord, as an async context manager.

One WebSocket server on one port serves the main gateway (``gateway_url``) and the REST API (``api_base``,
plain HTTP answered during the opening handshake). Voice servers run beside it, one port each, started through
a :data:`VoiceServerFactory` and registered in the state's voice-server directory.

Extension points for the voice side:

* ``voice_server_factory``: starts one voice server (voice gateway + UDP media) and returns a
  :class:`VoiceServerHandle`. The default is :class:`~cordvoice.emulator.voice_server.EmulatedVoiceServer`,
  configured by ``voice_config`` (a :class:`~cordvoice.emulator.voice_protocol.VoiceServerConfig`).
* :meth:`Emulator.add_voice_state_hook`: called with every :class:`~cordvoice.emulator.state.VoiceStateChange`
  after the main gateway announced it (joins, moves, leaves, kicks, channel deletions, ended gateway sessions,
  server moves). ``change.revoked`` is the voice session whose connection must end; the cause says with which
  close code.
* :meth:`Emulator.add_participant`: a simulated member joins a channel over the real voice protocol;
  :meth:`Emulator.inspect` shows what the voice side saw a client do (faults included);
  :attr:`Emulator.faults` injects every fault (:mod:`cordvoice.emulator.faults`) through the hooks
  :meth:`Emulator.voice_server` exposes (close a socket with a code, crash, drop, withhold ACKs, pause or
  impair UDP, crafted datagrams).
* The control routes under ``/_emulator/`` (:mod:`cordvoice.emulator.control`) reach the faults and the
  inspection over HTTP, for ``cordvoice emulate fault``; they need :attr:`Emulator.control_token`.
* :meth:`Emulator.disconnect_member` (kick: VOICE_STATE_UPDATE with a null channel), :meth:`move_guild`
  (server move, optionally announcing ``endpoint: null`` first), :meth:`set_voice_state` (simulated
  participants joining and leaving), :meth:`announce_voice_server_lost`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import http
import ipaddress
import json
import logging
import secrets
import ssl
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Protocol, Self
from urllib.parse import urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from cordvoice.emulator.control import CONTROL_PREFIX, ControlApi
from cordvoice.emulator.faults import Faults, check_move_pause
from cordvoice.emulator.inspection import ClientInspection
from cordvoice.emulator.main_gateway_protocol import GatewayConnection, VoiceStateHook
from cordvoice.emulator.main_gateway_server import MainGateway
from cordvoice.emulator.participant import Participant
from cordvoice.emulator.rest import RestApi, RestResponse
from cordvoice.emulator.state import (
    Bot,
    Channel,
    ChannelType,
    EmulatorState,
    Guild,
    User,
    VoiceChangeCause,
    VoiceServer,
    VoiceSession,
    VoiceStateChange,
)
from cordvoice.emulator.tls import TlsMaterial
from cordvoice.emulator.voice_protocol import VoiceServerConfig
from cordvoice.emulator.voice_server import EmulatedVoiceServer
from cordvoice.errors import EmulatorError
from cordvoice.wirelog import WIRE_LOGGER

__all__ = ["Emulator", "VoiceServerFactory", "VoiceServerHandle"]

logger = logging.getLogger(__name__)


class VoiceServerHandle(Protocol):
    """A running voice server the emulator can stop."""

    @property
    def endpoint(self) -> str:
        """``host:port`` as VOICE_SERVER_UPDATE carries it (no scheme)."""
        ...

    async def close(self) -> None: ...


VoiceServerFactory = Callable[["Emulator", int, int], Awaitable[VoiceServerHandle]]
"""``factory(emulator, server_id, port)`` starts voice server ``server_id`` on ``port`` (0: any free one)."""


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _http_response(result: RestResponse) -> Response:
    body = json.dumps(result.body, separators=(",", ":")).encode()
    headers = Headers(
        [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(body))),
            ("Connection", "close"),
        ]
    )
    return Response(result.status, http.HTTPStatus(result.status).phrase, headers, body)


class Emulator:
    """A strict local stand-in for Discord: main gateway, REST, and (through the factory) voice servers.

    ``async with Emulator() as emu:`` binds ``host`` on free ports (or ``port``/``voice_ports``), starts
    ``voice_servers`` voice servers and serves until the block ends, then closes every socket and task.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        tls: bool = False,
        heartbeat_interval: float = 41.25,
        heartbeat_timeout: float | None = None,
        resume_timeout: float = 60.0,
        rate_limit: tuple[int, float] | None = (120, 60.0),
        replay_limit: int = 1000,
        voice_servers: int = 1,
        voice_ports: Sequence[int] = (),
        voice_server_factory: VoiceServerFactory | None = None,
        voice_config: VoiceServerConfig | None = None,
        voice_server_update_first: bool = False,
        close_timeout: float = 2.0,
    ) -> None:
        if voice_servers < 0:
            raise EmulatorError("voice_servers must be >= 0")
        self.host = host
        self.port = port
        self.close_timeout = close_timeout
        self.state = EmulatorState()
        self.main_gateway = MainGateway(
            self.state,
            heartbeat_interval=heartbeat_interval,
            heartbeat_timeout=heartbeat_timeout,
            resume_timeout=resume_timeout,
            rate_limit=rate_limit,
            replay_limit=replay_limit,
            voice_server_update_first=voice_server_update_first,
            close_timeout=close_timeout,
        )
        self.rest = RestApi(self.state, session_starts=self.main_gateway.stats.identifies_by_user)
        self.voice_server_handles: dict[int, VoiceServerHandle] = {}
        self._tls_enabled = tls
        self.tls: TlsMaterial | None = None
        self._initial_voice_servers = voice_servers
        self._voice_ports = list(voice_ports)
        self._voice_server_factory: VoiceServerFactory = voice_server_factory or EmulatedVoiceServer.start
        self.voice_config = voice_config or VoiceServerConfig()
        """The default configuration every new voice server starts with (each gets its own copy)."""
        self.participants: list[Participant] = []
        self.faults = Faults(self)
        """Fault injection: closes, crashes, moves, kicks, withheld ACKs, UDP impairment, crafted packets."""
        self.control_token = secrets.token_hex(18)  # hex: never starts with "-", which argparse would misread
        """The secret the control routes (``/_emulator/...``) require: ``Authorization: Emulator <token>``."""
        self.control = ControlApi(self)
        self._server: Server | None = None
        self._started = False

    # ---- lifecycle ------------------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def start(self) -> None:
        """Bind the sockets and start serving."""
        if self._started:
            raise EmulatorError("the emulator is already started")
        self._started = True
        if not _is_loopback(self.host):
            logger.warning(
                "the Discord emulator is binding %s, which is not a loopback address: anyone who can reach "
                "this host can log in with the emulator's tokens",
                self.host,
            )
        try:
            if self._tls_enabled:
                self.tls = await asyncio.to_thread(TlsMaterial, (self.host,))
            self._server = await serve(
                self.main_gateway.handle,
                self.host,
                self.port,
                process_request=self._process_request,
                ssl=self.server_ssl_context,
                compression=None,
                ping_interval=None,
                close_timeout=self.close_timeout,
                max_size=1 << 20,
                server_header="cordvoice-emulator",
                logger=WIRE_LOGGER,
            )
            self.port = self._server.sockets[0].getsockname()[1]
            self.rest.gateway_url = self.gateway_url
            await self.main_gateway.start(self.gateway_url)
            for index in range(self._initial_voice_servers):
                port = self._voice_ports[index] if index < len(self._voice_ports) else 0
                await self.add_voice_server(port=port)
        except BaseException:
            await self.close()
            raise
        logger.info(
            "Discord emulator serving the gateway at %s and the API at %s", self.gateway_url, self.api_base
        )

    async def close(self) -> None:
        """Close every participant, socket, task, voice server and temporary file. Idempotent."""
        participants, self.participants = self.participants, []
        for participant in participants:
            try:
                await participant.close()
            except Exception:
                logger.exception("a participant failed to close")
        self.faults.close()
        await self.main_gateway.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        handles = list(self.voice_server_handles.values())
        self.voice_server_handles.clear()
        for handle in handles:
            try:
                await handle.close()
            except Exception:
                logger.exception("a voice server failed to close")
        if self.tls is not None:
            self.tls.close()

    async def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        """REST and control requests are answered here; anything else goes on to the WebSocket handshake."""
        path = urlsplit(request.path).path
        if path.startswith(CONTROL_PREFIX + "/"):
            control = await self.control.handle(request.path, request.headers.get("Authorization"))
            return _http_response(control)
        if not path.startswith("/api/"):
            return None
        method = getattr(request, "method", "GET")  # websockets < 14 only parses GET
        result = self.rest.handle(method, request.path, request.headers.get("Authorization"))
        return _http_response(result)

    # ---- where clients connect --------------------------------------------------------------------------

    @property
    def url_host(self) -> str:
        """The host as it appears in URLs and endpoints (IPv6 in brackets)."""
        return f"[{self.host}]" if ":" in self.host else self.host

    @property
    def gateway_url(self) -> str:
        """``ws://host:port`` (``wss://`` with TLS), as Discord's ``GET /gateway`` returns it."""
        return f"{'wss' if self._tls_enabled else 'ws'}://{self.url_host}:{self.port}"

    @property
    def api_base(self) -> str:
        """``http://host:port/api/v10`` (``https://`` with TLS); discord.py's ``Route.BASE``."""
        return f"{'https' if self._tls_enabled else 'http'}://{self.url_host}:{self.port}/api/v10"

    @property
    def control_url(self) -> str:
        """Base URL of the control routes (faults, inspection; :mod:`cordvoice.emulator.control`)."""
        return f"{'https' if self._tls_enabled else 'http'}://{self.url_host}:{self.port}{CONTROL_PREFIX}"

    @property
    def ca_file(self) -> Path | None:
        """PEM of the CA that signed the emulator's certificate (``None`` without TLS)."""
        return None if self.tls is None else self.tls.ca_file

    @property
    def server_ssl_context(self) -> ssl.SSLContext | None:
        """The server-side context every emulator socket (voice servers included) serves TLS with."""
        return None if self.tls is None else self.tls.server_context

    def client_ssl_context(self) -> ssl.SSLContext | None:
        """A client context that trusts the emulator's CA (``None`` without TLS)."""
        return None if self.tls is None else self.tls.client_context()

    @property
    def gateway_connections(self) -> list[GatewayConnection]:
        """Live main-gateway sockets (user, session, opcodes received, compression)."""
        return self.main_gateway.connections

    # ---- building the world -------------------------------------------------------------------------------

    def create_bot(self, name: str = "cordvoice-bot") -> Bot:
        """A bot user with a token for the gateway and REST."""
        return self.state.create_bot(name)

    def create_user(self, name: str) -> User:
        """A human user (no token), e.g. for simulated participants."""
        return self.state.create_user(name)

    def create_guild(self, name: str = "cordvoice guild", *, members: Iterable[int] = ()) -> Guild:
        """A guild with ``members`` (user ids); connected members get GUILD_CREATE."""
        member_ids = list(members)
        guild = self.state.create_guild(name, members=member_ids)
        for user_id in member_ids:
            self.main_gateway.hub.announce_member_added(guild.id, user_id)
        return guild

    def add_member(self, guild_id: int, user_id: int) -> None:
        """Add a user to a guild; if connected, they get GUILD_CREATE."""
        if self.state.add_member(guild_id, user_id):
            self.main_gateway.hub.announce_member_added(guild_id, user_id)

    def create_voice_channel(
        self,
        guild_id: int,
        name: str = "General",
        *,
        dave_required: bool = True,
        user_limit: int | None = None,
    ) -> Channel:
        """A voice channel (DAVE required by default); the guild gets CHANNEL_CREATE."""
        return self._add_channel(guild_id, name, ChannelType.GUILD_VOICE, dave_required, user_limit)

    def create_stage_channel(
        self, guild_id: int, name: str = "Stage", *, user_limit: int | None = None
    ) -> Channel:
        """A stage channel (DAVE protocol version 0); the guild gets CHANNEL_CREATE."""
        return self._add_channel(guild_id, name, ChannelType.GUILD_STAGE_VOICE, False, user_limit)

    def _add_channel(
        self, guild_id: int, name: str, kind: ChannelType, dave_required: bool, user_limit: int | None
    ) -> Channel:
        channel = self.state.create_channel(
            guild_id, name, kind, dave_required=dave_required, user_limit=user_limit
        )
        self.main_gateway.hub.announce_channel("CHANNEL_CREATE", channel.to_payload(), guild_id)
        return channel

    def delete_channel(self, channel_id: int) -> list[VoiceStateChange]:
        """Delete a channel: CHANNEL_DELETE, and everyone inside leaves (cause CHANNEL_DELETED)."""
        channel, changes = self.state.delete_channel(channel_id)
        hub = self.main_gateway.hub
        hub.announce_channel("CHANNEL_DELETE", channel.to_payload(), channel.guild_id)
        for change in changes:
            hub.apply_voice_change(change)
        return changes

    # ---- voice states (participants, kicks, moves) --------------------------------------------------------

    def add_voice_state_hook(self, hook: VoiceStateHook) -> Callable[[], None]:
        """Call ``hook(change)`` after every announced voice change; returns a function that removes it."""
        hooks = self.main_gateway.hub.voice_hooks
        hooks.append(hook)

        def remove() -> None:
            with contextlib.suppress(ValueError):
                hooks.remove(hook)

        return remove

    def _session_id_for(self, guild_id: int, user_id: int) -> str:
        """Keep the member's voice session id; else use their live gateway session; else make one up."""
        current = self.state.voice_state(guild_id, user_id)
        if current is not None:
            return current.session_id
        for session in self.main_gateway.hub.sessions_of(user_id):
            return session.session_id
        return secrets.token_hex(16)

    def set_voice_state(
        self,
        guild_id: int,
        user_id: int,
        channel_id: int | None,
        *,
        self_mute: bool = False,
        self_deaf: bool = False,
        session_id: str | None = None,
    ) -> VoiceStateChange | None:
        """Put a user in a channel (or out, with ``None``) as if they had done it themselves.

        Simulated participants join this way; for a bot it is "moved by someone". Subscribers get
        VOICE_STATE_UPDATE, the user's gateway session (if any) VOICE_SERVER_UPDATE, the voice side its hook.
        Full channels raise :class:`EmulatorError`.
        """
        change = self.state.update_voice_state(
            guild_id,
            user_id,
            channel_id,
            session_id=session_id or self._session_id_for(guild_id, user_id),
            self_mute=self_mute,
            self_deaf=self_deaf,
            cause=VoiceChangeCause.API,
        )
        if change is not None:
            self.main_gateway.hub.apply_voice_change(change)
        return change

    def disconnect_member(self, guild_id: int, user_id: int) -> VoiceStateChange | None:
        """Kick a member out of voice: VOICE_STATE_UPDATE with a null channel (cause KICK)."""
        change = self.state.disconnect_member(guild_id, user_id, cause=VoiceChangeCause.KICK)
        if change is not None:
            self.main_gateway.hub.apply_voice_change(change)
        return change

    def set_server_voice_flags(
        self,
        guild_id: int,
        user_id: int,
        *,
        mute: bool | None = None,
        deaf: bool | None = None,
        suppress: bool | None = None,
    ) -> VoiceStateChange | None:
        """Server mute/deafen or (un)suppress a member; announced as VOICE_STATE_UPDATE."""
        change = self.state.set_server_voice_flags(guild_id, user_id, mute=mute, deaf=deaf, suppress=suppress)
        if change is not None:
            self.main_gateway.hub.apply_voice_change(change)
        return change

    # ---- voice servers ------------------------------------------------------------------------------------

    async def add_voice_server(self, *, port: int = 0) -> VoiceServer:
        """Start one more voice server through the factory and register it."""
        server_id = self.state.reserve_voice_server_id()
        handle = await self._voice_server_factory(self, server_id, port)
        self.voice_server_handles[server_id] = handle
        if isinstance(handle, EmulatedVoiceServer):
            self.faults.voice_server_added(handle)
        return self.state.register_voice_server(handle.endpoint, server_id=server_id)

    def announce_voice_server_lost(self, guild_id: int) -> int:
        """VOICE_SERVER_UPDATE with ``endpoint: null`` to every member in voice in the guild.

        Discord's "your voice server went away, a new one is coming". Returns how many were told.
        """
        told = 0
        for state in list(self.state.guild(guild_id).voice_states.values()):
            session = self.state.voice_session(guild_id, state.user_id)
            if session is not None and self.main_gateway.hub.send_voice_server_update(session, endpoint=None):
                told += 1
        return told

    async def move_guild(
        self, guild_id: int, server_id: int, *, null_endpoint_first: bool = False, pause: float = 0.0
    ) -> list[VoiceStateChange]:
        """Move a guild to another voice server: new tokens and VOICE_SERVER_UPDATE for everyone in voice.

        With ``null_endpoint_first`` the members first get ``endpoint: null`` and, ``pause`` seconds later,
        the new endpoint. The voice side's hooks see cause SERVER_MOVE with the revoked and issued sessions.
        """
        check_move_pause(pause)
        self.state.voice_server(server_id)
        if null_endpoint_first:
            self.announce_voice_server_lost(guild_id)
            if pause > 0:
                await asyncio.sleep(pause)
        changes = self.state.move_guild(guild_id, server_id)
        for change in changes:
            self.main_gateway.hub.apply_voice_change(change)
        return changes

    # ---- voice side: configuration, participants, inspection ---------------------------------------------

    def voice_config_for(self, server_id: int) -> VoiceServerConfig:
        """The configuration a new voice server starts with: a copy of :attr:`voice_config`."""
        return dataclasses.replace(self.voice_config)

    def voice_server(
        self, server_id: int | None = None, *, guild_id: int | None = None
    ) -> EmulatedVoiceServer:
        """A running voice server: by id, the one serving ``guild_id``, or the only/first one."""
        if guild_id is not None:
            server_id = self.state.guild_voice_server(guild_id).id
        if server_id is None:
            if not self.voice_server_handles:
                raise EmulatorError("no voice server is running")
            server_id = min(self.voice_server_handles)
        handle = self.voice_server_handles.get(server_id)
        if not isinstance(handle, EmulatedVoiceServer):
            raise EmulatorError(
                f"voice server {server_id} is not an emulated voice server (or does not exist)"
            )
        return handle

    def _emulated_voice_servers(self) -> list[EmulatedVoiceServer]:
        return [h for h in self.voice_server_handles.values() if isinstance(h, EmulatedVoiceServer)]

    def set_delivery_order(self, channel_id: int, seed: int | None, max_delay: float = 0.005) -> None:
        """Shuffle the order (seeded) in which a channel's voice messages reach different connections.

        Each batch of messages one input produces goes out per connection in a shuffled order, each
        connection's share delayed by up to ``max_delay`` seconds; a connection's own messages keep their
        order. ``seed=None`` turns it off.
        """
        for server in self._emulated_voice_servers():
            server.set_delivery_order(channel_id, seed, max_delay)

    def inspect(self, user_id: int, *, guild_id: int | None = None) -> ClientInspection:
        """What the voice side saw ``user_id``'s newest voice session do (raises if it never connected)."""
        found = [
            inspection
            for server in self._emulated_voice_servers()
            if (inspection := server.inspect(user_id, guild_id=guild_id)) is not None
        ]
        if not found:
            raise EmulatorError(f"user {user_id} never identified on a voice server")
        # A live session first (a user in voice in one guild, gone from another), else the last identified.
        newest = max(found, key=lambda inspection: (not inspection.ended, inspection.identified_at))
        return dataclasses.replace(newest, faults=self.faults.for_user(user_id))

    def admit_to_voice(
        self, channel_id: int, *, name: str | None = None, self_mute: bool = False
    ) -> VoiceSession:
        """A new simulated user put in ``channel_id``; returns the voice session a client connects with.

        :meth:`add_participant` uses it; a benchmark can hand the (picklable) session to another process and
        call :meth:`Participant.from_session` there.
        """
        channel = self.state.channel(channel_id)
        user = self.create_user(name or f"participant-{len(self.state.users) + 1}")
        self.add_member(channel.guild_id, user.id)
        change = self.set_voice_state(channel.guild_id, user.id, channel_id, self_mute=self_mute)
        if change is None or change.issued is None:
            raise EmulatorError(f"the emulator issued no voice session for user {user.id}")
        return change.issued

    async def add_participant(
        self,
        channel_id: int,
        *,
        name: str | None = None,
        dave: bool = True,
        check_user_ids: bool = True,
        self_mute: bool = False,
        fail_commits: int = 0,
        resume: bool = False,
        timeout: float = 10.0,  # noqa: ASYNC109 - bounds the whole join
    ) -> Participant:
        """A simulated member joins ``channel_id``: voice state through the state, then the voice protocol.

        Returns once its Session Description arrived (DAVE may still be forming: see
        :meth:`Participant.wait_dave_ready`). ``dave=False`` offers DAVE version 0 (a DAVE channel refuses
        it with 4017, raised as :class:`~cordvoice.errors.DaveRequiredError`). ``fail_commits`` makes its
        first N op 29/op 30 fail on purpose (it answers op 31 and is re-added). ``resume`` makes it resume
        after 4015 and dropped connections (op 7) instead of ending.
        """
        session = self.admit_to_voice(channel_id, name=name, self_mute=self_mute)

        def leave() -> None:
            if self.state.voice_state(session.guild_id, session.user_id) is not None:
                self.set_voice_state(session.guild_id, session.user_id, None)

        try:
            participant = await Participant.from_session(
                session,
                ssl_context=self.client_ssl_context(),
                dave=dave,
                check_user_ids=check_user_ids,
                name=self.state.user(session.user_id).name,
                fail_commits=fail_commits,
                resume=resume,
                timeout=timeout,
            )
        except BaseException:
            leave()
            raise
        participant.on_leave = leave
        self.participants.append(participant)
        return participant
