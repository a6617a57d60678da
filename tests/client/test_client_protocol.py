"""The sans-IO voice gateway client core: Identify/Resume, seq tracking, heartbeats, handshake outputs."""

from __future__ import annotations

import json

import davey
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cordvoice.errors import InvalidArgumentError
from cordvoice.udp.crypto import MODE_AES256_GCM, MODE_XCHACHA20_POLY1305
from cordvoice.voicegateway.connection import voice_gateway_url
from cordvoice.voicegateway.messages import (
    ClientsConnect,
    Hello,
    Opcode,
    Ready,
    SessionDescription,
    Speaking,
    Unknown,
    encode_server,
)
from cordvoice.voicegateway.protocol import (
    MAX_UNACKED_HEARTBEATS,
    Credentials,
    HeartbeatAcked,
    HelloReceived,
    Malformed,
    NoUsableMode,
    PeerDisconnected,
    PeersConnected,
    PeerSpeaking,
    ReadyReceived,
    ResumedReceived,
    Send,
    SessionDescribed,
    VoiceGatewayProtocol,
)

CREDS = Credentials(server_id=10, user_id=20, session_id="sess", token="tok")
KEY = bytes(range(32))


def make(dave_version: int = 1) -> VoiceGatewayProtocol:
    return VoiceGatewayProtocol(CREDS, channel_id=30, max_dave_protocol_version=dave_version)


def ready_frame(
    modes: tuple[str, ...] = (MODE_XCHACHA20_POLY1305, MODE_AES256_GCM), seq: int = 1
) -> str | bytes:
    return encode_server(Ready(ssrc=777, ip="127.0.0.1", port=5000, modes=modes), seq)


def described(protocol: VoiceGatewayProtocol, dave_version: int = 1) -> list[object]:
    protocol.receive(ready_frame(), 0.0)
    return list(
        protocol.receive(
            encode_server(
                SessionDescription(mode=MODE_AES256_GCM, secret_key=KEY, dave_protocol_version=dave_version),
                2,
            ),
            0.0,
        )
    )


def test_client_protocol_identify_then_resume_with_seq_ack() -> None:
    protocol = make()
    identify = json.loads(protocol.connection_opened())
    assert identify == {
        "op": 0,
        "d": {
            "server_id": "10",
            "user_id": "20",
            "session_id": "sess",
            "token": "tok",
            "max_dave_protocol_version": davey.DAVE_PROTOCOL_VERSION,
        },
    }
    described(protocol)
    protocol.receive(encode_server(Unknown(16, {"voice": "1"}), 9), 0.0)
    resume = json.loads(protocol.connection_opened())
    assert resume == {"op": 7, "d": {"server_id": "10", "session_id": "sess", "token": "tok", "seq_ack": 9}}
    assert make(0).connection_opened().count('"max_dave_protocol_version":0') == 1


def test_client_protocol_tracks_seq_of_every_numbered_frame() -> None:
    protocol = make()
    assert protocol.seq is None
    protocol.receive(ready_frame(seq=3), 0.0)
    assert protocol.seq == 3
    protocol.receive(encode_server(Unknown(18, {"user_id": "1", "flags": 2}), 4), 0.0)  # ignored op
    assert protocol.seq == 4 and protocol.ignored[18] == 1
    protocol.receive(b"\x00\x05\xc8" + b"body", 0.0)  # unknown binary op
    assert protocol.seq == 5
    protocol.receive(b"\x00\x06\x1d\x00", 0.0)  # op 29 too short: malformed, but numbered
    assert protocol.seq == 6 and protocol.malformed == 1
    protocol.receive(json.dumps({"op": 5, "d": {"nope": 1}, "seq": 7}), 0.0)  # malformed JSON body
    assert protocol.seq == 7 and protocol.malformed == 2
    protocol.receive(encode_server(Hello(heartbeat_interval=1000.0, version=8)), 0.0)  # unnumbered
    assert protocol.seq == 7
    protocol.receive(b"\xff\xff\x19" + b"\x00", 0.0)  # binary seq 65535 (wrap point)
    assert protocol.seq == 65535


