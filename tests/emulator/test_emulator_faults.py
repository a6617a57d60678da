"""Every fault of ``emu.faults``, seen where a client would see it: on its sockets.

Voice-gateway faults are read from the close codes and opcodes a participant or a raw socket receives;
main-gateway faults from the dispatches a raw gateway socket records; UDP faults from what a participant
receives, against the configured rates (seeded, within generous statistical bounds) and against the
impairment's own counters. Every fault must also show in ``emu.inspect(user_id).faults``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import statistics
import struct
from collections.abc import AsyncIterator
from typing import Any

import pytest

from cordvoice.emulator import Emulator, Participant
from cordvoice.emulator import participant as participant_module
from cordvoice.errors import ConnectionClosedError, EmulatorError, InvalidArgumentError
from cordvoice.udp.rtp import parse_rtp
from cordvoice.voicegateway.messages import DaveMlsProposals, ServerMessage

from .emulator_helpers import (
    RawGateway,
    RawMediaClient,
    RawVoice,
    VoiceWorld,
    bot_joins_voice,
    build_voice_world,
    classify,
    eventually,
    exchange_audio,
    identify_payload,
    issue_session,
    opaque_frames,
    wait_converged,
)


@pytest.fixture
async def world() -> AsyncIterator[VoiceWorld]:
    async with Emulator() as emu:
        yield build_voice_world(emu)


# ---- voice gateway ---------------------------------------------------------------------------------------


async def test_close_client_with_any_code(world: VoiceWorld) -> None:
    emu = world.emu
    codes = [3000, 4000, 4006, 4021, 4999]
    members = [await emu.add_participant(world.stage.id, name=f"p{code}") for code in codes]
    for member, code in zip(members, codes, strict=True):
        assert await emu.faults.close_client(member.user_id, code, "test close") == 1
        assert await member.wait_closed() == code
        seen = emu.inspect(member.user_id)
        assert seen.closes_sent == (code,)
        assert seen.ended == (code >= 4000), "only codes below 4000 (and 4015) keep the session for a resume"
        assert seen.faults == {"close": 1, f"close_{code}": 1}
    with pytest.raises(InvalidArgumentError):
        await emu.faults.close_client(members[0].user_id, 999)
    with pytest.raises(EmulatorError, match="no live voice session"):
        await emu.faults.close_client(members[-1].user_id, 4000)
    assert emu.faults.counts["close"] == len(codes)


async def test_close_codes_no_close_frame_can_carry_are_refused(world: VoiceWorld) -> None:
    emu = world.emu
    member = await emu.add_participant(world.stage.id, name="dana")
    for code in (1004, 1005, 1006, 1015, 2000):
        with pytest.raises(InvalidArgumentError, match="cannot be sent"):
            await emu.faults.close_client(member.user_id, code)
    with pytest.raises(InvalidArgumentError, match="cannot be sent"):
        await emu.faults.crash(code=99)
    assert member.connected and emu.faults.counts == {}, "a refused fault touches nothing"
    assert await emu.faults.close_client(member.user_id, 1012) == 1
    assert await member.wait_closed() == 1012


async def test_crash_closes_everyone_with_4015_and_resumed_members_keep_hearing_each_other(
    world: VoiceWorld,
) -> None:
    emu = world.emu
    alice, bob = await asyncio.gather(
        emu.add_participant(world.channel.id, name="alice", resume=True),
        emu.add_participant(world.channel.id, name="bob", resume=True),
    )
    await wait_converged([alice, bob], emu)
    epoch = alice.epoch
    frames = opaque_frames(1, 60)
    playing = asyncio.create_task(alice.play(frames))
    await asyncio.sleep(0.3)
    assert await emu.faults.crash() == 2
    await playing
    heard = await bob.wait_for_frames(alice.user_id, 65)
    assert [f.payload for f in heard[:60]] == frames, "no frame lost through the crash and the resume"
    assert all(f.dave for f in heard[:60]) and bob.stats.dave_undecryptable.total() == 0
    for member in (alice, bob):
        assert member.closes == [4015] and member.connected
        assert member.stats.resumes == member.stats.resumed == 1
        seen = emu.inspect(member.user_id)
        assert seen.resumes == 1 and seen.connections == 2 and not seen.ended
        assert 7 in seen.opcode_order, "op 7 Resume on the wire"
        assert seen.faults == {"crashed": 1}
    assert alice.epoch == bob.epoch == epoch, "the DAVE group survives a resume"
    assert emu.faults.counts["crash"] == 1 and emu.voice_server().stats.resumes == 2


async def test_a_dave_reply_the_crash_cut_off_is_sent_after_the_resume(world: VoiceWorld) -> None:
    """The server crashes right after proposing a newcomer: a member reads the proposals, but its commit meets
    a closed socket. The resume will not replay the proposals (they were acknowledged), so the member must
    send the commit once resumed, or the newcomer never joins the group."""
    emu = world.emu
    alice, bob = await asyncio.gather(
        emu.add_participant(world.channel.id, name="alice", resume=True),
        emu.add_participant(world.channel.id, name="bob", resume=True),
    )
    await wait_converged([alice, bob], emu)
    crashed = asyncio.Event()
    for member in (alice, bob):
        handle = member._handle

        async def crash_first(message: ServerMessage, handle: Any = handle) -> None:
            if isinstance(message, DaveMlsProposals) and not crashed.is_set():
                crashed.set()
                await emu.faults.crash()  # the close frame now follows the proposals on both sockets
            await handle(message)

        member._handle = crash_first  # type: ignore[method-assign]
    carol = await emu.add_participant(world.channel.id, name="carol", resume=True)
    await wait_converged([alice, bob, carol], emu)
    assert crashed.is_set() and alice.stats.resumed == bob.stats.resumed == 1
    await exchange_audio([alice, bob, carol], 1)


async def test_a_select_protocol_the_crash_cut_off_is_sent_after_the_resume(
    world: VoiceWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server crashes while a joining member runs IP discovery: its Select Protocol meets the closed
    socket. Once resumed it must still send it, or the handshake never ends."""
    emu = world.emu
    emu.faults.pause_udp()  # IP discovery waits
    joining = asyncio.create_task(emu.add_participant(world.stage.id, name="lou", resume=True))
    await eventually(lambda: emu.voice_server().stats.identifies == 1)
    dial = participant_module._dial
    redial = asyncio.Event()

    async def gated_dial(*args: Any) -> Any:
        await redial.wait()  # the old socket is closed, the new one not open yet
        return await dial(*args)

    monkeypatch.setattr(participant_module, "_dial", gated_dial)
    await emu.faults.crash()
    emu.faults.resume_udp()
    await asyncio.sleep(0.7)  # discovery retries every 0.5 s: Select Protocol now meets the closed socket
    redial.set()
    async with asyncio.timeout(5):
        lou = await joining
    assert lou.mode is not None and lou.stats.resumed == 1 and lou.stats.dave_errors == {}


