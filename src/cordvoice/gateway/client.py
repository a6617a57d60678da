"""A small standalone main-gateway client: enough Discord for a voice bot that uses no other library.

``Client`` logs in with intents GUILDS | GUILD_VOICE_STATES, keeps the session alive (heartbeats with ACK
tracking; a missed ACK means a zombie socket, closed and resumed), resumes after drops with the last
sequence number, identifies again after an Invalid Session, reconnects with jittered exponential backoff, and
keeps a small cache of voice channels and voice states. It implements
:class:`~cordvoice.gateway.adapter.VoiceAdapter`.

Layers: :class:`~cordvoice.gateway.protocol.GatewayProtocol` is the sans-IO core (payloads in, decisions and
payloads out, no sockets, no clock of its own); :class:`Client`, here, is the asyncio shell (one reader, one
heartbeat task per socket).

Against the emulator: ``Client(bot.token, gateway_url=emu.gateway_url, api_base=emu.api_base,
ssl=emu.client_ssl_context())``. Without ``api_base`` the client uses ``$CORDVOICE_API_BASE`` when set (so
an unmodified bot can be pointed at ``cordvoice emulate``), else Discord's. Without ``gateway_url`` it asks
``GET {api_base}/gateway/bot`` with ``urllib`` in a worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import logging
import math
import os
import random
import ssl as ssl_module
import time
import urllib.error
import urllib.request
from collections import deque
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from cordvoice.errors import GatewayError, InvalidArgumentError, ProtocolError
from cordvoice.gateway.adapter import VoiceEventListener
from cordvoice.gateway.events import (
    VoiceChannelInfo,
    VoiceStateUpdate,
    parse_channel,
    parse_guild_create,
    parse_snowflake,
    parse_voice_server_update,
    parse_voice_state_update,
)
from cordvoice.gateway.protocol import (
    DEFAULT_INTENTS,
    MAX_MESSAGE_SIZE,
    CloseVerdict,
    Dispatch,
    GatewayProtocol,
    Hello,
    Intents,
    Signal,
)
from cordvoice.wirelog import WIRE_LOGGER

__all__ = [
    "API_BASE_VARIABLE",
    "DEFAULT_INTENTS",
    "DISCORD_API_BASE",
    "Client",
    "GatewayClientStats",
    "GuildInfo",
    "Intents",
]

logger = logging.getLogger(__name__)

DISCORD_API_BASE = "https://discord.com/api/v10"
API_BASE_VARIABLE = "CORDVOICE_API_BASE"
"""Environment variable that replaces :data:`DISCORD_API_BASE` when ``Client`` gets no ``api_base``."""


def _user_agent() -> str:
    from cordvoice import __version__  # noqa: PLC0415 - the package imports this module

    return f"DiscordBot (https://pypi.org/project/cordvoice/, {__version__}) cordvoice"


@dataclass
class GatewayClientStats:
    """What the client did and what it had to drop."""

    connects: int = 0
    identifies: int = 0
    resumes: int = 0
    reconnects: int = 0
    invalid_sessions: int = 0
    sessions_lost: int = 0
    heartbeats_sent: int = 0
    heartbeat_acks: int = 0
    zombie_connections: int = 0
    dispatches: int = 0
    malformed_messages: int = 0
    listener_errors: int = 0


@dataclass
class GuildInfo:
    """The client's view of one guild: its voice channels and who is connected where."""

    id: int
    name: str
    voice_channels: dict[int, VoiceChannelInfo] = field(default_factory=dict)
    voice_states: dict[int, VoiceStateUpdate] = field(default_factory=dict)


def _check_seconds(*, positive: bool = False, **waits: float) -> None:
    for name, seconds in waits.items():
        usable = (
            isinstance(seconds, int | float) and 0 <= seconds < math.inf and (seconds > 0 or not positive)
        )
        if not usable:
            which = "a positive number" if positive else "a number >= 0"
            raise InvalidArgumentError(f"{name} must be {which} of seconds, got {seconds!r}")


