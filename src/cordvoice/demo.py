"""The demo behind ``cordvoice demo``: a DAVE-encrypted conversation on the embedded emulator, recorded.

Three members share one voice channel of a local :class:`~cordvoice.emulator.Emulator`:

* **music-bot**, a cordvoice bot, plays the bundled sample: a melody synthesised by
  :mod:`cordvoice.audio.samples`, encoded to ``sample.ogg`` in the output folder and played from there (its
  Opus packets are sent as they are, not re-encoded);
* **speaker-bot**, a second cordvoice bot, talks (a synthesised voice, encoded by its player) and records
  everyone with the cordvoice receiver and sinks: a WAV and an Ogg Opus file per member and a mixed WAV;
* **alice**, a simulated participant (the emulator's independent voice client, which shares no code with
  cordvoice's client), talks too and keeps its own recording, written as a WAV per member and a mixed WAV.

Frame accounting
----------------
Every member joins and the DAVE group settles on one epoch *before* anyone sends a frame, and nobody leaves
until everything sent has arrived. So for every ordered pair (sender, receiver):

* ``frames_sent``: the RTP Opus frames the sender sent: its audio plus the five silence frames that end a
  talk spurt (all of them sent while the receiver was in the group);
* ``frames_received``: the frames the receiver decrypted (transport and DAVE) and accepted from that sender:
  the cordvoice receiver's ``delivered`` count, or what the participant recorded.

On a lossless network (the emulator's default), the two are equal for every pair; any difference is loss.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import wave
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np

from cordvoice.audio.mixer import soft_clip_to_int16
from cordvoice.audio.oggwriter import OggOpusWriter
from cordvoice.audio.opus import OpusDecoder, OpusEncoder
from cordvoice.audio.pcm import CHANNELS, FRAME_SAMPLES, SAMPLE_RATE, SAMPLE_WIDTH, iter_frames
from cordvoice.audio.samples import melody, speech_like
from cordvoice.audio.sinks import MixedWavSink, OggOpusSink, Timeline, WavSink
from cordvoice.emulator.participant import Participant, ReceivedFrame
from cordvoice.emulator.server import Emulator
from cordvoice.errors import AudioError, InvalidArgumentError, VoiceError
from cordvoice.gateway.client import Client
from cordvoice.session import Session
from cordvoice.udp.rtp import OPUS_SILENCE
from cordvoice.voice import Voice

__all__ = [
    "DEFAULT_SECONDS",
    "DemoMember",
    "DemoProgress",
    "DemoReport",
    "PairCount",
    "encode_speech",
    "run_demo",
    "write_participant_recording",
    "write_sample_ogg",
]

logger = logging.getLogger(__name__)

DEFAULT_SECONDS: Final = 10.0
MIN_SECONDS: Final = 1.0
MAX_SECONDS: Final = 600.0
_SETTLE: Final = 0.4
"""Seconds to wait after the last frame was sent, for it to cross the SFU and leave the jitter buffers."""
_JOIN_TIMEOUT: Final = 20.0


@dataclass(frozen=True)
class DemoMember:
    """One member of the demo call."""

    user_id: int
    name: str
    kind: str
    """``cordvoice bot`` or ``simulated participant``."""
    role: str


@dataclass(frozen=True)
class PairCount:
    """What one member sent to another, and what the other accepted (see the module docstring)."""

    sender: int
    receiver: int
    frames_sent: int
    frames_received: int

    @property
    def lost(self) -> int:
        return self.frames_sent - self.frames_received

    @property
    def loss(self) -> float:
        """The lost fraction (0.0 when nothing was sent)."""
        return self.lost / self.frames_sent if self.frames_sent else 0.0


@dataclass(frozen=True)
class DemoProgress:
    """A snapshot for the live progress line."""

    phase: str
    elapsed: float
    """Seconds since the demo started (synthesis and joining included)."""
    seconds: float
    talk_elapsed: float = 0.0
    """Seconds since the conversation started."""
    sent: dict[str, int] = field(default_factory=dict)
    """Frames sent so far, by member name."""
    received: int = 0
    """Frames the recorder bot has accepted so far, from everyone."""
    epoch: int | None = None


@dataclass
class DemoReport:
    """Everything ``cordvoice demo`` prints, in one place."""

    seconds: float
    guild_id: int
    channel_id: int
    members: list[DemoMember]
    pairs: list[PairCount]
    frames_sent: dict[int, int]
    dave_epoch: int | None
    privacy_code: str | None
    dave_agreed: bool
    """Every member reported the same epoch and privacy code."""
    lateness_ms: dict[str, float]
    """Pacing of the cordvoice bots as the emulator's media server received them (worst bot)."""
    lateness_by_user: dict[int, dict[str, float | int]]
    clock_lateness_ms: dict[int, dict[str, float | int]]
    """Each cordvoice bot's own clock: how late its 20 ms ticks fired."""
    recordings: list[Path]
    sample: Path
    elapsed: float

    def member(self, user_id: int) -> DemoMember:
        return next(m for m in self.members if m.user_id == user_id)

    @property
    def lossless(self) -> bool:
        return all(pair.lost == 0 for pair in self.pairs)

    def received_by(self, user_id: int) -> list[PairCount]:
        return [pair for pair in self.pairs if pair.receiver == user_id]

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` document (ids as integers, paths as strings)."""
        sessions = []
        for member in self.members:
            incoming = self.received_by(member.user_id)
            sessions.append(
                {
                    "user_id": member.user_id,
                    "name": member.name,
                    "kind": member.kind,
                    "role": member.role,
                    "frames_sent": self.frames_sent[member.user_id],
                    "frames_received": sum(pair.frames_received for pair in incoming),
                    "received_from": {
                        str(pair.sender): {
                            "frames_sent": pair.frames_sent,
                            "frames_received": pair.frames_received,
                            "lost": pair.lost,
                        }
                        for pair in incoming
                    },
                }
            )
        return {
            "seconds": self.seconds,
            "guild_id": self.guild_id,
            "channel_id": self.channel_id,
            "sessions": sessions,
            "pairs": [
                {
                    "sender": pair.sender,
                    "receiver": pair.receiver,
                    "frames_sent": pair.frames_sent,
                    "frames_received": pair.frames_received,
                    "lost": pair.lost,
                    "loss": round(pair.loss, 6),
                }
                for pair in self.pairs
            ],
            "lossless": self.lossless,
            "dave": {"epoch": self.dave_epoch, "privacy_code": self.privacy_code, "agreed": self.dave_agreed},
            "lateness_ms": dict(self.lateness_ms),
            "lateness_ms_by_user": {str(k): v for k, v in self.lateness_by_user.items()},
            "clock_lateness_ms_by_user": {str(k): v for k, v in self.clock_lateness_ms.items()},
            "recordings": [str(path) for path in self.recordings],
            "sample": str(self.sample),
            "elapsed_seconds": round(self.elapsed, 3),
        }

    def summary(self) -> str:
        """The human-readable summary (a few short tables)."""
        width = max(len(m.name) for m in self.members)
        lines = [
            f"cordvoice demo: {self.seconds:g} s in guild {self.guild_id}, voice channel {self.channel_id} "
            "(embedded emulator, DAVE end-to-end encrypted)",
            "",
            "Members",
        ]
        lines += [f"  {m.name:<{width}}  {m.user_id}  {m.kind}: {m.role}" for m in self.members]
        lines += ["", "Frames (sent -> received, per pair)"]
        for pair in self.pairs:
            sender, receiver = self.member(pair.sender).name, self.member(pair.receiver).name
            lines.append(
                f"  {sender:<{width}} -> {receiver:<{width}}  {pair.frames_sent:>6} -> "
                f"{pair.frames_received:<6} lost {pair.lost} ({pair.loss:.2%})"
            )
        code = self.privacy_code or "-"
        grouped = " ".join(code[i : i + 5] for i in range(0, len(code), 5)) if self.privacy_code else code
        lines += [
            "",
            f"DAVE       epoch {self.dave_epoch}, privacy code {grouped}"
            + ("" if self.dave_agreed else "  (members DISAGREE)"),
            f"Pacing     p50 {self.lateness_ms['p50']:.2f} ms, p99 {self.lateness_ms['p99']:.2f} ms late "
            "(arrival at the media server against a 20 ms grid, worst bot)",
            f"Loss       {'none' if self.lossless else 'see the pairs above'}",
            "",
            "Recordings",
        ]
        lines += [f"  {path}" for path in self.recordings]
        lines.append(f"Sample     {self.sample} (what music-bot played)")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Audio for the demo
# --------------------------------------------------------------------------------------------------


def write_sample_ogg(path: str | Path, seconds: float, *, bitrate: int = 96_000) -> int:
    """Encode :func:`~cordvoice.audio.samples.melody` (``seconds`` long) to an Ogg Opus file.

    Returns the number of Opus packets written. The sample is generated rather than shipped, so it is
    ours and free of licence doubt, and costs a fraction of a second.
    """
    pcm = melody(seconds)
    length = len(pcm) // (CHANNELS * SAMPLE_WIDTH)
    packets = 0
    with OpusEncoder(bitrate=bitrate) as encoder:
        pre_skip = encoder.lookahead
        with OggOpusWriter(path, pre_skip=pre_skip, tags={"TITLE": "cordvoice demo melody"}) as ogg:
            for frame in iter_frames(pcm):
                ogg.write(encoder.encode(frame))
                packets += 1
            # One more frame flushes the encoder's lookahead; the end trim cuts the padding back out.
            ogg.write(encoder.encode(bytes(FRAME_SAMPLES * CHANNELS * SAMPLE_WIDTH)))
            packets += 1
            ogg.close(end_trim=packets * FRAME_SAMPLES - pre_skip - length)
    return packets


def encode_speech(seconds: float, voice: int) -> list[bytes]:
    """A synthesised voice as 20 ms Opus frames (what the simulated participant sends)."""
    with OpusEncoder(bitrate=64_000, application="voip") as encoder:
        return [encoder.encode(frame) for frame in iter_frames(speech_like(seconds, voice=voice))]


def write_participant_recording(
    frames_by_user: dict[int, list[ReceivedFrame]],
    folder: Path,
    *,
    start: float,
    end: float,
    names: dict[int, str] | None = None,
) -> list[Path]:
    """Decode what a participant received into ``<name>.wav`` per user and ``mixed.wav``, ``start``-``end``.

    Each frame is placed by its RTP timestamp on a grid anchored at the stream's smallest transit delay (the
    same rule the cordvoice receiver uses), so arrival jitter does not move audio around. Silence frames are
    decoded (to keep the decoder's state) but not placed.
    """
    _make_folder(folder)
    total = max(0, round((end - start) * SAMPLE_RATE))
    mixed = np.zeros((total, CHANNELS), dtype=np.float32)
    written: list[Path] = []
    for user_id, frames in frames_by_user.items():
        track = np.zeros((total, CHANNELS), dtype=np.int16)
        if frames:
            _place_stream(frames, track, start)
        path = folder / f"{(names or {}).get(user_id, str(user_id))}.wav"
        _write_wav(path, track.tobytes())
        written.append(path)
        mixed += track
    path = folder / "mixed.wav"
    _write_wav(path, soft_clip_to_int16(mixed).tobytes())
    written.append(path)
    return written


def _place_stream(frames: list[ReceivedFrame], track: np.ndarray[Any, Any], start: float) -> None:
    first = frames[0]
    ordered = sorted(frames, key=lambda f: ((f.sequence - first.sequence + 0x8000) & 0xFFFF) - 0x8000)
    base = ordered[0].timestamp
    offsets = [((f.timestamp - base + 0x8000_0000) & 0xFFFF_FFFF) - 0x8000_0000 for f in ordered]
    anchor = min(f.arrival - offset / SAMPLE_RATE for f, offset in zip(ordered, offsets, strict=True))
    total = len(track)
    with OpusDecoder() as decoder:
        for frame, offset in zip(ordered, offsets, strict=True):
            pcm = decoder.decode(frame.payload)
            if frame.payload == OPUS_SILENCE:
                continue
            samples = np.frombuffer(pcm, dtype="<i2").reshape(-1, CHANNELS)
            at = round((anchor + offset / SAMPLE_RATE - start) * SAMPLE_RATE)
            lo, hi = max(at, 0), min(at + len(samples), total)
            if lo < hi:
                track[lo:hi] = samples[lo - at : hi - at]


def _write_wav(path: Path, pcm: bytes) -> None:
    try:
        with wave.open(str(path), "wb") as writer:
            writer.setnchannels(CHANNELS)
            writer.setsampwidth(SAMPLE_WIDTH)
            writer.setframerate(SAMPLE_RATE)
            writer.writeframes(pcm)
    except OSError as exc:
        raise AudioError(f"cannot write {str(path)!r}: {exc}") from exc


def _make_folder(folder: Path) -> None:
    """``mkdir -p``, failing as the AudioError run_demo promises (a file in the way, no permission)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AudioError(f"cannot create the folder {str(folder)!r}: {exc}") from exc


# --------------------------------------------------------------------------------------------------
# The scenario
# --------------------------------------------------------------------------------------------------


@dataclass
class _Bot:
    """A cordvoice bot in the demo: its gateway client, Voice and session."""

    member: DemoMember
    client: Client
    voice: Voice
    session: Session

    @property
    def frames_sent(self) -> int:
        stats = self.session.stats
        return stats.frames_sent + stats.silence_sent


@dataclass(frozen=True)
class _Script:
    """Who talks when: music all along, speaker-bot from 10 % to 50 % of the run, alice from 45 % to 85 %."""

    seconds: float
    sample: Path
    speaker_pcm: bytes
    alice_frames: list[bytes]

    @property
    def speaker_starts(self) -> float:
        return 0.10 * self.seconds

    @property
    def alice_starts(self) -> float:
        return 0.45 * self.seconds


def _speech_seconds(seconds: float) -> float:
    return max(0.4 * seconds, 0.2)


async def run_demo(
    seconds: float = DEFAULT_SECONDS,
    out_dir: str | Path = "cordvoice-demo",
    *,
    on_progress: Callable[[DemoProgress], None] | None = None,
    progress_interval: float = 0.2,
) -> DemoReport:
    """Run the demo conversation for ``seconds`` and write the recordings into ``out_dir``.

    ``on_progress`` is called with a :class:`DemoProgress` at each phase and every ``progress_interval``
    seconds while audio flows. Raises :class:`~cordvoice.errors.VoiceError` if anything fails.
    """
    if not MIN_SECONDS <= seconds <= MAX_SECONDS:
        raise InvalidArgumentError(f"seconds must be between {MIN_SECONDS:g} and {MAX_SECONDS:g}")
    began = time.monotonic()
    out = Path(out_dir)
    await asyncio.to_thread(_make_folder, out)

    def report(phase: str, **extra: Any) -> None:
        if on_progress is not None:
            on_progress(DemoProgress(phase, time.monotonic() - began, seconds, **extra))

    report("synthesising audio")
    sample = out / "sample.ogg"
    speech = _speech_seconds(seconds)
    audio = asyncio.gather(  # synthesised on worker threads while the emulator starts and everyone joins
        asyncio.to_thread(write_sample_ogg, sample, seconds),
        asyncio.to_thread(speech_like, speech, voice=1),
        asyncio.to_thread(encode_speech, speech, 2),
    )
    async with Emulator() as emu:
        report("starting the emulator and joining")
        guild = emu.create_guild("cordvoice demo")
        channel = emu.create_voice_channel(guild.id, "General")
        bots: list[_Bot] = []
        participant: Participant | None = None
        try:
            for name, role in (("music-bot", "plays the bundled sample"), ("speaker-bot", _RECORDS)):
                bots.append(await _start_bot(emu, name, role, guild.id, channel.id))
            participant = await emu.add_participant(channel.id, name="alice", timeout=_JOIN_TIMEOUT)
            _, speaker_pcm, alice_frames = await audio
            report("forming the DAVE group")
            await _wait_converged(bots, participant, _JOIN_TIMEOUT)
            script = _Script(seconds, sample, speaker_pcm, alice_frames)
            result = await _converse(
                emu, bots, participant, script, out=out, report=report, interval=progress_interval
            )
        finally:
            if not audio.done():
                audio.cancel()
                with contextlib.suppress(BaseException):
                    await audio
            if participant is not None:
                await participant.leave()
            for bot in bots:
                await _stop_bot(bot)
    result.guild_id, result.channel_id = guild.id, channel.id
    result.elapsed = time.monotonic() - began
    return result


_RECORDS = "talks and records everyone"


async def _start_bot(emu: Emulator, name: str, role: str, guild_id: int, channel_id: int) -> _Bot:
    bot = emu.create_bot(name)
    emu.add_member(guild_id, bot.user_id)
    assert bot.token is not None
    client = Client(bot.token, gateway_url=emu.gateway_url, api_base=emu.api_base)
    await client.start()
    try:
        voice = Voice(client, ssl=False, join_timeout=_JOIN_TIMEOUT)
        session = await voice.join_channel(guild_id, channel_id)
    except BaseException:
        await client.close()
        raise
    return _Bot(DemoMember(bot.user_id, name, "cordvoice bot", role), client, voice, session)


async def _stop_bot(bot: _Bot) -> None:
    with contextlib.suppress(VoiceError):
        await bot.voice.close()
    await bot.client.close()


async def _wait_converged(bots: Iterable[_Bot], participant: Participant, timeout: float) -> None:  # noqa: ASYNC109
    """Wait until every member is in one ready DAVE group (so that everyone can decrypt frame one)."""
    sessions = [bot.session for bot in bots]
    async with asyncio.timeout(timeout):
        while True:
            daves = [session.dave for session in sessions]
            if all(dave is not None and dave.ready for dave in daves) and participant.dave_ready:
                epochs = {dave.epoch for dave in daves if dave is not None} | {participant.epoch}
                if len(epochs) == 1:
                    return
            await asyncio.sleep(0.01)


def _recorder_sinks(
    folder: Path, members: list[DemoMember], start: float
) -> list[WavSink | MixedWavSink | OggOpusSink]:
    """speaker-bot's recording: ``<name>.wav`` and ``<name>.opus`` per member, and ``mixed.wav``, aligned."""
    _make_folder(folder)
    timeline = Timeline(start)
    sinks: list[WavSink | MixedWavSink | OggOpusSink] = []
    for member in members:
        sinks.append(WavSink(folder / f"{member.name}.wav", member.user_id, timeline=timeline))
        sinks.append(OggOpusSink(folder / f"{member.name}.opus", member.user_id, timeline=timeline))
    sinks.append(MixedWavSink(folder / "mixed.wav", timeline=timeline))
    return sinks


async def _converse(
    emu: Emulator,
    bots: list[_Bot],
    participant: Participant,
    script: _Script,
    *,
    out: Path,
    report: Callable[..., None],
    interval: float,
) -> DemoReport:
    music, speaker = bots
    alice = DemoMember(participant.user_id, "alice", "simulated participant", _RECORDS)
    members = [music.member, speaker.member, alice]

    # Receivers exist before the first frame: music-bot's only counts, speaker-bot's records.
    music_receiver = music.session.receiver
    speaker_receiver = speaker.session.receiver
    start = time.monotonic()
    sinks = _recorder_sinks(out / "speaker-bot", [music.member, alice], start)
    end: float | None = None
    try:
        for sink in sinks:
            speaker_receiver.add_sink(sink)
        await _talk(bots, participant, script, start=start, report=report, interval=interval)
        report("collecting the last frames")
        await asyncio.sleep(_SETTLE)
        end = time.monotonic()
        await music_receiver.close()
        await speaker_receiver.close(close_sinks=False)
    finally:
        end = time.monotonic() if end is None else end
        for sink in sinks:
            sink.close(end_time=end)

    # The accounting (see the module docstring): a count per ordered pair of members.
    sent = {bot.member.user_id: bot.frames_sent for bot in bots} | {
        alice.user_id: participant.stats.sent_packets
    }
    received: dict[tuple[int, int], int] = {}
    for bot, receiver in ((music, music_receiver), (speaker, speaker_receiver)):
        for member in members:
            if member is not bot.member:
                received[(member.user_id, bot.member.user_id)] = receiver.stats(member.user_id).delivered
    for member in (music.member, speaker.member):
        received[(member.user_id, alice.user_id)] = len(participant.frames_from(member.user_id))
    order = [m.user_id for m in members]
    pairs = [
        PairCount(sender, receiver, sent[sender], received[(sender, receiver)])
        for sender in order
        for receiver in order
        if sender != receiver
    ]

    # DAVE: one epoch and one privacy code for everyone.
    dave = music.session.dave
    codes = {bot.session.privacy_code for bot in bots} | {participant.privacy_code}
    epochs = {bot.session.dave.epoch if bot.session.dave else None for bot in bots} | {participant.epoch}

    # Pacing, as the emulator's media server saw each cordvoice bot's packets arrive.
    lateness = {bot.member.user_id: dict(emu.inspect(bot.member.user_id).rtp.lateness_ms) for bot in bots}
    worst = {key: max(float(value[key]) for value in lateness.values()) for key in ("p50", "p99")}

    heard_by_alice = {m.user_id: participant.frames_from(m.user_id) for m in (music.member, speaker.member)}
    names = {m.user_id: m.name for m in members}
    alice_files = await asyncio.to_thread(
        write_participant_recording, heard_by_alice, out / "alice", start=start, end=end, names=names
    )
    return DemoReport(
        seconds=script.seconds,
        guild_id=0,
        channel_id=0,
        members=members,
        pairs=pairs,
        frames_sent=sent,
        dave_epoch=None if dave is None else dave.epoch,
        privacy_code=music.session.privacy_code,
        dave_agreed=len(codes) == 1 and len(epochs) == 1,
        lateness_ms=worst,
        lateness_by_user=lateness,
        clock_lateness_ms={bot.member.user_id: dict(bot.session.stats.clock_lateness) for bot in bots},
        recordings=[sink.path for sink in sinks] + alice_files,
        sample=script.sample,
        elapsed=0.0,
    )


async def _talk(
    bots: list[_Bot],
    participant: Participant,
    script: _Script,
    *,
    start: float,
    report: Callable[..., None],
    interval: float,
) -> None:
    """Everyone does their part; progress every ``interval`` seconds; the first failure ends the demo."""
    music, speaker = bots
    dave = music.session.dave
    epoch = None if dave is None else dave.epoch

    async def music_plays() -> None:
        await music.session.play(script.sample, name="sample.ogg").wait()
        await music.session.stop_speaking()

    async def speaker_talks() -> None:
        await asyncio.sleep(script.speaker_starts)
        await speaker.session.play(script.speaker_pcm, name="speech").wait()
        await speaker.session.stop_speaking()

    async def alice_talks() -> None:
        await asyncio.sleep(script.alice_starts)
        await participant.play(script.alice_frames)

    def progress() -> None:
        report(
            "talking",
            talk_elapsed=time.monotonic() - start,
            sent={
                music.member.name: music.frames_sent,
                speaker.member.name: speaker.frames_sent,
                "alice": participant.stats.sent_packets,
            },
            received=sum(
                receiver_stats.delivered for receiver_stats in speaker.session.receiver.all_stats().values()
            ),
            epoch=epoch,
        )

    tasks = [asyncio.ensure_future(work()) for work in (music_plays, speaker_talks, alice_talks)]
    try:
        pending: set[asyncio.Future[None]] = set(tasks)
        while pending:
            done, pending = await asyncio.wait(pending, timeout=interval)
            for task in done:
                task.result()  # a failure ends the demo with its error
            progress()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
