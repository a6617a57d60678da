"""The seed's flow end to end against the emulator, in both transport modes, on DAVE and stage channels.

A simulated participant (the emulator's own independent voice client) hears the bot; it decrypts transport
and DAVE itself, so these tests do not grade cordvoice with cordvoice.
"""

from __future__ import annotations

import asyncio
import itertools

import pytest

from cordvoice import (
    ClientConnectEvent,
    DaveEpochEvent,
    DisconnectedEvent,
    ReadyEvent,
    Session,
    SessionState,
    SpeakingEvent,
    SpeakingFlag,
)
from cordvoice.emulator import ReceivedFrame, VoiceServerConfig
from cordvoice.udp.crypto import MODE_AES256_GCM, MODE_XCHACHA20_POLY1305
from cordvoice.udp.rtp import OPUS_SILENCE

from .conftest import LoopErrors, VoiceWorld, opus_frames, voice_world, wait_until


def assert_contiguous(frames: list[ReceivedFrame]) -> None:
    """RTP sequence +1 and timestamp +960 between every consecutive frame, one SSRC."""
    assert len({f.ssrc for f in frames}) == 1
    for previous, current in itertools.pairwise(frames):
        assert (current.sequence - previous.sequence) & 0xFFFF == 1, (previous, current)
        assert (current.timestamp - previous.timestamp) & 0xFFFF_FFFF == 960, (previous, current)


async def speak(frames: tuple[bytes, ...], session: Session) -> None:
    await session.speaking(SpeakingFlag.MICROPHONE)
    for frame in frames:
        await session.write(frame)
    await session.stop_speaking()


async def test_client_seed_flow_500_frames_byte_identical(world: VoiceWorld) -> None:
    emu, bot = world.emu, world.bot
    listener = await emu.add_participant(world.channel.id, name="listener")
    session = await world.voice.join_channel(world.guild.id, world.channel.id)
    assert session.state is SessionState.READY
    assert session.mode == MODE_AES256_GCM
    assert session.dave_protocol_version == 1
    assert session.ssrc == emu.inspect(bot.user_id).ssrc
    await listener.wait_dave_ready()
    await wait_until(lambda: session.dave_ready)
    assert session.privacy_code == listener.privacy_code and len(session.privacy_code or "") == 30

    frames = opus_frames(500)
    async with asyncio.timeout(30):
        await speak(frames, session)
        received = await listener.wait_for_frames(bot.user_id, 505, timeout=5)
    assert [f.payload for f in received[:500]] == list(frames)
    assert [f.payload for f in received[500:]] == [OPUS_SILENCE] * 5
    assert all(f.dave for f in received[:500]), "every audio frame travelled DAVE-encrypted"
    assert_contiguous(received)
    await asyncio.sleep(0.1)
    assert len(listener.frames_from(bot.user_id)) == 505, "nothing after the 5 silence frames"

    # op 5: speaking 0 at Session Description (binds the SSRC), 1 while talking, 0 after the tail.
    await wait_until(lambda: len(emu.inspect(bot.user_id).speaking) >= 3)
    flags = [event.flags for event in emu.inspect(bot.user_id).speaking]
    assert flags == [0, 1, 0]

    stats = session.stats
    assert (stats.frames_sent, stats.silence_sent, stats.frames_dropped) == (500, 5, 0)
    assert stats.dave_encrypted == 500
    assert stats.clock_lateness["count"] >= 505
    assert stats.gateway_latency is not None and stats.heartbeats_acked >= 1
    rtp = emu.inspect(bot.user_id).rtp
    assert rtp.packets == 505 and rtp.lost == 0

    events: list[DisconnectedEvent] = []
    session.on(DisconnectedEvent, events.append)
    await session.disconnect()
    assert session.state is SessionState.DISCONNECTED
    assert len(events) == 1 and events[0].error is None
    final = session.stats  # what a DisconnectedEvent handler reads: the same counts, none twice
    assert (final.heartbeats_sent, final.heartbeats_acked) == (stats.heartbeats_sent, stats.heartbeats_acked)
    assert (final.frames_sent, final.dave_encrypted) == (500, 500)
    # The leave went out as op 4 with a null channel.
    await wait_until(lambda: emu.state.voice_state(world.guild.id, bot.user_id) is None)


@pytest.mark.parametrize("offer_aes", [True, False], ids=["aes256gcm", "xchacha20"])
@pytest.mark.parametrize("kind", ["dave_channel", "stage_channel"])
async def test_client_modes_and_channels(loop_errors: LoopErrors, offer_aes: bool, kind: str) -> None:
    config = VoiceServerConfig(offer_aes=offer_aes)
    async with voice_world(voice_config=config) as world:
        channel = world.channel if kind == "dave_channel" else world.stage
        listener = await world.emu.add_participant(channel.id)
        session = await world.voice.join_channel(world.guild.id, channel.id)
        assert session.mode == (MODE_AES256_GCM if offer_aes else MODE_XCHACHA20_POLY1305)
        assert session.dave_protocol_version == (1 if kind == "dave_channel" else 0)
        if kind == "stage_channel":
            assert session.privacy_code is None and session.dave_ready
        frames = opus_frames(60, voice=1)
        async with asyncio.timeout(15):
            await speak(frames, session)
            received = await listener.wait_for_frames(world.bot.user_id, 65, timeout=5)
        assert [f.payload for f in received] == [*frames, *([OPUS_SILENCE] * 5)]
        assert all(f.dave == (kind == "dave_channel") for f in received[:60])
        assert_contiguous(received)


