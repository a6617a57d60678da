"""Every parser of bytes or JSON from the network, fed malformed input by hypothesis.

Inputs are valid samples (real frames, datagrams, MLS messages from davey) with a few random edits, or raw
random bytes/values. Each parser must either return or raise the project's own error for bad input
(:class:`~cordvoice.errors.ProtocolError`, or :class:`~cordvoice.errors.DaveDecryptError` for DAVE media,
:class:`~cordvoice.errors.AudioError` for DCA files); stateful consumers (the client's voice gateway core, the
main gateway core, the delivery service) must never raise at all. Both outcomes must occur, or the inputs are
not reaching the parser.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from collections.abc import Callable
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from cordvoice.audio.dca import DCAReader
from cordvoice.audio.opus import packet_samples
from cordvoice.dave import is_dave_frame
from cordvoice.emulator import mls
from cordvoice.emulator.dave_ds import DaveDeliveryService
from cordvoice.errors import AudioError, DaveDecryptError, ProtocolError
from cordvoice.gateway import events as gateway_events
from cordvoice.gateway.protocol import GatewayProtocol
from cordvoice.udp import discovery, rtp
from cordvoice.voicegateway import messages as m
from cordvoice.voicegateway.protocol import Credentials, VoiceGatewayProtocol

from .fuzz_support import (
    CHANNEL_ID,
    EXAMPLES,
    INPUTS,
    USER_A,
    USER_B,
    budget,
    ciphers,
    client_frames,
    datagrams,
    dave_exchange,
    dave_samples,
    mutated,
    server_frames,
)

CI_EXAMPLES = 400
Outcomes = Counter[str]


def _check(name: str, outcomes: Outcomes, parse: Callable[[], object], *errors: type[Exception]) -> None:
    INPUTS[name] += 1
    try:
        parse()
    except errors:
        outcomes["rejected"] += 1
    except Exception as exc:  # pragma: no cover - this is what the fuzzing hunts for
        raise AssertionError(f"{name} leaked {type(exc).__name__}: {exc}") from exc
    else:
        outcomes["accepted"] += 1


def _both(name: str, outcomes: Outcomes) -> None:
    """Both outcomes happened: the mutations reach the parser's accepting and rejecting paths."""
    assert outcomes["accepted"] > 0 and outcomes["rejected"] > 0, (name, dict(outcomes))


# ---- JSON-ish values ---------------------------------------------------------------------------------------

WEIRD = st.sampled_from(
    [
        None,
        True,
        False,
        0,
        -1,
        1,
        2**16,
        2**32,
        2**64,
        -(2**63),
        1.5,
        float("nan"),
        "",
        "x",
        "123",
        "-5",
        [],
        {},
    ]
)
JSON_VALUES = st.recursive(
    st.one_of(WEIRD, st.integers(), st.floats(allow_nan=True), st.text(max_size=20)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=5)
    ),
    max_leaves=12,
)


def _mutate_json(frame: str, path_pick: int, value: object) -> str:
    """Replace one value anywhere in a JSON frame with ``value``."""
    payload = json.loads(frame)
    slots: list[tuple[Any, Any]] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key in node:
                slots.append((node, key))
                walk(node[key])
        elif isinstance(node, list):
            for index in range(len(node)):
                slots.append((node, index))
                walk(node[index])

    walk(payload)
    if slots:
        container, key = slots[path_pick % len(slots)]
        container[key] = value
    return json.dumps(payload)


def json_frames(samples: tuple[str | bytes, ...]) -> st.SearchStrategy[str | bytes]:
    text = tuple(s for s in samples if isinstance(s, str))
    binary = tuple(s for s in samples if isinstance(s, bytes))
    options: list[st.SearchStrategy[str | bytes]] = [
        st.builds(_mutate_json, st.sampled_from(text), st.integers(0, 1000), JSON_VALUES),
        st.text(max_size=200),
        mutated(tuple(s.encode() for s in text)).map(lambda b: b.decode("utf-8", "replace")),
    ]
    if binary:
        options.append(mutated(binary))
    return st.one_of(options)


# ---- voice gateway messages --------------------------------------------------------------------------------

_server_outcomes: Outcomes = Counter()


