"""Parsing the main gateway's dispatches and messages: valid shapes, Discord's quirks, and hostile input."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cordvoice.errors import ProtocolError
from cordvoice.gateway.events import (
    parse_channel,
    parse_guild_create,
    parse_voice_server_update,
    parse_voice_state_update,
)
from cordvoice.gateway.protocol import GatewayProtocol, Hello

STATE = {
    "guild_id": "41771983423143937",
    "channel_id": "127121515262115840",
    "user_id": "80351110224678912",
    "session_id": "90326bd25d71d39b9ef95b299e3872ff",
    "deaf": False,
    "mute": False,
    "self_deaf": False,
    "self_mute": True,
    "suppress": False,
    "self_video": False,
    "request_to_speak_timestamp": None,
    "member": {"user": {"id": "80351110224678912"}},
}


def test_voice_state_update() -> None:
    event = parse_voice_state_update(STATE)
    assert event.guild_id == 41771983423143937 and event.channel_id == 127121515262115840
    assert event.user_id == 80351110224678912 and event.self_mute and not event.self_deaf
    left = parse_voice_state_update(STATE | {"channel_id": None, "session_id": ""})
    assert left.channel_id is None
    in_guild_create = {k: v for k, v in STATE.items() if k != "guild_id"}
    assert parse_voice_state_update(in_guild_create, guild_id=5).guild_id == 5


@pytest.mark.parametrize(
    "bad",
    [
        None,
        [],
        {k: v for k, v in STATE.items() if k != "guild_id"},
        {k: v for k, v in STATE.items() if k != "channel_id"},
        STATE | {"user_id": "12a"},
        STATE | {"user_id": "0"},
        STATE | {"user_id": str(1 << 64)},
        STATE | {"user_id": True},
        STATE | {"session_id": 5},
        STATE | {"self_mute": "yes"},
    ],
)
def test_voice_state_update_rejects(bad: Any) -> None:
    with pytest.raises(ProtocolError):
        parse_voice_state_update(bad)


def test_voice_server_update() -> None:
    event = parse_voice_server_update(
        {"token": "abc", "guild_id": "41771983423143937", "endpoint": "x.discord.media:443"}
    )
    assert event.endpoint == "x.discord.media:443" and event.token == "abc"
    assert "abc" not in repr(event)
    assert event.voice_gateway_url() == "wss://x.discord.media:443/?v=8"
    assert event.voice_gateway_url(secure=False, version=7) == "ws://x.discord.media:443/?v=7"
    stripped = parse_voice_server_update({"token": "t", "guild_id": 1, "endpoint": "wss://127.0.0.1:5000/"})
    assert stripped.endpoint == "127.0.0.1:5000"
    waiting = parse_voice_server_update({"token": "t", "guild_id": "1", "endpoint": None})
    assert waiting.endpoint is None
    with pytest.raises(ProtocolError):
        waiting.voice_gateway_url()


@pytest.mark.parametrize(
    "bad",
    [
        {"guild_id": "1", "endpoint": "a:1"},
        {"token": "", "guild_id": "1", "endpoint": "a:1"},
        {"token": "t", "endpoint": "a:1"},
        {"token": "t", "guild_id": "1", "endpoint": 5},
        {"token": "t", "guild_id": "1", "endpoint": ""},
        {"token": "t", "guild_id": "1", "endpoint": "a b:1"},
        {"token": "t", "guild_id": "1", "endpoint": "evil.example/path"},
        "VOICE_SERVER_UPDATE",
    ],
)
def test_voice_server_update_rejects(bad: Any) -> None:
    with pytest.raises(ProtocolError):
        parse_voice_server_update(bad)


def test_guild_create_keeps_voice_channels_and_states() -> None:
    guild = parse_guild_create(
        {
            "id": "41771983423143937",
            "name": "g",
            "channels": [
                {"id": "1", "type": 0, "name": "text"},
                {"id": "2", "type": 2, "name": "voice", "user_limit": 0},
                {"id": "3", "type": 13, "name": "stage", "user_limit": 10},
            ],
            "voice_states": [{k: v for k, v in STATE.items() if k != "guild_id"}],
        }
    )
    assert [c.id for c in guild.voice_channels] == [2, 3]
    assert guild.voice_channels[0].user_limit is None and guild.voice_channels[1].is_stage
    assert guild.voice_states[0].guild_id == 41771983423143937
    assert parse_channel({"id": "9", "type": 4}) is None
    with pytest.raises(ProtocolError):
        parse_guild_create({"id": "1", "channels": {"not": "a list"}})
    with pytest.raises(ProtocolError):
        parse_channel({"id": "2", "type": 2})  # a voice channel needs its guild


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8) | st.sampled_from(["1", "wss://a:1", ""]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
keys = st.sampled_from(
    [
        "guild_id",
        "channel_id",
        "user_id",
        "session_id",
        "token",
        "endpoint",
        "id",
        "type",
        "channels",
        "voice_states",
        "self_mute",
        "name",
        "user_limit",
    ]
)
payloads = st.dictionaries(keys, json_values, max_size=8) | json_values


@given(payloads)
def test_parsers_raise_only_protocol_error(payload: Any) -> None:
    for parser in (parse_voice_state_update, parse_voice_server_update, parse_guild_create, parse_channel):
        with contextlib.suppress(ProtocolError):
            parser(payload)


def test_a_message_nested_beyond_the_stack_is_a_protocol_error() -> None:
    protocol = GatewayProtocol("token", 0, compress=False)
    protocol.connection_started()
    nested = '{"op":0,"s":2,"t":"X","d":' + "[" * 200_000 + "]" * 200_000 + "}"
    with pytest.raises(ProtocolError, match="nested"):
        protocol.decode(nested)


@pytest.mark.parametrize(
    "interval", ["NaN", "Infinity", "-Infinity", "1" + "0" * 400, "86400001", "0", "-5", "true", '"45000"']
)
def test_hello_needs_a_sane_heartbeat_interval(interval: str) -> None:
    protocol = GatewayProtocol("token", 0, compress=False)
    protocol.connection_started()
    payload = protocol.decode('{"op":10,"d":{"heartbeat_interval":' + interval + "}}")
    assert payload is not None
    with pytest.raises(ProtocolError, match="heartbeat_interval"):
        protocol.receive(payload, 0.0)


def test_hello_gives_the_heartbeat_interval_in_seconds() -> None:
    protocol = GatewayProtocol("token", 0, compress=False)
    protocol.connection_started()
    assert protocol.receive({"op": 10, "d": {"heartbeat_interval": 41250}}, 0.0) == Hello(41.25)
    with pytest.raises(ProtocolError, match="second Hello"):
        protocol.receive({"op": 10, "d": {"heartbeat_interval": 41250}}, 1.0)
    protocol.connection_started()  # a new socket gets its own Hello
    assert protocol.receive({"op": 10, "d": {"heartbeat_interval": 41250}}, 2.0) == Hello(41.25)
