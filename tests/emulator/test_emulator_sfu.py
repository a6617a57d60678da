"""The emulated SFU: forwarding with per-receiver re-encryption, drops with counters, stats and hooks."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from cordvoice.emulator import Emulator, MediaEndpoint, Participant
from cordvoice.emulator.inspection import RtpStats
from cordvoice.errors import EmulatorError, InvalidArgumentError
from cordvoice.udp import discovery
from cordvoice.udp.crypto import MODE_AES256_GCM, TransportCipher, make_cipher
from cordvoice.udp.rtp import build_header
from cordvoice.voicegateway.messages import SessionDescription

from .emulator_helpers import (
    RawVoice,
    VoiceWorld,
    build_voice_world,
    eventually,
    identify_payload,
    issue_session,
    opaque_frames,
)


@pytest.fixture
async def world() -> AsyncIterator[VoiceWorld]:
    async with Emulator() as emu:
        yield build_voice_world(emu)


def udp_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    return sock


async def recv_datagram(sock: socket.socket, timeout: float = 2.0) -> bytes:  # noqa: ASYNC109
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout):
        return await loop.sock_recv(sock, 4096)


async def stage_pair(world: VoiceWorld) -> tuple[Participant, Participant]:
    alice, bob = await asyncio.gather(
        world.emu.add_participant(world.stage.id, name="alice"),
        world.emu.add_participant(world.stage.id, name="bob"),
    )
    return alice, bob


async def test_forwarding_keeps_the_senders_rtp_fields_and_reencrypts_per_receiver(world: VoiceWorld) -> None:
    emu = world.emu
    alice, bob = await stage_pair(world)
    carol = await emu.add_participant(world.stage.id, name="carol")
    media = emu.voice_server().media
    captured: list[tuple[bytes, Any, MediaEndpoint, MediaEndpoint]] = []

    def capture(packet: bytes, address: Any, sender: MediaEndpoint, receiver: MediaEndpoint) -> None:
        captured.append((packet, address, sender, receiver))
        media.send_datagram(packet, address)

    media.forward_hook = capture
    frames = opaque_frames(7, 3)
    await alice.play(frames)
    for listener in (bob, carol):
        heard = await listener.wait_for_frames(alice.user_id, 8)
        assert [f.payload for f in heard[:3]] == frames
        assert [f.sequence for f in heard] == list(range(8)), "the sender's sequence numbers"
        assert [f.timestamp for f in heard] == [960 * i for i in range(8)], "the sender's timestamps"
        assert {f.ssrc for f in heard} == {alice.ssrc}, "the sender's SSRC"
    to_bob = [c for c in captured if c[3].user_id == bob.user_id]
    to_carol = [c for c in captured if c[3].user_id == carol.user_id]
    assert len(to_bob) == len(to_carol) == 8 and all(c[2].user_id == alice.user_id for c in captured)
    bob_key = emu.voice_server().media_endpoint(bob.user_id).cipher
    carol_key = emu.voice_server().media_endpoint(carol.user_id).cipher
    assert bob_key is not None and carol_key is not None
    bob_packet, carol_packet = to_bob[0][0], to_carol[0][0]
    assert bob_packet[:12] == carol_packet[:12] and bob_packet != carol_packet
    assert bob_key.open_rtp(bob_packet)[1] == frames[0]
    with pytest.raises(Exception, match="authentication"):
        bob_key.open_rtp(carol_packet)
    assert carol_key.open_rtp(carol_packet)[1] == frames[0]
    # Each receiver has its own nonce counter, starting at 0.
    assert [p[-4:] for p, *_ in to_bob[:3]] == [i.to_bytes(4, "big") for i in range(3)]
    assert emu.inspect(bob.user_id).forwarded_to_client == 8
    assert media.forwarded == 16


async def test_garbage_wrong_keys_and_strangers_are_dropped_and_counted(world: VoiceWorld) -> None:
    emu = world.emu
    alice, bob = await stage_pair(world)
    media = emu.voice_server().media
    server = media.address
    alice_endpoint = emu.voice_server().media_endpoint(alice.user_id)
    assert alice_endpoint.cipher is not None
    stranger = udp_socket()
    try:
        frames = opaque_frames(9, 25)
        playing = asyncio.create_task(alice.play(frames))
        stranger.sendto(b"garbage", server)
        stranger.sendto(build_header(1, 960, alice.ssrc) + os.urandom(40), server)
        stranger.sendto(discovery.build_request(12345), server)
        alice.send_datagram(b"\x01\x02")  # short: keepalive-sized scraps
        wrong_key = make_cipher(MODE_AES256_GCM, os.urandom(32))
        alice.send_datagram(wrong_key.seal(build_header(500, 0, alice.ssrc), b"\xfc" * 30, 0))
        alice.send_datagram(bytes((0x80, 200)) + os.urandom(40))  # RTCP: counted, not forwarded
        alice.send_datagram(alice_endpoint.cipher.seal(build_header(501, 0, bob.ssrc), b"\xfc" * 30, 9))
        alice.send_datagram(b"\x80\x78" + os.urandom(198))  # RTP-shaped noise: fails authentication
        alice.send_datagram(b"\x40\x78" + os.urandom(40))  # RTP version 1: malformed
        await playing
        heard = await bob.wait_for_frames(alice.user_id, 30)
        assert [f.payload for f in heard[:25]] == frames, "the healthy stream lost nothing"
    finally:
        stranger.close()
    counters = media.counters
    assert counters["unknown_address"] == 2
    assert counters["discovery_unknown_ssrc"] == 1
    assert counters["short"] == 1
    assert counters["rtcp"] == 1
    assert counters["wrong_ssrc"] == 1
    assert counters["undecryptable"] == 2 and counters["malformed"] == 1
    seen = emu.inspect(alice.user_id)
    assert seen.rtp.undecryptable == 2
    assert seen.rtp.packets == 30 and bob.stats.transport_undecryptable == 0


async def test_nothing_before_select_protocol_and_no_rtp_before_speaking(world: VoiceWorld) -> None:
    emu = world.emu
    alice = await emu.add_participant(world.stage.id, name="alice")
    media = emu.voice_server().media
    session = issue_session(emu, world.stage)
    raw = await RawVoice.open(session.endpoint)
    sock = udp_socket()
    try:
        await raw.send(identify_payload(session))
        ready = (await raw.recv_op(2)).message
        server = (ready.ip, ready.port)  # type: ignore[union-attr]
        sock.sendto(discovery.build_request(ready.ssrc), server)  # type: ignore[union-attr]
        answer = discovery.parse_response(await recv_datagram(sock))
        assert (answer.address, answer.port) == sock.getsockname()
        await alice.play(opaque_frames(1, 2))
        sock.sendto(b"\x80\x78" + os.urandom(60), server)
        await eventually(lambda: media.counters["before_select_protocol"] == 1)
        assert emu.inspect(session.user_id).forwarded_to_client == 0, "nothing before Select Protocol"

        host, port = sock.getsockname()
        await raw.send(
            {
                "op": 1,
                "d": {"protocol": "udp", "data": {"address": host, "port": port, "mode": MODE_AES256_GCM}},
            }
        )
        description = (await raw.recv_op(4)).message
        assert isinstance(description, SessionDescription)
        cipher = make_cipher(MODE_AES256_GCM, description.secret_key)
        ssrc = ready.ssrc  # type: ignore[union-attr]
        sock.sendto(cipher.seal(build_header(0, 0, ssrc), b"\xfc\x01", 0), server)
        await eventually(lambda: media.counters["before_speaking"] == 1)
        assert alice.frames_from(session.user_id) == []
        await raw.send({"op": 5, "d": {"speaking": 1, "delay": 0, "ssrc": ssrc}})
        await alice.wait_until(lambda: any(e[0] == session.user_id for e in alice.speaking_events))
        sock.sendto(cipher.seal(build_header(1, 960, ssrc), b"\xfc\x02", 1), server)
        heard = await alice.wait_for_frames(session.user_id, 1)
        assert heard[0].payload == b"\xfc\x02" and heard[0].sequence == 1
        # After Select Protocol the raw client receives alice, sealed with its own key.
        frame = opaque_frames(2, 1)
        await alice.play(frame, silence=False)
        header, payload = cipher.open_rtp(await recv_datagram(sock))
        assert header.ssrc == alice.ssrc and payload == frame[0]
    finally:
        sock.close()
        await raw.close()


async def test_rtp_statistics_count_gaps_duplicates_reordering_and_steps(world: VoiceWorld) -> None:
    emu = world.emu
    alice, bob = await stage_pair(world)
    endpoint = emu.voice_server().media_endpoint(alice.user_id)
    assert endpoint.cipher is not None
    await alice.play(opaque_frames(3, 0), silence=False)  # op 5 binds the SSRC
    for nonce, sequence in enumerate((0, 1, 3, 3, 2, 4)):
        alice.send_datagram(
            endpoint.cipher.seal(build_header(sequence, sequence * 960, alice.ssrc), b"\xfc", nonce)
        )
    await bob.wait_for_frames(alice.user_id, 6)
    rtp = emu.inspect(alice.user_id).rtp
    assert rtp.packets == 6 and rtp.sequence_gaps == 1 and rtp.lost == 1
    assert rtp.duplicates == 1 and rtp.out_of_order == 1
    assert rtp.timestamp_steps == {960: 2, 1920: 1}, "0->1, 1->3 (a gap), 3->4"
    assert rtp.lateness_ms["count"] == 4


async def test_pause_drops_both_ways_and_inject_reaches_a_client(world: VoiceWorld) -> None:
    emu = world.emu
    alice, bob = await stage_pair(world)
    media = emu.voice_server().media
    media.paused = True
    await alice.play(opaque_frames(4, 3))
    await eventually(lambda: media.counters["paused"] == 8)
    assert bob.frames_from(alice.user_id) == []
    media.paused = False
    frames = opaque_frames(5, 3)
    await alice.play(frames)
    heard = await bob.wait_for_frames(alice.user_id, 3)
    assert [f.payload for f in heard[:3]] == frames
    media.inject(emu.voice_server().media_endpoint(bob.user_id), b"\x80\x78" + os.urandom(50))
    await bob.wait_until(lambda: bob.stats.transport_undecryptable == 1)
    assert media.counters["injected"] == 1


async def test_arrival_lateness_is_the_kernels_arrival_time_not_when_the_server_got_to_read(
    world: VoiceWorld,
) -> None:
    """A sender pacing well stays near 0 ms late even while the emulator's loop is too busy to read."""
    emu = world.emu
    alice, _ = await stage_pair(world)
    if not emu.voice_server().media._stamped:
        pytest.skip("no SO_TIMESTAMPNS on this platform")
    endpoint = emu.voice_server().media_endpoint(alice.user_id)
    cipher = endpoint.cipher
    assert cipher is not None
    await alice.play(opaque_frames(3, 0), silence=False)  # op 5 binds the SSRC
    await eventually(lambda: endpoint.speaking_bound)
    endpoint.stats = RtpStats()

    def packet(sequence: int, slot: int) -> bytes:
        """Packet ``sequence`` for the 20 ms grid slot ``slot``."""
        return cipher.seal(build_header(sequence, slot * 960, alice.ssrc), b"\xfc", 100 + sequence)

    first = time.monotonic()
    alice.send_datagram(packet(0, 0))
    await eventually(lambda: endpoint.stats.packets == 1)
    next_slot = int((time.monotonic() - first) / 0.02) + 1
    for sequence in range(1, 6):
        # This blocks the loop for about 100 ms: the server reads these five only afterwards, all at once.
        slot = next_slot + sequence - 1
        time.sleep(max(0.0, first + slot * 0.02 - time.monotonic()))
        alice.send_datagram(packet(sequence, slot))
    await eventually(lambda: endpoint.stats.packets == 6)
    assert endpoint.stats.lateness.max_ms < 10.0, "lateness measured when the server read, not on arrival"