async def test_a_resuming_member_plays_right_after_a_crash(world: VoiceWorld) -> None:
    """``play`` while the socket a crash closed is being resumed: its op 5 goes out with the resume, rather
    than a ConnectionClosedError from a participant that is still connected."""
    emu = world.emu
    alice, bob = await asyncio.gather(
        emu.add_participant(world.channel.id, name="alice", resume=True),
        emu.add_participant(world.channel.id, name="bob", resume=True),
    )
    await wait_converged([alice, bob], emu)
    await emu.faults.crash()
    frames = opaque_frames(3, 10)
    await alice.play(frames)
    await bob.wait_for_frames(alice.user_id, 15)  # and the 5 silence frames
    assert bob.payloads_from(alice.user_id) == frames and alice.stats.resumed == 1
    await eventually(lambda: emu.inspect(alice.user_id).speaking_flags == [0, 1, 0])  # bound, then play's


@pytest.mark.parametrize("resume", [False, True])
async def test_a_crash_before_identify_fails_the_join_with_the_projects_error(
    world: VoiceWorld, monkeypatch: pytest.MonkeyPatch, resume: bool
) -> None:
    emu = world.emu
    dial = participant_module._dial

    async def dial_then_crash(*args: Any) -> Any:
        socket = await dial(*args)
        await emu.faults.crash()  # closes the new socket too, before the participant's Identify
        return socket

    monkeypatch.setattr(participant_module, "_dial", dial_then_crash)
    with pytest.raises(ConnectionClosedError) as closed:
        await emu.add_participant(world.stage.id, name="max", resume=resume, timeout=5)
    assert closed.value.code == 4015


