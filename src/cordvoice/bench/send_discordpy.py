"""The peer of ``bench send --peer discordpy``: the same workload through discord.py 2.7's voice clients.

A handler for :class:`~cordvoice.bench.process.ChildProcess`, shaped like
:class:`~cordvoice.bench.send_cordvoice.CordvoiceSender`. One discord.py client joins every channel with
``channel.connect()`` and plays the same Opus frames through its own machinery: one ``AudioPlayer`` thread
per voice client (sleeping between 20 ms frames), DAVE through discord.py's davey integration, and
XChaCha20-Poly1305 through PyNaCl (the only AEAD mode discord.py implements, whatever the benchmark's mode).

Two setup-only adjustments, neither touching the audio path: discord.py is pointed at the emulator (its REST
base and gateway URL, as :mod:`cordvoice.emulator.for_discordpy` does, plus a connector that trusts the
emulator's CA), and its client-side gateway rate limiter (110 commands per minute) is lifted so that hundreds
of voice joins do not take minutes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from typing import Any

from cordvoice.bench.frames import opus_frames
from cordvoice.bench.machine import CpuSnapshot, rss_bytes
from cordvoice.bench.send_cordvoice import percentiles

__all__ = ["DiscordpySender"]

logger = logging.getLogger(__name__)

_UNLIMITED = 1_000_000


class DiscordpySender:
    """Commands: ``join``, ``stream``, ``begin``, ``end`` (see the module docstring)."""

    def __init__(self, *, world: dict[str, Any], join_concurrency: int = 50) -> None:
        self.world = world
        self.join_concurrency = join_concurrency
        self.voice_clients: list[Any] = []
        self.sources: list[Any] = []
        self._restore: list[tuple[Any, str, Any]] = []
        self._runner: asyncio.Task[None] | None = None
        self._begin: CpuSnapshot | None = None
        self._begin_packets = 0

    async def start(self) -> None:
        import aiohttp  # noqa: PLC0415 - discord.py's dependency, only needed here
        import discord  # noqa: PLC0415
        import discord.gateway  # noqa: PLC0415
        import discord.http  # noqa: PLC0415
        import yarl  # noqa: PLC0415

        discord.utils.setup_logging(level=logging.WARNING, root=False)
        self.frames = opus_frames()
        self._point(discord.http.Route, "BASE", self.world["api_base"])
        self._point(discord.gateway.DiscordWebSocket, "DEFAULT_GATEWAY", yarl.URL(self.world["gateway_url"]))
        ca_file = self.world.get("ca_file")
        context: ssl.SSLContext | bool = ssl.create_default_context(cafile=ca_file) if ca_file else False
        intents = discord.Intents.none()
        intents.guilds = True
        intents.voice_states = True
        self.client = discord.Client(
            intents=intents,
            guild_ready_timeout=1.0,
            connector=aiohttp.TCPConnector(ssl=context, limit=0),
        )
        await self.client.login(self.world["token"])
        self._runner = asyncio.create_task(self.client.connect(reconnect=False))
        async with asyncio.timeout(120):
            await self.client.wait_until_ready()
        limiter = self.client.ws._rate_limiter
        limiter.max = limiter.remaining = _UNLIMITED

    def _point(self, owner: Any, name: str, value: Any) -> None:
        self._restore.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)

    async def close(self) -> None:
        for vc in self.voice_clients:
            vc.stop()
        for vc in self.voice_clients:
            with contextlib.suppress(Exception):
                await vc.disconnect(force=True)
        with contextlib.suppress(Exception):
            await self.client.close()
        if self._runner is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                async with asyncio.timeout(10):
                    await self._runner
        for owner, name, value in reversed(self._restore):
            setattr(owner, name, value)

    # ---- phases -------------------------------------------------------------------------------------

    async def cmd_join(self, *, dave_timeout: float = 300.0) -> dict[str, Any]:
        import discord  # noqa: PLC0415

        limit = asyncio.Semaphore(self.join_concurrency)
        join_ms: list[float] = []
        started = time.monotonic()

        async def join(channel_id: int) -> Any:
            channel = self.client.get_channel(channel_id)
            if not isinstance(channel, discord.VoiceChannel | discord.StageChannel):
                raise RuntimeError(f"discord.py does not know channel {channel_id}")
            async with limit:
                t0 = time.monotonic()
                vc: Any = await channel.connect(timeout=120, reconnect=False)
                join_ms.append((time.monotonic() - t0) * 1000)
                return vc

        self.voice_clients = list(await asyncio.gather(*(join(c) for _, c in self.world["channels"])))
        joined = time.monotonic()
        async with asyncio.timeout(dave_timeout):
            while not all(self._ready(vc) for vc in self.voice_clients):  # noqa: ASYNC110 - many
                await asyncio.sleep(0.05)
        ready = time.monotonic()
        return {
            "sessions": len(self.voice_clients),
            "setup_s": round(ready - started, 3),
            "join_all_s": round(joined - started, 3),
            "dave_wait_s": round(ready - joined, 3),
            "join_ms": percentiles(join_ms),
            "modes": sorted({str(vc.mode) for vc in self.voice_clients}),
            "dave_versions": sorted({vc._connection.dave_protocol_version for vc in self.voice_clients}),
            "join_concurrency": self.join_concurrency,
        }

    @staticmethod
    def _ready(vc: Any) -> bool:
        state = vc._connection
        return bool(state.dave_protocol_version == 0 or state.can_encrypt)

    async def cmd_stream(self, *, warmup: float) -> None:
        source_type = _looping_source_type()
        for index, vc in enumerate(self.voice_clients):
            source = source_type(self.frames, index)
            self.sources.append(source)
            vc.play(source)
        await asyncio.sleep(warmup)

    def _packets(self) -> int:
        return sum(source.pulled for source in self.sources)

    async def cmd_begin(self, settle: float = 0.0) -> None:
        self._begin_packets = self._packets()
        self._begin = CpuSnapshot.take()
        await asyncio.sleep(settle)  # as the cordvoice side does, so both windows have the same shape

    async def cmd_end(self) -> dict[str, Any]:
        end = CpuSnapshot.take()
        packets = self._packets() - self._begin_packets
        assert self._begin is not None
        cpu = end.since(self._begin)
        import threading  # noqa: PLC0415

        return {
            "packets_sent": packets,
            "cpu": cpu,
            "cpu_us_per_packet": round(cpu["cpu_s"] / packets * 1e6, 2) if packets else None,
            "core_percent_per_stream": round(cpu["core_percent"] / len(self.voice_clients), 4)
            if self.voice_clients
            else None,
            "threads": threading.active_count(),
            "rss_mib": round(rss_bytes() / 2**20, 1),
        }


def _looping_source_type() -> type:
    """A ``discord.AudioSource`` looping pre-encoded Opus frames (defined lazily: discord.py is optional)."""
    import discord  # noqa: PLC0415

    class LoopingOpus(discord.AudioSource):
        def __init__(self, frames: tuple[bytes, ...], offset: int) -> None:
            self._frames = frames
            self._index = offset % len(frames)
            self.pulled = 0

        def read(self) -> bytes:
            frame = self._frames[self._index]
            self._index = (self._index + 1) % len(self._frames)
            self.pulled += 1
            return frame

        def is_opus(self) -> bool:
            return True

    return LoopingOpus