@budget(CI_EXAMPLES * 2)
@given(json_frames(server_frames()))
def test_fuzz_decode_server(frame: str | bytes) -> None:
    EXAMPLES["test_fuzz_decode_server"] += 1
    _check("decode_server", _server_outcomes, lambda: m.decode_server(frame), ProtocolError)


def test_fuzz_decode_server_both_outcomes() -> None:
    _both("decode_server", _server_outcomes)


_client_outcomes: Outcomes = Counter()


@budget(CI_EXAMPLES * 2)
@given(json_frames(client_frames()))
def test_fuzz_decode_client(frame: str | bytes) -> None:
    EXAMPLES["test_fuzz_decode_client"] += 1
    _check("decode_client", _client_outcomes, lambda: m.decode_client(frame), ProtocolError)


def test_fuzz_decode_client_both_outcomes() -> None:
    _both("decode_client", _client_outcomes)


@budget(CI_EXAMPLES * 2)
@given(st.lists(json_frames(server_frames()), min_size=1, max_size=12))
def test_fuzz_voice_gateway_core_never_raises(frames: list[str | bytes]) -> None:
    """The client's sans-IO core takes anything the server sends, counts what it cannot use, and goes on."""
    EXAMPLES["test_fuzz_voice_gateway_core_never_raises"] += 1
    credentials = Credentials(server_id=1, user_id=USER_A, session_id="s", token="t")
    protocol = VoiceGatewayProtocol(credentials, channel_id=CHANNEL_ID, max_dave_protocol_version=1)
    protocol.connection_opened()
    for now, frame in enumerate(frames):
        before = protocol.malformed
        outputs = protocol.receive(frame, float(now))
        assert isinstance(outputs, list)
        if protocol.malformed > before:
            assert type(outputs[-1]).__name__ == "Malformed"
        assert protocol.seq is None or 0 <= protocol.seq <= 0xFFFF_FFFF


# ---- UDP ------------------------------------------------------------------------------------------------

_discovery_outcomes: Outcomes = Counter()


@budget(CI_EXAMPLES)
@given(mutated(datagrams()[:2]))
def test_fuzz_discovery(data: bytes) -> None:
    EXAMPLES["test_fuzz_discovery"] += 1
    _check(
        "discovery.parse_request", _discovery_outcomes, lambda: discovery.parse_request(data), ProtocolError
    )
    _check(
        "discovery.parse_response", _discovery_outcomes, lambda: discovery.parse_response(data), ProtocolError
    )


def test_fuzz_discovery_both_outcomes() -> None:
    _both("discovery", _discovery_outcomes)


_rtp_outcomes: Outcomes = Counter()


@budget(CI_EXAMPLES * 2)
@given(mutated(datagrams()), st.integers(0, len(ciphers()) - 1))
def test_fuzz_rtp_rtcp_and_transport_open(data: bytes, which: int) -> None:
    EXAMPLES["test_fuzz_rtp_rtcp_and_transport_open"] += 1
    cipher = ciphers()[which]
    INPUTS["rtp.is_rtcp"] += 1
    rtcp = rtp.is_rtcp(data)  # never raises
    _check("rtp.parse_rtp", _rtp_outcomes, lambda: rtp.parse_rtp(data), ProtocolError)
    _check("crypto.open_rtp", _rtp_outcomes, lambda: cipher.open_rtp(data), ProtocolError)
    _check("crypto.open_rtp_fields", _rtp_outcomes, lambda: cipher.open_rtp_fields(data), ProtocolError)
    if rtcp:
        _check("crypto.open_rtcp", _rtp_outcomes, lambda: cipher.open_rtcp(data), ProtocolError)


def test_fuzz_rtp_both_outcomes() -> None:
    _both("rtp", _rtp_outcomes)


def test_fuzz_open_rtp_and_open_rtp_fields_agree() -> None:
    """The SFU's fast path and the full parser accept exactly the same packets (checked on the samples)."""
    for cipher in ciphers():
        for packet in datagrams():
            full: object
            try:
                header, payload = cipher.open_rtp(packet)
                full = (header.sequence, header.timestamp, header.ssrc, payload)
            except ProtocolError:
                full = None
            try:
                fast: object = cipher.open_rtp_fields(packet)
            except ProtocolError:
                fast = None
            if fast is not None:
                assert full == fast