async def test_drop_client_cuts_tcp_and_a_resuming_member_comes_back(world: VoiceWorld) -> None:
    emu = world.emu
    carol = await emu.add_participant(world.stage.id, name="carol", resume=True)
    assert await emu.faults.drop_client(carol.user_id) == 1
    await carol.wait_until(lambda: carol.stats.resumed == 1)
    assert carol.closes == [1006], "no close frame: the client sees an abnormal closure"
    seen = emu.inspect(carol.user_id)
    assert seen.connected and seen.resumes == 1 and seen.faults == {"drop": 1}


async def test_withhold_acks_for_n_heartbeats_or_until_restored(world: VoiceWorld) -> None:
    emu = world.emu
    session = issue_session(emu, world.stage)
    raw = await RawVoice.open(session.endpoint)
    await raw.send(identify_payload(session, dave=0))
    await raw.recv_op(2)
    emu.faults.withhold_acks(session.user_id, count=2)
    for nonce in (1, 2, 3):
        await raw.send({"op": 3, "d": {"t": nonce, "seq_ack": -1}})
    ack = (await raw.recv_op(6)).message
    assert ack.nonce == 3, "ACKs come in order, so 1 and 2 were never answered"  # type: ignore[union-attr]
    emu.faults.withhold_acks(session.user_id)  # until restored
    for nonce in (4, 5):
        await raw.send({"op": 3, "d": {"t": nonce, "seq_ack": -1}})
    await eventually(lambda: emu.inspect(session.user_id).heartbeats == 5)
    emu.faults.restore_acks(session.user_id)
    await raw.send({"op": 3, "d": {"t": 6, "seq_ack": -1}})
    assert (await raw.recv_op(6)).message.nonce == 6  # type: ignore[union-attr]
    assert emu.voice_server().stats.acks_withheld == 4
    assert emu.inspect(session.user_id).faults == {"withhold_acks": 2}
    await raw.close()


async def test_the_control_route_answers_a_bad_parameter_with_400(world: VoiceWorld) -> None:
    emu = world.emu
    member = await emu.add_participant(world.stage.id, name="gus")
    auth = f"Emulator {emu.control_token}"
    for query in ("count=0", "count=-2"):
        target = f"/_emulator/fault?kind=withhold_acks&user_id={member.user_id}&{query}"
        answer = await emu.control.handle(target, auth)
        assert answer.status == 400, answer.body
    with pytest.raises(InvalidArgumentError):
        emu.faults.withhold_acks(member.user_id, count=0)
    assert emu.faults.counts == {}


# ---- main gateway: moves, kicks, deleted channels -------------------------------------------------------


