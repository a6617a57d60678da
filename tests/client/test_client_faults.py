"""What real Discord does to long-lived voice connections, done by the emulator to a streaming session.

Each fault is injected mid-stream while a background writer keeps calling ``session.write``; the tests check
the recovery path (resume, rejoin, move, final), that exactly one Disconnected event ends a final one, that a
final one is never retried, and that audio reaches a listener afterwards.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import pytest

from cordvoice import (
    DaveRequiredError,
    DisconnectedError,
    MovedEvent,
    ReadyEvent,
    ReconnectAction,
    ReconnectingEvent,
    ResumedEvent,
    Session,
    SessionEvent,
    SessionState,
)
from cordvoice.emulator import MediaEndpoint, VoiceServerConfig
from cordvoice.emulator.sfu import Address
from cordvoice.udp.connection import UdpConnection
from cordvoice.udp.rtp import OPUS_SILENCE

from .conftest import FAST_RECONNECT, LoopErrors, VoiceWorld, opus_frames, voice_world, wait_until

E = TypeVar("E", bound=SessionEvent)


@dataclass
class Streamer:
    """Writes frames in the background, as a bot playing a long track does."""

    session: Session
    frames: tuple[bytes, ...]
    written: int = 0
    error: BaseException | None = None
    task: asyncio.Task[None] | None = field(default=None, repr=False)

    def start(self) -> Streamer:
        self.task = asyncio.create_task(self._run())
        return self

    async def _run(self) -> None:
        try:
            for frame in self.frames:
                await self.session.write(frame)
                self.written += 1
        except Exception as exc:
            self.error = exc

    async def wait_written(self, count: int, within: float = 10.0) -> None:
        await wait_until(lambda: self.written >= count, within)

    async def finish(self, within: float = 20.0) -> None:
        assert self.task is not None
        async with asyncio.timeout(within):
            await self.task
        await self.session.stop_speaking()

    async def cancel(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)


def expect(session: Session, event_type: type[E], within: float = 10.0) -> asyncio.Future[E]:
    """Start waiting for an event *before* the fault that causes it (recovery on loopback is fast)."""
    return asyncio.ensure_future(session.wait_for(event_type, timeout=within))


def record(session: Session) -> list[SessionEvent]:
    events: list[SessionEvent] = []
    session.on(SessionEvent, events.append)
    return events


def kinds(events: list[SessionEvent]) -> list[str]:
    return [type(e).__name__ for e in events]


def assert_in_order_subsequence(received: list[bytes], sent: tuple[bytes, ...]) -> int:
    """Every received payload was sent, in the sent order; returns how many sent frames are missing."""
    position = 0
    for payload in received:
        position = sent.index(payload, position) + 1
    return len(sent) - len(received)


async def joined_with_listener(world: VoiceWorld, channel_id: int | None = None) -> tuple[Session, object]:
    channel = channel_id or world.channel.id
    listener = await world.emu.add_participant(channel, name="listener")
    session = await world.voice.join_channel(world.guild.id, channel)
    await listener.wait_dave_ready()
    await wait_until(lambda: session.dave_ready)
    return session, listener


# ---- resume ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["close_4015", "crash_4015", "drop_no_close_frame"])
async def test_client_resume_keeps_ssrc_and_audio(world: VoiceWorld, how: str) -> None:
    emu, bot = world.emu, world.bot
    session, listener = await joined_with_listener(world)
    server = emu.voice_server(guild_id=world.guild.id)
    ssrc, identifies = session.ssrc, server.stats.identifies
    events = record(session)
    frames = opus_frames(150, voice=4)
    streamer = Streamer(session, frames).start()
    await streamer.wait_written(50)
    resumed_soon = expect(session, ResumedEvent)
    if how == "close_4015":
        await server.close_client(bot.user_id, 4015, "voice server crashed")
    elif how == "crash_4015":
        await server.crash()
    else:
        await server.drop_client(bot.user_id)
    resumed = await resumed_soon
    assert resumed.attempt == 1
    await streamer.finish()
    received = await listener.wait_for_frames(bot.user_id, 155, timeout=5) if how != "crash_4015" else None
    payloads = listener.payloads_from(bot.user_id)
    # UDP kept running through the resume: nothing was lost (the bound allows the outage's frames).
    missing = assert_in_order_subsequence(payloads, frames)
    assert missing == 0 or (how == "crash_4015" and missing <= 10), missing
    assert session.ssrc == ssrc and session.state is SessionState.READY
    assert server.stats.identifies == identifies, "a resume, not a fresh Identify"
    assert server.stats.resumes >= 1 and emu.inspect(bot.user_id).resumes == 1
    assert "ReconnectingEvent" in kinds(events) and "ReadyEvent" not in kinds(events)
    reconnecting = next(e for e in events if isinstance(e, ReconnectingEvent))
    assert reconnecting.action is ReconnectAction.RESUME
    assert session.stats.resumes == 1 and session.stats.reconnects == 0
    if received is not None:
        assert emu.inspect(bot.user_id).rtp.lost == 0


async def test_client_speaking_changed_during_a_resume_is_sent_after_it(world: VoiceWorld) -> None:
    emu, bot = world.emu, world.bot
    session, _ = await joined_with_listener(world)
    await session.speaking(1)
    await wait_until(lambda: emu.inspect(bot.user_id).speaking_flags[-1:] == [1])
    changes: list[asyncio.Future[None]] = []

    def stop_while_down(event: ReconnectingEvent) -> None:
        if event.action is ReconnectAction.RESUME:  # no WebSocket is up now
            changes.append(asyncio.ensure_future(session.speaking(0)))

    session.on(ReconnectingEvent, stop_while_down)
    resumed = expect(session, ResumedEvent)
    await emu.voice_server(guild_id=world.guild.id).close_client(bot.user_id, 4015, "voice server crashed")
    await resumed
    await changes[0]
    # op 9 brings no Session Description (whose op 5 carries the flags): the resume itself must send it.
    await wait_until(lambda: emu.inspect(bot.user_id).speaking_flags == [0, 1, 0], 5)
    assert session.stats.resumes == 1


async def test_client_udp_lost_while_the_websocket_is_down_is_not_resumed(
    world: VoiceWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened: list[UdpConnection] = []
    open_udp = UdpConnection.open

    async def recording_open(host: str, port: int, **kwargs: Any) -> UdpConnection:
        udp = await open_udp(host, port, **kwargs)
        opened.append(udp)
        return udp

    monkeypatch.setattr(UdpConnection, "open", recording_open)
    emu, bot = world.emu, world.bot
    session, listener = await joined_with_listener(world)
    server = emu.voice_server(guild_id=world.guild.id)
    events = record(session)

    def udp_dies(event: ReconnectingEvent) -> None:
        if event.action is ReconnectAction.RESUME:
            # The socket fails by itself (the loop aborts its transport) while no WebSocket is up.
            transport = opened[-1]._transport
            assert transport is not None
            transport.abort()

    session.on(ReconnectingEvent, udp_dies)
    frames = opus_frames(120, voice=7)
    streamer = Streamer(session, frames).start()
    await streamer.wait_written(30)
    ready_soon = expect(session, ReadyEvent)
    await server.close_client(bot.user_id, 4015, "voice server crashed")
    await ready_soon
    actions = [e.action for e in events if isinstance(e, ReconnectingEvent)]
    assert actions == [ReconnectAction.RESUME, ReconnectAction.REJOIN], "a resume would keep the dead socket"
    assert "ResumedEvent" not in kinds(events)
    assert len(opened) == 2 and opened[0].closed and not opened[1].closed
    await wait_until(lambda: session.dave_ready, 10)
    await streamer.finish()
    await wait_until(lambda: listener.payloads_from(bot.user_id)[-1:] == [frames[-1]], 10)
    assert streamer.error is None and session.state is SessionState.READY
    assert session.stats.reconnects == 1


async def test_client_three_withheld_acks_lead_to_a_resume(loop_errors: LoopErrors) -> None:
    config = VoiceServerConfig(heartbeat_interval_ms=40.0, heartbeat_timeout=5.0)
    async with voice_world(voice_config=config) as world:
        bot = world.bot
        session = await world.voice.join_channel(world.guild.id, world.channel.id)
        server = world.emu.voice_server(guild_id=world.guild.id)
        await wait_until(lambda: session.stats.heartbeats_acked >= 2)
        ssrc = session.ssrc

        def stop_withholding(event: ReconnectingEvent) -> None:
            server.withhold_acks(bot.user_id, False)

        session.on(ReconnectingEvent, stop_withholding)
        loop = asyncio.get_running_loop()
        started = loop.time()
        reconnecting_soon = expect(session, ReconnectingEvent)
        resumed_soon = expect(session, ResumedEvent)
        server.withhold_acks(bot.user_id)
        reconnecting = await reconnecting_soon
        detected_after = loop.time() - started
        assert reconnecting.action is ReconnectAction.RESUME
        assert "heartbeat" in reconnecting.reason
        await resumed_soon
        assert session.ssrc == ssrc
        # Three intervals of silence (40 ms each) before the fourth beat gives up, not one.
        assert 0.1 <= detected_after < 1.0, detected_after
        acks = session.stats.heartbeats_acked
        await wait_until(lambda: session.stats.heartbeats_acked > acks)


# ---- rejoin ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("code", [4006, 4009, 4004])
async def test_client_rejoins_after_session_invalid(world: VoiceWorld, code: int) -> None:
    emu, bot = world.emu, world.bot
    session, listener = await joined_with_listener(world)
    server = emu.voice_server(guild_id=world.guild.id)
    events = record(session)
    frames = opus_frames(120, voice=5)
    streamer = Streamer(session, frames).start()
    await streamer.wait_written(30)
    identifies = server.stats.identifies
    ready_soon = expect(session, ReadyEvent)
    await server.close_client(bot.user_id, code, "test")
    ready = await ready_soon
    assert ready.channel_id == world.channel.id
    assert server.stats.identifies == identifies + 1, "a fresh Identify"
    reconnecting = next(e for e in events if isinstance(e, ReconnectingEvent))
    assert reconnecting.action is ReconnectAction.REJOIN and reconnecting.close_code == code
    await wait_until(lambda: session.dave_ready, 10)
    await streamer.finish()
    await wait_until(lambda: listener.payloads_from(bot.user_id)[-1:] == [frames[-1]], 10)
    # At most the frame(s) in flight when the server dropped the session are lost; the rest waited.
    assert assert_in_order_subsequence(listener.payloads_from(bot.user_id), frames) <= 2
    assert session.stats.reconnects == 1 and session.state is SessionState.READY


async def test_client_rejoins_when_the_gateway_session_is_lost(world: VoiceWorld) -> None:
    emu, bot = world.emu, world.bot
    session = await world.voice.join_channel(world.guild.id, world.channel.id)
    gateway_session = world.client.session_id
    assert gateway_session is not None
    ready_soon = expect(session, ReadyEvent)
    emu.main_gateway.invalidate_session(gateway_session, resumable=False)
    ready = await ready_soon
    assert ready.channel_id == world.channel.id
    assert world.client.session_id != gateway_session
    assert emu.state.voice_state(world.guild.id, bot.user_id) is not None
    assert session.state is SessionState.READY


async def test_client_a_rejoin_nobody_answers_ends_saying_so(
    world: VoiceWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    await world.voice.close()
    voice = world.make_voice(reconnect=replace(FAST_RECONNECT, max_rejoins=1, rejoin_timeout=0.3))
    session = await voice.join_channel(world.guild.id, world.channel.id)
    gateway_session = world.client.session_id
    assert gateway_session is not None
    monkeypatch.setattr(world.emu.main_gateway.hub, "request_voice_state", lambda *_: None)  # op 4 unanswered
    world.emu.main_gateway.invalidate_session(gateway_session, resumable=False)
    async with asyncio.timeout(15):
        final = await session.wait_closed()
    # The timeout's empty message left "rejoin failed: " with no cause.
    assert "rejoin failed: no answer" in final.reason, final.reason


async def test_client_gateway_session_lost_while_waiting_for_a_server_rejoins(world: VoiceWorld) -> None:
    emu = world.emu
    session = await world.voice.join_channel(world.guild.id, world.channel.id)
    events = record(session)
    gateway_session = world.client.session_id
    assert gateway_session is not None
    ready_soon = expect(session, ReadyEvent)
    emu.announce_voice_server_lost(world.guild.id)  # and no new server follows unasked
    await wait_until(lambda: session.state is SessionState.RECONNECTING)
    emu.main_gateway.invalidate_session(gateway_session, resumable=False)
    # Op 4 on the new gateway session brings a server; without it the session would wait out server_wait.
    ready = await ready_soon
    assert ready.channel_id == world.channel.id and session.state is SessionState.READY
    actions = [e.action for e in events if isinstance(e, ReconnectingEvent)]
    # More than one rejoin when the client waits longer than rejoin_timeout before identifying again.
    assert actions[0] is ReconnectAction.WAIT_FOR_SERVER and set(actions[1:]) == {ReconnectAction.REJOIN}
    assert "DisconnectedEvent" not in kinds(events)


async def test_client_gateway_session_lost_during_a_rejoin_asks_again_at_once(
    world: VoiceWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    await world.voice.close()
    voice = world.make_voice(reconnect=replace(FAST_RECONNECT, rejoin_timeout=30.0))
    session = await voice.join_channel(world.guild.id, world.channel.id)
    events = record(session)
    client = world.client
    send_op4 = client.update_voice_state
    lost: list[str] = []

    async def op4_dies_with_the_gateway(guild_id: int, channel_id: int | None, **kwargs: Any) -> None:
        if channel_id is None or lost:
            await send_op4(guild_id, channel_id, **kwargs)
            return
        # The rejoin's op 4 goes out on a gateway connection that dies before Discord reads it.
        assert client.session_id is not None
        lost.append(client.session_id)
        world.emu.main_gateway.invalidate_session(client.session_id, resumable=False)

    monkeypatch.setattr(client, "update_voice_state", op4_dies_with_the_gateway)
    ready_soon = expect(session, ReadyEvent, within=20.0)
    started = asyncio.get_running_loop().time()
    server = world.emu.voice_server(guild_id=world.guild.id)
    await server.close_client(world.bot.user_id, 4006, "session gone")
    ready = await ready_soon
    # Without asking again on the new gateway session it would wait out rejoin_timeout (30 s).
    assert asyncio.get_running_loop().time() - started < 15.0
    assert lost and client.session_id != lost[0]
    assert ready.channel_id == world.channel.id and session.state is SessionState.READY
    assert "DisconnectedEvent" not in kinds(events)
    await voice.close()


async def test_client_bug_close_rejoins_once_then_gives_up(world: VoiceWorld) -> None:
    emu, bot = world.emu, world.bot
    session = await world.voice.join_channel(world.guild.id, world.channel.id)
    server = emu.voice_server(guild_id=world.guild.id)
    ready_soon = expect(session, ReadyEvent)
    await server.close_client(bot.user_id, 4001, "unknown opcode")
    await ready_soon
    await server.close_client(bot.user_id, 4002, "decode error")
    final = await session.wait_closed()
    assert final.close_code == 4002 and isinstance(final.error, DisconnectedError)
    assert "again after a rejoin" in final.reason


# ---- moves ----------------------------------------------------------------------------------------------


async def test_client_server_move_continues_playback(world: VoiceWorld) -> None:
    emu, bot = world.emu, world.bot
    session, _ = await joined_with_listener(world)
    old_endpoint = session.endpoint
    events = record(session)
    frames = opus_frames(200, voice=6)
    streamer = Streamer(session, frames).start()
    await streamer.wait_written(40)
    new_server = await emu.add_voice_server()
    moved_soon, ready_soon = expect(session, MovedEvent), expect(session, ReadyEvent)
    await emu.move_guild(world.guild.id, new_server.id)
    moved = await moved_soon
    assert moved.previous_endpoint == old_endpoint and moved.endpoint == new_server.endpoint
    ready = await ready_soon
    assert ready.endpoint == new_server.endpoint and session.endpoint == new_server.endpoint
    # A listener on the new server hears the rest of the track.
    listener = await emu.add_participant(world.channel.id, name="new-server-listener")
    await listener.wait_dave_ready()
    await streamer.finish()
    await wait_until(lambda: listener.payloads_from(bot.user_id)[-1:] == [frames[-1]], 10)
    heard = listener.payloads_from(bot.user_id)
    assert assert_in_order_subsequence(heard, frames) < len(frames)
    assert heard == list(frames[frames.index(heard[0]) :]), "contiguous from the first frame it could hear"
    assert emu.inspect(bot.user_id).ssrc == session.ssrc
    assert streamer.error is None and session.stats.moves == 1
    assert "DisconnectedEvent" not in kinds(events)


@pytest.mark.parametrize("pause", [0.0, 0.3])
async def test_client_null_endpoint_waits_for_the_next_server(world: VoiceWorld, pause: float) -> None:
    emu = world.emu
    session = await world.voice.join_channel(world.guild.id, world.channel.id)
    events = record(session)
    new_server = await emu.add_voice_server()
    ready_soon = expect(session, ReadyEvent)
    await emu.move_guild(world.guild.id, new_server.id, null_endpoint_first=True, pause=pause)
    ready = await ready_soon
    assert ready.endpoint == new_server.endpoint
    waited = [e for e in events if isinstance(e, ReconnectingEvent)]
    assert waited and waited[0].action is ReconnectAction.WAIT_FOR_SERVER
    assert "DisconnectedEvent" not in kinds(events)


async def test_client_moved_by_someone_follows(world: VoiceWorld) -> None:
    emu, bot = world.emu, world.bot
    other = emu.create_voice_channel(world.guild.id, "Elsewhere")
    session = await world.voice.join_channel(world.guild.id, world.channel.id)
    moved_soon, ready_soon = expect(session, MovedEvent), expect(session, ReadyEvent)
    emu.set_voice_state(world.guild.id, bot.user_id, other.id)
    moved = await moved_soon
    assert (moved.previous_channel_id, moved.channel_id) == (world.channel.id, other.id)
    await ready_soon
    assert session.channel_id == other.id and emu.inspect(bot.user_id).channel_id == other.id


# ---- final ----------------------------------------------------------------------------------------------


async def assert_final_without_retry(world: VoiceWorld, session: Session, events: list[SessionEvent]) -> None:
    server = world.emu.voice_server(guild_id=world.guild.id)
    final = await session.wait_closed()
    identifies = server.stats.identifies
    await asyncio.sleep(world.voice._config.reconnect.move_wait + 0.3)
    assert kinds(events).count("DisconnectedEvent") == 1
    assert server.stats.identifies == identifies, "no retry"
    assert session.state is SessionState.DISCONNECTED and final.error is not None
    assert world.guild.id not in world.voice.sessions
    with pytest.raises(DisconnectedError):
        await session.write(b"\xfc\x00")


async def test_client_kick_ends_with_one_disconnected_event(world: VoiceWorld) -> None:
    session = await world.voice.join_channel(world.guild.id, world.channel.id)
    events = record(session)
    streamer = Streamer(session, opus_frames(100, voice=7)).start()
    # Alone in a DAVE channel the group never forms: the lane does not pull, the writer waits (backpressure).
    await wait_until(lambda: session.queued_frames == 5)
    await asyncio.sleep(0.1)
    assert streamer.written == 5 and session.stats.frames_sent == 0 and session.stats.dave_withheld > 0
    world.emu.disconnect_member(world.guild.id, world.bot.user_id)
    await assert_final_without_retry(world, session, events)
    assert isinstance(streamer.error, DisconnectedError), "the blocked writer is released with an error"
    final = session.disconnected_event
    assert final is not None and "removed from the voice channel" in final.reason


async def test_client_call_terminated_4022_ends_with_one_disconnected_event(world: VoiceWorld) -> None:
    session = await world.voice.join_channel(world.guild.id, world.channel.id)
    events = record(session)
    world.emu.delete_channel(world.channel.id)
    await assert_final_without_retry(world, session, events)


async def test_client_4014_without_a_move_is_final(world: VoiceWorld) -> None:
    session = await world.voice.join_channel(world.guild.id, world.channel.id)
    events = record(session)
    server = world.emu.voice_server(guild_id=world.guild.id)
    await server.close_client(world.bot.user_id, 4014, "disconnected")
    await assert_final_without_retry(world, session, events)
    waits = [e for e in events if isinstance(e, ReconnectingEvent)]
    assert [w.action for w in waits] == [ReconnectAction.WAIT_FOR_MOVE]
    final = session.disconnected_event
    assert final is not None and final.close_code == 4014


@pytest.mark.parametrize("code", [4021, 4016, 4012, 4020])
async def test_client_final_close_codes_are_not_retried(world: VoiceWorld, code: int) -> None:
    session = await world.voice.join_channel(world.guild.id, world.channel.id)
    events = record(session)
    await world.emu.voice_server(guild_id=world.guild.id).close_client(world.bot.user_id, code, "final")
    await assert_final_without_retry(world, session, events)
    final = session.disconnected_event
    assert final is not None and final.close_code == code
    assert "ReconnectingEvent" not in kinds(events)


async def test_client_4017_on_join_raises_dave_required(world: VoiceWorld) -> None:
    await world.voice.close()
    voice = world.make_voice(dave=False)
    try:
        with pytest.raises(DaveRequiredError) as caught:
            await voice.join_channel(world.guild.id, world.channel.id)
        assert caught.value.code == 4017
        assert "dave=False" in str(caught.value) and "max_dave_protocol_version=0" in str(caught.value)
        assert voice.sessions == {}
        # The stage channel needs no DAVE: the same Voice joins it.
        session = await voice.join_channel(world.guild.id, world.stage.id)
        assert session.dave_protocol_version == 0
    finally:
        await voice.close()


async def test_client_4017_mid_session_ends_with_dave_required(world: VoiceWorld) -> None:
    session = await world.voice.join_channel(world.guild.id, world.channel.id)
    events = record(session)
    await world.emu.voice_server(guild_id=world.guild.id).close_client(world.bot.user_id, 4017, "E2EE")
    await assert_final_without_retry(world, session, events)
    final = session.disconnected_event
    assert final is not None and isinstance(final.error, DaveRequiredError)
    assert "4017" in str(final.error)


# ---- loss -----------------------------------------------------------------------------------------------


async def test_client_survives_20_percent_udp_loss(world: VoiceWorld) -> None:
    emu, bot = world.emu, world.bot
    session, listener = await joined_with_listener(world)
    speaker = await emu.add_participant(world.channel.id, name="speaker")
    await speaker.wait_dave_ready()
    await wait_until(lambda: session.dave_ready)
    server = emu.voice_server(guild_id=world.guild.id)
    rng = random.Random(20)
    dropped = 0

    def lossy(packet: bytes, address: Address, sender: MediaEndpoint, receiver: MediaEndpoint) -> None:
        nonlocal dropped
        if rng.random() < 0.2:
            dropped += 1
            return
        server.media.send_datagram(packet, address)

    server.media.forward_hook = lossy
    frames = opus_frames(150, voice=8)
    talk = asyncio.create_task(speaker.play(opus_frames(150, voice=9)))
    streamer = Streamer(session, frames).start()
    await streamer.finish()
    await talk
    await asyncio.sleep(0.2)
    server.media.forward_hook = None
    heard = listener.payloads_from(bot.user_id)
    assert 0.65 * len(frames) < len(heard) < 0.95 * len(frames)
    assert assert_in_order_subsequence(heard, frames) > 0
    stats = session.stats
    assert 0.65 * 155 < stats.received_per_ssrc[speaker.ssrc] < 0.95 * 155
    assert stats.udp_undecryptable == 0 and stats.udp_malformed == 0
    assert session.state is SessionState.READY and stats.frames_sent == 150 and dropped > 40
    # Still fully usable afterwards.
    await session.write(frames[0])
    await session.stop_speaking()
    await wait_until(lambda: listener.payloads_from(bot.user_id, include_silence=True)[-1] == OPUS_SILENCE)