# ---- DAVE ------------------------------------------------------------------------------------------------

_dave_frame_outcomes: Outcomes = Counter()


@budget(CI_EXAMPLES)
@given(mutated((*dave_samples().media_frames, b"\xf8\xff\xfe")))
def test_fuzz_dave_frames(frame: bytes) -> None:
    """The footer check never raises; decrypting garbage raises only DaveDecryptError."""
    EXAMPLES["test_fuzz_dave_frames"] += 1
    INPUTS["dave.is_dave_frame"] += 1
    is_dave_frame(frame)
    client = dave_exchange()[1][USER_B]
    _check(
        "DaveClient.decrypt",
        _dave_frame_outcomes,
        lambda: client.decrypt(USER_A, frame),
        DaveDecryptError,
    )


def test_fuzz_dave_frames_both_outcomes() -> None:
    _both("DaveClient.decrypt", _dave_frame_outcomes)


_mls_outcomes: Outcomes = Counter()


def _mls_samples() -> tuple[bytes, ...]:
    s = dave_samples()
    return s.key_packages + s.commit_welcomes + s.commits + s.welcomes + s.proposals + (s.external_sender,)


@budget(CI_EXAMPLES * 2)
@given(mutated(_mls_samples()))
def test_fuzz_mls_parsers(data: bytes) -> None:
    EXAMPLES["test_fuzz_mls_parsers"] += 1
    _check("mls.parse_key_package", _mls_outcomes, lambda: mls.parse_key_package(data), ProtocolError)
    _check("mls.parse_commit_welcome", _mls_outcomes, lambda: mls.parse_commit_welcome(data), ProtocolError)
    _check("mls.parse_welcome", _mls_outcomes, lambda: mls.parse_welcome(data), ProtocolError)
    _check("mls.parse_proposal_refs", _mls_outcomes, lambda: mls.parse_proposal_refs(data), ProtocolError)
    _check(
        "mls.split_proposal_messages", _mls_outcomes, lambda: mls.split_proposal_messages(data), ProtocolError
    )


def test_fuzz_mls_both_outcomes() -> None:
    _both("mls", _mls_outcomes)