@pytest.mark.parametrize("null_endpoint_first", [False, True])
async def test_move_to_another_voice_server(world: VoiceWorld, null_endpoint_first: bool) -> None:
    emu = world.emu
    gateway = await RawGateway.login(emu, world.bot.token)
    voice, first = await bot_joins_voice(emu, gateway, world.bot, world.channel)
    human = await emu.add_participant(world.channel.id, name="human")
    await wait_converged([voice, human], emu)
    mark = gateway.mark()
    moving = asyncio.create_task(
        emu.faults.move_client(world.bot.user_id, null_endpoint_first=null_endpoint_first, pause=0.3)
    )
    if null_endpoint_first:
        _, lost_at, lost = await gateway.expect("VOICE_SERVER_UPDATE", after=mark)
        assert lost["endpoint"] is None and lost["guild_id"] == str(world.guild.id)
        await asyncio.sleep(0.1)
        assert voice.connected, "the old server keeps the socket until the move itself"
    new_server = await moving
    _, moved_at, moved = await gateway.expect(
        "VOICE_SERVER_UPDATE", lambda d: d["endpoint"] is not None, after=mark
    )
    assert moved["endpoint"] == new_server.endpoint != first["endpoint"]
    assert moved["token"] != first["token"]
    if null_endpoint_first:
        assert moved_at - lost_at >= 0.25, "the new endpoint follows the null one after the pause"
    assert "VOICE_STATE_UPDATE" not in gateway.events_since(mark), "a server move keeps the voice state"
    assert gateway.events_since(mark).count("VOICE_SERVER_UPDATE") == (2 if null_endpoint_first else 1)
    assert await voice.wait_closed() == 4022 and await human.wait_closed() == 4022
    # The bot connects afresh with the new credentials and lands on the new server.
    state = emu.state.voice_state(world.guild.id, world.bot.user_id)
    assert state is not None
    again = await Participant.connect(
        endpoint=moved["endpoint"],
        server_id=world.guild.id,
        user_id=world.bot.user_id,
        session_id=state.session_id,
        token=moved["token"],
        channel_id=world.channel.id,
    )
    assert emu.voice_server(guild_id=world.guild.id).server_id == new_server.id
    assert emu.voice_server(new_server.id).inspect(world.bot.user_id) is not None
    kind = "moved_null_endpoint" if null_endpoint_first else "moved"
    assert emu.inspect(world.bot.user_id).faults == {kind: 1}
    await again.close()
    await gateway.close()


@pytest.mark.parametrize("pause", [-1.0, math.nan, math.inf])
async def test_a_move_pause_that_is_negative_nan_or_endless_is_refused(
    world: VoiceWorld, pause: float
) -> None:
    emu = world.emu
    member = await emu.add_participant(world.stage.id, name="hal")
    servers = set(emu.voice_server_handles)
    async with asyncio.timeout(5):  # an endless pause left everyone on `endpoint: null` for good
        with pytest.raises(InvalidArgumentError, match="pause"):
            await emu.faults.move_client(member.user_id, null_endpoint_first=True, pause=pause)
    assert member.connected and set(emu.voice_server_handles) == servers, "a refused fault touches nothing"
    assert emu.faults.counts == {}
    answer = await emu.control.handle(
        f"/_emulator/fault?kind=move_guild&guild_id={world.guild.id}&pause={pause}",
        f"Emulator {emu.control_token}",
    )
    assert answer.status == 400, answer.body


async def test_inspect_shows_the_newest_session_after_a_move_and_a_leave(world: VoiceWorld) -> None:
    emu = world.emu
    first = await Participant.from_session(issue_session(emu, world.stage, "frank"))
    user_id, guild_id = first.user_id, world.guild.id
    await emu.faults.move_guild(guild_id)
    assert await first.wait_closed() == 4022
    moved = emu.state.voice_session(guild_id, user_id)
    assert moved is not None
    second = await Participant.from_session(moved)
    emu.set_voice_state(guild_id, user_id, None)
    assert await second.wait_closed() == 4014
    seen = emu.inspect(user_id)  # both sessions ended, each after one connection
    assert seen.ssrc == second.ssrc and seen.closes_sent == (4014,), "the newest session, not the first"
    assert seen.identified_at > emu.voice_server(1).inspect(user_id).identified_at  # type: ignore[union-attr]


async def test_kick_sends_a_null_channel_then_closes_4014(world: VoiceWorld) -> None:
    emu = world.emu
    gateway = await RawGateway.login(emu, world.bot.token)
    voice, _ = await bot_joins_voice(emu, gateway, world.bot, world.stage)
    mark = gateway.mark()
    assert emu.faults.kick(world.bot.user_id)
    _, _, state = await gateway.expect("VOICE_STATE_UPDATE", after=mark)
    assert state["user_id"] == str(world.bot.user_id) and state["channel_id"] is None
    assert await voice.wait_closed() == 4014
    seen = emu.inspect(world.bot.user_id)
    assert seen.ended and seen.closes_sent == (4014,) and seen.faults == {"kick": 1}
    with pytest.raises(EmulatorError):
        emu.faults.kick(world.bot.user_id)  # not in voice any more
    await gateway.close()


