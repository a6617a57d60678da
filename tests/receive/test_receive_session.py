"""The session wiring: ``session.listen()``/``session.receiver`` fed by a real client through the emulator."""

from __future__ import annotations

import asyncio

from cordvoice.audio.receive_pipeline import SpeakingChange, VoiceFrame
from cordvoice.audio.samples import speech_like

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
    assert session.receive_hook is None  # the closed receiver unhooked itself