@budget(CI_EXAMPLES // 2)
@given(st.lists(st.tuples(st.integers(0, 2), mutated(_mls_samples())), min_size=1, max_size=8))
def test_fuzz_delivery_service_takes_garbage(inputs: list[tuple[int, bytes]]) -> None:
    """Garbage key packages and commits are counted and dropped by the DS, never raised."""
    EXAMPLES["test_fuzz_delivery_service_takes_garbage"] += 1
    ds = DaveDeliveryService(CHANNEL_ID)
    ds.member_connected(USER_A)
    for kind, data in inputs:
        if kind == 0:
            ds.key_package_received(USER_A, data)
        elif kind == 1:
            ds.commit_welcome_received(USER_A, data)
        else:
            ds.transition_ready(USER_A, int.from_bytes(data[:2] or b"\x00", "big"))
    assert ds.members == frozenset({USER_A})


# ---- main gateway --------------------------------------------------------------------------------------

_gateway_outcomes: Outcomes = Counter()


def _gateway_samples() -> tuple[str | bytes, ...]:
    user = {"id": str(USER_A), "username": "bot"}
    voice_state = {
        "guild_id": "1", "channel_id": "2", "user_id": str(USER_A), "session_id": "abc",
        "self_mute": False, "self_deaf": False, "deaf": False, "mute": False,
    }  # fmt: skip
    payloads: list[dict[str, Any]] = [
        {"op": 10, "d": {"heartbeat_interval": 41250}},
        {"op": 11, "d": None},
        {"op": 0, "s": 1, "t": "READY", "d": {"session_id": "x", "user": user, "guilds": [{"id": "1"}]}},
        {"op": 0, "s": 2, "t": "VOICE_STATE_UPDATE", "d": voice_state},
        {
            "op": 0,
            "s": 3,
            "t": "VOICE_SERVER_UPDATE",
            "d": {"guild_id": "1", "token": "t", "endpoint": "h:1"},
        },
        {
            "op": 0,
            "s": 4,
            "t": "GUILD_CREATE",
            "d": {
                "id": "1",
                "name": "g",
                "channels": [{"id": "2", "type": 2, "name": "v", "guild_id": "1"}],
                "voice_states": [voice_state],
            },
        },
        {"op": 0, "s": 5, "t": "CHANNEL_DELETE", "d": {"id": "2", "type": 2, "guild_id": "1"}},
        {"op": 7, "d": None},
        {"op": 9, "d": False},
    ]
    return tuple(json.dumps(p) for p in payloads)


@budget(CI_EXAMPLES * 2)
@given(json_frames(_gateway_samples()))
def test_fuzz_main_gateway_parsers(frame: str | bytes) -> None:
    """The main gateway core and the voice event parsers raise only ProtocolError."""
    EXAMPLES["test_fuzz_main_gateway_parsers"] += 1
    protocol = GatewayProtocol("token", 0, compress=False)
    protocol.connection_started()

    def decode_and_apply() -> None:
        payload = protocol.decode(frame)
        assert payload is not None
        protocol.receive(payload, 1.0)
        data = payload.get("d")
        name = payload.get("t")
        if name == "VOICE_STATE_UPDATE":
            gateway_events.parse_voice_state_update(data)
        elif name == "VOICE_SERVER_UPDATE":
            gateway_events.parse_voice_server_update(data)
        elif name == "GUILD_CREATE":
            gateway_events.parse_guild_create(data)
        elif name in ("CHANNEL_CREATE", "CHANNEL_UPDATE", "CHANNEL_DELETE"):
            gateway_events.parse_channel(data)

    _check("main gateway", _gateway_outcomes, decode_and_apply, ProtocolError)


def test_fuzz_main_gateway_both_outcomes() -> None:
    _both("main gateway", _gateway_outcomes)


_event_outcomes: Outcomes = Counter()


@budget(CI_EXAMPLES)
@given(JSON_VALUES)
def test_fuzz_voice_event_parsers_with_any_value(data: object) -> None:
    EXAMPLES["test_fuzz_voice_event_parsers_with_any_value"] += 1
    for name, parse in (
        ("parse_voice_state_update", gateway_events.parse_voice_state_update),
        ("parse_voice_server_update", gateway_events.parse_voice_server_update),
        ("parse_guild_create", gateway_events.parse_guild_create),
        ("parse_channel", gateway_events.parse_channel),
    ):
        _check(name, _event_outcomes, lambda parse=parse: parse(data), ProtocolError)  # type: ignore[misc]


# ---- audio files and Opus packets ------------------------------------------------------------------------

_dca_outcomes: Outcomes = Counter()


def _dca_sample() -> bytes:
    frames = [bytes([0xFC]) + bytes(range(n)) for n in (10, 20, 30)]
    body = b"".join(len(f).to_bytes(2, "little", signed=True) + f for f in frames)
    metadata = json.dumps({"dca": {"version": 1}, "opus": {"sample_rate": 48000, "channels": 2}}).encode()
    return b"DCA1" + len(metadata).to_bytes(4, "little", signed=True) + metadata + body


@budget(CI_EXAMPLES)
@given(mutated((_dca_sample(), _dca_sample()[4:])))
def test_fuzz_dca_reader(data: bytes) -> None:
    EXAMPLES["test_fuzz_dca_reader"] += 1

    def read_all() -> None:
        reader = DCAReader(io.BytesIO(data))
        for _ in range(100):
            if reader.read() is None:
                break

    _check("DCAReader", _dca_outcomes, read_all, AudioError)


def test_fuzz_dca_both_outcomes() -> None:
    _both("DCAReader", _dca_outcomes)


@budget(CI_EXAMPLES)
@given(st.binary(max_size=8))
def test_fuzz_opus_toc(packet: bytes) -> None:
    EXAMPLES["test_fuzz_opus_toc"] += 1
    INPUTS["opus.packet_samples"] += 1
    try:
        samples = packet_samples(packet)
    except (AudioError, ProtocolError, ValueError):
        return
    assert samples is None or 0 <= samples <= 5760
