"""Bad input: the close code or the drop protocol.md specifies, always counted, never a crash.

The last test sends 10,000 fuzzed messages and datagrams (mutations of valid ones, random bytes, wrong keys,
deep nesting, oversized frames, over hundreds of connections) at the main gateway, the voice gateway and the
media server while one participant streams to another in a DAVE channel: the listener must hear every frame.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from cordvoice.emulator import Emulator, Participant
from cordvoice.errors import DecryptionError, FrameDecodeError, ProtocolError
from cordvoice.udp import discovery
from cordvoice.udp.crypto import MODE_AES256_GCM, MODE_XCHACHA20_POLY1305, make_cipher
from cordvoice.udp.rtp import OPUS_SILENCE, build_header
from cordvoice.voicegateway.messages import Unknown, decode_client

from .emulator_helpers import (
    NO_PROXY,
    RawVoice,
    build_voice_world,
    eventually,
    identify_payload,
    issue_session,
    opaque_frames,
    wait_converged,
)

# ---- the codec tells an undecodable frame (4002) from bad fields (4020) ---------------------------------


@pytest.mark.parametrize(
    "frame", ["", "nope", "[]", '{"op": "1"}', '{"d": {}}', "[" * 5000, '{"op": 26, "d": null}', b"", b"\x00"]
)
def test_undecodable_frames_raise_frame_decode_error(frame: str | bytes) -> None:
    with pytest.raises(FrameDecodeError):
        decode_client(frame)


@pytest.mark.parametrize(
    "frame",
    [
        '{"op": 0, "d": null}',
        '{"op": 1, "d": {"protocol": 5}}',
        '{"op": 3, "d": "x"}',
        '{"op": 5, "d": {}}',
        b"\x1c",
    ],
)
def test_malformed_fields_raise_plain_protocol_error(frame: str | bytes) -> None:
    with pytest.raises(ProtocolError) as raised:
        decode_client(frame)
    assert not isinstance(raised.value, FrameDecodeError)


def test_unknown_opcodes_decode_to_unknown() -> None:
    assert decode_client('{"op": 99, "d": 1}') == Unknown(99, 1)


@pytest.mark.parametrize("mode", [MODE_AES256_GCM, MODE_XCHACHA20_POLY1305])
def test_the_sfus_open_rtp_fields_agrees_with_open_rtp(mode: str) -> None:
    """The plain-header short path the SFU uses returns what open_rtp does, and refuses the same packets."""
    cipher = make_cipher(mode, os.urandom(32))
    plain = cipher.seal(build_header(65535, 2**32 - 1, 0xDEADBEEF), b"\xfc" + bytes(50), 7)
    extended = bytearray(plain)
    extended[0] |= 0x10  # now it claims an extension: the long path parses (and rejects) it
    rtcp = cipher.seal(bytes((0x80, 201, 0, 6)) + bytes(4), bytes(20), 8)
    header, payload = cipher.open_rtp(plain)
    assert cipher.open_rtp_fields(plain) == (header.sequence, header.timestamp, header.ssrc, payload)
    for bad in (bytes(extended), plain[:-1] + bytes((plain[-1] ^ 1,)), rtcp, plain[:31], b""):
        with pytest.raises(ProtocolError):
            cipher.open_rtp(bad)
        with pytest.raises(ProtocolError):
            cipher.open_rtp_fields(bad)
    with pytest.raises(DecryptionError):
        cipher.open_rtp_fields(plain[:-1] + bytes((plain[-1] ^ 1,)))


# ---- each kind of bad input, on the wire -----------------------------------------------------------------


async def gateway_close_code(emu: Emulator, *messages: str | bytes) -> int | None:
    async with connect(emu.gateway_url + "/?v=10&encoding=json") as ws:
        await ws.recv()
        for message in messages:
            await ws.send(message)
        async with asyncio.timeout(3):
            with pytest.raises(ConnectionClosed):
                while True:
                    await ws.recv()
        return ws.close_code


async def test_bad_input_gets_its_close_code_or_drop_and_is_counted() -> None:
    async with Emulator() as emu:
        world = build_voice_world(emu)
        witness = await emu.add_participant(world.stage.id, name="witness")
        identify = {"op": 2, "d": {"token": world.bot.token, "intents": 129, "properties": {}}}
        # Main gateway: malformed JSON, deep nesting, unknown opcode, wrong token.
        assert await gateway_close_code(emu, "{not json") == 4002
        assert await gateway_close_code(emu, "[" * 3000) == 4002
        wide = json.dumps({"op": 1, "d": None, "pad": "é" * 2100}, ensure_ascii=False)
        assert len(wide) < 4096 < len(wide.encode()), "the 4096 limit is in bytes, not characters"
        assert await gateway_close_code(emu, wide) == 4002
        assert await gateway_close_code(emu, json.dumps(identify), '{"op": 99, "d": null}') == 4001
        wrong = {"op": 2, "d": {"token": "wrong", "intents": 129, "properties": {}}}
        assert await gateway_close_code(emu, json.dumps(wrong)) == 4004
        assert emu.main_gateway.stats.closes == {4002: 3, 4001: 1, 4004: 1}
        # Voice gateway: malformed JSON, unknown opcode, wrong token, wrong resume, payload before Identify.
        cases: list[tuple[Callable[[Any], Any], int]] = [
            (lambda s: "{not json", 4002),
            (lambda s: {"op": 99, "d": None}, 4001),
            (lambda s: identify_payload(s, token="wrong"), 4004),
            (
                lambda s: {"op": 7, "d": {"server_id": str(s.server_id), "session_id": "x", "token": "y"}},
                4006,
            ),
            (lambda s: {"op": 5, "d": {"speaking": 1, "delay": 0, "ssrc": 1}}, 4003),
            (lambda s: {"op": 0, "d": {"server_id": "1"}}, 4020),
        ]
        for make, code in cases:
            session = issue_session(emu, world.stage)
            raw = await RawVoice.open(session.endpoint)
            await raw.send(make(session))
            assert await raw.close_code() == code
        assert emu.voice_server().stats.closes == {4002: 1, 4001: 1, 4004: 1, 4006: 1, 4003: 1, 4020: 1}
        # Media server: garbage, wrong keys, strangers: dropped and counted, the witness unaffected.
        media = emu.voice_server().media
        endpoint = emu.voice_server().media_endpoint(witness.user_id)
        await witness.play([], silence=False)  # op 5 binds its SSRC
        witness.send_datagram(b"\x80\x78" + os.urandom(40))  # RTP-shaped noise
        wrong_key = make_cipher(MODE_AES256_GCM, os.urandom(32))
        witness.send_datagram(wrong_key.seal(build_header(1, 960, witness.ssrc), b"\xfc" * 20, 0))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as stranger:
            stranger.sendto(os.urandom(60), media.address)
            await eventually(lambda: media.counters["unknown_address"] == 1)
        await eventually(lambda: endpoint.stats.undecryptable == 2)
        assert media.counters["undecryptable"] == 2
        assert emu.voice_server().stats.internal_errors == 0 and emu.main_gateway.stats.internal_errors == 0
        assert witness.connected


# ---- 10,000 fuzzed inputs while a stream flows -----------------------------------------------------------

VOICE_QUOTA = 3_000
GATEWAY_QUOTA = 1_500
DATAGRAM_QUOTA = 5_500
#: Close codes a fuzzed client may get (4014: the test takes each fuzz user out of voice when it is done);
#: anything else (1011 above all) is a failure.
VOICE_CODES = {4001, 4002, 4003, 4004, 4005, 4006, 4012, 4014, 4016, 4017, 4020}
GATEWAY_CODES = {4001, 4002, 4003, 4004, 4005, 4007, 4008, 4010, 4013}


def mutate(rng: random.Random, data: bytes) -> bytes:
    """One random byte-level mutation: flip, insert, delete, truncate, duplicate a span, or replace all."""
    data = bytearray(data)
    kind = rng.randrange(6)
    if kind == 0 and data:
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif kind == 1:
        position = rng.randint(0, len(data))
        data[position:position] = rng.randbytes(rng.randint(1, 8))
    elif kind == 2 and len(data) > 1:
        start = rng.randrange(len(data))
        del data[start : start + rng.randint(1, 8)]
    elif kind == 3:
        del data[rng.randint(0, len(data)) :]
    elif kind == 4 and data:
        start = rng.randrange(len(data))
        data[start:start] = data[start : start + rng.randint(1, 16)]
    else:
        data = bytearray(rng.randbytes(rng.randint(0, 64)))
    return bytes(data)


def mutate_json(rng: random.Random, payload: dict[str, Any]) -> str:
    """Replace one value somewhere in the payload with something of another type, or drop a key."""
    value: Any = json.loads(json.dumps(payload))
    target = value
    while isinstance(target, dict) and target and rng.random() < 0.6:
        key = rng.choice(list(target))
        if isinstance(target[key], dict) and target[key]:
            target = target[key]
        else:
            break
    if isinstance(target, dict) and target:
        key = rng.choice(list(target))
        replacements: list[Any] = [None, True, -1, 2**70, 1.5, "", "x" * 200, [], {}, [1, "a"], "0"]
        if rng.random() < 0.2:
            del target[key]
        else:
            target[key] = rng.choice(replacements)
    return json.dumps(value)


def fuzz_frame(rng: random.Random, templates: list[dict[str, Any]]) -> str | bytes:
    choice = rng.random()
    template = rng.choice(templates)
    if choice < 0.4:
        return mutate_json(rng, template)
    if choice < 0.7:
        return mutate(rng, json.dumps(template).encode()).decode("utf-8", "replace")
    if choice < 0.8:
        return bytes((rng.choice((26, 28, 1, 5, 99)),)) + rng.randbytes(rng.randint(0, 100))
    if choice < 0.85:
        return "[" * rng.randint(500, 3000)
    if choice < 0.9:
        return json.dumps({"op": rng.randint(-5, 300), "d": rng.choice([None, {}, [], 1])})
    return rng.randbytes(rng.randint(0, 200)).decode("latin-1")


def voice_templates(session: Any) -> list[dict[str, Any]]:
    return [
        identify_payload(session),
        {
            "op": 1,
            "d": {"protocol": "udp", "data": {"address": "127.0.0.1", "port": 9, "mode": MODE_AES256_GCM}},
        },
        {"op": 3, "d": {"t": 1, "seq_ack": 1}},
        {"op": 5, "d": {"speaking": 1, "delay": 0, "ssrc": 1}},
        {"op": 7, "d": {"server_id": str(session.server_id), "session_id": session.session_id, "token": "x"}},
        {"op": 23, "d": {"transition_id": 3}},
        {"op": 31, "d": {"transition_id": 3}},
    ]


async def test_ten_thousand_fuzzed_inputs_while_a_healthy_stream_loses_nothing() -> None:
    rng = random.Random(20_260_302)
    async with Emulator() as emu:
        world = build_voice_world(emu)
        fuzz_channel = emu.create_voice_channel(world.guild.id, "Fuzz")
        server = emu.voice_server()
        media = server.media
        alice, bob = await asyncio.gather(
            emu.add_participant(world.channel.id, name="alice"),
            emu.add_participant(world.channel.id, name="bob"),
        )
        await wait_converged([alice, bob], emu)

        done = asyncio.Event()
        sent_frames: list[bytes] = []

        def stream() -> Any:
            index = 0
            while not done.is_set() or index < 25:
                frame = opaque_frames(5000 + index, 1)[0]
                sent_frames.append(frame)
                index += 1
                yield frame

        def healthy_frames() -> int:
            return sum(sum(emu.inspect(p.user_id).opcodes.values()) for p in (alice, bob))

        voice_base = server.stats.frames_received + -healthy_frames()
        alice_sent_base = alice.stats.sent_packets
        gateway_base = emu.main_gateway.stats.messages_received
        counters_base = sum(media.counters.values())
        forwarded_base = media.forwarded
        valid_frames = Counter[str]()
        datagrams = 0

        def fuzzed_voice_frames() -> int:
            return server.stats.frames_received - voice_base - healthy_frames() - valid_frames["voice"]

        async def voice_fuzzer() -> None:
            while fuzzed_voice_frames() < VOICE_QUOTA:
                session = issue_session(emu, fuzz_channel if rng.random() < 0.8 else world.stage, "fuzz")
                templates = voice_templates(session)
                try:
                    raw = await RawVoice.open(session.endpoint)
                except (OSError, InvalidHandshake):
                    continue
                burst: list[str | bytes] = []
                if rng.random() < 0.7:
                    burst.append(json.dumps(identify_payload(session)))
                    valid_frames["voice"] += 1
                burst += [fuzz_frame(rng, templates) for _ in range(rng.randint(1, 12))]
                try:
                    for frame in burst:
                        await raw.ws.send(frame)
                    await raw.close_code(timeout=0.3)
                except (ConnectionClosed, TimeoutError):
                    pass
                await raw.close()
                emu.set_voice_state(session.guild_id, session.user_id, None)

        async def gateway_fuzzer() -> None:
            # GUILDS only: the fuzz users' voice states need not be dispatched to hundreds of sessions.
            identify = {"op": 2, "d": {"token": world.bot.token, "intents": 1, "properties": {}}}
            templates = [
                identify,
                {"op": 1, "d": 5},
                {
                    "op": 4,
                    "d": {
                        "guild_id": str(world.guild.id),
                        "channel_id": str(fuzz_channel.id),
                        "self_mute": False,
                        "self_deaf": False,
                    },
                },
                {"op": 6, "d": {"token": world.bot.token, "session_id": "x", "seq": 3}},
                {"op": 3, "d": {"since": None, "activities": [], "status": "online", "afk": False}},
            ]
            while (
                emu.main_gateway.stats.messages_received - gateway_base - valid_frames["gateway"]
                < GATEWAY_QUOTA
            ):
                try:
                    ws = await connect(
                        emu.gateway_url + "/?v=10&encoding=json", close_timeout=0.5, **NO_PROXY
                    )
                except (OSError, InvalidHandshake):
                    continue
                try:
                    await ws.recv()
                    burst: list[str | bytes] = []
                    if rng.random() < 0.5:
                        burst.append(json.dumps(identify))
                        valid_frames["gateway"] += 1
                    burst += [fuzz_frame(rng, templates) for _ in range(rng.randint(1, 12))]
                    if rng.random() < 0.05:
                        burst.append("x" * 5000)  # larger than Discord's 4096-byte limit
                    for frame in burst:
                        await ws.send(frame)
                    async with asyncio.timeout(0.3):
                        while True:
                            await ws.recv()
                except (ConnectionClosed, TimeoutError):
                    pass
                await ws.close()

        async def udp_fuzzer() -> None:
            nonlocal datagrams
            alice_cipher = server.media_endpoint(alice.user_id).cipher
            assert alice_cipher is not None
            valid = alice_cipher.seal(build_header(40_000, 0, alice.ssrc), b"\xfc" * 40, 0xFFFF_0000)
            wrong_key = make_cipher(MODE_AES256_GCM, os.urandom(32))
            strangers = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(4)]
            try:
                while datagrams < DATAGRAM_QUOTA:
                    for _ in range(50):
                        kind = rng.randrange(8)
                        if kind == 0:
                            data = rng.randbytes(rng.randint(0, 300))
                        elif kind == 1:
                            data = mutate(rng, valid)
                            if data == valid:
                                continue
                        elif kind == 2:
                            header = build_header(rng.randrange(65536), rng.randrange(2**32), alice.ssrc)
                            data = wrong_key.seal(header, rng.randbytes(40), rng.randrange(2**32))
                        elif kind == 3:
                            data = bytes((0x80, rng.randint(200, 204))) + rng.randbytes(rng.randint(0, 60))
                        elif kind == 4:
                            data = mutate(rng, discovery.build_request(rng.choice([alice.ssrc, bob.ssrc, 7])))
                        elif kind == 5:  # authentic, but names someone else's SSRC
                            header = build_header(rng.randrange(65536), 0, bob.ssrc)
                            data = alice_cipher.seal(header, b"\xfc" * 20, 0xFFFF_0001 + datagrams)
                        else:
                            data = mutate(rng, valid)[: rng.randint(0, 40)]
                            if data == valid:
                                continue
                        # asyncio's transport silently skips empty datagrams: those go from a plain socket.
                        if rng.random() < 0.6 and kind != 4 and data:
                            alice.send_datagram(data)  # from the healthy sender's own address
                        else:
                            rng.choice(strangers).sendto(data, media.address)
                        datagrams += 1
                    await asyncio.sleep(0.002)
            finally:
                for sock in strangers:
                    sock.close()

        async def fuzz() -> None:
            try:
                await asyncio.gather(
                    *(voice_fuzzer() for _ in range(6)), *(gateway_fuzzer() for _ in range(3)), udp_fuzzer()
                )
            finally:
                done.set()

        async with asyncio.timeout(60):
            fuzzing = asyncio.create_task(fuzz())
            played = await alice.play(stream())
            await fuzzing

        # The listener heard every frame, in order, DAVE-decrypted: nothing was lost.
        heard = await bob.wait_for_frames(alice.user_id, played + 5, timeout=5)
        assert [f.payload for f in heard] == [*sent_frames, *[OPUS_SILENCE] * 5]
        assert all(f.dave for f in heard[:played])
        assert [f.sequence for f in heard] == list(range(played + 5))
        assert bob.stats.dave_undecryptable.total() == 0 and bob.stats.transport_undecryptable == 0
        assert played >= 25

        # Everything was processed and counted; nothing crashed.
        voice_fuzzed = fuzzed_voice_frames()
        gateway_fuzzed = emu.main_gateway.stats.messages_received - gateway_base - valid_frames["gateway"]
        await eventually(lambda: sum(media.counters.values()) - counters_base == datagrams, timeout=3)
        assert voice_fuzzed + gateway_fuzzed + datagrams >= 10_000
        assert media.forwarded - forwarded_base == alice.stats.sent_packets - alice_sent_base, (
            "alice's audio only"
        )
        assert media.counters["internal_errors"] == 0
        assert server.stats.internal_errors == 0 and 1011 not in server.stats.closes
        assert set(server.stats.closes) <= VOICE_CODES, server.stats.closes
        assert emu.main_gateway.stats.internal_errors == 0 and emu.main_gateway.stats.hook_errors == 0
        assert set(emu.main_gateway.stats.closes) <= GATEWAY_CODES, emu.main_gateway.stats.closes
        assert server.stats.closes.total() > 300, "hundreds of connections were refused"
        # And the emulator still serves newcomers.
        carol = await Participant.from_session(issue_session(emu, world.stage, "carol"))
        dave = await emu.add_participant(world.stage.id, name="dave")
        await dave.play(opaque_frames(9, 3), silence=False)
        await carol.wait_for_frames(dave.user_id, 3)
        await carol.close()
