"""``bench join``: time from ``Voice.join_channel`` to the first audio frame another member hears, with DAVE.

Each run creates a fresh guild and DAVE voice channel in the emulator (its own process and core) with
``members - 1`` listening participants already in the call (their DAVE group established), then the bot,
in the process under test, calls ``join_channel`` and immediately hands its session an endless Opus source.
The transmit lane holds the audio until the DAVE group including the bot is ready (no frame leaves in
clear), so the first frame a listener decrypts marks the end of the whole join: main gateway op 4, voice
handshake, UDP discovery, DAVE key package, commit, Welcome and transition, then the first clock tick.

Times are ``time.monotonic()`` in both processes (one system-wide clock). A run reports when
``join_channel`` returned, when the bot's DAVE group was ready, and when the first and the last listener
heard the bot; the report gives the median and p95 over the runs.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
from typing import Any

from cordvoice.bench.frames import LoopingFrames, opus_frames
from cordvoice.bench.machine import machine_info, pin_to_core, plan_placement, restores_affinity
from cordvoice.bench.process import BenchError, ChildProcess, require
from cordvoice.bench.send_cordvoice import world_client
from cordvoice.events import DaveEpochEvent
from cordvoice.metrics import nearest_rank
from cordvoice.voice import Voice

__all__ = ["JoinWorker", "run_join"]

logger = logging.getLogger(__name__)


class JoinWorker:
    """The bot of ``bench join``: ``cmd_join_once`` joins one channel, streams, and reports its timestamps."""

    def __init__(self, *, world: dict[str, Any]) -> None:
        self.client, self._ssl = world_client(world)
        self.voice: Voice | None = None

    async def start(self) -> None:
        self.frames = opus_frames()
        await self.client.start()
        self.voice = Voice(self.client, ssl=self._ssl if self._ssl is not None else False)

    async def close(self) -> None:
        if self.voice is not None:
            await self.voice.close()
        await self.client.close()

    async def cmd_join_once(
        self,
        *,
        guild_id: int,
        channel_id: int,
        timeout: float = 30.0,  # noqa: ASYNC109 - a command's own bound, passed from the other process
    ) -> dict[str, Any]:
        voice = self.voice
        assert voice is not None
        await self._wait_for_guild(guild_id, within=timeout)
        started = time.monotonic()
        session = await voice.join_channel(guild_id, channel_id, timeout=timeout)
        joined = time.monotonic()
        session.set_provider(LoopingFrames(self.frames))
        dave_ready = joined if session.dave_ready else None
        if dave_ready is None:
            ready = asyncio.Event()
            unsubscribe = session.on(DaveEpochEvent, lambda event: ready.set() if event.epoch else None)
            try:
                async with asyncio.timeout(timeout):
                    while not session.dave_ready:
                        ready.clear()
                        await ready.wait()
            finally:
                unsubscribe()
            dave_ready = time.monotonic()
        return {"started": started, "joined": joined, "dave_ready": dave_ready}

    async def cmd_leave(self, *, guild_id: int) -> None:
        assert self.voice is not None
        await self.voice.leave(guild_id)

    async def _wait_for_guild(self, guild_id: int, within: float) -> None:
        # A guild created after login arrives as GUILD_CREATE; joining before it did would race it. The
        # client has no event for it, so poll (this happens before the measured interval starts).
        async with asyncio.timeout(within):
            while guild_id not in self.client.guilds:  # noqa: ASYNC110
                await asyncio.sleep(0.005)


def _median_p95(values: list[float]) -> dict[str, float]:
    if not values:
        return {"median": 0.0, "p95": 0.0, "min": 0.0, "max": 0.0}
    ordered = sorted(values)
    p95 = ordered[min(len(ordered), nearest_rank(len(ordered), 95)) - 1]
    return {
        "median": round(statistics.median(ordered), 1),
        "p95": round(p95, 1),
        "min": round(ordered[0], 1),
        "max": round(ordered[-1], 1),
    }


@restores_affinity
def run_join(
    *,
    members: tuple[int, ...] = (2, 10),
    runs: int = 10,
    uvloop: bool = False,
    log_level: int = logging.WARNING,
) -> dict[str, Any]:
    """Run the join benchmark for each channel size in ``members`` (the bot included)."""
    if runs < 1:
        raise BenchError("--runs must be at least 1")
    if any(m < 2 for m in members):
        raise BenchError("a channel needs at least 2 members (the bot and one listener)")
    if uvloop:
        require("uvloop", option="--uvloop", package="uvloop")
    placement = plan_placement()
    machine = machine_info()  # before pinning: it reports the usable cores
    pin_to_core(placement.emulator_core)
    report: dict[str, Any] = {
        "benchmark": "join",
        "dave": True,
        "runs": runs,
        "loop": "uvloop" if uvloop else "asyncio",
        "placement": placement.describe(),
        "machine": machine,
        "results": {},
    }
    host = ChildProcess(
        "cordvoice.bench.host:EmulatorHost",
        name="emulator",
        core=placement.emulator_core,
        log_level=log_level,
    )
    with host:
        world = host.call("world", guilds=0, dave=True)
        worker = ChildProcess(
            "cordvoice.bench.join:JoinWorker",
            name="bot",
            core=placement.bench_core,
            uvloop=uvloop,
            options={"world": world},
            log_level=log_level,
        )
        with worker:
            bot_user_id = world["bot_user_id"]
            for size in members:
                samples: dict[str, list[float]] = {
                    "joined": [],
                    "dave_ready": [],
                    "first_heard": [],
                    "all_heard": [],
                }
                for _ in range(runs):
                    guild_id, channel_id = host.call("create_channel", dave=True)
                    host.call("add_listeners", channel_id=channel_id, count=size - 1)
                    times = worker.call("join_once", guild_id=guild_id, channel_id=channel_id)
                    heard = host.call("heard", channel_id=channel_id, user_id=bot_user_id)
                    worker.call("leave", guild_id=guild_id)
                    host.call("remove_listeners", channel_id=channel_id)
                    start = times["started"]
                    samples["joined"].append((times["joined"] - start) * 1000)
                    samples["dave_ready"].append((times["dave_ready"] - start) * 1000)
                    samples["first_heard"].append((min(heard) - start) * 1000)
                    samples["all_heard"].append((max(heard) - start) * 1000)
                report["results"][f"members_{size}"] = {
                    "members": size,
                    "first_heard_ms": _median_p95(samples["first_heard"]),
                    "all_heard_ms": _median_p95(samples["all_heard"]),
                    "join_channel_ms": _median_p95(samples["joined"]),
                    "dave_ready_ms": _median_p95(samples["dave_ready"]),
                    "samples_first_heard_ms": [round(x, 1) for x in samples["first_heard"]],
                }
    first = report["results"].get("members_2")
    if first is not None:
        report["first_heard_ms_2_members"] = first["first_heard_ms"]["median"]
    return report