class _SendLimiter:
    """At most ``limit`` payloads per ``period`` seconds (Discord closes with 4008 above 120 per minute)."""

    def __init__(self, limit: int, period: float) -> None:
        if limit < 1 or not period > 0:
            raise InvalidArgumentError("send_limit must be (payloads >= 1, seconds > 0)")
        self._limit = limit
        self._period = period
        self._sent: deque[float] = deque(maxlen=limit)
        # Without it, callers waiting together all wake for the same freed slot and burst past the limit.
        self._lock = asyncio.Lock()

    async def acquire(self) -> None:
        loop = asyncio.get_running_loop()
        async with self._lock:
            while len(self._sent) == self._limit:
                wait = self._sent[0] + self._period - loop.time()
                if wait <= 0:
                    break
                logger.info("main gateway send limit reached; waiting %.1f s", wait)
                await asyncio.sleep(wait)  # may wake a clock tick early: check again
            self._sent.append(loop.time())


class Client:
    """A standalone main-gateway client that implements :class:`~cordvoice.gateway.adapter.VoiceAdapter`.

    ``async with Client(token) as client:`` returns once the gateway is READY and the guilds have arrived (or
    ``guild_ready_timeout`` passed). ``start()``/``close()`` do the same without a block.
    """

    def __init__(
        self,
        token: str,
        *,
        intents: int = DEFAULT_INTENTS,
        gateway_url: str | None = None,
        api_base: str | None = None,
        ssl: ssl_module.SSLContext | None = None,
        compress: bool = False,
        reconnect: bool = True,
        backoff_base: float = 1.0,
        backoff_cap: float = 60.0,
        ready_timeout: float = 30.0,
        guild_ready_timeout: float = 2.0,
        request_timeout: float = 30.0,
        send_limit: tuple[int, float] | None = (110, 60.0),
    ) -> None:
        if not isinstance(token, str) or not token.strip():
            raise InvalidArgumentError("a bot token is required")
        _check_seconds(
            backoff_base=backoff_base, backoff_cap=backoff_cap, guild_ready_timeout=guild_ready_timeout
        )
        # A zero or negative wait fails at once; NaN waits forever (asyncio never fires its deadline).
        _check_seconds(ready_timeout=ready_timeout, request_timeout=request_timeout, positive=True)
        if ssl is not None and not isinstance(ssl, ssl_module.SSLContext):
            raise InvalidArgumentError(
                f"ssl must be an ssl.SSLContext, or None for the system's trusted CAs, got {ssl!r}"
            )
        if not isinstance(intents, int) or isinstance(intents, bool) or not 0 <= intents < 1 << 53:
            raise InvalidArgumentError(f"intents must be a non-negative integer bit set, got {intents!r}")
        if send_limit is not None and not (isinstance(send_limit, tuple | list) and len(send_limit) == 2):
            raise InvalidArgumentError(f"send_limit must be (payloads, seconds) or None, got {send_limit!r}")
        self._token = token.strip().removeprefix("Bot ")
        if not (self._token.isascii() and self._token.isprintable()) or " " in self._token:
            # Checked here: the HTTP client would raise a ValueError quoting the whole token.
            raise InvalidArgumentError("the bot token has spaces, line breaks or non-ASCII characters in it")
        self._protocol = GatewayProtocol(self._token, intents, compress=compress)
        self._gateway_url = gateway_url
        self._api_base = (api_base or os.environ.get(API_BASE_VARIABLE) or DISCORD_API_BASE).rstrip("/")
        self._ssl = ssl
        self._reconnect = reconnect
        self._backoff_base = backoff_base
        self._backoff_cap = backoff_cap
        self._ready_timeout = ready_timeout
        self._guild_ready_timeout = guild_ready_timeout
        self._request_timeout = request_timeout
        self._limiter = _SendLimiter(*send_limit) if send_limit is not None else None
        self._listener: VoiceEventListener | None = None
        self._guilds: dict[int, GuildInfo] = {}
        self._pending_guilds: set[int] = set()
        self._guilds_ready = asyncio.Event()
        self._ready = asyncio.Event()
        self._ever_ready = False
        self._ws: ClientConnection | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._stop = asyncio.Event()
        self._error: GatewayError | None = None
        self.stats = GatewayClientStats()

    def __repr__(self) -> str:
        return f"<cordvoice.gateway.Client user_id={self._protocol.user_id} ready={self._ready.is_set()}>"

    # ---- VoiceAdapter ---------------------------------------------------------------------------------

    @property
    def user_id(self) -> int:
        """The bot's user id, from READY."""
        if self._protocol.user_id is None:
            raise GatewayError("the gateway client is not logged in yet: await start() first")
        return self._protocol.user_id

    def set_listener(self, listener: VoiceEventListener | None) -> None:
        self._listener = listener

    async def update_voice_state(
        self, guild_id: int, channel_id: int | None, *, self_mute: bool = False, self_deaf: bool = False
    ) -> None:
        """Send op 4 (join/move with a channel id, leave with ``None``), waiting for a live session first."""
        for name, value in (("guild_id", guild_id), ("channel_id", channel_id)):
            if value is None and name == "channel_id":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise InvalidArgumentError(f"{name} must be a positive integer id")
        payload = {
            "op": 4,
            "d": {
                "guild_id": str(guild_id),
                "channel_id": None if channel_id is None else str(channel_id),
                "self_mute": bool(self_mute),
                "self_deaf": bool(self_deaf),
            },
        }
        message = json.dumps(payload, separators=(",", ":"))
        while True:
            try:
                async with asyncio.timeout(self._request_timeout):
                    await self._wait_ready()
            except TimeoutError:
                raise GatewayError(
                    f"could not send a voice state update within {self._request_timeout} s: not connected"
                ) from None
            # The send limit's queue is not "not connected": a bot leaving or joining many guilds at once
            # waits its turn (at most one period per ``limit`` payloads ahead) rather than failing.
            if self._limiter is not None:
                await self._limiter.acquire()
            ws = self._ws
            if ws is None or not self._ready.is_set():
                continue  # the connection dropped while this waited for a slot
            try:
                async with asyncio.timeout(self._request_timeout):
                    await ws.send(message)
                return
            except ConnectionClosed:
                await asyncio.sleep(0.05)  # the reader notices the drop and clears readiness
            except TimeoutError:
                raise GatewayError(
                    f"could not send a voice state update within {self._request_timeout} s"
                ) from None

    # ---- public state ---------------------------------------------------------------------------------

    @property
    def session_id(self) -> str | None:
        """The main-gateway session id (voice states carry it)."""
        return self._protocol.session_id

    @property
    def latency(self) -> float | None:
        """Seconds between the last heartbeat and its ACK."""
        return self._protocol.latency

    @property
    def is_ready(self) -> bool:
        return self._ready.is_set()

    @property
    def guilds(self) -> dict[int, GuildInfo]:
        """The guild cache, by id (read-only by convention)."""
        return self._guilds

    def voice_state(self, guild_id: int, user_id: int) -> VoiceStateUpdate | None:
        guild = self._guilds.get(guild_id)
        return None if guild is None else guild.voice_states.get(user_id)

    # ---- lifecycle ------------------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def start(self) -> None:
        """Connect and wait for READY and the guilds; raises :class:`GatewayError` if login fails."""
        if self._task is not None:
            raise GatewayError("the gateway client was already started")
        try:
            gateway_url = self._gateway_url or await self._discover_gateway()
            self._task = asyncio.create_task(self._run(gateway_url), name="cordvoice-gateway-client")
            try:
                async with asyncio.timeout(self._ready_timeout):
                    await self._until_ready_or_stopped()
            except TimeoutError:
                raise GatewayError(
                    f"the gateway did not become ready within {self._ready_timeout} s"
                ) from None
            if not self._ready.is_set():
                raise self._error or GatewayError("the gateway connection ended before READY")
            try:
                async with asyncio.timeout(self._guild_ready_timeout):
                    await self._guilds_ready.wait()
            except TimeoutError:
                logger.warning("%d guild(s) from READY did not arrive in time", len(self._pending_guilds))
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Close the socket with 1000 (ending the session, as Discord defines) and stop every task."""
        self._closing = True
        self._stop.set()
        self._ready.clear()
        ws = self._ws
        if ws is not None:
            with contextlib.suppress(Exception):
                await ws.close(1000, "client closing")
        task = self._task
        if task is not None and not task.done():
            try:
                # With no socket open, the task is opening one (or backing off): nothing to close cleanly,
                # and a handshake that hangs would otherwise hold close() for the whole 5 s.
                async with asyncio.timeout(5.0 if ws is not None else 0):
                    await asyncio.shield(task)
            except (TimeoutError, Exception):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    async def wait_closed(self) -> None:
        """Wait until the client stops for good; raises the fatal :class:`GatewayError` if there was one."""
        if self._task is not None:
            await asyncio.shield(self._task)
        if self._error is not None:
            raise self._error

    # ---- internals ------------------------------------------------------------------------------------

    async def _discover_gateway(self) -> str:
        url = f"{self._api_base}/gateway/bot"

        def fetch() -> bytes:
            request = urllib.request.Request(
                url, headers={"Authorization": f"Bot {self._token}", "User-Agent": _user_agent()}
            )
            with urllib.request.urlopen(request, timeout=10.0, context=self._ssl) as response:
                body: bytes = response.read()
                return body

        try:
            body = await asyncio.to_thread(fetch)
        except urllib.error.HTTPError as exc:
            if exc.code == 401:
                raise GatewayError("Discord rejected the bot token (HTTP 401 from /gateway/bot)") from None
            raise GatewayError(f"GET {url} failed with HTTP {exc.code}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise GatewayError(f"could not reach {url}: {exc}") from None
        except (ValueError, http.client.HTTPException) as exc:  # not an http(s) URL, or no HTTP server there
            raise GatewayError(
                f"could not reach {url} ({type(exc).__name__}: {exc}): is it the http(s) URL of an API?"
            ) from None
        try:
            gateway = json.loads(body)["url"]
        except (ValueError, KeyError, TypeError):
            raise GatewayError(f"GET {url} did not return a gateway URL") from None
        if not isinstance(gateway, str) or not gateway.startswith(("ws://", "wss://")):
            raise GatewayError(f"GET {url} returned an unusable gateway URL")
        return gateway

    async def _wait_ready(self) -> ClientConnection:
        while True:
            if self._closing or (self._task is not None and self._task.done()):
                raise GatewayError("the gateway client is closed") from self._error
            if self._ready.is_set() and self._ws is not None:
                return self._ws
            await self._until_ready_or_stopped()

    async def _until_ready_or_stopped(self) -> None:
        """Return when the session is ready, close() was called or the client task ended."""
        waiters: set[asyncio.Future[Any]] = {
            asyncio.ensure_future(self._ready.wait()),
            asyncio.ensure_future(self._stop.wait()),
        }
        try:
            await asyncio.wait(
                waiters if self._task is None else waiters | {self._task},
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            for waiter in waiters:
                waiter.cancel()

    async def _send(self, ws: ClientConnection, payload: dict[str, Any]) -> None:
        if self._limiter is not None:
            await self._limiter.acquire()
        await ws.send(json.dumps(payload, separators=(",", ":")))

    def _backoff(self, attempt: int) -> float:
        if attempt == 0:
            return 0.0
        return random.uniform(0, min(self._backoff_cap, self._backoff_base * 2**attempt))

    def _fail(self, error: GatewayError) -> None:
        self._error = error
        logger.error("main gateway client stopped: %s", error)

    async def _run(self, gateway_url: str) -> None:
        failures = 0
        while not self._closing:
            try:
                verdict, healthy = await self._connect_once(gateway_url)
            except (OSError, InvalidHandshake, InvalidURI, TimeoutError) as exc:
                if not self._ever_ready:
                    self._fail(GatewayError(f"could not connect to the gateway at {gateway_url}: {exc}"))
                    return
                logger.warning("main gateway connection failed: %s", exc)
                verdict, healthy = CloseVerdict(None, False), False
            except Exception as exc:  # a bug of ours: stop with an error of the hierarchy, never silently
                logger.exception("main gateway client failed unexpectedly")
                error = GatewayError(f"the main gateway client failed unexpectedly: {exc!r}")
                error.__cause__ = exc
                self._fail(error)
                return
            if self._closing:
                return
            if verdict.session_lost:
                self._session_lost()
            if verdict.fatal is not None:
                self._fail(verdict.fatal)
                return
            if not self._reconnect:
                self._fail(GatewayError("the main gateway connection closed and reconnect=False"))
                return
            # A socket that reached READY/RESUMED earns an immediate retry; repeated failures back off.
            failures = 0 if healthy else failures + 1
            delay = self._backoff(failures)
            self.stats.reconnects += 1
            logger.info("reconnecting to the main gateway in %.2f s", delay)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._stop.wait()

    async def _connect_once(self, gateway_url: str) -> tuple[CloseVerdict, bool]:
        """One socket's life; returns the verdict on its close and whether the session became ready on it."""
        protocol = self._protocol
        url = protocol.connect_url(gateway_url)
        protocol.connection_started()
        got_hello = False
        healthy = False
        heartbeat: asyncio.Task[None] | None = None
        async with connect(
            url,
            # wss:// needs a context: ours, else websockets' default (ssl=None would be refused).
            ssl=(self._ssl or True) if url.startswith("wss://") else None,
            compression=None,
            max_size=MAX_MESSAGE_SIZE,
            open_timeout=10.0,
            close_timeout=2.0,
            ping_interval=None,
            user_agent_header=_user_agent(),
            logger=WIRE_LOGGER,
        ) as ws:
            self.stats.connects += 1
            self._ws = ws
            try:
                while True:
                    try:
                        async with asyncio.timeout(None if got_hello else 20.0):
                            message = await ws.recv()
                    except ConnectionClosed:
                        break
                    try:
                        payload = protocol.decode(message)
                        if payload is None:
                            continue
                        event = protocol.receive(payload, time.monotonic())
                    except ProtocolError as exc:
                        self.stats.malformed_messages += 1
                        logger.warning("dropped a malformed gateway message: %s", exc)
                        if protocol.stream_broken:  # the zlib stream cannot go on: resume on a new socket
                            await ws.close(1009, "message too big or corrupt")
                            break
                        continue
                    try:
                        if isinstance(event, Hello):
                            got_hello = True
                            heartbeat = asyncio.create_task(
                                self._heartbeat_loop(ws, event.heartbeat_interval),
                                name="cordvoice-gateway-heartbeat",
                            )
                            await self._open_session(ws)
                        elif isinstance(event, Dispatch):
                            self._on_dispatch(event)
                            healthy = healthy or self._ready.is_set()
                        elif event is not None:
                            await self._on_signal(ws, event)
                    except ConnectionClosed:
                        break  # the socket dropped while we answered: its close code decides what follows
            finally:
                self._ws = None
                self._ready.clear()
                if heartbeat is not None:
                    heartbeat.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await heartbeat
        return protocol.connection_closed(ws.close_code), healthy

    async def _open_session(self, ws: ClientConnection) -> None:
        payload = self._protocol.opening_payload()
        if payload["op"] == 2:
            self.stats.identifies += 1
        await self._send(ws, payload)

    async def _on_signal(self, ws: ClientConnection, signal: Signal) -> None:
        if signal is Signal.HEARTBEAT_REQUESTED:
            await self._beat(ws, self._protocol.forced_heartbeat(time.monotonic()))
        elif signal is Signal.HEARTBEAT_ACK:
            self.stats.heartbeat_acks += 1
        elif signal in (Signal.RECONNECT, Signal.INVALID_RESUMABLE):
            logger.info("main gateway asked for a reconnect (%s)", signal.value)
            await ws.close(4000, "reconnecting")
        elif signal is Signal.INVALID:
            self.stats.invalid_sessions += 1
            self._ready.clear()
            if self._protocol.forget_session():
                self._session_lost()
            delay = random.uniform(1.0, 5.0) * self._backoff_base
            logger.info("main gateway session invalidated; identifying again in %.2f s", delay)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._stop.wait()  # close() must not wait out the delay
            if not self._closing:
                await self._open_session(ws)

    def _session_lost(self) -> None:
        self.stats.sessions_lost += 1
        listener = self._listener
        if listener is not None:
            try:
                listener.on_gateway_session_lost()
            except Exception:
                self.stats.listener_errors += 1
                logger.exception("voice listener failed in on_gateway_session_lost")

    async def _heartbeat_loop(self, ws: ClientConnection, interval: float) -> None:
        await asyncio.sleep(interval * random.random())
        while True:
            payload = self._protocol.heartbeat(time.monotonic())
            if payload is None:
                self.stats.zombie_connections += 1
                logger.warning("main gateway did not acknowledge the last heartbeat; reconnecting")
                await ws.close(4000, "heartbeat not acknowledged")
                return
            try:
                await self._beat(ws, payload)
            except ConnectionClosed:
                return
            await asyncio.sleep(interval)

    async def _beat(self, ws: ClientConnection, payload: dict[str, Any]) -> None:
        # Heartbeats skip the send limiter (its headroom below Discord's 120/min is kept for them).
        await ws.send(json.dumps(payload, separators=(",", ":")))
        self.stats.heartbeats_sent += 1

    def _on_dispatch(self, event: Dispatch) -> None:
        self.stats.dispatches += 1
        try:
            self._apply_dispatch(event.name, event.data)
        except ProtocolError as exc:
            self.stats.malformed_messages += 1
            logger.warning("dropped a malformed %s dispatch: %s", event.name, exc)

    def _apply_dispatch(self, name: str, data: Any) -> None:
        if name == "READY":
            self._on_ready(data)
        elif name == "RESUMED":
            self.stats.resumes += 1
            self._ready.set()
        elif name == "GUILD_CREATE":
            snapshot = parse_guild_create(data)
            self._guilds[snapshot.id] = GuildInfo(
                id=snapshot.id,
                name=snapshot.name,
                voice_channels={c.id: c for c in snapshot.voice_channels},
                voice_states={s.user_id: s for s in snapshot.voice_states},
            )
            self._pending_guilds.discard(snapshot.id)
            if not self._pending_guilds:
                self._guilds_ready.set()
        elif name == "GUILD_DELETE":
            guild_id = parse_snowflake(data.get("id") if isinstance(data, dict) else None, "id")
            self._guilds.pop(guild_id, None)
        elif name in ("CHANNEL_CREATE", "CHANNEL_UPDATE", "CHANNEL_DELETE"):
            self._on_channel(name, data)
        elif name == "VOICE_STATE_UPDATE":
            state = parse_voice_state_update(data)
            guild = self._guilds.get(state.guild_id)
            if guild is not None:
                if state.channel_id is None:
                    guild.voice_states.pop(state.user_id, None)
                else:
                    guild.voice_states[state.user_id] = state
            self._notify("on_voice_state_update", state)
        elif name == "VOICE_SERVER_UPDATE":
            self._notify("on_voice_server_update", parse_voice_server_update(data))

    def _on_ready(self, data: Any) -> None:
        guilds = data.get("guilds", []) if isinstance(data, dict) else []
        pending = set()
        for raw in guilds if isinstance(guilds, list) else []:
            # One bad entry must not cost the whole READY: the session is live either way.
            try:
                pending.add(parse_snowflake(raw.get("id") if isinstance(raw, dict) else None, "guilds[].id"))
            except ProtocolError as exc:
                self.stats.malformed_messages += 1
                logger.warning("skipped a malformed guild in READY: %s", exc)
        self._guilds.clear()
        self._pending_guilds = pending
        if pending:
            self._guilds_ready.clear()
        else:
            self._guilds_ready.set()
        self._ever_ready = True
        self._ready.set()
        logger.info("main gateway ready: %d guild(s)", len(pending))

    def _on_channel(self, name: str, data: Any) -> None:
        channel = parse_channel(data)
        if channel is None:
            return
        guild = self._guilds.get(channel.guild_id)
        if guild is None:
            return
        if name == "CHANNEL_DELETE":
            guild.voice_channels.pop(channel.id, None)
        else:
            guild.voice_channels[channel.id] = channel

    def _notify(self, method: str, event: Any) -> None:
        listener = self._listener
        if listener is None:
            return
        try:
            getattr(listener, method)(event)
        except Exception:
            self.stats.listener_errors += 1
            logger.exception("voice listener failed in %s", method)
