"""The process under test of ``bench send``: one cordvoice bot, one voice session per guild, all streaming.

A handler for :class:`~cordvoice.bench.process.ChildProcess`. The bot logs in with the standalone gateway
client (no send limit: the emulator has none either), joins every channel of the world it is given, waits
until every session's DAVE group is ready, then streams Opus passthrough on every session:

* ``feed="provider"`` (default): each session's transmit lane pulls from a :class:`LoopingFrames` provider
  (``Session.set_provider``), which is what a player feeding pre-encoded Opus costs;
* ``feed="write"``: one task per session awaits ``Session.write(frame)`` in a loop, the seed API.

``begin``/``end`` bracket the measurement window: process CPU (``getrusage``) and packets sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from typing import Any

from cordvoice.audio.clock import get_clock
from cordvoice.bench.frames import LoopingFrames, opus_frames
from cordvoice.bench.gcwatch import GcWatch
from cordvoice.bench.machine import CpuSnapshot, rss_bytes
from cordvoice.gateway.client import Client
from cordvoice.metrics import Histogram, nearest_rank
from cordvoice.session import Session, SessionStats
from cordvoice.voice import Voice

__all__ = ["CordvoiceSender", "percentiles", "world_client"]


def percentiles(values: list[float]) -> dict[str, float]:
    """``{p50, p95, max}`` of a list (exact, by rank), rounded to 3 decimals."""
    if not values:
        return {"p50": 0.0, "p95": 0.0, "max": 0.0}
    ordered = sorted(values)

    def rank(p: float) -> float:
        return ordered[min(len(ordered), nearest_rank(len(ordered), p)) - 1]

    return {"p50": round(rank(50), 3), "p95": round(rank(95), 3), "max": round(ordered[-1], 3)}


def world_client(world: dict[str, Any], **options: Any) -> tuple[Client, ssl.SSLContext | None]:
    """The bench bot's gateway client for the emulator host's ``world``, with no send limit (the emulator
    has none either), and the TLS context that trusts the emulator's CA (None without TLS) for its Voice.

    ``options`` go to :class:`~cordvoice.gateway.client.Client`.
    """
    ca_file = world.get("ca_file")
    context = ssl.create_default_context(cafile=ca_file) if ca_file else None
    client = Client(
        world["token"],
        gateway_url=world["gateway_url"],
        api_base=world["api_base"],
        ssl=context,
        send_limit=None,
        **options,
    )
    return client, context


class CordvoiceSender:
    """Commands: ``join``, ``stream``, ``begin``, ``end``, ``stats``."""

    def __init__(
        self,
        *,
        world: dict[str, Any],
        feed: str = "provider",
        join_concurrency: int = 50,
        slot_capacity: int | None = None,
    ) -> None:
        if feed not in ("provider", "write"):
            raise ValueError(f"feed must be 'provider' or 'write', got {feed!r}")
        self.world = world
        self.feed = feed
        self.slot_capacity = slot_capacity
        """Overrides the shared clock's packing (0: spread evenly); None keeps the library's default."""
        self.join_concurrency = join_concurrency
        self.client, self._ssl = world_client(world, guild_ready_timeout=10.0, request_timeout=120.0)
        self.voice: Voice | None = None
        self.sessions: list[Session] = []
        self.providers: list[LoopingFrames] = []
        self._writers: list[asyncio.Task[None]] = []
        self._begin: CpuSnapshot | None = None
        self._begin_packets = 0
        self._rss_start = 0
        self._gc = GcWatch()

    async def start(self) -> None:
        if self.slot_capacity is not None:
            get_clock().slot_capacity = self.slot_capacity or None
        self.frames = opus_frames()
        self._rss_start = rss_bytes()
        await self.client.start()
        self.voice = Voice(self.client, ssl=self._ssl if self._ssl is not None else False, join_timeout=300.0)

    async def close(self) -> None:
        for task in self._writers:
            task.cancel()
        for task in self._writers:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.voice is not None:
            await self.voice.close()
        await self.client.close()

    # ---- phases -------------------------------------------------------------------------------------

    async def cmd_join(self, *, dave_timeout: float = 300.0) -> dict[str, Any]:
        """Join every channel (``join_concurrency`` at a time), then wait until every DAVE group is ready."""
        voice = self.voice
        assert voice is not None
        limit = asyncio.Semaphore(self.join_concurrency)
        join_ms: list[float] = []
        started = time.monotonic()

        async def join(guild_id: int, channel_id: int) -> Session:
            async with limit:
                t0 = time.monotonic()
                session = await voice.join_channel(guild_id, channel_id)
                join_ms.append((time.monotonic() - t0) * 1000)
                return session

        self.sessions = list(await asyncio.gather(*(join(g, c) for g, c in self.world["channels"])))
        joined = time.monotonic()
        async with asyncio.timeout(dave_timeout):
            while not all(session.dave_ready for session in self.sessions):  # noqa: ASYNC110 - many
                await asyncio.sleep(0.05)
        ready = time.monotonic()
        return {
            "sessions": len(self.sessions),
            "setup_s": round(ready - started, 3),
            "join_all_s": round(joined - started, 3),
            "dave_wait_s": round(ready - joined, 3),
            "join_ms": percentiles(join_ms),
            "modes": sorted({s.mode or "?" for s in self.sessions}),
            "dave_versions": sorted({s.dave_protocol_version or 0 for s in self.sessions}),
            "join_concurrency": self.join_concurrency,
            "clock_slot_capacity": get_clock().slot_capacity,
        }

    async def cmd_stream(self, *, warmup: float) -> None:
        """Start audio on every session, then let it settle for ``warmup`` seconds."""
        frames = self.frames
        for index, session in enumerate(self.sessions):
            if self.feed == "provider":
                provider = LoopingFrames(frames, offset=index)
                self.providers.append(provider)
                session.set_provider(provider)
            else:
                self._writers.append(asyncio.create_task(self._write_forever(session, index)))
        await asyncio.sleep(warmup)

    async def _write_forever(self, session: Session, offset: int) -> None:
        frames = self.frames
        index = offset
        while True:
            await session.write(frames[index % len(frames)])
            index += 1

    async def cmd_begin(self, settle: float = 0.0) -> None:
        """Start the CPU window, then after ``settle`` seconds the clock's: reading a thousand sessions'
        counters pauses the loop for 10-20 ms, and the catch-up after that pause is the bench's."""
        self._gc.start()
        stats = [s.stats for s in self.sessions]  # one read each
        self._begin_packets = _packets(stats)
        self._begin_dave = sum(s.dave_encrypted for s in stats)
        self._begin = CpuSnapshot.take()
        await asyncio.sleep(settle)
        clock = get_clock()
        clock.lateness = Histogram()
        self._stalls = clock.stalls

    async def cmd_end(self) -> dict[str, Any]:
        end = CpuSnapshot.take()
        self._gc.stop()
        stats = [s.stats for s in self.sessions]
        packets = _packets(stats) - self._begin_packets
        assert self._begin is not None
        cpu = end.since(self._begin)
        clock = get_clock()
        return {
            "packets_sent": packets,
            "cpu": cpu,
            "cpu_us_per_packet": round(cpu["cpu_s"] / packets * 1e6, 2) if packets else None,
            "core_percent_per_stream": round(cpu["core_percent"] / len(self.sessions), 4)
            if self.sessions
            else None,
            "clock_wakeup_lateness_ms": clock.lateness.summary(),
            "clock_stalls": clock.stalls - self._stalls,
            "dave_encrypted": sum(s.dave_encrypted for s in stats) - self._begin_dave,
            "frames_dropped": sum(s.frames_dropped for s in stats),
            "dave_withheld_ticks": sum(s.dave_withheld for s in stats),
            # Since each session joined (reading them at the window's start would pause the loop again).
            "late_ticks_since_join": sum(s.late_ticks for s in stats),
            "skipped_ticks_since_join": sum(s.skipped_ticks for s in stats),
            "rss_mib": round(rss_bytes() / 2**20, 1),
            "gc": self._gc.report(),
        }


def _packets(stats: list[SessionStats]) -> int:
    """Packets sent, audio and silence, over every session."""
    return sum(s.frames_sent + s.silence_sent for s in stats)