async def test_a_kicked_participant_stops_playing_with_the_projects_error(world: VoiceWorld) -> None:
    emu = world.emu
    speaker = await emu.add_participant(world.stage.id, name="erin")
    playing = asyncio.create_task(speaker.play(opaque_frames(1, 50)))
    await asyncio.sleep(0.2)
    assert emu.faults.kick(speaker.user_id)
    with pytest.raises(ConnectionClosedError) as closed:
        await playing
    assert closed.value.code == 4014
    assert speaker.stats.sent_packets < 50, "it stopped sending at the kick"
    with pytest.raises(ConnectionClosedError):
        await speaker.play(opaque_frames(2, 1))
    with pytest.raises(ConnectionClosedError):
        await speaker.send_raw("{}")


async def test_delete_channel_announces_it_and_closes_4022(world: VoiceWorld) -> None:
    emu = world.emu
    gateway = await RawGateway.login(emu, world.bot.token)
    voice, _ = await bot_joins_voice(emu, gateway, world.bot, world.stage)
    other = await emu.add_participant(world.stage.id, name="other")
    mark = gateway.mark()
    assert emu.faults.delete_channel(world.stage.id) == 2
    deleted_at, _, deleted = await gateway.expect("CHANNEL_DELETE", after=mark)
    assert deleted["id"] == str(world.stage.id)
    left_at, _, state = await gateway.expect(
        "VOICE_STATE_UPDATE", lambda d: d["user_id"] == str(world.bot.user_id), after=mark
    )
    assert state["channel_id"] is None
    assert deleted_at < left_at, "CHANNEL_DELETE first, then the null voice states (docs/emulator.md)"
    assert await voice.wait_closed() == 4022 and await other.wait_closed() == 4022
    assert emu.inspect(world.bot.user_id).faults == {"channel_deleted": 1}
    await gateway.close()


# ---- UDP -------------------------------------------------------------------------------------------------


async def stage_trio(world: VoiceWorld) -> tuple[Participant, Participant, Participant]:
    alice, bob, carol = await asyncio.gather(
        *(world.emu.add_participant(world.stage.id, name=name) for name in ("alice", "bob", "carol"))
    )
    return alice, bob, carol


async def test_loss_duplication_and_reordering_rates(world: VoiceWorld) -> None:
    emu = world.emu
    alice, bob, carol = await stage_trio(world)
    count = 1000
    impairment = emu.faults.impair(bob.user_id, loss=0.1, duplicate=0.05, reorder=0.1, seed=11)
    await alice.play(opaque_frames(2, count), silence=False, interval=0.001)
    await carol.wait_for_frames(alice.user_id, count)
    await asyncio.sleep(0.2)  # a packet held for reordering at the very end waits up to 0.1 s
    distinct, duplicates, out_of_order = classify(bob.frames_from(alice.user_id))
    lost = count - distinct
    counters = impairment.counters
    # What the participant measured is exactly what the impairment did ...
    assert counters["forwarded"] == count
    assert (lost, duplicates) == (counters["lost"], counters["duplicated"])
    assert counters["reordered"] - 1 <= out_of_order <= counters["reordered"]
    # ... and the rates are the configured ones (binomial, more than 4 standard deviations of slack).
    assert 60 <= lost <= 140, lost
    assert 22 <= duplicates <= 80, duplicates
    assert 60 <= out_of_order <= 140, out_of_order
    assert classify(carol.frames_from(alice.user_id)) == (count, 0, 0), "only bob's path is impaired"
    faults = emu.inspect(bob.user_id).faults
    assert faults["impair"] == 1 and faults["udp_lost"] == lost and faults["udp_duplicated"] == duplicates
    assert emu.inspect(carol.user_id).faults == {}