def test_client_protocol_heartbeats_acks_latency_and_zombie() -> None:
    protocol = make()
    outputs = protocol.receive(encode_server(Hello(heartbeat_interval=13750.0, version=8)), 0.0)
    assert outputs == [HelloReceived(13.75)]
    first = json.loads(protocol.heartbeat(100.0) or "")
    assert first["op"] == 3 and first["d"]["seq_ack"] == -1
    ack = protocol.receive(json.dumps({"op": 6, "d": {"t": first["d"]["t"]}}), 100.05)
    assert len(ack) == 1 and isinstance(ack[0], HeartbeatAcked)
    assert protocol.latency == pytest.approx(0.05)
    assert protocol.receive(json.dumps({"op": 6, "d": {"t": 12345}}), 101.0) == []  # unknown nonce
    nonces = []
    for _ in range(MAX_UNACKED_HEARTBEATS):
        frame = protocol.heartbeat(100.0)  # same millisecond: nonces still differ
        assert frame is not None
        nonces.append(json.loads(frame)["d"]["t"])
    assert len(set(nonces)) == MAX_UNACKED_HEARTBEATS
    assert protocol.heartbeat(200.0) is None, "three unanswered heartbeats: a zombie connection"
    protocol.receive(json.dumps({"op": 6, "d": {"t": nonces[0]}}), 200.0)
    assert protocol.unacked_heartbeats == MAX_UNACKED_HEARTBEATS - 1, "an older ACK answers only the older"
    assert protocol.heartbeat(200.5) is not None
    assert protocol.heartbeat(200.6) is None, "the newer ones are still unanswered"
    protocol.receive(json.dumps({"op": 6, "d": {"t": nonces[-1]}}), 201.0)
    assert protocol.unacked_heartbeats == 1, "the one sent after it is still in flight"
    assert protocol.heartbeat(201.0) is not None
    protocol.connection_opened()
    assert protocol.unacked_heartbeats == 0


@pytest.mark.parametrize(
    ("modes", "chosen"),
    [
        ((MODE_XCHACHA20_POLY1305, MODE_AES256_GCM), MODE_AES256_GCM),
        ((MODE_XCHACHA20_POLY1305, "xsalsa20_poly1305_lite_rtpsize"), MODE_XCHACHA20_POLY1305),
    ],
)
def test_client_protocol_mode_choice(modes: tuple[str, ...], chosen: str) -> None:
    protocol = make()
    (output,) = protocol.receive(ready_frame(modes), 0.0)
    assert isinstance(output, ReadyReceived) and output.mode == chosen
    select = json.loads(protocol.select_protocol("1.2.3.4", 999))
    assert select == {
        "op": 1,
        "d": {"protocol": "udp", "data": {"address": "1.2.3.4", "port": 999, "mode": chosen}},
    }


def test_client_protocol_rejects_handshake_nonsense() -> None:
    protocol = make()
    (out,) = protocol.receive(ready_frame(("xsalsa20_poly1305",)), 0.0)
    assert isinstance(out, NoUsableMode) and "no supported transport mode" in out.error
    assert protocol.ready is None and protocol.malformed == 0, "not malformed: unusable, which ends the join"
    description = encode_server(SessionDescription(mode=MODE_AES256_GCM, secret_key=KEY), 2)
    (out,) = make().receive(description, 0.0)
    assert isinstance(out, Malformed), "Session Description before Ready"
    protocol = make()
    protocol.receive(ready_frame(), 0.0)
    (out,) = protocol.receive(ready_frame(), 0.0)
    assert isinstance(out, Malformed), "Ready twice"
    wrong = encode_server(SessionDescription(mode=MODE_XCHACHA20_POLY1305, secret_key=KEY), 3)
    (out,) = protocol.receive(wrong, 0.0)
    assert isinstance(out, Malformed) and not protocol.established


