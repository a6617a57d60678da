"""``bench send``: N concurrent sessions in one process stream Opus passthrough to an emulator in another.

Placement: the emulator (and this orchestrating process, which only waits) run on one core, the process
under test on the other (``os.sched_setaffinity``). Phases, for cordvoice and then for each peer:

1. the emulator builds one guild per session with one channel (a DAVE voice channel with one quiet member,
   or with ``dave=False`` a stage channel without DAVE);
2. the process under test logs in, joins every channel and waits for every DAVE group (``setup``);
3. it starts streaming and warms up;
4. the measurement windows: the process under test reads its counters and takes a CPU snapshot, then
   0.2 s later (once its clock has caught up) its clock figures and the emulator's arrival statistics
   start; ``seconds`` later the emulator reports, then the process. ``measured_core`` says how the
   process's core was shared in the arrival window (other processes, the hypervisor's steal).

``cpu_us_per_packet`` is the process under test's CPU (user + system, all threads) divided by the packets it
sent in the window. ``lateness_ms`` is measured where the packets arrive: for every stream, how late each
packet reached the SFU against that stream's 20 ms grid (anchored at its earliest packet and advanced by the
RTP timestamp; the streams never pause, so a gap in them counts as lateness), merged over every stream.
``packets_lost`` counts sequence numbers that never arrived.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from cordvoice.bench.machine import CoreShare, machine_info, pin_to_core, plan_placement, restores_affinity
from cordvoice.bench.process import BenchError, ChildProcess, require
from cordvoice.bench.profile import SpyRecording, summarize

__all__ = ["PEERS", "run_send"]

logger = logging.getLogger(__name__)

PEERS: dict[str, str] = {
    "discordpy": "cordvoice.bench.send_discordpy:DiscordpySender",
}
_SETTLE = 0.2
"""Seconds the process under test waits after reading its counters at "begin" before the arrival window and
its clock figures start: the clock catches up the ticks that reading delayed before anything counts."""
_CORDVOICE = "cordvoice.bench.send_cordvoice:CordvoiceSender"
_SFU_READ_INTERVAL = 0.001
"""Seconds between the emulator's reads of its media socket (``--sfu-reads timer``; see
:meth:`~cordvoice.emulator.sfu.MediaServer.read_every`)."""


@restores_affinity
def run_send(
    *,
    sessions: int,
    seconds: float,
    dave: bool = True,
    mode: str = "aes",
    peer: str | None = None,
    uvloop: bool = False,
    feed: str = "provider",
    slot_capacity: int | None = None,
    sfu_reads: str = "timer",
    warmup: float = 3.0,
    profile_dir: Path | None = None,
    log_level: int = logging.WARNING,
) -> dict[str, Any]:
    """Run the send benchmark and return its JSON-ready report.

    ``profile_dir``: record a py-spy profile of each process under test during its window there, and add
    a summary (self and inclusive sample shares) to the report. ``sfu_reads``: ``timer`` (the emulator reads
    its media socket every millisecond, so the sender's loopback sends never wake it) or ``wakeup`` (it reads
    whenever the socket is readable, as it does outside benchmarks).
    """
    if sessions < 1:
        raise BenchError("--sessions must be at least 1")
    if seconds <= 0:
        raise BenchError("--seconds must be positive")
    if slot_capacity is not None and slot_capacity < 0:
        raise BenchError("--slot-capacity must be 0 (spread evenly) or more")
    if mode not in ("aes", "xchacha"):
        raise BenchError("--mode must be aes or xchacha")
    if sfu_reads not in ("timer", "wakeup"):
        raise BenchError("--sfu-reads must be timer or wakeup")
    if peer is not None and peer not in PEERS:
        raise BenchError(f"unknown peer {peer!r}; known: {sorted(PEERS)}")
    if peer == "discordpy":
        require("discord", option="--peer discordpy", package="discord.py")
    if uvloop:
        require("uvloop", option="--uvloop", package="uvloop")
    placement = plan_placement()
    machine = machine_info()  # before pinning: it reports the usable cores
    pin_to_core(placement.emulator_core)  # this process only waits; keep it off the measured core
    report: dict[str, Any] = {
        "benchmark": "send",
        "sessions": sessions,
        "seconds": seconds,
        "dave": dave,
        "mode": mode,
        "loop": "uvloop" if uvloop else "asyncio",
        "feed": feed,
        "clock_slot_capacity": "library default" if slot_capacity is None else slot_capacity,
        "sfu_reads": sfu_reads,
        "warmup_s": warmup,
        "placement": placement.describe(),
        "machine": machine,
    }
    host = ChildProcess(
        "cordvoice.bench.host:EmulatorHost",
        name="emulator",
        core=placement.emulator_core,
        options={
            "tls": peer == "discordpy",
            "offer_aes": mode == "aes",
            "sfu_read_interval": _SFU_READ_INTERVAL if sfu_reads == "timer" else None,
        },
        log_level=log_level,
    )
    with host:
        ours = {"feed": feed, "slot_capacity": slot_capacity}
        runs: list[tuple[str, str, dict[str, Any]]] = [("cordvoice", _CORDVOICE, ours)]
        if peer is not None:
            runs.append((peer, PEERS[peer], {}))
        for name, factory, options in runs:
            report[name] = _run_one(
                host,
                factory,
                name=name,
                sessions=sessions,
                seconds=seconds,
                dave=dave,
                warmup=warmup,
                core=placement.bench_core,
                uvloop=uvloop,
                options=options,
                profile=None if profile_dir is None else profile_dir / f"send-{name}-{sessions}.txt",
                log_level=log_level,
            )
    result = report["cordvoice"]
    for key in ("sessions", "cpu_us_per_packet", "core_percent_per_stream", "lateness_ms", "packets_lost"):
        report[key if key != "sessions" else "sessions_streaming"] = result[key]
    report["setup_s"] = result["setup"]["setup_s"]
    if peer is not None:
        report["ratios"] = _ratios(result, report[peer])
    return report


def _run_one(
    host: ChildProcess,
    factory: str,
    *,
    name: str,
    sessions: int,
    seconds: float,
    dave: bool,
    warmup: float,
    core: int | None,
    uvloop: bool,
    options: dict[str, Any],
    profile: Path | None,
    log_level: int,
) -> dict[str, Any]:
    world = host.call("world", guilds=sessions, dave=dave)
    guilds = [guild_id for guild_id, _ in world["channels"]]
    members: dict[str, Any] = {"members": 0, "seconds": 0.0}
    if dave:
        members = host.call("add_members", channels=[c for _, c in world["channels"]], timeout=600.0)
    worker = ChildProcess(
        factory,
        name=name,
        core=core,
        uvloop=uvloop,
        options={"world": world, **options},
        log_level=log_level,
    )
    with worker:
        setup = worker.call("join", timeout=1800.0)
        worker.call("stream", warmup=warmup)
        # The arrival window sits inside the process's window: reading a thousand sessions' counters at
        # "begin" and "end" pauses the process under test, and that pause is the bench's, not the library's.
        worker.call("begin", settle=_SETTLE)
        host.call("reset_rtp", guilds=guilds)
        share_before = CoreShare.take(worker.info["pid"])
        recording = None if profile is None else SpyRecording(worker.info["pid"], seconds, profile)
        time.sleep(seconds)
        arrivals = host.call("rtp_report", guilds=guilds)
        share_after = CoreShare.take(worker.info["pid"])
        measured = worker.call("end")
        profile_error = recording.wait() if recording is not None else ""
        counts = host.call("counts")
    result: dict[str, Any] = {
        "sessions": setup["sessions"],
        "setup": {**setup, "members_setup_s": members["seconds"]},
        "cpu_us_per_packet": measured["cpu_us_per_packet"],
        "core_percent_per_stream": measured["core_percent_per_stream"],
        "lateness_ms": arrivals["lateness_ms"],
        "packets_lost": arrivals["lost"],
        "packets_sent": measured["packets_sent"],
        "packets_arrived": arrivals["packets"],
        "process": measured,
        "arrivals": arrivals,
        "emulator": counts,
        # The arrival window's share of the measured core: time the process did not get shows in the tail.
        "measured_core": CoreShare.window(share_before, share_after),
        "loop": worker.info.get("loop"),
    }
    if profile is not None:
        result["profile"] = {"file": str(profile), "error": profile_error or None}
        if not profile_error and profile.exists():
            result["profile"].update(summarize(profile))
    if arrivals["silent_streams"]:
        logger.warning("%s: %d streams sent nothing in the window", name, arrivals["silent_streams"])
    return result


def _ratios(ours: dict[str, Any], theirs: dict[str, Any]) -> dict[str, float | None]:
    """``theirs / ours`` for every figure where lower is better (so > 1 means cordvoice is better)."""

    def ratio(a: float | None, b: float | None) -> float | None:
        if a is None or b is None or b == 0:
            return None
        return round(a / b, 2)

    return {
        "cpu_us_per_packet": ratio(theirs["cpu_us_per_packet"], ours["cpu_us_per_packet"]),
        "core_percent_per_stream": ratio(theirs["core_percent_per_stream"], ours["core_percent_per_stream"]),
        "lateness_p50": ratio(theirs["lateness_ms"]["p50"], ours["lateness_ms"]["p50"]),
        "lateness_p99": ratio(theirs["lateness_ms"]["p99"], ours["lateness_ms"]["p99"]),
        "lateness_max": ratio(theirs["lateness_ms"]["max"], ours["lateness_ms"]["max"]),
        "setup_s": ratio(theirs["setup"]["setup_s"], ours["setup"]["setup_s"]),
    }