async def test_delay_and_jitter_measured_against_an_unimpaired_receiver(world: VoiceWorld) -> None:
    emu = world.emu
    alice, bob, carol = await stage_trio(world)
    count = 200
    emu.faults.impair(bob.user_id, delay=0.05, jitter=0.03, seed=5)
    await alice.play(opaque_frames(3, count), silence=False, interval=0.005)
    await bob.wait_for_frames(alice.user_id, count)
    reference = {f.sequence: f.arrival for f in carol.frames_from(alice.user_id)}
    latency = [f.arrival - reference[f.sequence] for f in bob.frames_from(alice.user_id)]
    assert len(latency) == count
    assert min(latency) >= 0.049, "never earlier than the fixed delay"
    assert 0.057 <= statistics.mean(latency) <= 0.08, statistics.mean(latency)  # 0.065 expected
    quantiles = statistics.quantiles(latency, n=20)
    assert quantiles[-1] - quantiles[0] >= 0.02, "the jitter spreads arrivals over ~30 ms"
    assert max(latency) <= 0.05 + 0.03 + 0.03, "bounded by delay + jitter (plus scheduling slack)"
    _, _, out_of_order = classify(bob.frames_from(alice.user_id))
    assert out_of_order > 0, "30 ms of jitter on 5 ms spacing reorders packets"
    assert emu.inspect(bob.user_id).faults["udp_delayed"] == count


async def test_global_impairment_and_per_receiver_override(world: VoiceWorld) -> None:
    emu = world.emu
    alice, bob, carol = await stage_trio(world)
    emu.faults.impair(loss=1.0)  # everyone ...
    emu.faults.impair(bob.user_id)  # ... except bob, who has his own (empty) impairment
    frames = opaque_frames(4, 20)
    await alice.play(frames, silence=False, interval=0.002)
    heard = await bob.wait_for_frames(alice.user_id, 20)
    assert [f.payload for f in heard] == frames
    await asyncio.sleep(0.05)
    assert carol.frames_from(alice.user_id) == []
    assert emu.inspect(carol.user_id).faults == {"udp_lost": 20}
    emu.faults.clear_impairments()
    assert emu.voice_server().media.forward_hook is None, "no hook left on the hot path"
    await alice.play(frames, silence=False, interval=0.002)
    await carol.wait_for_frames(alice.user_id, 20)


@pytest.mark.parametrize("option", ["delay", "jitter"])
@pytest.mark.parametrize("value", [math.nan, math.inf])
async def test_a_delay_that_would_hold_audio_forever_is_refused(
    world: VoiceWorld, option: str, value: float
) -> None:
    emu = world.emu
    with pytest.raises(InvalidArgumentError, match="finite"):
        emu.faults.impair(**{option: value})  # type: ignore[arg-type]
    assert emu.voice_server().media.forward_hook is None and emu.faults.counts == {}


async def test_pause_stops_forwarding_and_resume_restores_it(world: VoiceWorld) -> None:
    emu = world.emu
    alice, bob, _ = await stage_trio(world)
    media = emu.voice_server().media
    playing = asyncio.create_task(alice.play(opaque_frames(5, 60), silence=False))
    await bob.wait_for_frames(alice.user_id, 10)
    emu.faults.pause_udp()
    paused_at = len(bob.frames_from(alice.user_id))
    await asyncio.sleep(0.4)
    assert len(bob.frames_from(alice.user_id)) <= paused_at + 1, "nothing forwarded while paused"
    emu.faults.resume_udp()
    await playing
    heard = [f.sequence for f in bob.frames_from(alice.user_id)]
    gaps = [b - a for a, b in itertools.pairwise(heard) if b - a > 1]
    assert len(gaps) == 1 and 15 <= gaps[0] <= 25, gaps  # 0.4 s of 20 ms frames were dropped
    assert heard[-1] == 59, "forwarding resumed until the end"
    assert media.counters["paused"] >= 15
    assert emu.faults.counts["pause_udp"] == 1
    assert emu.inspect(bob.user_id).faults == {"udp_paused": 1}