def test_client_protocol_session_description_sends_op5_then_key_package() -> None:
    protocol = make()
    protocol.speaking_flags = 0
    outputs = described(protocol)
    assert isinstance(outputs[0], Send) and json.loads(outputs[0].frame) == {
        "op": 5,
        "d": {"speaking": 0, "delay": 0, "ssrc": 777},
    }
    assert isinstance(outputs[1], SessionDescribed)
    key_package = outputs[2]
    assert isinstance(key_package, Send) and isinstance(key_package.frame, bytes)
    assert (
        key_package.frame[0] == Opcode.DAVE_MLS_KEY_PACKAGE and key_package.frame[1:5] == b"\x00\x01\x00\x02"
    )
    assert protocol.established and protocol.dave.dave_required and not protocol.dave.ready
    stage = make()
    outputs = described(stage, dave_version=0)
    assert [type(o) for o in outputs] == [Send, SessionDescribed]
    assert not stage.dave.dave_required


def test_client_protocol_peers_and_speaking() -> None:
    protocol = make()
    described(protocol)
    out = protocol.receive(encode_server(ClientsConnect(user_ids=(5, 6)), 3), 0.0)
    assert out == [PeersConnected((5, 6))]
    assert protocol.dave.recognized_users == frozenset({5, 6})
    out = protocol.receive(encode_server(Speaking(speaking=1, ssrc=99, user_id=5), 4), 0.0)
    assert out == [PeerSpeaking(5, 99, 1)]
    out = protocol.receive(json.dumps({"op": 13, "d": {"user_id": "6"}, "seq": 5}), 0.0)
    assert out == [PeerDisconnected(6)] and protocol.dave.recognized_users == frozenset({5})
    (bad,) = protocol.receive(encode_server(Speaking(speaking=1, ssrc=99), 6), 0.0)
    assert isinstance(bad, Malformed), "a server op 5 must name the user"

    resumed = json.dumps({"op": 9, "d": None})
    (bad,) = protocol.receive(resumed, 0.0)
    assert isinstance(bad, Malformed), "op 9 on a connection that sent Identify resumes nothing"
    assert json.loads(protocol.connection_opened())["op"] == 7
    assert protocol.receive(resumed, 0.0) == [ResumedReceived()]
    (again,) = protocol.receive(resumed, 0.0)
    assert isinstance(again, Malformed), "only one op 9 answers a Resume"


@given(st.one_of(st.text(max_size=200), st.binary(max_size=200)))
def test_client_protocol_never_raises_on_random_frames(frame: str | bytes) -> None:
    protocol = make()
    protocol.receive(frame, 0.0)


@given(
    st.dictionaries(
        st.sampled_from(["op", "d", "seq"]),
        st.one_of(
            st.integers(-5, 40),
            st.none(),
            st.text(max_size=5),
            st.dictionaries(st.text(max_size=8), st.integers()),
        ),
    )
)
def test_client_protocol_never_raises_on_random_json(payload: dict[str, object]) -> None:
    protocol = make()
    described(protocol)
    protocol.receive(json.dumps(payload), 0.0)


@pytest.mark.parametrize(
    ("endpoint", "secure", "url"),
    [
        ("voice.discord.media", True, "wss://voice.discord.media/?v=8"),
        ("wss://x.discord.media:443", True, "wss://x.discord.media:443/?v=8"),
        ("wss://x.discord.media:443/", True, "wss://x.discord.media:443/?v=8"),
        ("127.0.0.1:5555", False, "ws://127.0.0.1:5555/?v=8"),
        ("ws://127.0.0.1:5555", False, "ws://127.0.0.1:5555/?v=8"),
        ("[::1]:5555", False, "ws://[::1]:5555/?v=8"),
    ],
)
def test_client_voice_gateway_url(endpoint: str, secure: bool, url: str) -> None:
    assert voice_gateway_url(endpoint, secure=secure) == url


@pytest.mark.parametrize(
    "endpoint",
    ["", "wss://", "a b:1", "127.0.0.1:99999", "127.0.0.1:abc", "host:0", "[::1", "[nope]:1", "::1", ":80"],
)
def test_client_voice_gateway_url_refuses_what_is_not_host_port(endpoint: str) -> None:
    with pytest.raises(InvalidArgumentError, match="not a voice endpoint"):
        voice_gateway_url(endpoint)
