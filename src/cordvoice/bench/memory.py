"""``bench memory``: resident memory per idle voice session and per playing one.

The process under test logs one bot in (the emulator, in its own process, already holds the guilds, so
their GUILD_CREATE payloads are part of the baseline), reads its RSS, joins ``sessions`` channels (DAVE
voice channels with a quiet member each, or stages without DAVE) and waits until every DAVE group is ready,
reads its RSS again (idle sessions), then starts Opus passthrough on every session, lets it run for
``seconds``, and reads it a third time (playing sessions). Deltas divided by the session count give the
per-session figures; RSS is read from ``/proc/self/statm`` after a ``gc.collect()``.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from cordvoice.bench.machine import machine_info, pin_to_core, plan_placement, restores_affinity, rss_bytes
from cordvoice.bench.process import BenchError, ChildProcess, require
from cordvoice.bench.send_cordvoice import CordvoiceSender

__all__ = ["MemoryWorker", "run_memory"]

logger = logging.getLogger(__name__)


class MemoryWorker(CordvoiceSender):
    """The send benchmark's bot, with RSS readings between the phases."""

    async def cmd_rss(self) -> int:
        return rss_bytes()

    async def cmd_play(self, *, seconds: float) -> dict[str, Any]:
        await self.cmd_stream(warmup=seconds)
        sent = sum(s.stats.frames_sent for s in self.sessions)
        return {"frames_sent": sent, "rss": rss_bytes()}


@restores_affinity
def run_memory(
    *,
    sessions: int = 200,
    seconds: float = 5.0,
    dave: bool = True,
    uvloop: bool = False,
    log_level: int = logging.WARNING,
) -> dict[str, Any]:
    """Run the memory benchmark; returns its JSON-ready report."""
    if sessions < 1:
        raise BenchError("--sessions must be at least 1")
    if uvloop:
        require("uvloop", option="--uvloop", package="uvloop")
    placement = plan_placement()
    machine = machine_info()  # before pinning: it reports the usable cores
    pin_to_core(placement.emulator_core)
    report: dict[str, Any] = {
        "benchmark": "memory",
        "sessions": sessions,
        "seconds": seconds,
        "dave": dave,
        "loop": "uvloop" if uvloop else "asyncio",
        "placement": placement.describe(),
        "machine": machine,
    }
    host = ChildProcess(
        "cordvoice.bench.host:EmulatorHost",
        name="emulator",
        core=placement.emulator_core,
        log_level=log_level,
    )
    with host:
        world = host.call("world", guilds=sessions, dave=dave)
        if dave:
            host.call("add_members", channels=[c for _, c in world["channels"]], timeout=600.0)
        worker = ChildProcess(
            "cordvoice.bench.memory:MemoryWorker",
            name="bot",
            core=placement.bench_core,
            uvloop=uvloop,
            options={"world": world},
            log_level=log_level,
        )
        with worker:
            baseline = worker.call("rss")
            started = time.monotonic()
            setup = worker.call("join", timeout=1800.0)
            idle = worker.call("rss")
            playing = worker.call("play", seconds=seconds)
    mib = 2**20
    idle_delta = idle - baseline
    playing_delta = playing["rss"] - baseline
    report.update(
        {
            "setup_s": round(time.monotonic() - started, 3),
            "sessions_joined": setup["sessions"],
            "rss_baseline_mib": round(baseline / mib, 1),
            "rss_idle_mib": round(idle / mib, 1),
            "rss_playing_mib": round(playing["rss"] / mib, 1),
            "idle_kib_per_session": round(idle_delta / sessions / 1024, 1),
            "playing_kib_per_session": round(playing_delta / sessions / 1024, 1),
            "playing_extra_kib_per_session": round((playing_delta - idle_delta) / sessions / 1024, 1),
            "frames_sent": playing["frames_sent"],
        }
    )
    return report
