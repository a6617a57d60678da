"""The session wiring: ``session.listen()``/``session.receiver`` fed by a real client through the emulator."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import av
import pytest

from cordvoice.audio.opus import OPUS_SILENCE
from cordvoice.audio.receive_pipeline import SpeakingChange, VoiceFrame
from cordvoice.audio.receiver import FrameStream, Receiver
from cordvoice.audio.samples import speech_like
from cordvoice.audio.sinks import record_to_directory
from cordvoice.audio.sources import FramesSource
from cordvoice.errors import VoiceError
from cordvoice.session import SessionState
from cordvoice.udp.rtp import RtpHeader

from .receive_helpers import aligned_correlation, encode_pcm, to_mono
from .receive_world import bot_world


async def test_session_listen_hears_a_participant_and_ends_with_the_session() -> None:
    pcm = speech_like(1.0, voice=2)
    frames = encode_pcm(pcm)
    async with bot_world("session") as world:
        speaker = await world.add_speaker("speaker")
        await world.converge([speaker])
        # The speaker's op 5 arrived before the receiver existed: the map comes from the session.
        assert speaker.ssrc in world.session.ssrc_users
        session = world.session
        events = session.receiver.speaking_events()
        mine = session.listen(speaker.user_id, pcm=True)
        assert session.receiver.ssrc_users[speaker.ssrc] == speaker.user_id
        async with session.listen() as everyone:
            await speaker.play(frames)
            await asyncio.sleep(0.2)
            opus_frames = [everyone.get_nowait() for _ in range(len(everyone))]
        assert [f.opus for f in opus_frames if f and not f.is_silence] == frames
        receiver = session.receiver
        await world.voice.leave(world.guild_id)
        async with asyncio.timeout(5):
            while not receiver.closed:
                await asyncio.sleep(0.01)
        got: list[VoiceFrame] = [f async for f in mine]
        changes: list[SpeakingChange] = [c async for c in events]
    out = b"".join(f.pcm or b"" for f in got)
    assert aligned_correlation(to_mono(pcm), to_mono(out), 4800)[0] > 0.95
    assert ("gateway", True) in [(c.source, c.speaking) for c in changes]
    assert ("audio", True) in [(c.source, c.speaking) for c in changes]
    assert receiver.stats(speaker.user_id).undecryptable == 0
    assert session._receiver_feeds == []  # the closed receiver unhooked itself


async def test_frames_the_bot_encrypts_before_a_transition_executes_are_counted() -> None:
    """davey switches the bot's sending key when it applies a commit, before op 22: a member that applies
    the commit later cannot decrypt those frames. Every such frame a listener loses must show on the bot's
    side (``dave_encrypted_in_transition``)."""
    frames = encode_pcm(speech_like(4.0, voice=1))
    async with bot_world("transition-send") as world:
        # Members get the gateway's messages up to 200 ms apart: commits land at visibly different moments.
        world.emu.set_delivery_order(world.channel_id, seed=3, max_delay=0.2)
        listeners = [await world.add_speaker(f"listener{i}") for i in range(2)]
        await world.converge(listeners)
        session = world.session
        before = session.stats.dave_encrypted_in_transition
        track = session.play(FramesSource(frames, kind="opus"))
        await asyncio.sleep(0.5)
        for step in range(2):
            await asyncio.gather(*(world.add_speaker(f"visitor{step}{k}") for k in range(3)))
            await asyncio.sleep(1.0)
        await track.wait()
        await asyncio.sleep(0.3)
        at_risk = session.stats.dave_encrypted_in_transition - before
        assert session.state is SessionState.READY
        for listener in listeners:
            heard = len(listener.frames_from(world.bot_user_id))
            lost = listener.stats.dave_undecryptable[world.bot_user_id]
            assert heard + lost >= len(frames), (heard, lost)
            assert lost <= at_risk, (lost, at_risk, listener.stats.dave_undecryptable)
        assert at_risk > 0  # the joins changed the epoch while the bot was sending


async def test_a_move_to_another_channel_ends_the_old_channels_speakers() -> None:
    """After the bot moves, nobody of the old channel is in its call: a member talking there must not stay
    speaking (nor mapped) in the receiver for good, since no op 13 will ever come for it."""
    frames = encode_pcm(speech_like(3.0, voice=1))
    async with bot_world("move") as world:
        talker = await world.add_speaker("talker")
        await world.converge([talker])
        receiver = world.receiver
        events = receiver.speaking_events()
        playing = asyncio.create_task(talker.play(frames))
        await asyncio.sleep(0.5)
        other = world.emu.create_voice_channel(world.guild_id, "Other")
        newcomer = await world.emu.add_participant(other.id, name="newcomer")
        session = await world.voice.join_channel(world.guild_id, other.id)
        assert session is world.session and session.receiver is receiver
        await world.converge([newcomer])
        await newcomer.play(frames[:50])
        await asyncio.sleep(0.3)
        playing.cancel()
        changes = [events.get_nowait() for _ in range(len(events))]
        gateway = [c.speaking for c in changes if c.user_id == talker.user_id and c.source == "gateway"]
        assert gateway == [True, False], changes
        assert talker.ssrc not in receiver.ssrc_users
        assert receiver.ssrc_users[newcomer.ssrc] == newcomer.user_id
        assert receiver.stats(newcomer.user_id).delivered >= 50


async def test_a_member_heard_only_as_silence_frames_leaves_no_unreadable_recording(tmp_path: Path) -> None:
    """Only the 3-byte silence frames (a member who stopped talking as the recording began): no files."""
    async with bot_world("silence-only") as world:
        speaker, quiet = await world.add_speaker("speaker"), await world.add_speaker("quiet")
        await world.converge([speaker, quiet])
        receiver = world.receiver
        for sink in record_to_directory(tmp_path, start_time=time.monotonic()):
            receiver.add_sink(sink)
        await asyncio.gather(speaker.play(encode_pcm(speech_like(0.4, voice=1))), quiet.play([]))
        await asyncio.sleep(0.2)
        assert receiver.stats(quiet.user_id).delivered == 5
        await receiver.close()
    lengths = decoded_lengths(tmp_path)
    assert sorted(lengths) == sorted([f"{speaker.user_id}.wav", f"{speaker.user_id}.opus", "mixed.wav"])
    assert all(samples > 0.4 * 48_000 for samples in lengths.values()), lengths


def decoded_lengths(folder: Path) -> dict[str, int]:
    """How many samples FFmpeg decodes from each file in ``folder``."""
    lengths = {}
    for path in folder.iterdir():
        with av.open(str(path)) as container:
            lengths[path.name] = sum(frame.samples for frame in container.decode(audio=0))
    return lengths


async def test_a_users_receive_hook_and_the_receiver_both_get_every_packet() -> None:
    """``listen()`` after a raw hook took the hook's place, and a raw hook set while listening took the
    receiver's (its streams went silent, uncounted)."""
    frames = encode_pcm(speech_like(0.4, voice=3))
    async with bot_world("hook-and-receiver") as world:
        speaker = await world.add_speaker("speaker")
        await world.converge([speaker])
        session = world.session
        hooked: list[list[int]] = [[], []]
        session.set_receive_hook(lambda header, payload, arrival: hooked[0].append(header.sequence))
        async with session.listen(speaker.user_id) as stream:
            for phase in range(2):
                await speaker.play(frames)
                await asyncio.sleep(0.3)
                heard = [stream.get_nowait() for _ in range(len(stream))]
                assert [f.opus for f in heard if f and not f.is_silence] == frames, phase
                assert len(hooked[phase]) >= len(frames), phase
                session.set_receive_hook(lambda header, payload, arrival: hooked[1].append(header.sequence))
        session.set_receive_hook(None)
        assert session.receive_hook is None


