"""Voice gateway messages: exact wire forms, strict validation and hypothesis round trips both directions."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cordvoice.errors import InvalidArgumentError, ProtocolError
from cordvoice.voicegateway import messages as m

U16 = st.integers(0, 0xFFFF)
U32 = st.integers(0, 0xFFFF_FFFF)
U64 = st.integers(0, 2**64 - 1)
U8 = st.integers(0, 255)
TEXT = st.text(max_size=40)
BLOB = st.binary(min_size=1, max_size=200)

# Undocumented or retired opcodes the client must ignore while still tracking their seq.
IGNORED_OPS = (10, 12, 14, 15, 16, 17, 18, 19, 20)

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63) | TEXT,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(TEXT, children, max_size=4),
    max_leaves=10,
)

SERVER_STRATEGIES: dict[type, st.SearchStrategy[Any]] = {
    m.Ready: st.builds(
        m.Ready,
        ssrc=U32,
        ip=TEXT,
        port=U16,
        modes=st.lists(TEXT, max_size=5).map(tuple),
        experiments=st.lists(TEXT, max_size=3).map(tuple),
    ),
    m.SessionDescription: st.builds(
        m.SessionDescription,
        mode=TEXT,
        secret_key=st.binary(min_size=32, max_size=32),
        dave_protocol_version=U8,
        audio_codec=st.none() | TEXT,
        video_codec=st.none() | TEXT,
        media_session_id=st.none() | TEXT,
    ),
    m.Speaking: st.builds(m.Speaking, speaking=U32, ssrc=U32, delay=U32, user_id=st.none() | U64),
    m.HeartbeatAck: st.builds(m.HeartbeatAck, nonce=U64),
    m.Hello: st.builds(
        m.Hello,
        heartbeat_interval=st.floats(min_value=1e-3, max_value=1e9, allow_nan=False, allow_infinity=False),
        version=st.none() | U8,
    ),
    m.Resumed: st.just(m.Resumed()),
    m.ClientsConnect: st.builds(m.ClientsConnect, user_ids=st.lists(U64, max_size=5).map(tuple)),
    m.ClientDisconnect: st.builds(m.ClientDisconnect, user_id=U64),
    m.DavePrepareTransition: st.builds(m.DavePrepareTransition, protocol_version=U8, transition_id=U16),
    m.DaveExecuteTransition: st.builds(m.DaveExecuteTransition, transition_id=U16),
    m.DavePrepareEpoch: st.builds(
        m.DavePrepareEpoch, protocol_version=U8, epoch=U64, transition_id=st.none() | U16
    ),
    m.DaveMlsExternalSender: st.builds(m.DaveMlsExternalSender, external_sender=BLOB),
    m.DaveMlsProposals: st.builds(
        m.DaveMlsProposals, operation=st.sampled_from(m.ProposalsOperation), proposals=BLOB
    ),
    m.DaveMlsAnnounceCommitTransition: st.builds(
        m.DaveMlsAnnounceCommitTransition, transition_id=U16, commit=BLOB
    ),
    m.DaveMlsWelcome: st.builds(m.DaveMlsWelcome, transition_id=U16, welcome=BLOB),
    m.Unknown: st.builds(m.Unknown, op=st.sampled_from(IGNORED_OPS), data=JSON_VALUES)
    | st.builds(m.Unknown, op=st.integers(32, 255), data=st.binary(max_size=50)),
}

CLIENT_STRATEGIES: dict[type, st.SearchStrategy[Any]] = {
    m.Identify: st.builds(
        m.Identify,
        server_id=U64,
        user_id=U64,
        session_id=TEXT,
        token=TEXT,
        max_dave_protocol_version=U8,
    ),
    m.SelectProtocol: st.builds(m.SelectProtocol, address=TEXT, port=U16, mode=TEXT, protocol=TEXT),
    m.Heartbeat: st.builds(m.Heartbeat, nonce=U64, seq_ack=st.none() | U32),
    m.Speaking: st.builds(m.Speaking, speaking=U32, ssrc=U32, delay=U32),
    m.Resume: st.builds(m.Resume, server_id=U64, session_id=TEXT, token=TEXT, seq_ack=st.none() | U32),
    m.DaveTransitionReady: st.builds(m.DaveTransitionReady, transition_id=U16),
    m.DaveMlsKeyPackage: st.builds(m.DaveMlsKeyPackage, key_package=BLOB),
    m.DaveMlsCommitWelcome: st.builds(m.DaveMlsCommitWelcome, commit_welcome=BLOB),
    m.DaveMlsInvalidCommitWelcome: st.builds(m.DaveMlsInvalidCommitWelcome, transition_id=U16),
    m.Unknown: st.builds(m.Unknown, op=st.sampled_from((2, 4, 6, 8, 9, 11, 13, 24, 99)), data=JSON_VALUES)
    | st.builds(m.Unknown, op=st.sampled_from((25, 27, 29, 30, 200)), data=st.binary(max_size=50)),
}

BINARY_SERVER = (
    m.DaveMlsExternalSender,
    m.DaveMlsProposals,
    m.DaveMlsAnnounceCommitTransition,
    m.DaveMlsWelcome,
)


def _all_message_classes() -> set[type]:
    return {
        obj
        for obj in vars(m).values()
        if isinstance(obj, type) and dataclasses.is_dataclass(obj) and obj is not m.ServerFrame
    }


def test_every_message_class_has_a_round_trip_strategy() -> None:
    assert set(SERVER_STRATEGIES) | set(CLIENT_STRATEGIES) == _all_message_classes()


def test_opcode_table_is_complete() -> None:
    assert [op.value for op in m.Opcode] == [*range(10), *range(11, 32)]
    assert m.Opcode.DAVE_MLS_INVALID_COMMIT_WELCOME == 31


@st.composite
def server_frames(draw: st.DrawFn) -> tuple[Any, int | None]:
    message = draw(st.one_of(*SERVER_STRATEGIES.values()))
    binary = isinstance(message, BINARY_SERVER) or (
        isinstance(message, m.Unknown) and isinstance(message.data, bytes)
    )
    seq = draw(U16) if binary else draw(st.none() | U32)
    return message, seq


@given(server_frames())
def test_server_round_trip(frame: tuple[Any, int | None]) -> None:
    message, seq = frame
    wire = m.encode_server(message, seq)
    assert isinstance(wire, bytes) == isinstance(message, BINARY_SERVER) or isinstance(message, m.Unknown)
    assert m.decode_server(wire) == m.ServerFrame(message, seq)


@given(st.one_of(*CLIENT_STRATEGIES.values()))
def test_client_round_trip(message: Any) -> None:
    assert m.decode_client(m.encode_client(message)) == message


# --------------------------------------------------------------------------------------------------
# Exact wire forms
# --------------------------------------------------------------------------------------------------


def test_identify_wire_form_uses_string_snowflakes_and_hides_the_token_in_repr() -> None:
    message = m.Identify(41771983423143937, 80351110224678912, "sess", "secret-token", 1)
    assert json.loads(m.encode_client(message)) == {
        "op": 0,
        "d": {
            "server_id": "41771983423143937",
            "user_id": "80351110224678912",
            "session_id": "sess",
            "token": "secret-token",
            "max_dave_protocol_version": 1,
        },
    }
    assert "secret-token" not in repr(message)
    assert "secret-token" not in repr(m.Resume(1, "s", "secret-token", 3))


def test_select_protocol_and_heartbeat_wire_forms() -> None:
    select = m.SelectProtocol("203.0.113.7", 50004, "aead_aes256_gcm_rtpsize")
    assert json.loads(m.encode_client(select)) == {
        "op": 1,
        "d": {"protocol": "udp", "data": {"address": "203.0.113.7", "port": 50004, "mode": select.mode}},
    }
    assert json.loads(m.encode_client(m.Heartbeat(1700000000000, 12))) == {
        "op": 3,
        "d": {"t": 1700000000000, "seq_ack": 12},
    }
    assert json.loads(m.encode_client(m.Heartbeat(5)))["d"] == {"t": 5, "seq_ack": -1}


def test_decodes_a_realistic_ready_with_extra_fields() -> None:
    frame = json.dumps(
        {
            "op": 2,
            "d": {
                "ssrc": 1,
                "ip": "127.0.0.1",
                "port": 1234,
                "modes": ["aead_aes256_gcm_rtpsize", "aead_xchacha20_poly1305_rtpsize"],
                "experiments": ["fixed_keyframe_interval"],
                "streams": [{"type": "video", "ssrc": 2, "rtx_ssrc": 3}],
                "heartbeat_interval": 1,
            },
        }
    )
    result = m.decode_server(frame)
    assert result.seq is None
    assert result.message == m.Ready(
        1,
        "127.0.0.1",
        1234,
        ("aead_aes256_gcm_rtpsize", "aead_xchacha20_poly1305_rtpsize"),
        ("fixed_keyframe_interval",),
    )


def test_decodes_hello_session_description_and_speaking() -> None:
    assert m.decode_server('{"op":8,"d":{"v":8,"heartbeat_interval":13750.0}}').message == m.Hello(13750.0, 8)
    key = list(range(32))
    sd = m.decode_server(
        json.dumps(
            {
                "op": 4,
                "seq": 2,
                "d": {
                    "mode": "aead_aes256_gcm_rtpsize",
                    "secret_key": key,
                    "dave_protocol_version": 1,
                    "audio_codec": "opus",
                    "video_codec": "H264",
                    "media_session_id": "abc",
                },
            }
        )
    )
    assert sd == m.ServerFrame(
        m.SessionDescription("aead_aes256_gcm_rtpsize", bytes(range(32)), 1, "opus", "H264", "abc"), 2
    )
    speaking = m.decode_server('{"op":5,"seq":7,"d":{"user_id":"123","ssrc":99,"speaking":1}}')
    assert speaking == m.ServerFrame(m.Speaking(speaking=1, ssrc=99, delay=0, user_id=123), 7)


def test_snowflakes_accepted_as_int_or_string() -> None:
    as_text = m.decode_server('{"op":13,"d":{"user_id":"18446744073709551615"}}').message
    as_int = m.decode_server('{"op":13,"d":{"user_id":18446744073709551615}}').message
    assert as_text == as_int == m.ClientDisconnect(2**64 - 1)


def test_pre_v8_bare_integer_heartbeat_and_ack() -> None:
    assert m.decode_client('{"op":3,"d":123}') == m.Heartbeat(123, None)
    assert m.decode_server('{"op":6,"d":123}').message == m.HeartbeatAck(123)
    assert m.decode_server('{"op":6,"d":{"t":124}}').message == m.HeartbeatAck(124)


def test_seq_ack_minus_one_or_missing_means_none() -> None:
    assert m.decode_client('{"op":3,"d":{"t":1,"seq_ack":-1}}') == m.Heartbeat(1, None)
    assert m.decode_client('{"op":3,"d":{"t":1}}') == m.Heartbeat(1, None)
    assert m.decode_client('{"op":7,"d":{"server_id":"1","session_id":"s","token":"t"}}') == m.Resume(
        1, "s", "t", None
    )


@pytest.mark.parametrize("op", IGNORED_OPS)
def test_ignored_opcodes_decode_to_unknown_and_keep_their_seq(op: int) -> None:
    frame = m.decode_server(json.dumps({"op": op, "d": {"any": 100}, "seq": 41}))
    assert frame == m.ServerFrame(m.Unknown(op, {"any": 100}), 41)


def test_unknown_and_wrong_direction_opcodes_are_not_errors() -> None:
    assert m.decode_server('{"op":77,"d":null,"seq":3}') == m.ServerFrame(m.Unknown(77, None), 3)
    assert m.decode_server(b"\x00\x09\x63abc") == m.ServerFrame(m.Unknown(99, b"abc"), 9)
    # A client-only op arriving from the server, and vice versa, is something this side does not handle.
    assert m.decode_server('{"op":0,"d":{}}').message == m.Unknown(0, {})
    assert m.decode_client('{"op":2,"d":{}}') == m.Unknown(2, {})
    assert m.decode_client(b"\x1bxyz") == m.Unknown(27, b"xyz")


@pytest.mark.parametrize("op", [-1, 256, 10**400])
def test_an_opcode_no_byte_can_hold_is_malformed(op: int) -> None:
    # Unknown ops are counted by value: an unbounded one would grow that count and the log without end.
    for decode in (m.decode_server, m.decode_client):
        with pytest.raises(ProtocolError, match=r"outside 0\.\.255"):
            decode(json.dumps({"op": op, "d": None}))


def test_binary_frame_layouts() -> None:
    assert m.encode_server(m.DaveMlsWelcome(5, b"W"), seq=258) == b"\x01\x02\x1e\x00\x05W"
    assert m.encode_server(m.DaveMlsAnnounceCommitTransition(0x0102, b"C"), seq=1) == b"\x00\x01\x1d\x01\x02C"
    assert m.encode_server(m.DaveMlsExternalSender(b"ES"), seq=0) == b"\x00\x00\x19ES"
    proposals = m.DaveMlsProposals(m.ProposalsOperation.REVOKE, b"\x02ab")
    assert m.encode_server(proposals, seq=65535) == b"\xff\xff\x1b\x01\x02ab"
    assert m.encode_client(m.DaveMlsKeyPackage(b"\x00\x01\x00\x02")) == b"\x1a\x00\x01\x00\x02"
    assert m.encode_client(m.DaveMlsCommitWelcome(b"cw")) == b"\x1ccw"
    assert m.decode_server(b"\x12\x34\x1e\x00\x07welcome") == m.ServerFrame(
        m.DaveMlsWelcome(7, b"welcome"), 0x1234
    )


def test_json_dave_ops() -> None:
    assert m.decode_server('{"op":21,"d":{"protocol_version":1,"transition_id":0}}').message == (
        m.DavePrepareTransition(1, 0)
    )
    assert m.decode_server('{"op":24,"d":{"protocol_version":1,"epoch":1}}').message == m.DavePrepareEpoch(
        1, 1
    )
    assert json.loads(m.encode_client(m.DaveMlsInvalidCommitWelcome(9))) == {
        "op": 31,
        "d": {"transition_id": 9},
    }


# --------------------------------------------------------------------------------------------------
# Strict validation
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("frame", "fragments"),
    [
        ('{"op":2,"d":{"ssrc":true,"ip":"x","port":1,"modes":[]}}', ("op 2", "ssrc")),
        ('{"op":2,"d":{"ssrc":4294967296,"ip":"x","port":1,"modes":[]}}', ("op 2", "ssrc")),
        ('{"op":2,"d":{"ssrc":1,"ip":"x","port":65536,"modes":[]}}', ("op 2", "port")),
        ('{"op":2,"d":{"ssrc":1,"ip":"x","port":1,"modes":[1]}}', ("op 2", "modes")),
        ('{"op":2,"d":{"ssrc":1,"port":1,"modes":[]}}', ("op 2", "ip")),
        ('{"op":4,"d":{"mode":"m","secret_key":[1,2,3]}}', ("op 4", "secret_key")),
        ('{"op":4,"d":{"mode":"m","secret_key":[' + ",".join(["256"] * 32) + "]}}", ("op 4", "secret_key")),
        ('{"op":4,"d":{"mode":"m","secret_key":[' + ",".join(["true"] * 32) + "]}}", ("op 4", "secret_key")),
        ('{"op":5,"d":{"speaking":1,"ssrc":-1}}', ("op 5", "ssrc")),
        ('{"op":5,"d":{"speaking":1,"ssrc":1,"user_id":"12a"}}', ("op 5", "user_id")),
        ('{"op":5,"d":{"speaking":1,"ssrc":1,"user_id":"\\u0663"}}', ("op 5", "user_id")),
        ('{"op":5,"d":{"speaking":1,"ssrc":1,"user_id":"18446744073709551616"}}', ("op 5", "user_id")),
        ('{"op":8,"d":{"heartbeat_interval":0}}', ("op 8", "heartbeat_interval")),
        ('{"op":8,"d":{"heartbeat_interval":"13750"}}', ("op 8", "heartbeat_interval")),
        ('{"op":8,"d":{"heartbeat_interval":NaN}}', ("op 8", "heartbeat_interval")),
        # an integer too big for a float: rejected, not an OverflowError from float()
        ('{"op":8,"d":{"heartbeat_interval":1' + "0" * 400 + "}}", ("op 8", "heartbeat_interval")),
        ('{"op":11,"d":{"user_ids":"1"}}', ("op 11", "user_ids")),
        ('{"op":21,"d":{"protocol_version":1,"transition_id":65536}}', ("op 21", "transition_id")),
        ('{"op":22,"d":[]}', ("op 22", "object")),
        ('{"op":24,"d":{"protocol_version":1,"epoch":-1}}', ("op 24", "epoch")),
        ('{"op":6,"d":1.5}', ("op 6",)),
        ('{"op":5,"seq":-1,"d":{"speaking":1,"ssrc":1}}', ("op 5", "seq")),
        ('{"op":25,"d":null,"seq":1}', ("op 25", "binary")),
        ('{"op":"5","d":{}}', ("op",)),
        ("[1,2]", ("object",)),
        ('{"op":5,', ("JSON",)),
        ("[" * 100_000, ("JSON",)),
    ],
)
def test_server_validation_errors_name_the_op_and_field(frame: str, fragments: tuple[str, ...]) -> None:
    with pytest.raises(ProtocolError) as info:
        m.decode_server(frame)
    for fragment in fragments:
        assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("frame", "fragments"),
    [
        (b"\x00\x01", ("2 bytes",)),
        (b"\x00\x01\x1e\x00\x01", ("op 30",)),  # transition id without a Welcome
        (b"\x00\x01\x19", ("op 25", "external_sender")),
        (b"\x00\x01\x1b\x02\x00", ("op 27", "op_type")),
        (b"\x00\x01\x05{}", ("op 5", "JSON")),
    ],
)
def test_binary_server_validation(frame: bytes, fragments: tuple[str, ...]) -> None:
    with pytest.raises(ProtocolError) as info:
        m.decode_server(frame)
    for fragment in fragments:
        assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("frame", "fragments"),
    [
        ('{"op":0,"d":{"server_id":"1","user_id":"2","session_id":"s"}}', ("op 0", "token")),
        (
            '{"op":0,"d":{"server_id":"1","user_id":"2","session_id":"s","token":"t",'
            '"max_dave_protocol_version":256}}',
            ("op 0", "max_dave_protocol_version"),
        ),
        (
            '{"op":1,"d":{"protocol":"udp","data":{"address":"a","port":-1,"mode":"m"}}}',
            ("op 1", "data.port"),
        ),
        ('{"op":1,"d":{"protocol":"udp"}}', ("op 1", "data")),
        ('{"op":3,"d":{"t":1,"seq_ack":-2}}', ("op 3", "seq_ack")),
        ('{"op":23,"d":{"transition_id":null}}', ("op 23", "transition_id")),
        ('{"op":26,"d":{}}', ("op 26", "binary")),
        (b"", ("empty",)),
        (b"\x1a", ("op 26", "key_package")),
        (b"\x05{}", ("op 5", "JSON")),
    ],
)
def test_client_validation_errors(frame: str | bytes, fragments: tuple[str, ...]) -> None:
    with pytest.raises(ProtocolError) as info:
        m.decode_client(frame)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_non_frame_inputs_raise_protocol_error() -> None:
    with pytest.raises(ProtocolError):
        m.decode_server(123)  # type: ignore[arg-type]
    assert m.decode_client(bytearray(b"\x1cxy")) == m.DaveMlsCommitWelcome(b"xy")


def test_encode_rejects_misuse() -> None:
    with pytest.raises(InvalidArgumentError):
        m.encode_server(m.Identify(1, 2, "s", "t"))  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError):
        m.encode_client(m.Ready(1, "ip", 1, ()))  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="seq"):
        m.encode_server(m.DaveMlsWelcome(1, b"w"))
    with pytest.raises(InvalidArgumentError, match="seq"):
        m.encode_server(m.DaveMlsWelcome(1, b"w"), seq=65536)
    with pytest.raises(InvalidArgumentError, match="transition_id"):
        m.encode_server(m.DaveMlsWelcome(65536, b"w"), seq=1)
    with pytest.raises(InvalidArgumentError, match="secret_key"):
        m.encode_server(m.SessionDescription("m", b"short"))
    with pytest.raises(InvalidArgumentError):
        m.encode_server(m.Hello(float("inf")))
    with pytest.raises(InvalidArgumentError):
        m.encode_client(m.Unknown(300, b""))
