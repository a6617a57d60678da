"""Issue 6 acceptance: a cordvoice bot records DAVE-encrypted participants through the emulator.

The four scenarios run concurrently (one emulator each, one event loop) in a module fixture, so the module
takes about as long as the longest one (churn: 60 s of audio); each test then checks one scenario's results.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import struct
import time
import wave
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from cordvoice.audio.receive_pipeline import VoiceFrame
from cordvoice.audio.receiver import Receiver
from cordvoice.audio.samples import speech_like
from cordvoice.audio.sinks import CallbackSink, MixedWavSink, PerUserWavSink
from cordvoice.emulator import Participant
from cordvoice.events import DaveEpochEvent
from cordvoice.udp.rtp import build_header

from .receive_helpers import aligned_correlation, encode_pcm, to_mono
from .receive_world import RATE, Impairment, Rewrapper, bot_world, log_sends, window_lag

pytestmark = pytest.mark.slow

RECORD_SECONDS = 30.0
CHURN_SECONDS = 60.0
HOSTILE_SECONDS = 10.0


@dataclass
class Signal:
    pcm: bytes
    frames: list[bytes]

    def head(self, seconds: float) -> Signal:
        count = round(seconds * 50)
        return Signal(self.pcm[: count * 3840], self.frames[:count])


def make_signals() -> list[Signal]:
    """Four distinct speech-like voices, 60 s each, with their Opus frames (the first 30 s are reused)."""
    signals = []
    for voice in range(4):
        pcm = speech_like(CHURN_SECONDS, voice=voice)
        signals.append(Signal(pcm, encode_pcm(pcm)))
    return signals


def read_wav(path: Path) -> bytes:
    with wave.open(str(path), "rb") as reader:
        return reader.readframes(reader.getnframes())


async def play_all(pairs: list[tuple[Participant, Signal]]) -> list[int]:
    return list(await asyncio.gather(*(p.play(signal.frames) for p, signal in pairs)))


async def drained(receiver: Receiver, speakers: list[Participant], sent: list[int] | None = None) -> None:
    """Until every packet received from ``speakers`` is played out (a loaded machine plays out later).

    ``sent``: wait for that many frames per speaker instead, when hostile packets under a speaker's SSRC
    count as received but are never played.
    """

    def behind(index: int, speaker: Participant) -> bool:
        stats = receiver.stats(speaker.user_id)
        return stats.delivered < (stats.received if sent is None else sent[index])

    with contextlib.suppress(TimeoutError):  # the assertions then say what is missing
        async with asyncio.timeout(5.0):
            while any(behind(i, s) for i, s in enumerate(speakers)):
                await asyncio.sleep(0.02)
    await asyncio.sleep(0.1)


# --------------------------------------------------------------------------------------------------
# Scenario 1: three participants, per-user WAVs and a mixed WAV


@dataclass
class RecordingResult:
    stats: dict[str, dict[str, int]]
    recordings: dict[str, tuple[bytes, Path]]
    mixed_path: Path
    correlations: dict[str, float] = field(default_factory=dict)
    mixed_seconds: float = 0.0

    def analyse(self) -> None:
        """Signal metrics, computed after every scenario ended (numpy would stall the shared loop)."""
        for name, (source, path) in self.recordings.items():
            self.correlations[name] = aligned_correlation(to_mono(source), to_mono(read_wav(path)), RATE)[0]
        self.mixed_seconds = len(read_wav(self.mixed_path)) / 4 / RATE


async def scenario_recording(signals: list[Signal], folder: Path) -> RecordingResult:
    async with bot_world("recording") as world:
        speakers = [await world.add_speaker(f"voice{i}") for i in range(3)]
        await world.converge(speakers)
        receiver = world.receiver
        per_user = PerUserWavSink(folder)
        mixed = MixedWavSink(folder / "mixed.wav")
        receiver.add_sink(per_user)
        receiver.add_sink(mixed)
        sources = [signals[i].head(RECORD_SECONDS) for i in range(3)]
        await play_all(list(zip(speakers, sources, strict=True)))
        await drained(receiver, speakers)
        for sink in (per_user, mixed):
            receiver.remove_sink(sink)
            sink.close()
        result = RecordingResult({}, {}, folder / "mixed.wav")
        for index, (speaker, source) in enumerate(zip(speakers, sources, strict=True)):
            result.recordings[f"voice{index}"] = (source.pcm, per_user.paths[speaker.user_id])
            result.stats[f"voice{index}"] = receiver.stats(speaker.user_id).as_dict()
        return result


# --------------------------------------------------------------------------------------------------
# Scenario 2: 10 % loss, 5 % reordering, 20 ms jitter


@dataclass
class ImpairedResult:
    stats: dict[str, dict[str, int]]
    dropped: dict[str, int]
    reordered: dict[str, int]
    recordings: dict[str, tuple[bytes, Path]]
    drift_ms: dict[str, float] = field(default_factory=dict)
    correlations: dict[str, float] = field(default_factory=dict)

    def analyse(self) -> None:
        """Alignment of a window near the start and one near the end: their lags differ by the drift."""
        for name, (source, path) in self.recordings.items():
            ref = to_mono(source)
            out = to_mono(read_wav(path))
            correlation, lag = aligned_correlation(ref, out, RATE)
            start = window_lag(ref, out, 1.0, 4.0, lag, 4800)
            end = window_lag(ref, out, RECORD_SECONDS - 5.0, 4.0, lag, 4800)
            self.drift_ms[name] = abs(end - start) / RATE * 1000
            self.correlations[name] = correlation


async def scenario_impaired(signals: list[Signal], folder: Path) -> ImpairedResult:
    async with bot_world("impaired") as world:
        speakers = [await world.add_speaker(f"voice{i}") for i in (1, 3)]
        await world.converge(speakers)
        impairment = Impairment(
            world.media, world.bot_user_id, loss=0.10, reorder=0.05, jitter=0.020, seed=20261123
        )
        world.media.forward_hook = impairment
        receiver = world.receiver
        per_user = PerUserWavSink(folder)
        receiver.add_sink(per_user)
        sources = [signals[i].head(RECORD_SECONDS) for i in (1, 3)]
        await play_all(list(zip(speakers, sources, strict=True)))
        await asyncio.sleep(0.3)
        receiver.remove_sink(per_user)
        per_user.close()
        world.media.forward_hook = None
        result = ImpairedResult({}, {}, {}, {})
        for speaker, source in zip(speakers, sources, strict=True):
            name = speaker.name
            result.recordings[name] = (source.pcm, per_user.paths[speaker.user_id])
            result.stats[name] = receiver.stats(speaker.user_id).as_dict()
            result.dropped[name] = impairment.dropped[speaker.user_id]
            result.reordered[name] = impairment.reordered[speaker.user_id]
        return result


# --------------------------------------------------------------------------------------------------
# Scenario 3: churn (joins and leaves every 3 s while two participants talk for 60 s)


@dataclass
class ChurnResult:
    epoch_changes: int
    eligible: dict[str, int]
    delivered_eligible: dict[str, int]
    sent: dict[str, int]
    delivered: dict[str, int]
    stats: dict[str, dict[str, int]]
    churn_errors: list[str] = field(default_factory=list)
    connected: bool = True


async def scenario_churn(signals: list[Signal]) -> ChurnResult:
    async with bot_world("churn") as world:
        # Each member gets the gateway's messages up to 40 ms apart, as on a real network: senders often
        # switch to a new key before the bot has the commit, so frames arrive before their key.
        world.emu.set_delivery_order(world.channel_id, seed=6, max_delay=0.040)
        speakers = [await world.add_speaker(f"talker{i}") for i in range(2)]
        await world.converge(speakers)
        receiver = world.receiver
        delivered: dict[int, set[int]] = {p.user_id: set() for p in speakers}

        def note(frame: VoiceFrame) -> None:
            if not frame.concealed and frame.user_id in delivered:
                delivered[frame.user_id].add(frame.sequence)

        receiver.add_sink(CallbackSink(note))
        logs = {p.user_id: log_sends(p) for p in speakers}
        epochs_before = len(world.epoch_times)
        errors: list[str] = []

        async def churn(start: float) -> None:
            joiner: Participant | None = None
            for step in range(int(CHURN_SECONDS // 3)):
                await asyncio.sleep(max(0.0, start + 1.5 + 3 * step - time.monotonic()))
                try:
                    if joiner is None:
                        joiner = await world.add_speaker(f"visitor{step}")
                    else:
                        await joiner.leave()
                        joiner = None
                except Exception as exc:  # reported by the test, never hidden
                    errors.append(f"step {step}: {exc!r}")
            if joiner is not None:
                await joiner.leave()

        start = time.monotonic()
        await asyncio.gather(play_all([(speakers[0], signals[0]), (speakers[1], signals[2])]), churn(start))
        await asyncio.sleep(0.5)
        transitions = sorted(
            world.epoch_times[epochs_before:] + [t for log in logs.values() for t in log.epoch_changes()]
        )
        result = ChurnResult(len(world.epoch_times) - epochs_before, {}, {}, {}, {}, {}, errors)
        result.connected = not world.session.closed
        for speaker in speakers:
            name = speaker.name
            log = logs[speaker.user_id]
            got = delivered[speaker.user_id]
            eligible = [
                seq
                for seq, (sent_at, _enc, _epoch) in log.frames.items()
                if not any(t <= sent_at < t + 1.0 for t in transitions)
            ]
            result.eligible[name] = len(eligible)
            result.delivered_eligible[name] = sum(1 for seq in eligible if seq in got)
            result.sent[name] = len(log.frames)
            result.delivered[name] = len(got)
            result.stats[name] = receiver.stats(speaker.user_id).as_dict()
        return result


# --------------------------------------------------------------------------------------------------
# Scenario 4: hostile packets from the SFU side


@dataclass
class HostileResult:
    stats: dict[str, dict[str, int]]
    sent: dict[str, int]
    injected: Tally
    rewrapped: int
    counters: dict[str, int]
    connected: bool
    recordings: dict[str, tuple[bytes, Path]] = field(default_factory=dict)
    correlations: dict[str, float] = field(default_factory=dict)

    def analyse(self) -> None:
        for name, (source, path) in self.recordings.items():
            self.correlations[name] = aligned_correlation(to_mono(source), to_mono(read_wav(path)), RATE)[0]


class Tally(dict[str, int]):
    def add(self, key: str) -> None:
        self[key] = self.get(key, 0) + 1


async def scenario_hostile(signals: list[Signal], folder: Path) -> HostileResult:
    async with bot_world("hostile") as world:
        speakers = [await world.add_speaker(f"target{i}") for i in range(2)]
        await world.converge(speakers)
        a, b = speakers
        rewrapper = Rewrapper(world.media, a.user_id, world.bot_user_id, seed=7)
        world.media.forward_hook = rewrapper
        receiver = world.receiver
        per_user = PerUserWavSink(folder)
        receiver.add_sink(per_user)
        injected = Tally()
        endpoint = world.bot_endpoint()
        rng = random.Random(99)

        async def inject(until: float) -> None:
            seq = 40_000
            while time.monotonic() < until:
                await asyncio.sleep(0.01)
                seq += 1
                kind = rng.choice(
                    [
                        "garbage",
                        "short",
                        "rtcp",
                        "rtcp_plain",
                        "unknown_ssrc",
                        "bad_tag",
                        "plain_in_dave",
                        "dave_like",
                    ]
                )
                injected.add(kind)
                if kind == "garbage":
                    world.media.inject(endpoint, os.urandom(rng.randint(12, 300)))
                elif kind == "short":
                    world.media.inject(endpoint, os.urandom(rng.randint(0, 11)))
                elif kind == "rtcp":
                    world.media.inject(
                        endpoint, endpoint.seal(struct.pack(">BBHI", 0x81, 201, 7, a.ssrc), os.urandom(24))
                    )
                elif kind == "rtcp_plain":
                    world.media.inject(endpoint, struct.pack(">BBHI", 0x80, 200, 6, a.ssrc) + os.urandom(24))
                elif kind == "unknown_ssrc":
                    header = build_header(seq & 0xFFFF, seq * 960 & 0xFFFFFFFF, rng.getrandbits(32))
                    world.media.inject(endpoint, endpoint.seal(header, b"\xfc" + os.urandom(80)))
                elif kind == "bad_tag":
                    header = build_header(seq & 0xFFFF, 0, a.ssrc)
                    world.media.inject(endpoint, header + os.urandom(100))
                elif kind == "plain_in_dave":
                    # Valid transport, the speaker's SSRC, but plain Opus where DAVE is required.
                    header = build_header(seq & 0xFFFF, 0, a.ssrc)
                    world.media.inject(endpoint, endpoint.seal(header, b"\xfc" + os.urandom(60)))
                else:
                    # A frame with a well-formed DAVE footer nobody can decrypt (held briefly, then dropped).
                    header = build_header(seq & 0xFFFF, 0, b.ssrc)
                    frame = b"\xfc" + os.urandom(60) + os.urandom(8) + b"\x05\x0c\xfa\xfa"
                    world.media.inject(endpoint, endpoint.seal(header, frame))

        sources = [signals[i].head(HOSTILE_SECONDS) for i in (2, 3)]
        until = time.monotonic() + HOSTILE_SECONDS
        sent, _ = await asyncio.gather(play_all(list(zip(speakers, sources, strict=True))), inject(until))
        await drained(receiver, speakers, sent)
        world.media.forward_hook = None
        receiver.remove_sink(per_user)
        per_user.close()
        result = HostileResult({}, {}, injected, rewrapper.rewrapped, receiver.counters.as_dict(), False)
        result.connected = not world.session.closed
        for speaker, source, count in zip(speakers, sources, sent, strict=True):
            result.recordings[speaker.name] = (source.pcm, per_user.paths[speaker.user_id])
            result.stats[speaker.name] = receiver.stats(speaker.user_id).as_dict()
            result.sent[speaker.name] = count
        return result


# --------------------------------------------------------------------------------------------------
# Scenario 5: DAVE edges (sole-member reset with op 24 and transition 0, a participant's op 31 recovery)


@dataclass
class EdgesResult:
    epochs: list[int | None]
    delivered: dict[str, int]
    expected: dict[str, int]
    recovered_tail: tuple[int, int]
    recoveries: int
    bot_recoveries: int
    stats: dict[str, dict[str, int]]


async def scenario_edges(signals: list[Signal]) -> EdgesResult:
    async with bot_world("edges") as world:
        epochs: list[int | None] = []
        world.session.on(DaveEpochEvent, lambda e: epochs.append(e.epoch))
        receiver = world.receiver
        got: dict[int, set[int]] = {}
        receiver.add_sink(
            CallbackSink(lambda f: got.setdefault(f.user_id, set()).add(f.sequence) if f.opus else None)
        )
        session = world.session
        # 1. A talks, then leaves: the bot is alone and the gateway resets the group (op 24, op 21 tid 0).
        first = await world.add_speaker("first")
        await world.converge([first])
        await first.play(signals[0].head(1.0).frames)
        await asyncio.sleep(0.2)
        await first.leave()
        async with asyncio.timeout(10):
            while session.dave is None or session.dave.ready:
                await asyncio.sleep(0.01)
        # 2. B joins the bot's fresh pending group: a new group at epoch 1; B must be heard.
        second = await world.add_speaker("second")
        await world.converge([second])
        await second.play(signals[1].head(2.0).frames)
        # 3. C talks while it fails a commit (op 31): it is removed and re-added with a new key package.
        third = await world.add_speaker("third")
        await world.converge([second, third])
        log = log_sends(third)
        marks: list[float] = []

        async def disturb() -> None:
            await asyncio.sleep(1.0)
            third.fail_next_commit()
            marks.append(time.monotonic())
            await world.add_speaker("fourth")

        await asyncio.gather(third.play(signals[2].head(6.0).frames), disturb())
        after = [seq for seq, (sent, _e, _p) in log.frames.items() if sent >= marks[0] + 2.0]
        heard = got.setdefault(third.user_id, set())  # the sink keeps adding to this set
        # A loaded machine plays the tail out later; on a timeout the assertion says what is missing.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5.0):
                while not heard.issuperset(after):
                    await asyncio.sleep(0.02)
        assert session.dave is not None
        return EdgesResult(
            epochs,
            {p.name: len(got.get(p.user_id, ())) for p in (first, second, third)},
            {"first": 55, "second": 105},
            (sum(1 for seq in after if seq in heard), len(after)),
            third.stats.recoveries,
            session.dave.stats.recoveries,
            {p.name: receiver.stats(p.user_id).as_dict() for p in (first, second, third)},
        )


# --------------------------------------------------------------------------------------------------


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    signals = await asyncio.to_thread(make_signals)
    root = tmp_path_factory.mktemp("receive_acceptance")
    scenarios: dict[str, Awaitable[Any]] = {
        "recording": scenario_recording(signals, root / "recording"),
        "impaired": scenario_impaired(signals, root / "impaired"),
        "churn": scenario_churn(signals),
        "hostile": scenario_hostile(signals, root / "hostile"),
        "edges": scenario_edges(signals),
    }
    async with asyncio.timeout(CHURN_SECONDS + 90):
        outcomes = await asyncio.gather(*scenarios.values(), return_exceptions=True)
    for result in outcomes:
        analyse = getattr(result, "analyse", None)
        if analyse is not None:
            await asyncio.to_thread(analyse)
    return dict(zip(scenarios, outcomes, strict=True))


def outcome(results: dict[str, Any], name: str) -> Any:
    value = results[name]
    if isinstance(value, BaseException):
        raise value
    return value


def test_per_user_recording_matches_sources_and_mix_keeps_length(results: dict[str, Any]) -> None:
    result: RecordingResult = outcome(results, "recording")
    for name, correlation in result.correlations.items():
        assert correlation >= 0.95, (name, correlation, result.stats[name])
    assert abs(result.mixed_seconds - RECORD_SECONDS) <= 0.040, result.mixed_seconds
    for stats in result.stats.values():
        assert stats["undecryptable"] == 0 and stats["lost"] == 0, stats


def test_impaired_network_stays_aligned_and_counts_losses(results: dict[str, Any]) -> None:
    result: ImpairedResult = outcome(results, "impaired")
    for name, drift in result.drift_ms.items():
        stats = result.stats[name]
        assert drift <= 40.0, (name, drift, stats)
        dropped = result.dropped[name]
        assert dropped > 0.07 * 1500 and result.reordered[name] > 0
        # Every packet the network dropped is a lost slot (a few trailing silence frames cannot be told
        # apart from the end of the stream), and lost slots are concealed.
        assert dropped - 5 <= stats["lost"] <= dropped + stats["late"], (dropped, stats)
        assert stats["concealed"] >= stats["lost"] - 10, stats
        # davey never opens a nonce older than the first one it opened for a sender, so packets the network
        # delivers after a speaker's first opened one are refused, and counted, as undecryptable: one when a
        # reorder swaps the first two, two when the 20 ms jitter also moves the third ahead of them.
        assert stats["undecryptable"] <= 2, stats
        assert result.correlations[name] > 0.5, result.correlations[name]


def test_churn_delivers_frames_outside_transitions_and_counts_every_loss(results: dict[str, Any]) -> None:
    result: ChurnResult = outcome(results, "churn")
    assert result.churn_errors == []
    assert result.connected
    assert result.epoch_changes >= 15, result.epoch_changes
    for name, eligible in result.eligible.items():
        stats = result.stats[name]
        assert eligible > 0.5 * result.sent[name], (name, eligible, result.sent[name])
        assert result.delivered_eligible[name] >= 0.995 * eligible, (
            name,
            result.delivered_eligible[name],
            eligible,
            stats,
        )
        # Every frame sent is either delivered or in a drop counter.
        assert stats["received"] == result.sent[name], stats
        missing = result.sent[name] - result.delivered[name]
        accounted = stats["undecryptable"] + stats["late"] + stats["duplicate"] + stats["dropped"]
        assert missing == accounted, (name, missing, stats)


def test_hostile_packets_do_not_disturb_the_streams(results: dict[str, Any]) -> None:
    result: HostileResult = outcome(results, "hostile")
    assert result.connected
    assert sum(result.injected.values()) > 300 and result.rewrapped > 400
    for name, correlation in result.correlations.items():
        stats = result.stats[name]
        assert correlation >= 0.95, (name, correlation, stats)
        assert stats["lost"] == 0 and stats["late"] == 0, stats
        assert stats["delivered"] >= result.sent[name], stats
    assert result.counters["unknown_ssrc_dropped"] >= 1


def test_dave_edges_reset_and_recovery_keep_every_voice_heard(results: dict[str, Any]) -> None:
    result: EdgesResult = outcome(results, "edges")
    # The sole-member reset showed as "no group", then a new group started again at epoch 1.
    assert None in result.epochs and result.epochs.count(1) >= 2, result.epochs
    assert result.delivered["first"] == result.expected["first"], result.stats["first"]
    assert result.delivered["second"] == result.expected["second"], result.stats["second"]
    assert result.recoveries == 1 and result.bot_recoveries == 0
    heard, total = result.recovered_tail
    assert total > 100 and heard >= 0.99 * total, (heard, total, result.stats["third"])
