"""Hostile bytes: random voice gateway messages and UDP datagrams sent to a live session.

From the emulator's side (frames pushed down the bot's real voice socket, datagrams injected by its SFU) and
from a raw scripted server. The session either stays up or ends with a clear VoiceError; nothing ever reaches
the event loop's exception handler (the ``loop_errors`` fixture fails the test otherwise).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import socket
import struct

import pytest

from cordvoice import ResumedEvent, SessionState, Voice, VoiceError
from cordvoice.errors import ProtocolError
from cordvoice.gateway.events import parse_voice_server_update
from cordvoice.reconnect import ReconnectConfig
from cordvoice.udp.crypto import MODE_AES256_GCM
from cordvoice.udp.rtp import build_header
from cordvoice.voicegateway.connection import VoiceGatewayConnection
from cordvoice.voicegateway.messages import Opcode

from .client_fakes import FakeAdapter, RawConnection, RawVoiceServer, Script
from .conftest import FAST_RECONNECT, LoopErrors, VoiceWorld, opus_frames, wait_until

GUILD, CHANNEL = 111, 222
# JSON ops that are safe to garble: everything but the DAVE transition ops, whose well-formed random values
# would legitimately downgrade or reset the call (a server may do that; it is not "bad input").
JSON_OPS = [
    0,
    1,
    2,
    3,
    4,
    5,
    6,
    7,
    8,
    9,
    10,
    11,
    12,
    13,
    14,
    15,
    16,
    17,
    18,
    19,
    20,
    23,
    25,
    26,
    27,
    31,
    99,
    255,
]


def random_value(rng: random.Random, depth: int = 0) -> object:
    kind = rng.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([0, -1, 1, 2**16, 2**32, 2**64, -(2**70), rng.randrange(-1000, 1000)])
    if kind == 3:
        return rng.choice([0.5, -3.25, 1e308, 13750.0])
    if kind == 4:
        return "".join(rng.choice('abc0123456789\u00e9\ud7ff"\\{}') for _ in range(rng.randrange(12)))
    if kind == 5:
        return str(rng.randrange(10**20))
    if kind == 6:
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    keys = [
        "ssrc",
        "ip",
        "port",
        "modes",
        "user_id",
        "user_ids",
        "speaking",
        "t",
        "heartbeat_interval",
        "secret_key",
        "mode",
        "transition_id",
        "epoch",
        "protocol_version",
        "seq",
        "x",
    ]
    return {rng.choice(keys): random_value(rng, depth + 1) for _ in range(rng.randrange(5))}


def random_frame(rng: random.Random) -> str | bytes:
    kind = rng.randrange(6)
    if kind == 0:  # a random op with a random body, maybe numbered
        payload: dict[str, object] = {"op": rng.choice(JSON_OPS), "d": random_value(rng)}
        if rng.random() < 0.7:
            payload["seq"] = random_value(rng) if rng.random() < 0.2 else rng.randrange(1, 60000)
        return json.dumps(payload)
    if kind == 1:  # not JSON, or JSON that is not an object
        return rng.choice(["", "{", "null", "[1,2]", '"op"', '{"op": "2"}', "\x00" * 10, "9" * 5000])
    if kind == 2:  # binary: random seq, random (mostly DAVE) op, random body
        op = rng.choice([25, 27, 29, 30, 21, 2, 200])
        body = rng.randbytes(rng.randrange(0, 300))
        return struct.pack(">HB", rng.randrange(65536), op) + body
    if kind == 3:  # short binary
        return rng.randbytes(rng.randrange(0, 3))
    if kind == 4:  # op 27 with a plausible shape but garbage proposals
        return struct.pack(">HBB", rng.randrange(65536), 27, rng.randrange(3)) + rng.randbytes(
            rng.randrange(40)
        )
    # known ops with wrong field types
    d = rng.choice(
        [
            {"ssrc": "x", "ip": 1, "port": -1, "modes": "aes"},
            {"heartbeat_interval": -5},
            {"heartbeat_interval": "soon"},
            {"user_id": None, "ssrc": 1, "speaking": 1},
            {"user_ids": [None, "abc"]},
            {"mode": "aead_aes256_gcm_rtpsize", "secret_key": [1] * 31},
            {"t": "x"},
        ]
    )
    return json.dumps({"op": rng.choice([2, 4, 5, 6, 8, 11, 13]), "d": d, "seq": rng.randrange(60000)})


def random_datagram(rng: random.Random, ssrc: int) -> bytes:
    kind = rng.randrange(6)
    if kind == 0:
        return rng.randbytes(rng.randrange(0, 1600))
    if kind == 1:  # an RTP header (any flags) and garbage
        return bytes((0x80 | rng.randrange(64), rng.choice([0x78, 0xF8, 0x00]))) + rng.randbytes(
            rng.randrange(10, 200)
        )
    if kind == 2:  # RTCP-looking
        return bytes((0x81, rng.randrange(200, 205))) + rng.randbytes(rng.randrange(0, 100))
    if kind == 3:  # discovery-looking
        return b"\x00\x02\x00\x46" + rng.randbytes(70)
    if kind == 4:  # a proper header with a truncated body
        return build_header(rng.randrange(65536), rng.randrange(2**32), ssrc) + rng.randbytes(
            rng.randrange(0, 20)
        )
    return b"\x80\x78" + rng.randbytes(2)  # too short


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_client_survives_random_gateway_frames_and_datagrams_from_the_emulator(
    world: VoiceWorld, seed: int
) -> None:
    emu, bot = world.emu, world.bot
    listener = await emu.add_participant(world.channel.id, name="listener")
    session = await world.voice.join_channel(world.guild.id, world.channel.id)
    await listener.wait_dave_ready()
    server = emu.voice_server(guild_id=world.guild.id)
    record = server.core.live_record(bot.user_id)
    assert record is not None and record.connection is not None
    outbox = record.connection.outbox
    endpoint = server.media_endpoint(bot.user_id)
    rng = random.Random(seed)
    for _ in range(400):
        outbox.send(random_frame(rng), 0.0)
        server.media.inject(endpoint, random_datagram(rng, endpoint.ssrc))
        if rng.random() < 0.1:
            await asyncio.sleep(0.001)
    await asyncio.sleep(0.3)
    stats = session.stats
    final = session.disconnected_event
    if final is not None:
        assert isinstance(final.error, VoiceError), final
    else:
        assert session.state in (SessionState.READY, SessionState.RESUMING, SessionState.RECONNECTING)
        assert stats.malformed_messages > 50
        assert stats.udp_malformed + stats.udp_undecryptable + stats.udp_rtcp > 100
        # Still a working session: audio reaches the listener once DAVE is (again) ready.
        await wait_until(lambda: session.state is SessionState.READY and session.dave_ready, 10)
        frames = opus_frames(10, voice=11)
        async with asyncio.timeout(10):
            for frame in frames:
                await session.write(frame)
            await session.stop_speaking()
            await wait_until(lambda: listener.payloads_from(bot.user_id)[-10:] == list(frames), 10)


async def voice_on_raw(server: RawVoiceServer, **kwargs: object) -> tuple[Voice, FakeAdapter]:
    adapter = FakeAdapter(server.endpoint)
    options: dict[str, object] = {"ssl": False, "reconnect": FAST_RECONNECT, "join_timeout": 5.0}
    options.update(kwargs)
    return Voice(adapter, **options), adapter  # type: ignore[arg-type]


@pytest.mark.parametrize("seed", [10, 11])
async def test_client_survives_a_raw_server_sending_garbage(loop_errors: LoopErrors, seed: int) -> None:
    done = asyncio.Event()

    async def script(conn: RawConnection) -> None:
        rng = random.Random(seed)
        for _ in range(500):
            await conn.ws.send(random_frame(rng))
            conn.udp_send(random_datagram(rng, 9999))
        done.set()
        while True:
            await conn.recv_json(within=3600)

    async with RawVoiceServer(script) as server:
        voice, _ = await voice_on_raw(server)
        try:
            session = await voice.join_channel(GUILD, CHANNEL)
            async with asyncio.timeout(10):
                await done.wait()
            await asyncio.sleep(0.3)
            final = session.disconnected_event
            if final is None:
                assert session.stats.malformed_messages > 100
                # A burst this size overflows the socket buffer; what arrived was all classified.
                assert session.stats.udp_received >= 100
            else:
                assert isinstance(final.error, VoiceError)
        finally:
            await voice.close()


def keep_connection(holder: list[RawConnection]) -> Script:
    """A script that hands each connection (after the handshake) to the test and then just answers it."""

    async def script(conn: RawConnection) -> None:
        holder.append(conn)
        while True:
            await conn.recv_json(within=3600)

    return script


async def test_client_valid_rtp_from_the_server_reaches_the_receive_hook(loop_errors: LoopErrors) -> None:
    holder: list[RawConnection] = []
    async with RawVoiceServer(keep_connection(holder)) as server:
        voice, _ = await voice_on_raw(server)
        try:
            session = await voice.join_channel(GUILD, CHANNEL)
            got: list[tuple[int, int, bytes]] = []
            session.set_receive_hook(
                lambda header, payload, arrival: got.append((header.ssrc, header.sequence, payload))
            )
            await wait_until(lambda: bool(holder))
            conn = holder[0]
            assert conn.cipher is not None
            await conn.send(5, {"user_id": "777", "ssrc": 31337, "speaking": 1})
            for sequence in range(5):
                conn.udp_send(
                    conn.cipher.seal(
                        build_header(sequence, sequence * 960, 31337), b"opus%d" % sequence, sequence
                    )
                )
            conn.udp_send(conn.cipher.seal(build_header(9, 0, 31337), b"tampered", 99)[:-5] + b"\x00" * 5)
            await wait_until(lambda: len(got) == 5 and session.stats.udp_undecryptable == 1)
            assert got == [(31337, n, b"opus%d" % n) for n in range(5)]
            assert session.ssrc_users == {31337: 777}
            assert session.stats.received_per_ssrc == {31337: 5}
        finally:
            await voice.close()


async def test_client_repeated_session_description_does_not_reuse_transport_nonces(
    loop_errors: LoopErrors,
) -> None:
    # A second op 4 with the key in use restarted the nonce counter at 0 under that key: AES-GCM nonce reuse.
    holder: list[RawConnection] = []
    async with RawVoiceServer(keep_connection(holder)) as server:
        voice, _ = await voice_on_raw(server)

        def sent_nonces() -> list[bytes]:
            return [data[-4:] for data, _ in server.datagrams if len(data) > 32 and data[0] == 0x80]

        try:
            session = await voice.join_channel(GUILD, CHANNEL)
            await wait_until(lambda: bool(holder))
            conn = holder[0]
            await session.speaking(1)
            for frame in opus_frames(10, voice=12):
                await session.write(frame)
            await wait_until(lambda: len(sent_nonces()) >= 10)
            description = {"mode": MODE_AES256_GCM, "secret_key": list(conn.key), "dave_protocol_version": 0}
            await conn.send(4, description)
            for frame in opus_frames(10, voice=13):
                await session.write(frame)
            await wait_until(lambda: len(sent_nonces()) >= 20)
            nonces = sent_nonces()
            assert len(set(nonces)) == len(nonces), "a nonce was used twice with one key"
            assert session.state is SessionState.READY
        finally:
            await voice.close()


@pytest.mark.parametrize("endpoint", ["127.0.0.1:99999", "[::1", "127.0.0.1:abc"])
async def test_client_unusable_endpoint_is_a_voice_error_not_an_internal_one(
    loop_errors: LoopErrors, caplog: pytest.LogCaptureFixture, endpoint: str
) -> None:
    # The main gateway's parser lets these through; URI parsing would raise a bare ValueError on them.
    parsed = parse_voice_server_update({"token": "t", "guild_id": "1", "endpoint": endpoint})
    assert parsed.endpoint == endpoint
    with pytest.raises(VoiceError, match="not a voice endpoint"):
        await VoiceGatewayConnection.open(endpoint, ssl=False, open_timeout=1.0)
    config = ReconnectConfig(backoff_base=0.01, backoff_cap=0.02, max_rejoins=1)
    voice = Voice(FakeAdapter(endpoint), ssl=False, reconnect=config)  # type: ignore[arg-type]
    try:
        with caplog.at_level(logging.ERROR, logger="cordvoice"), pytest.raises(VoiceError) as caught:
            await voice.join_channel(GUILD, CHANNEL)
        assert "not a voice endpoint" in str(caught.value) and "internal" not in str(caught.value)
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR], "no 'internal error' logged"
    finally:
        await voice.close()


async def test_client_ip_discovery_is_retried(loop_errors: LoopErrors) -> None:
    async with RawVoiceServer() as server:
        server.ignore_discovery = 2
        voice, _ = await voice_on_raw(server)
        try:
            loop = asyncio.get_running_loop()
            started = loop.time()
            session = await voice.join_channel(GUILD, CHANNEL)
            assert server.discovery_requests == 3
            assert 1.5 < loop.time() - started < 4.0, "retried about once a second"
            assert session.state is SessionState.READY
        finally:
            await voice.close()


async def test_client_gives_up_clearly_when_discovery_never_answers(loop_errors: LoopErrors) -> None:
    async with RawVoiceServer() as server:
        server.ignore_discovery = 10**6
        config = ReconnectConfig(backoff_base=0.01, backoff_cap=0.02, max_rejoins=1)
        voice, adapter = await voice_on_raw(
            server, discovery_timeout=0.3, reconnect=config, join_timeout=10.0
        )
        try:
            with pytest.raises(VoiceError) as caught:
                await voice.join_channel(GUILD, CHANNEL)
            assert "did not answer IP discovery" in str(caught.value)
            assert voice.sessions == {}
            assert adapter.requests[-1] == (GUILD, None), "left the channel"
        finally:
            await voice.close()


async def test_client_handshake_that_never_completes_ends_clearly(loop_errors: LoopErrors) -> None:
    async def script(conn: RawConnection) -> None:
        await conn.send(8, {"heartbeat_interval": 100.0, "v": 8}, numbered=False)
        await conn.ws.send(json.dumps({"op": 2, "d": {"ssrc": 1}}))  # a broken Ready
        while True:
            await conn.recv_json(within=3600)

    async with RawVoiceServer(script, handshake=False) as server:
        config = ReconnectConfig(backoff_base=0.01, backoff_cap=0.02, max_rejoins=2)
        voice, _ = await voice_on_raw(server, handshake_timeout=0.3, reconnect=config)
        try:
            with pytest.raises(VoiceError) as caught:
                await voice.join_channel(GUILD, CHANNEL)
            assert "Gave up after 2 attempts" in str(caught.value)
            assert len(server.connections) == 3
        finally:
            await voice.close()


async def test_client_resumed_without_a_resume_is_malformed_not_a_finished_handshake(
    loop_errors: LoopErrors,
) -> None:
    # An op 9 answering an Identify must not count as a resume: it left the session READY with no Ready, no
    # UDP and no handshake timeout, until the join timed out.
    async def script(conn: RawConnection) -> None:
        await conn.send(8, {"heartbeat_interval": 5000, "v": 8}, numbered=False)
        assert (await conn.recv_json())["op"] == Opcode.IDENTIFY
        await conn.send(9, None, numbered=False)
        while True:
            await conn.recv_json(within=3600)

    async with RawVoiceServer(script, handshake=False) as server:
        config = ReconnectConfig(backoff_base=0.01, backoff_cap=0.02, max_rejoins=2)
        voice, _ = await voice_on_raw(server, handshake_timeout=0.3, reconnect=config, join_timeout=10.0)
        try:
            async with asyncio.timeout(5):  # the handshake timeout and its retries, not the join timeout
                with pytest.raises(VoiceError) as caught:
                    await voice.join_channel(GUILD, CHANNEL)
            assert "Gave up after 2 attempts" in str(caught.value)
            assert len(server.connections) == 3
        finally:
            await voice.close()


async def test_client_ready_without_a_usable_mode_ends_the_join_at_once(loop_errors: LoopErrors) -> None:
    async def script(conn: RawConnection) -> None:
        await conn.send(8, {"heartbeat_interval": 5000, "v": 8}, numbered=False)
        await conn.recv_json()  # Identify
        await conn.send(2, {"ssrc": 1, "ip": "127.0.0.1", "port": 9, "modes": ["xsalsa20_poly1305"]})
        while True:
            await conn.recv_json(within=3600)

    async with RawVoiceServer(script, handshake=False) as server:
        voice, adapter = await voice_on_raw(server, handshake_timeout=30.0)
        try:
            async with asyncio.timeout(3):  # not the 30 s handshake timeout, and no retries
                with pytest.raises(ProtocolError) as caught:
                    await voice.join_channel(GUILD, CHANNEL)
            assert "no supported transport mode" in str(caught.value)
            assert len(server.connections) == 1
            assert adapter.requests[-1] == (GUILD, None), "left the channel"
        finally:
            await voice.close()


async def test_client_resume_sends_the_last_seq_including_binary_and_ignored_ops(
    loop_errors: LoopErrors,
) -> None:
    first = asyncio.Event()

    async def script(conn: RawConnection) -> None:
        if len(server.connections) == 1:
            await conn.send(16, {"voice": "1.0"})  # ignored op, numbered
            await conn.send_binary(200, b"\x01\x02")  # unknown binary op, numbered
            conn.seq = 40
            await conn.ws.send(json.dumps({"op": 5, "d": {"bad": 1}, "seq": 41}))  # malformed, numbered
            first.set()
            await asyncio.sleep(0.1)
            await conn.ws.close(4015, "crashed")
            return
        while True:
            await conn.recv_json(within=3600)

    async with RawVoiceServer(script) as server:
        voice, _ = await voice_on_raw(server)
        try:
            session = await voice.join_channel(GUILD, CHANNEL)
            await session.wait_for(ResumedEvent, timeout=5)  # the script closes 0.1 s after the handshake
            resume = next(
                m for m in server.connections[1].received if isinstance(m, dict) and m["op"] == Opcode.RESUME
            )
            assert resume["d"]["seq_ack"] == 41
            assert resume["d"]["session_id"] and resume["d"]["token"]
            assert server.close_codes[0] == 4015 or server.close_codes[0] is None
        finally:
            await voice.close()


async def test_client_dial_hook_supplies_the_udp_socket(world: VoiceWorld) -> None:
    dialed: list[tuple[str, int]] = []

    async def dial(host: str, port: int) -> socket.socket:
        dialed.append((host, port))
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        return sock

    await world.voice.close()
    voice = world.make_voice(dial=dial)
    try:
        session = await voice.join_channel(world.guild.id, world.channel.id)
        server = world.emu.voice_server(guild_id=world.guild.id)
        assert dialed == [server.media.address]
        assert session.state is SessionState.READY
    finally:
        await voice.close()
