"""The emulated voice gateway (v8) on the wire: handshake, strict close codes, resume with replay, relays.

Raw WebSocket clients make each mistake protocol.md §3 names and must get its close code; a participant
provides the "other member" where one is needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from cordvoice.emulator import Emulator, VoiceServerConfig, VoiceSession
from cordvoice.errors import DaveRequiredError
from cordvoice.udp.crypto import MODE_AES256_GCM, MODE_XCHACHA20_POLY1305
from cordvoice.voicegateway.messages import (
    ClientDisconnect,
    ClientsConnect,
    DaveMlsExternalSender,
    Hello,
    Ready,
    Resumed,
    SessionDescription,
    Speaking,
)

from .emulator_helpers import (
    RawVoice,
    VoiceWorld,
    build_voice_world,
    eventually,
    identify_payload,
    issue_session,
)


@contextlib.asynccontextmanager
async def voice_world(**config: Any) -> AsyncIterator[VoiceWorld]:
    async with Emulator(voice_config=VoiceServerConfig(**config)) as emu:
        yield build_voice_world(emu)


def select(address: str = "127.0.0.1", port: int = 9, mode: str = MODE_XCHACHA20_POLY1305) -> dict[str, Any]:
    return {"op": 1, "d": {"protocol": "udp", "data": {"address": address, "port": port, "mode": mode}}}


async def identified(world: VoiceWorld, *, dave: int = 1) -> tuple[RawVoice, VoiceSession, Ready]:
    session = issue_session(world.emu, world.channel)
    raw = await RawVoice.open(session.endpoint)
    await raw.send(identify_payload(session, dave=dave))
    ready = (await raw.recv_op(2)).message
    assert isinstance(ready, Ready)
    return raw, session, ready


async def test_handshake_hello_ready_session_description_and_heartbeat() -> None:
    async with voice_world() as world:
        session = issue_session(world.emu, world.channel)
        raw = await RawVoice.open(session.endpoint)
        hello = await raw.recv()
        assert isinstance(hello.message, Hello) and hello.seq is None
        assert hello.message.heartbeat_interval == 13750 and hello.message.version == 8
        await raw.send(identify_payload(session))
        ready = await raw.recv()
        assert isinstance(ready.message, Ready) and ready.seq == 1
        media_host, media_port = world.emu.voice_server().media.address
        assert (ready.message.ip, ready.message.port) == (media_host, media_port)
        assert ready.message.modes == (MODE_AES256_GCM, MODE_XCHACHA20_POLY1305)
        await raw.send(select(mode=MODE_AES256_GCM))
        description = await raw.recv()
        assert isinstance(description.message, SessionDescription) and description.seq == 2
        assert description.message.mode == MODE_AES256_GCM
        assert len(description.message.secret_key) == 32 and description.message.dave_protocol_version == 1
        sender = await raw.recv()
        assert isinstance(sender.message, DaveMlsExternalSender) and sender.seq == 3, "op 25 after op 4"
        await raw.send({"op": 3, "d": {"t": 12345, "seq_ack": 3}})
        ack = await raw.recv()
        assert int(ack.message.op) == 6 and ack.seq is None
        assert ack.message.nonce == 12345  # type: ignore[union-attr]
        seen = world.emu.inspect(session.user_id)
        assert seen.opcode_order == (0, 1, 3) and seen.last_seq_ack == 3 and seen.mode == MODE_AES256_GCM
        await raw.close()


async def test_ready_can_withhold_aes_and_list_deprecated_modes_that_are_refused() -> None:
    async with voice_world(offer_aes=False, advertise_deprecated_modes=True) as world:
        raw, _, ready = await identified(world)
        assert ready.modes[0] == MODE_XCHACHA20_POLY1305 and MODE_AES256_GCM not in ready.modes
        assert "xsalsa20_poly1305_lite_rtpsize" in ready.modes, "deprecated names listed after the AEAD mode"
        await raw.send(select(mode="xsalsa20_poly1305_lite_rtpsize"))
        assert await raw.close_code() == 4016
        raw, _, _ = await identified(world)
        await raw.send(select(mode=MODE_AES256_GCM))
        assert await raw.close_code() == 4016, "a withheld mode is unknown"
        assert world.emu.voice_server().stats.closes[4016] == 2


Mistake = Callable[[RawVoice, VoiceSession], Awaitable[None]]


async def _identify(raw: RawVoice, session: VoiceSession, **overrides: Any) -> None:
    await raw.send(identify_payload(session, **overrides))


async def _identified_then(
    raw: RawVoice, session: VoiceSession, payload: dict[str, Any] | str | bytes
) -> None:
    await _identify(raw, session)
    await raw.recv_op(2)
    await raw.send(payload)


MISTAKES: list[tuple[int, str, Mistake]] = [
    (4001, "unknown opcode", lambda raw, s: _identified_then(raw, s, {"op": 99, "d": {}})),
    (4002, "not JSON", lambda raw, s: raw.send("{not json")),
    (4002, "JSON without an op", lambda raw, s: raw.send("[1, 2, 3]")),
    (4002, "empty binary frame", lambda raw, s: raw.send(b"")),
    (4002, "a JSON op sent as binary", lambda raw, s: raw.send(b"\x00{}")),
    (4003, "Select Protocol before Identify", lambda raw, s: raw.send(select())),
    (4004, "wrong token", lambda raw, s: _identify(raw, s, token="not-the-token")),
    (4004, "wrong server id", lambda raw, s: _identify(raw, s, server_id="1")),
    (4004, "wrong session id", lambda raw, s: _identify(raw, s, session_id="nope")),
    (4005, "second Identify", lambda raw, s: _identified_then(raw, s, identify_payload(s))),
    (4006, "resume of an unknown session", lambda raw, s: raw.send({"op": 7, "d": {
        "server_id": str(s.server_id), "session_id": "nope", "token": "nope", "seq_ack": 1}})),
    (4012, "unknown protocol", lambda raw, s: _identified_then(raw, s, {"op": 1, "d": {
        "protocol": "tcp", "data": {"address": "127.0.0.1", "port": 9, "mode": MODE_XCHACHA20_POLY1305}}})),
    (4016, "unknown mode", lambda raw, s: _identified_then(raw, s, select(mode="plaintext"))),
    (4017, "no DAVE on a DAVE channel", lambda raw, s: _identify(raw, s, max_dave_protocol_version=0)),
    (4020, "user id is not a snowflake", lambda raw, s: _identify(raw, s, user_id="abc")),
    (4020, "address is not an IP", lambda raw, s: _identified_then(raw, s, select(address="example"))),
    (4020, "speaking names another SSRC", lambda raw, s: _identified_then(raw, s, {"op": 5, "d": {
        "speaking": 1, "delay": 0, "ssrc": 1}})),
]  # fmt: skip


@pytest.mark.parametrize(
    ("code", "mistake"), [(c, m) for c, _, m in MISTAKES], ids=[n for _, n, _ in MISTAKES]
)
async def test_each_client_mistake_gets_its_close_code(code: int, mistake: Mistake) -> None:
    async with voice_world() as world:
        session = issue_session(world.emu, world.channel)
        raw = await RawVoice.open(session.endpoint)
        await mistake(raw, session)
        assert await raw.close_code() == code
        stats = world.emu.voice_server().stats
        assert stats.closes == {code: 1}
        # The server is unharmed: the same credentials still work on a new socket (unless spent: 4005, 4001).
        other = issue_session(world.emu, world.channel, "healthy")
        healthy = await RawVoice.open(other.endpoint)
        await healthy.send(identify_payload(other))
        assert isinstance((await healthy.recv_op(2)).message, Ready)
        await healthy.close()


async def test_ignored_client_opcodes_and_early_heartbeats_do_not_close() -> None:
    async with voice_world() as world:
        session = issue_session(world.emu, world.channel)
        raw = await RawVoice.open(session.endpoint)
        await raw.send({"op": 3, "d": {"t": 1, "seq_ack": -1}})  # before Identify: accepted
        assert int((await raw.recv_op(6)).message.op) == 6
        await raw.send(identify_payload(session))
        await raw.recv_op(2)
        await raw.send({"op": 16, "d": {}})  # voice backend version, sent by official clients
        await raw.send({"op": 3, "d": {"t": 2, "seq_ack": 1}})
        assert int((await raw.recv_op(6)).message.op) == 6
        assert world.emu.voice_server().stats.ignored_ops == {16: 1}
        await raw.close()


async def test_unsupported_gateway_version_is_refused() -> None:
    async with voice_world() as world:
        session = issue_session(world.emu, world.channel)
        raw = await RawVoice.open(session.endpoint, query="?v=3")
        assert await raw.close_code() == 4020


async def test_participant_without_dave_is_refused_on_a_dave_channel_but_not_on_a_stage() -> None:
    async with voice_world() as world:
        with pytest.raises(DaveRequiredError):
            await world.emu.add_participant(world.channel.id, dave=False)
        listener = await world.emu.add_participant(world.stage.id, dave=False)
        assert listener.dave_protocol_version == 0
        raw_session = issue_session(world.emu, world.stage)
        raw = await RawVoice.open(raw_session.endpoint)
        await raw.send(identify_payload(raw_session, dave=1))
        await raw.recv_op(2)
        await raw.send(select())
        description = (await raw.recv_op(4)).message
        assert isinstance(description, SessionDescription) and description.dave_protocol_version == 0
        await raw.close()


async def test_resume_replays_every_missed_message_json_and_binary() -> None:
    async with voice_world() as world:
        emu = world.emu
        raw, session, _ = await identified(world)
        await raw.send(select())
        assert (await raw.recv_op(25)).seq == 3
        first = await emu.add_participant(world.channel.id, name="first")
        joined = await raw.recv_op(11)
        assert joined.seq == 4 and joined.message == ClientsConnect((first.user_id,))
        speaking = await raw.recv_op(5)
        assert speaking.seq == 5 and speaking.message == Speaking(0, first.ssrc, user_id=first.user_id)
        raw.abort()  # a dead TCP connection: no close frame
        second = await emu.add_participant(world.channel.id, name="second")  # announced while detached
        seen = emu.inspect(session.user_id)
        assert not seen.connected and not seen.ended, "the session waits for a resume"

        again = await RawVoice.open(session.endpoint)
        assert isinstance((await again.recv()).message, Hello)
        await again.send(
            {"op": 7, "d": {"server_id": str(session.server_id), "session_id": session.session_id,
                            "token": session.token, "seq_ack": 2}}
        )  # fmt: skip
        resumed = await again.recv()
        assert isinstance(resumed.message, Resumed) and resumed.seq is None
        replay = [await again.recv() for _ in range(5)]
        assert [frame.seq for frame in replay] == [3, 4, 5, 6, 7]
        assert isinstance(replay[0].message, DaveMlsExternalSender), "binary frames are replayed too"
        assert replay[1].message == ClientsConnect((first.user_id,))
        assert replay[3].message == ClientsConnect((second.user_id,))
        assert replay[4].message == Speaking(0, second.ssrc, user_id=second.user_id)
        seen = emu.inspect(session.user_id)
        assert seen.connected and seen.resumes == 1 and seen.connections == 2
        assert emu.voice_server().stats.replayed == 5
        # The resumed session is live: relays keep coming with the next numbers.
        await first.leave()
        gone = await again.recv_op(13)
        assert gone.seq == 8 and gone.message == ClientDisconnect(first.user_id)
        await again.close()


async def test_resume_is_refused_with_4006_after_the_window_or_past_the_buffer() -> None:
    async with voice_world(resume_window=0.3, replay_limit=2) as world:
        emu = world.emu
        witness = await emu.add_participant(world.channel.id, name="witness")
        raw, session, _ = await identified(world)
        resume = {"op": 7, "d": {"server_id": str(session.server_id), "session_id": session.session_id,
                                 "token": session.token, "seq_ack": 1}}  # fmt: skip
        await raw.send(select())  # seq 2 op 11, 3 op 5 (witness), 4 op 4, 5 op 25: 2 kept
        await raw.recv_op(25)
        raw.abort()
        late = await RawVoice.open(session.endpoint)
        await late.send(resume)
        assert await late.close_code() == 4006, "seq 2..3 are no longer buffered"
        await witness.wait_until(lambda: session.user_id not in witness.clients)

        raw, session, _ = await identified(world)
        raw.abort()
        await eventually(lambda: emu.inspect(session.user_id).ended)  # the 0.3 s resume window ran out
        late = await RawVoice.open(session.endpoint)
        resume["d"] = {**resume["d"], "session_id": session.session_id, "token": session.token}
        await late.send(resume)
        assert await late.close_code() == 4006
        assert emu.voice_server().stats.sessions_expired == 1


async def test_a_refused_resume_also_closes_the_socket_still_carrying_the_session() -> None:
    async with voice_world() as world:
        raw, session, _ = await identified(world)
        other = await RawVoice.open(session.endpoint)
        resume = {"server_id": str(session.server_id), "session_id": session.session_id,
                  "token": session.token, "seq_ack": 500}  # fmt: skip
        await other.send({"op": 7, "d": resume})
        assert await other.close_code() == 4006, "acknowledges a number never sent"
        assert world.emu.inspect(session.user_id).ended
        assert await raw.close_code() == 4006, "the session ended; its socket must not live on without it"


async def test_heartbeat_timeout_closes_with_4009_and_ends_the_session() -> None:
    async with voice_world(heartbeat_interval_ms=100, heartbeat_timeout=0.3) as world:
        witness = await world.emu.add_participant(world.channel.id, name="witness")
        raw, session, _ = await identified(world)
        assert await raw.close_code() == 4009
        await witness.wait_until(lambda: session.user_id not in witness.clients)
        assert witness.connected, "the participant heartbeats on its own and stays"


async def test_speaking_is_relayed_with_user_and_ssrc_and_members_come_and_go() -> None:
    async with voice_world() as world:
        emu = world.emu
        alice = await emu.add_participant(world.channel.id, name="alice")
        bob = await emu.add_participant(world.channel.id, name="bob")
        assert alice.clients == {bob.user_id} and bob.clients == {alice.user_id}
        await alice.play([b"\xfc" + bytes(20)] * 2)
        await bob.wait_until(
            lambda: [e[2] for e in bob.speaking_events if e[0] == alice.user_id] == [0, 1, 0]
        )
        assert {(e[0], e[1]) for e in bob.speaking_events} == {(alice.user_id, alice.ssrc)}
        seen = emu.inspect(alice.user_id)
        assert seen.speaking_flags == [0, 1, 0] and seen.opcodes[5] == 3
        assert seen.rtp.packets == 7 and seen.forwarded_to_client == 0
        # A client that closes with 1000 has left: op 13 at once, no resume window.
        await bob.close()
        await alice.wait_until(lambda: not alice.clients)
        assert emu.inspect(bob.user_id).ended


async def test_revoked_sessions_close_with_4014_and_a_deleted_channel_with_4022() -> None:
    async with voice_world() as world:
        emu = world.emu
        kicked = await emu.add_participant(world.channel.id, name="kicked")
        emu.disconnect_member(world.guild.id, kicked.user_id)
        assert await kicked.wait_closed() == 4014
        doomed = await emu.add_participant(world.channel.id, name="doomed")
        emu.delete_channel(world.channel.id)
        assert await doomed.wait_closed() == 4022
        assert emu.voice_server().stats.closes == {4014: 1, 4022: 1}


async def test_undecodable_text_never_crashes_the_server() -> None:
    async with voice_world() as world:
        witness = await world.emu.add_participant(world.stage.id, name="witness")
        cases = [("", 4002), ("null", 4002), ('{"op": 1.5}', 4002), (json.dumps({"op": 0, "d": None}), 4020)]
        for payload, code in cases:
            session = issue_session(world.emu, world.channel)
            raw = await RawVoice.open(session.endpoint)
            await raw.send(payload)
            assert await raw.close_code() == code, payload
        assert witness.connected
        assert world.emu.voice_server().stats.closes == {4002: 3, 4020: 1}


async def test_fault_hooks_close_with_any_code_crash_drop_and_withhold_acks() -> None:
    async with voice_world() as world:
        emu = world.emu
        server = emu.voice_server()
        raw, session, _ = await identified(world)
        server.withhold_acks(session.user_id)
        await raw.send({"op": 3, "d": {"t": 7, "seq_ack": 1}})
        await eventually(lambda: emu.inspect(session.user_id).heartbeats == 1)
        assert server.stats.acks_withheld == 1
        server.withhold_acks(session.user_id, False)
        await raw.send({"op": 3, "d": {"t": 8, "seq_ack": 1}})
        assert (await raw.recv_op(6)).message.nonce == 8  # type: ignore[union-attr]

        assert await server.close_client(session.user_id, 4015) == 1  # resumable: the session waits
        assert await raw.close_code() == 4015
        seen = emu.inspect(session.user_id)
        assert not seen.connected and not seen.ended and seen.closes_sent == (4015,)

        listener = await emu.add_participant(world.channel.id, name="listener")
        assert await server.drop_client(listener.user_id) == 1  # no close frame at all
        assert await listener.wait_closed() == 1006
        assert not emu.inspect(listener.user_id).ended

        other = await emu.add_participant(world.channel.id, name="other")
        assert await server.crash() == 1, "only live sockets are closed"
        assert await other.wait_closed() == 4015
        assert not emu.inspect(other.user_id).ended

        last = await emu.add_participant(world.stage.id, name="last")
        assert await server.close_client(last.user_id, 4014, "kicked by a test") == 1
        assert await last.wait_closed() == 4014
        assert emu.inspect(last.user_id).ended, "a non-resumable code ends the session"


def test_a_deadline_under_a_millisecond_away_on_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    """uvloop's ``call_at`` returns a plain Handle, without ``when()``, for a deadline under 0.5 ms away (its
    timers also fire up to 1 ms early, which re-arms at such a deadline); rescheduling again before that
    handle ran asked it for ``when()`` and the connection's handler died."""
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> None:
        async with voice_world() as world:
            server = world.emu._emulated_voice_servers()[0]
            loop = asyncio.get_running_loop()
            monkeypatch.setattr(server.core, "next_deadline", lambda: loop.time() + 0.0002)
            server._reschedule()  # a plain Handle on uvloop
            server._reschedule()  # again in the same iteration, as a frame arriving meanwhile does

    uvloop.run(scenario())