async def test_a_receive_hook_decrypts_the_dave_frames_session_receiver_decrypted_first() -> None:
    """The hook's documented use, ``session.dave.decrypt(user_id, payload)``, runs after the receiver
    decrypted the same frame: davey refused it as a replay, so every DAVE frame failed in the hook (and
    counted as a DAVE failure) once anyone listened."""
    frames = encode_pcm(speech_like(0.4, voice=3))
    async with bot_world("hook-decrypt") as world:
        speaker = await world.add_speaker("speaker")
        await world.converge([speaker])
        session = world.session
        dave = session.dave
        assert dave is not None
        opened: list[bytes] = []

        def hook(header: RtpHeader, payload: bytes, arrival: float) -> None:
            opened.append(dave.decrypt(session.ssrc_users[header.ssrc], payload))

        session.set_receive_hook(hook)
        async with session.listen(speaker.user_id) as stream:
            await speaker.play(frames)
            await asyncio.sleep(0.3)
            heard = [stream.get_nowait() for _ in range(len(stream))]
        assert [f.opus for f in heard if f and not f.is_silence] == frames
        assert [opus for opus in opened if opus != OPUS_SILENCE] == frames
        assert not dave.stats.decrypt_failures


async def test_a_receiver_with_its_own_options_and_session_receiver_both_hear_everything() -> None:
    """``Receiver.for_session(session, jitter_delay=...)`` is the way to a session receiver with other
    options; it took the session's one feed slot, so whichever of it and ``session.receiver`` came second
    silenced the other's streams and recordings, uncounted."""
    frames = encode_pcm(speech_like(0.4, voice=3))

    def heard(stream: FrameStream) -> list[bytes | None]:
        got = [stream.get_nowait() for _ in range(len(stream))]
        return [f.opus for f in got if f and not f.is_silence]

    async with bot_world("two-receivers") as world:
        speaker = await world.add_speaker("speaker")
        await world.converge([speaker])
        session = world.session
        default = session.listen(speaker.user_id)
        quick = Receiver.for_session(session, jitter_delay=0.02)
        fast = quick.listen(speaker.user_id)
        await speaker.play(frames)
        await asyncio.sleep(0.3)
        assert heard(default) == frames
        assert heard(fast) == frames
        await quick.close()  # unhooks itself only
        await speaker.play(frames)
        await asyncio.sleep(0.3)
        assert heard(default) == frames
        assert session.receiver.stats(speaker.user_id).undecryptable == 0
        default.close()


async def test_a_receiver_made_for_an_ended_session_is_refused_instead_of_never_ending() -> None:
    """No DisconnectedEvent comes again for an ended session: the receiver never closed and iterating its
    streams waited forever."""
    async with bot_world("ended") as world:
        session = world.session
        await world.voice.leave(world.guild_id)
        await session.wait_closed()
        with pytest.raises(VoiceError):
            Receiver.for_session(session)
