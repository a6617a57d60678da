"""Soak: many sessions stream for minutes; memory and the task count stay flat.

The emulator runs in a child process (``cordvoice emulate``), so this process holds nothing but cordvoice: two
bots, each in every guild, so each guild's voice channel holds one DAVE group of two sessions that send to
each other. Half the sessions play an Ogg Opus file through the player (passthrough, looped), half feed the
transmit lane from a provider of pre-encoded frames (``Session.set_provider``).

After a warm-up the resident set size (RSS) and the task count are taken; at the end the RSS must be within
5% of it and the task count unchanged, every session still ready, in its group, and sending, and the partner's
packets still arriving.

CI: 100 sessions (50 guilds) for 100 s (20 s of warm-up). Manual (``CORDVOICE_MANUAL=1``): 200 sessions for
``CORDVOICE_SOAK_SECONDS`` (default 600, 60 s of warm-up). ``CORDVOICE_SOAK_REPORT=path`` writes the samples.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import json
import os
import resource
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from cordvoice import Voice
from cordvoice.audio.opus import OpusEncoder
from cordvoice.audio.samples import demo_pcm, write_demo_ogg
from cordvoice.gateway import Client
from cordvoice.session import Session, SessionState

StartEmulator = Callable[[int], Awaitable[dict[str, Any]]]
"""The ``emulator_process`` fixture (tests/conftest.py)."""
MANUAL_SECONDS = float(os.environ.get("CORDVOICE_SOAK_SECONDS", "600"))
FRAME_BYTES = 3840
_PAGE = resource.getpagesize()


def rss_bytes() -> int:
    with open("/proc/self/statm", encoding="ascii") as statm:
        return int(statm.read().split()[1]) * _PAGE


class LoopingFrames:
    """A frame provider that never runs dry: the same real Opus frames, round and round."""

    def __init__(self, frames: list[bytes]) -> None:
        self._next = itertools.cycle(frames).__next__

    def pull(self) -> bytes | None:
        return self._next()


def opus_frames(seconds: float) -> list[bytes]:
    pcm = demo_pcm(seconds)
    with OpusEncoder(bitrate=64_000) as encoder:
        return [
            encoder.encode(pcm[i : i + FRAME_BYTES])
            for i in range(0, len(pcm) - FRAME_BYTES + 1, FRAME_BYTES)
        ]


@dataclass
class Sample:
    t: float
    rss: int
    tasks: int
    frames_sent: int
    received: int


@dataclass
class SoakReport:
    sessions: int
    seconds: float
    warmup: float
    samples: list[Sample] = field(default_factory=list)
    unhealthy: list[str] = field(default_factory=list)
    """Sessions not ready, not in their DAVE group, or short of the full rate after warm-up, at the end."""

    def as_json(self) -> dict[str, Any]:
        return {
            "sessions": self.sessions,
            "seconds": self.seconds,
            "warmup": self.warmup,
            "samples": [s.__dict__ for s in self.samples],
            "unhealthy": self.unhealthy,
        }


def _counts(session: Session) -> tuple[int, int]:
    """(frames sent, packets received from the partner) of one session."""
    stats = session.stats
    return stats.frames_sent, sum(stats.received_per_ssrc.values())


def _totals(sessions: list[Session]) -> tuple[int, int]:
    counts = [_counts(s) for s in sessions]
    return sum(sent for sent, _ in counts), sum(received for _, received in counts)


def _unhealthy(sessions: list[Session], warm: list[tuple[int, int]], window: float) -> list[str]:
    """Each session on its own (the totals hide one that stopped): ready, in its DAVE group, and sending and
    hearing its partner at 95% of the full rate (50 frames/s) since the warm-up."""
    expected = 0.95 * 50 * window
    problems = []
    for index, (session, (sent_then, received_then)) in enumerate(zip(sessions, warm, strict=True)):
        sent, received = _counts(session)
        if session.state is not SessionState.READY or not session.dave_ready:
            problems.append(f"session {index}: {session.state.value}, dave_ready={session.dave_ready}")
        elif sent - sent_then < expected or received - received_then < expected:
            problems.append(
                f"session {index}: sent {sent - sent_then}, received {received - received_then} frames in "
                f"{window:.1f} s after warm-up"
            )
    return problems


async def _soak(
    guilds: int,
    seconds: float,
    warmup: float,
    tmp_path: Path,
    emulator_process: StartEmulator,
) -> SoakReport:
    ogg = tmp_path / "soak.ogg"
    write_demo_ogg(ogg, seconds=8.0)
    frames = opus_frames(8.0)
    world = await emulator_process(guilds)
    clients: list[Client] = []
    voices: list[Voice] = []
    sessions: list[Session] = []
    report = SoakReport(2 * guilds, seconds, warmup)
    loop = asyncio.get_running_loop()
    try:
        for bot in world["bots"]:
            client = Client(
                bot["token"], gateway_url=world["gateway_url"], api_base=world["api_base"], send_limit=None
            )
            await client.start()
            clients.append(client)
            voices.append(Voice(client, ssl=False, join_timeout=60.0))
        joins = [
            voice.join_channel(int(guild["id"]), int(guild["voice_channels"][0]["id"]))
            for voice in voices
            for guild in world["guilds"]
        ]
        async with asyncio.timeout(120):
            sessions = list(await asyncio.gather(*joins))
            while not all(s.dave_ready for s in sessions):
                await asyncio.sleep(0.1)
        for index, session in enumerate(sessions):
            if index % 2:
                session.play(str(ogg), loop=True)
            else:
                session.set_provider(LoopingFrames(frames))
                session.wake()
        started = loop.time()
        warm: Sample | None = None
        warm_counts: list[tuple[int, int]] = []
        while True:
            elapsed = loop.time() - started
            if elapsed >= seconds:
                break
            await asyncio.sleep(min(5.0, seconds - elapsed))
            gc.collect()
            sent, received = _totals(sessions)
            sample = Sample(
                round(loop.time() - started, 1), rss_bytes(), len(asyncio.all_tasks()), sent, received
            )
            report.samples.append(sample)
            if warm is None and sample.t >= warmup:
                warm = sample
                warm_counts = [_counts(s) for s in sessions]
        if warm is not None:
            report.unhealthy = _unhealthy(sessions, warm_counts, report.samples[-1].t - warm.t)
        return report
    finally:
        for voice in voices:
            await voice.close()
        for client in clients:
            await client.close()
        states = [s.state for s in sessions]
        report_states = {state.value: states.count(state) for state in set(states)}
        print(json.dumps({"end_states": report_states}))
        out = os.environ.get("CORDVOICE_SOAK_REPORT")
        if out:
            Path(out).write_text(json.dumps(report.as_json(), indent=1))  # noqa: ASYNC240 - once, at the end


def _check(report: SoakReport, sessions_expected: int) -> None:
    samples = report.samples
    warm = next(s for s in samples if s.t >= report.warmup)
    end = samples[-1]
    after = [s for s in samples if s.t >= report.warmup]
    growth = (end.rss - warm.rss) / warm.rss
    mib = 2**20
    peak = max(s.rss for s in after) / mib
    tasks = sorted(s.tasks for s in after)
    print(
        f"soak: {sessions_expected} sessions, {report.seconds:.0f} s; "
        f"RSS after warm-up {warm.rss / mib:.1f} MiB, "
        f"at the end {end.rss / mib:.1f} MiB ({growth:+.2%}); max {peak:.1f} MiB; "
        f"tasks {warm.tasks} -> {end.tasks} (range {tasks[0]}-{tasks[-1]}); "
        f"frames sent {end.frames_sent}, received {end.received}"
    )
    assert abs(growth) <= 0.05, f"RSS grew {growth:+.2%} after warm-up"
    assert tasks[0] == tasks[-1] == warm.tasks, "the task count moved"
    # Everyone kept sending and receiving at the full rate over the measured window (50 frames/s/session).
    window = end.t - warm.t
    expected = sessions_expected * 50 * window
    assert end.frames_sent - warm.frames_sent >= 0.95 * expected
    assert end.received - warm.received >= 0.95 * expected
    assert not report.unhealthy, f"{len(report.unhealthy)} sessions: {report.unhealthy[:10]}"


@pytest.mark.slow
async def test_soak_ci_100_sessions(tmp_path: Path, emulator_process: StartEmulator) -> None:
    report = await _soak(50, 100.0, 20.0, tmp_path, emulator_process)
    _check(report, 100)


@pytest.mark.slow
async def test_soak_fails_when_one_session_stops_sending(
    tmp_path: Path, emulator_process: StartEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One quiet session out of 40 (and its partner hearing nothing) leaves the totals above 95%: the soak
    must still fail, since it claims every session kept sending and hearing its partner."""
    joined: list[Session] = []
    join = Voice.join_channel

    async def join_and_note(self: Voice, guild_id: int, channel_id: int, **options: Any) -> Session:
        session = await join(self, guild_id, channel_id, **options)
        joined.append(session)
        return session

    monkeypatch.setattr(Voice, "join_channel", join_and_note)

    async def silence_one() -> None:
        while len(joined) < 40 or not all(s.dave_ready for s in joined):
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)  # everyone is streaming
        next(s for s in joined if isinstance(s._lane.provider, LoopingFrames)).set_provider(None)
        await asyncio.Event().wait()  # alive until cancelled: the task count stays as it was

    silencer = asyncio.create_task(silence_one())
    try:
        report = await _soak(20, 12.0, 2.0, tmp_path, emulator_process)
    finally:
        silencer.cancel()
    with pytest.raises(AssertionError, match="2 sessions: "):
        _check(report, 40)


@pytest.mark.manual
async def test_soak_manual(tmp_path: Path, emulator_process: StartEmulator) -> None:
    report = await _soak(100, MANUAL_SECONDS, 60.0, tmp_path, emulator_process)
    _check(report, 200)
