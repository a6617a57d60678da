"""The emulator's side of a benchmark: a handler for :class:`~cordvoice.bench.process.ChildProcess`.

It runs the :class:`~cordvoice.emulator.Emulator` (no gateway rate limit) in its own process, builds the
world a benchmark asks for (one bot, many guilds with one channel each), puts quiet members or listening
participants in the channels, and reports what the SFU saw the bot send: per-stream arrival lateness
against each stream's 20 ms grid (merged over all streams), sequence gaps, and its own CPU.

Lateness is measured from the kernel's arrival stamp of each datagram where the platform gives one (Linux),
so a busy emulator does not add to it; elsewhere it is the time the SFU read the packet, an upper bound. The
emulator's CPU share is reported beside it so that a busy emulator is visible. With ``sfu_read_interval``
the SFU reads its socket on a timer (:meth:`~cordvoice.emulator.sfu.MediaServer.read_every`), so the sender's
loopback sends never pay for waking this process.

Quiet members never read media, so once they have joined the SFU stops forwarding to them
(:meth:`~cordvoice.emulator.sfu.MediaServer.stop_forwarding_to`): the emulator's core then only receives,
authenticates and records the bots' packets, and stays out of the way of a thousand-stream measurement.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from typing import Any

from cordvoice.bench.gcwatch import GcWatch
from cordvoice.bench.machine import CpuSnapshot
from cordvoice.bench.member import QuietMember
from cordvoice.emulator.inspection import RtpStats
from cordvoice.emulator.participant import Participant
from cordvoice.emulator.server import Emulator
from cordvoice.emulator.voice_protocol import VoiceServerConfig
from cordvoice.errors import EmulatorError
from cordvoice.metrics import Histogram
from cordvoice.udp.rtp import OPUS_SILENCE

__all__ = ["EmulatorHost", "histogram_summary", "window_stats"]

logger = logging.getLogger(__name__)

_BOT_NAME = "bench-bot"


def histogram_summary(histogram: Histogram) -> dict[str, float | int]:
    """``{count, p50, p99, p999, max, mean}`` in ms (bucket upper bounds, like :meth:`Histogram.summary`)."""
    summary = histogram.summary()
    summary["p999"] = round(histogram.percentile(99.9), 3) if histogram.count else 0.0
    return summary


def window_stats() -> RtpStats:
    """Arrival statistics for one stream in a measurement window.

    The bench's streams never pause (looping sources), so a long gap between two packets is the sender
    stalling, not a new talk spurt: it counts as lateness instead of re-anchoring the stream's grid, which
    reported a 250 ms stall as 0 ms late while a 190 ms one showed as 170 ms.
    """
    return RtpStats(spurt_gap=None)


class EmulatorHost:
    """Commands: ``world``, ``add_members``, ``add_listeners``, ``reset_rtp``, ``rtp_report``, ``heard``..."""

    def __init__(
        self,
        *,
        tls: bool = False,
        offer_aes: bool = True,
        heartbeat_interval_ms: float = 13_750.0,
        sfu_read_interval: float | None = None,
    ) -> None:
        self.emu = Emulator(
            rate_limit=None,
            tls=tls,
            voice_config=VoiceServerConfig(offer_aes=offer_aes, heartbeat_interval_ms=heartbeat_interval_ms),
            close_timeout=1.0,
        )
        self._sfu_read_interval = sfu_read_interval
        self.members: dict[int, list[QuietMember]] = {}
        self.listeners: dict[int, list[Participant]] = {}
        self.guilds: list[int] = []
        self._bot_user_id = 0
        self._window_start: CpuSnapshot | None = None
        self._gc = GcWatch()
        self._window_counters: dict[str, int] = {}
        self.unforwarded = 0
        """Quiet members the SFU no longer forwards audio to."""

    async def start(self) -> None:
        await self.emu.start()
        if self._sfu_read_interval is not None:
            try:
                self.emu.voice_server().media.read_every(self._sfu_read_interval)
            except EmulatorError as exc:  # no kernel arrival stamps here: keep reading on wake-ups
                logger.warning("the SFU reads its socket when it is readable: %s", exc)
        bot = self.emu.create_bot(_BOT_NAME)
        self._bot_user_id = bot.user_id
        self._bot_token = bot.token

    async def close(self) -> None:
        for members in self.members.values():
            for member in members:
                await member.close()
        self.members.clear()
        self.listeners.clear()
        await self.emu.close()

    # ---- the world ----------------------------------------------------------------------------------

    async def cmd_world(self, *, guilds: int, dave: bool) -> dict[str, Any]:
        """``guilds`` guilds with the bot and one channel each (DAVE voice channels, or stages without it)."""
        emu = self.emu
        channels: list[tuple[int, int]] = []
        for index in range(guilds):
            guild = emu.create_guild(f"bench {index}", members=[self._bot_user_id])
            if dave:
                channel = emu.create_voice_channel(guild.id, "Voice")
            else:
                channel = emu.create_stage_channel(guild.id, "Stage")
            channels.append((guild.id, channel.id))
            self.guilds.append(guild.id)
        return {
            "token": self._bot_token,
            "bot_user_id": self._bot_user_id,
            "gateway_url": emu.gateway_url,
            "api_base": emu.api_base,
            "ca_file": None if emu.ca_file is None else str(emu.ca_file),
            "channels": channels,
        }

    async def cmd_add_members(
        self,
        *,
        channels: list[int],
        per_channel: int = 1,
        concurrency: int = 32,
        timeout: float = 60.0,  # noqa: ASYNC109 - a command's own bound, passed from the other process
    ) -> dict[str, Any]:
        """Quiet members (DAVE, no media reading) in every channel; returns how long that took."""
        started = time.monotonic()
        limit = asyncio.Semaphore(concurrency)

        async def add(channel_id: int) -> None:
            async with limit:
                session = self.emu.admit_to_voice(channel_id)
                member = await QuietMember.join(
                    session, ssl_context=self.emu.client_ssl_context(), timeout=timeout
                )
                self.members.setdefault(channel_id, []).append(member)

        async with asyncio.timeout(timeout + len(channels) * per_channel * 0.1):
            await asyncio.gather(*(add(c) for c in channels for _ in range(per_channel)))
        # Quiet members never read media: the SFU need not seal and send them the bots' audio.
        server = self.emu.voice_server()
        for members in self.members.values():
            for member in members:
                record = server.core.sessions.get((member.session.guild_id, member.session.user_id))
                if record is not None:
                    server.media.stop_forwarding_to(record.media)
                    self.unforwarded += 1
        return {"members": len(channels) * per_channel, "seconds": round(time.monotonic() - started, 3)}

    async def cmd_add_listeners(
        self,
        *,
        channel_id: int,
        count: int,
        timeout: float = 30.0,  # noqa: ASYNC109 - a command's own bound, passed from the other process
    ) -> list[int]:
        """Listening participants (they decrypt and keep what they hear) in ``channel_id``; their user ids."""
        joined = await asyncio.gather(
            *(self.emu.add_participant(channel_id, timeout=timeout) for _ in range(count))
        )
        listeners = self.listeners.setdefault(channel_id, [])
        listeners.extend(joined)
        if len(listeners) > 1:  # a lone member has no group to wait for: it forms when the next one joins
            for participant in listeners:
                await participant.wait_dave_ready(timeout)
        return [p.user_id for p in joined]

    async def cmd_create_channel(self, *, dave: bool = True) -> tuple[int, int]:
        """One more guild (the bot a member) with one channel; returns ``(guild_id, channel_id)``."""
        guild = self.emu.create_guild(f"bench {len(self.guilds)}", members=[self._bot_user_id])
        self.guilds.append(guild.id)
        if dave:
            channel = self.emu.create_voice_channel(guild.id, "Voice")
        else:
            channel = self.emu.create_stage_channel(guild.id, "Stage")
        return guild.id, channel.id

    async def cmd_remove_listeners(self, *, channel_id: int) -> None:
        for participant in self.listeners.pop(channel_id, []):
            with contextlib.suppress(Exception):
                await participant.leave()

    async def cmd_heard(
        self,
        *,
        channel_id: int,
        user_id: int,
        timeout: float = 10.0,  # noqa: ASYNC109 - a command's own bound, passed from the other process
    ) -> list[float]:
        """Wait until every listener in ``channel_id`` heard an audio frame from ``user_id``.

        Returns each listener's arrival time (``time.monotonic()``, shared by every process) of the first
        decrypted frame that is not the silence frame.
        """
        listeners = self.listeners.get(channel_id, [])
        if not listeners:
            raise EmulatorError(f"no listeners in channel {channel_id}")

        def first_audio(participant: Participant) -> float | None:
            for frame in participant.frames_from(user_id):
                if frame.payload != OPUS_SILENCE:
                    return frame.arrival
            return None

        async with asyncio.timeout(timeout):
            for participant in listeners:

                def heard(p: Participant = participant) -> bool:
                    return first_audio(p) is not None

                await participant.wait_until(heard, timeout)
        times = [first_audio(p) for p in listeners]
        return [t for t in times if t is not None]

    # ---- what the SFU saw ---------------------------------------------------------------------------

    def _bot_endpoints(self, guilds: list[int] | None) -> list[Any]:
        # The core's live sessions, by (guild, user): ``media_endpoint`` looks a user up in a short
        # per-user history, which a bot in hundreds of guilds overflows.
        sessions = self.emu.voice_server().core.sessions
        found = []
        for guild_id in guilds if guilds is not None else self.guilds:
            record = sessions.get((guild_id, self._bot_user_id))
            if record is not None and not record.ended:
                found.append(record.media)
        return found

    async def cmd_reset_rtp(self, *, guilds: list[int] | None = None) -> int:
        """Start a measurement window: fresh arrival statistics for every bot stream, and a CPU snapshot.

        The emulator's heap (a thousand members' MLS state) is frozen first: a full collection of it pauses
        the emulator for 100-230 ms, long enough for its socket to overflow, and the kernel's drops would
        count as packets the bot lost.
        """
        gc.freeze()
        self._gc.stop()
        self._gc = GcWatch()
        self._gc.start()
        endpoints = self._bot_endpoints(guilds)
        for endpoint in endpoints:
            endpoint.stats = window_stats()
        media = self.emu.voice_server().media
        self._window_counters = {"received": media.received, "forwarded": media.forwarded}
        self._window_start = CpuSnapshot.take()
        return len(endpoints)

    async def cmd_rtp_report(self, *, guilds: list[int] | None = None) -> dict[str, Any]:
        """Arrival statistics of the bot's streams since :meth:`cmd_reset_rtp`, merged over all streams."""
        now = CpuSnapshot.take()
        self._gc.stop()
        merged = Histogram()
        per_stream_p99: list[float] = []
        packets = lost = duplicates = out_of_order = streams = silent_streams = 0
        for endpoint in self._bot_endpoints(guilds):
            stats: RtpStats = endpoint.stats
            streams += 1
            if not stats.packets:
                silent_streams += 1
                continue
            merged.merge(stats.lateness)
            per_stream_p99.append(stats.lateness.percentile(99))
            packets += stats.packets
            lost += stats.lost
            duplicates += stats.duplicates
            out_of_order += stats.out_of_order
        per_stream_p99.sort()
        media = self.emu.voice_server().media
        return {
            "streams": streams,
            "silent_streams": silent_streams,
            "packets": packets,
            "lost": lost,
            "duplicates": duplicates,
            "out_of_order": out_of_order,
            "lateness_ms": histogram_summary(merged),
            "worst_stream_p99_ms": per_stream_p99[-1] if per_stream_p99 else 0.0,
            "median_stream_p99_ms": per_stream_p99[len(per_stream_p99) // 2] if per_stream_p99 else 0.0,
            "sfu_received": media.received - self._window_counters.get("received", 0),
            "sfu_forwarded": media.forwarded - self._window_counters.get("forwarded", 0),
            "sfu_drops": dict(media.counters),
            "emulator_cpu": now.since(self._window_start) if self._window_start is not None else None,
            "emulator_gc": self._gc.report(),
        }

    async def cmd_counts(self) -> dict[str, Any]:
        """Member health and SFU counters (for sanity checks)."""
        members = [m for ms in self.members.values() for m in ms]
        media = self.emu.voice_server().media
        return {
            "members": len(members),
            "members_dave_ready": sum(m.dave_ready for m in members),
            "member_failures": sum(m.failures for m in members),
            "members_not_forwarded_to": self.unforwarded,
            "sfu_counters": dict(media.counters),
            "sfu_reads_on_timer": media.reads_on_timer,
        }