async def test_timer_reads_forward_everything_and_refuse_bad_intervals(world: VoiceWorld) -> None:
    """``read_every`` (the send benchmark's mode): datagrams wait in the socket until the next read."""
    emu = world.emu
    media = emu.voice_server().media
    if not media._stamped:
        with pytest.raises(EmulatorError, match="kernel arrival stamps"):
            media.read_every(0.001)
        return
    for bad in (0.0, -1.0, 1.5):
        with pytest.raises(InvalidArgumentError):
            media.read_every(bad)
    alice, bob = await stage_pair(world)
    assert not media.reads_on_timer
    media.read_every(0.5)
    assert media.reads_on_timer
    with pytest.raises(EmulatorError, match="already reads on a timer"):
        media.read_every(0.5)
    frames = opaque_frames(6, 4)
    await alice.play(frames)
    heard = await bob.wait_for_frames(alice.user_id, 4)
    assert [f.payload for f in heard[:4]] == frames
    # Right after a read, a datagram waits in the socket for the next read, 500 ms later.
    received = media.received
    alice.send_datagram(b"\x00" * 8)
    await eventually(lambda: media.received > received)
    received = media.received
    alice.send_datagram(b"\x00" * 8)
    await asyncio.sleep(0.05)
    assert media.received == received, "read on the timer, not when the socket became readable"
    await eventually(lambda: media.received > received)
    assert media.counters["short"] >= 2