# ---- crafted datagrams -----------------------------------------------------------------------------------


async def test_injected_rtp_has_the_requested_shape_on_the_wire(world: VoiceWorld) -> None:
    emu = world.emu
    raw = await RawMediaClient.join(emu, world.stage)
    try:
        user_id = raw.session.user_id
        sent = emu.faults.inject_rtp(
            user_id,
            ssrc=0x1234,
            sequence=77,
            timestamp=960 * 77,
            payload=b"\xfc opus",
            marker=True,
            extension=b"\x10\xaa\x20\xbb\xcc",
            padding=5,
            csrcs=[7, 8],
        )
        datagram = await raw.recv_datagram()
        assert datagram == sent
        header = parse_rtp(datagram)
        assert (header.version, header.padding, header.extension, header.marker) == (2, True, True, True)
        assert (header.csrcs, header.ssrc, header.sequence) == ((7, 8), 0x1234, 77)
        assert header.extension_profile == 0xBEDE and header.extension_length == 2, "5 bytes padded to 8"
        assert header.header_length == 12 + 8 + 4
        _, payload = raw.cipher.open_rtp(datagram)
        assert payload == b"\xfc opus", "extension body and padding are inside the ciphertext"
        nonce = struct.unpack(">I", datagram[-4:])[0]
        assert nonce == 0, "the server's nonce counter for this client"
        unknown = emu.faults.inject_rtp(user_id)
        assert parse_rtp(await raw.recv_datagram()).ssrc not in {raw.ssrc, 0x1234}
        assert unknown[-4:] == (1).to_bytes(4, "big")
        wrong = emu.faults.inject_rtp(user_id, ssrc=0x1234, wrong_key=True)
        assert await raw.recv_datagram() == wrong
        with pytest.raises(Exception, match="authentication"):
            raw.cipher.open_rtp(wrong)
        rtcp = emu.faults.inject_rtcp(user_id)
        assert await raw.recv_datagram() == rtcp and rtcp[1] == 201
        report = raw.cipher.open_rtcp(rtcp)
        assert struct.unpack(">I", report[:4])[0] == raw.ssrc, "a report block about the client's stream"
        garbage = emu.faults.inject_garbage(user_id, 33, seed=1)
        assert await raw.recv_datagram() == garbage and len(garbage) == 33
        assert emu.faults.inject_raw(user_id, b"\x00\x01") == await raw.recv_datagram()
        assert emu.inspect(user_id).faults == {
            "inject_rtp": 2,
            "inject_rtp_wrong_key": 1,
            "inject_rtcp": 1,
            "inject_garbage": 1,
            "inject_raw": 1,
        }
        assert emu.voice_server().media.counters["injected"] == 6
    finally:
        await raw.close()


async def test_a_crafted_datagram_larger_than_udp_allows_is_refused(world: VoiceWorld) -> None:
    emu = world.emu
    member = await emu.add_participant(world.stage.id, name="hal")
    too_big = bytes(65_508)
    with pytest.raises(InvalidArgumentError, match="UDP"):
        emu.faults.inject_raw(member.user_id, too_big)
    with pytest.raises(InvalidArgumentError, match="UDP"):
        emu.faults.inject_rtp(member.user_id, payload=too_big)
    with pytest.raises(InvalidArgumentError, match="UDP"):
        emu.faults.inject_rtcp(member.user_id, body=bytes(300_000))
    assert emu.faults.counts == {}, "nothing was sent, so nothing is counted as injected"
    emu.faults.inject_raw(member.user_id, bytes(65_507))  # the largest UDP payload still goes out
    assert emu.voice_server().media.counters["send_errors"] == 0


@pytest.mark.parametrize("ssrc", [-1, 2**32])
async def test_an_rtcp_sender_ssrc_outside_a_u32_is_refused(world: VoiceWorld, ssrc: int) -> None:
    emu = world.emu
    member = await emu.add_participant(world.stage.id, name="ida")
    with pytest.raises(InvalidArgumentError, match="ssrc"):
        emu.faults.inject_rtcp(member.user_id, ssrc=ssrc)
    answer = await emu.control.handle(
        f"/_emulator/fault?kind=inject_rtcp&user_id={member.user_id}&ssrc={ssrc}",
        f"Emulator {emu.control_token}",
    )
    assert answer.status == 400, answer.body
    assert emu.faults.counts == {}