async def test_client_events_and_ssrc_map(world: VoiceWorld) -> None:
    emu = world.emu
    session = await world.voice.join_channel(world.guild.id, world.channel.id)
    seen: list[object] = []
    session.on(ClientConnectEvent, seen.append)
    session.on(SpeakingEvent, seen.append)

    async def async_handler(event: DaveEpochEvent) -> None:
        await asyncio.sleep(0)
        seen.append(event)

    session.on(DaveEpochEvent, async_handler)
    speaker = await emu.add_participant(world.channel.id, name="speaker")
    epoch = await session.wait_for(DaveEpochEvent, lambda e: e.epoch is not None, timeout=5)
    assert epoch.privacy_code == session.privacy_code
    await speaker.wait_dave_ready()
    played = opus_frames(20, voice=2)
    await speaker.play(played)
    await wait_until(lambda: any(isinstance(e, SpeakingEvent) and e.flags for e in seen))
    connect = next(e for e in seen if isinstance(e, ClientConnectEvent))
    assert connect.user_ids == (speaker.user_id,)
    assert session.ssrc_users == {speaker.ssrc: speaker.user_id}
    assert session.user_ids == frozenset({speaker.user_id})
    await wait_until(lambda: session.stats.received_per_ssrc.get(speaker.ssrc, 0) >= 25)
    assert session.verification_code(speaker.user_id) is not None
    # Unsubscribing works and a failing handler never breaks the session.
    session.on(SpeakingEvent, lambda e: 1 / 0)
    await speaker.play(played[:3])
    await wait_until(lambda: session.stats.received_per_ssrc.get(speaker.ssrc, 0) >= 33)
    assert session.state is SessionState.READY


async def test_client_join_is_fast_and_idempotent(world: VoiceWorld) -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    session = await world.voice.join_channel(world.guild.id, world.channel.id)
    elapsed = loop.time() - started
    assert elapsed < 1.0
    assert await world.voice.join_channel(world.guild.id, world.channel.id) is session
    with pytest.raises(TimeoutError):
        await session.wait_for(ReadyEvent, timeout=0.05)  # joining the same channel again is a no-op
    print(f"join took {elapsed * 1000:.1f} ms")


async def test_client_join_again_with_other_flags_mutes_and_deafens(world: VoiceWorld) -> None:
    emu, guild_id, bot_id = world.emu, world.guild.id, world.bot.user_id
    other = emu.create_voice_channel(guild_id, "Other")

    def flags() -> tuple[bool, bool] | None:
        state = emu.state.voice_state(guild_id, bot_id)
        return None if state is None else (state.self_mute, state.self_deaf)

    session = await world.voice.join_channel(guild_id, world.channel.id)
    assert await world.voice.join_channel(guild_id, world.channel.id, self_deaf=True) is session
    await wait_until(lambda: flags() == (False, True))
    await world.voice.join_channel(guild_id, other.id, self_mute=True, timeout=10)  # a move with new flags
    await wait_until(lambda: flags() == (True, False))
    # A rejoin asks for the channel again with the flags last asked for, not those of the first join.
    rejoined = asyncio.ensure_future(session.wait_for(ReadyEvent, timeout=10))
    await emu.faults.close_client(bot_id, 4006)
    await rejoined
    assert flags() == (True, False) and session.channel_id == other.id


@pytest.mark.parametrize("server_update_first", [False, True])
async def test_client_move_between_channels_keeps_the_session(
    world: VoiceWorld, server_update_first: bool
) -> None:
    emu = world.emu
    emu.main_gateway.hub.voice_server_update_first = server_update_first  # protocol.md §1.2: any order
    other = emu.create_voice_channel(world.guild.id, "Other")
    listener = await emu.add_participant(other.id, name="other-listener")
    session = await world.voice.join_channel(world.guild.id, world.channel.id)
    first_ssrc = session.ssrc
    moved = await world.voice.join_channel(world.guild.id, other.id, timeout=10)
    assert moved is session and session.channel_id == other.id and session.ssrc != first_ssrc
    await listener.wait_dave_ready()
    await wait_until(lambda: session.dave_ready)
    frames = opus_frames(30, voice=3)
    async with asyncio.timeout(10):
        await speak(frames, session)
        received = await listener.wait_for_frames(world.bot.user_id, 35)
    assert [f.payload for f in received[:30]] == list(frames)