async def speaking_pair(world: VoiceWorld) -> tuple[Participant, Participant, MediaEndpoint, TransportCipher]:
    """Alice and Bob staged, Alice's SSRC bound by op 5: datagrams sealed with her cipher count as hers."""
    alice, bob = await stage_pair(world)
    endpoint = world.emu.voice_server().media_endpoint(alice.user_id)
    cipher = endpoint.cipher
    assert cipher is not None
    await alice.play(opaque_frames(3, 0), silence=False)
    await eventually(lambda: endpoint.speaking_bound)
    return alice, bob, endpoint, cipher


async def test_a_reused_transport_nonce_is_dropped_and_counted(world: VoiceWorld) -> None:
    """protocol.md §5.2: a nonce is never reused with one key (a counter reset on resume would do it)."""
    emu = world.emu
    alice, bob, endpoint, cipher = await speaking_pair(world)
    frames = opaque_frames(4, 5)
    # (sequence, nonce): nonce 7 comes twice with other plaintext, 5 arrives late (reordered, never used).
    for index, (sequence, nonce) in enumerate([(0, 6), (1, 7), (2, 7), (3, 8), (4, 5)]):
        alice.send_datagram(
            cipher.seal(build_header(sequence, sequence * 960, alice.ssrc), frames[index], nonce)
        )
    await eventually(
        lambda: endpoint.stats.packets + emu.voice_server().media.counters["replayed_nonce"] == 5
    )
    await bob.wait_for_frames(alice.user_id, 4)
    assert bob.payloads_from(alice.user_id) == [frames[0], frames[1], frames[3], frames[4]]
    assert emu.voice_server().media.counters["replayed_nonce"] == 1
    assert emu.inspect(alice.user_id).rtp.replayed_nonces == 1


async def test_a_participant_does_not_take_rtp_of_another_payload_type_as_audio(world: VoiceWorld) -> None:
    """protocol.md §4.5: receivers keep payload type 120 (Opus); a sender using 111 is heard by no one."""
    alice, bob, _, cipher = await speaking_pair(world)
    frames = opaque_frames(5, 2)
    wrong_type = struct.pack("!BBHII", 0x80, 111, 0, 0, alice.ssrc)
    alice.send_datagram(cipher.seal(wrong_type, frames[0], 0))
    alice.send_datagram(cipher.seal(build_header(1, 960, alice.ssrc), frames[1], 1))
    await bob.wait_for_frames(alice.user_id, 1)
    await eventually(lambda: bob.stats.received_packets == 2)
    assert bob.payloads_from(alice.user_id) == [frames[1]]
    assert bob.stats.other_payload_type == 1