@pytest.mark.parametrize("interval", [-0.02, math.nan, math.inf])
async def test_play_refuses_a_pace_it_cannot_keep(world: VoiceWorld, interval: float) -> None:
    speaker = await world.emu.add_participant(world.stage.id, name="ivy")
    with pytest.raises(EmulatorError, match="interval"):
        await asyncio.wait_for(speaker.play(opaque_frames(1, 2), interval=interval), 2.0)
    assert speaker.stats.sent_packets == 0


async def test_a_dave_frame_a_participant_cannot_decrypt_wakes_its_waiters(world: VoiceWorld) -> None:
    emu = world.emu
    alice, bob = [await emu.add_participant(world.channel.id, name=name) for name in ("alice", "bob")]
    await wait_converged([alice, bob], emu)
    await alice.play([], silence=False)  # op 5: bob maps alice's SSRC
    await bob.wait_until(lambda: [e[2] for e in bob.speaking_events if e[0] == alice.user_id][-2:] == [1, 0])
    await asyncio.sleep(0.2)  # nothing else in flight: only the forged frame can wake bob's waiter
    forged = b"\xfc not a DAVE frame" + bytes(8) + b"\xfa\xfa"
    emu.faults.inject_rtp(bob.user_id, ssrc=alice.ssrc, payload=forged)
    await bob.wait_until(lambda: bob.stats.dave_undecryptable[alice.user_id] == 1, timeout=1.0)
    assert bob.frames_from(alice.user_id) == []


async def test_hostile_packets_reach_a_participant_and_are_counted_there(world: VoiceWorld) -> None:
    emu = world.emu
    alice, bob, _ = await stage_trio(world)
    await alice.play([], silence=False)  # op 5: bob maps alice's SSRC
    await bob.wait_until(lambda: any(e[0] == alice.user_id for e in bob.speaking_events))
    emu.faults.inject_rtp(
        bob.user_id,
        ssrc=alice.ssrc,
        sequence=9,
        payload=b"\xfc hi",
        extension=b"\x01\x02",
        padding=3,
        csrcs=[1],
    )
    heard = await bob.wait_for_frames(alice.user_id, 1)
    assert heard[0].payload == b"\xfc hi" and heard[0].sequence == 9
    emu.faults.inject_rtp(bob.user_id, payload=b"\xfc ?")
    emu.faults.inject_rtp(bob.user_id, ssrc=alice.ssrc, wrong_key=True)
    emu.faults.inject_rtcp(bob.user_id)
    await bob.wait_until(
        lambda: (
            bob.stats.unmapped_ssrc == 1 and bob.stats.transport_undecryptable == 1 and bob.stats.rtcp == 1
        )
    )
    with pytest.raises(EmulatorError, match="no live voice session"):
        emu.faults.inject_raw(123, b"x")


def test_a_delay_under_a_millisecond_on_uvloop_delivers_every_packet() -> None:
    """uvloop's ``call_at`` returns a plain Handle, without ``when()``, for a deadline under 0.5 ms away; the
    delay queue asked that handle for ``when()`` and the media server dropped the packet on the error."""
    uvloop = pytest.importorskip("uvloop")
    count = 50

    async def scenario() -> tuple[int, int]:
        async with Emulator() as emu:
            alice, bob, _ = await stage_trio(build_voice_world(emu))
            emu.faults.impair(bob.user_id, delay=0.0002)
            await alice.play(opaque_frames(4, count), silence=False, interval=0.001)
            with contextlib.suppress(TimeoutError):
                await bob.wait_for_frames(alice.user_id, count, timeout=2.0)
            return len(bob.frames_from(alice.user_id)), emu.inspect(bob.user_id).faults["udp_delayed"]

    assert uvloop.run(scenario()) == (count, count)
