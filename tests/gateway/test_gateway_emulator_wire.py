"""The emulator's main gateway and REST API seen from a raw WebSocket / HTTP client: the strict parts."""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import urllib.error
import urllib.request
import zlib
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from cordvoice.emulator import Emulator

from .conftest import World, build_world

GUILDS_AND_VOICE = (1 << 0) | (1 << 7)


def identify(token: str, intents: int = GUILDS_AND_VOICE, **extra: Any) -> str:
    return json.dumps({"op": 2, "d": {"token": token, "intents": intents, "properties": {}, **extra}})


async def recv_json(ws: ClientConnection) -> dict[str, Any]:
    async with asyncio.timeout(5):
        payload: dict[str, Any] = json.loads(await ws.recv())
    return payload


async def recv_until(ws: ClientConnection, event: str) -> dict[str, Any]:
    while True:
        payload = await recv_json(ws)
        if payload.get("t") == event:
            return payload


async def close_code_after(ws: ClientConnection, *messages: str | bytes) -> int | None:
    """Send messages, then read until the emulator closes; returns the close code it sent."""
    for message in messages:
        await ws.send(message)
    async with asyncio.timeout(5):
        try:
            while True:
                await ws.recv()
        except ConnectionClosed as exc:
            return None if exc.rcvd is None else exc.rcvd.code


async def logged_in(world: World, intents: int = GUILDS_AND_VOICE) -> ClientConnection:
    ws = await connect(world.emu.gateway_url + "/?v=10&encoding=json")
    hello = await recv_json(ws)
    assert hello["op"] == 10 and hello["d"]["heartbeat_interval"] == 41250
    await ws.send(identify(world.bot.token, intents))
    return ws


async def test_ready_and_guild_create_carry_the_world(world: World) -> None:
    human = world.emu.create_user("dave")
    world.emu.add_member(world.guild.id, human.id)
    world.emu.set_voice_state(world.guild.id, human.id, world.channel.id, self_mute=True)
    async with await logged_in(world) as ws:
        ready = await recv_json(ws)
        assert (ready["op"], ready["t"], ready["s"]) == (0, "READY", 1)
        data = ready["d"]
        assert data["user"]["id"] == str(world.bot.user_id) and data["user"]["bot"] is True
        assert data["guilds"] == [{"id": str(world.guild.id), "unavailable": True}]
        assert data["resume_gateway_url"] == world.emu.gateway_url
        assert len(data["session_id"]) == 32
        guild = await recv_json(ws)
        assert (guild["t"], guild["s"]) == ("GUILD_CREATE", 2)
        channels = {c["id"]: c for c in guild["d"]["channels"]}
        assert channels[str(world.channel.id)]["type"] == 2
        assert [s["user_id"] for s in guild["d"]["voice_states"]] == [str(human.id)]
        assert guild["d"]["voice_states"][0]["self_mute"] is True
        member_ids = {m["user"]["id"] for m in guild["d"]["members"]}
        assert member_ids == {str(world.bot.user_id), str(human.id)}


async def test_intents_filter_voice_states(world: World) -> None:
    async with await logged_in(world, intents=1) as ws:
        await recv_json(ws)
        guild = await recv_json(ws)
        assert "voice_states" not in guild["d"]
        human = world.emu.create_user("erin")
        world.emu.add_member(world.guild.id, human.id)
        world.emu.set_voice_state(world.guild.id, human.id, world.channel.id)
        # Without GUILD_VOICE_STATES the bot still gets its own VOICE_SERVER_UPDATE, but no voice states.
        await ws.send(
            json.dumps(
                {
                    "op": 4,
                    "d": {
                        "guild_id": str(world.guild.id),
                        "channel_id": str(world.channel.id),
                        "self_mute": False,
                        "self_deaf": False,
                    },
                }
            )
        )
        nxt = await recv_json(ws)
        assert nxt["t"] == "VOICE_SERVER_UPDATE"


async def test_without_the_guilds_intent_no_guild_create_comes(world: World) -> None:
    """GUILD_CREATE belongs to the GUILDS intent: READY still lists the guilds, unavailable, and nothing fills
    them in, so a bot that forgot the intent cannot find its voice channel here either."""
    async with await logged_in(world, intents=1 << 7) as ws:
        ready = await recv_json(ws)
        assert ready["t"] == "READY"
        assert ready["d"]["guilds"] == [{"id": str(world.guild.id), "unavailable": True}]
        other = world.emu.create_guild("joined later")
        world.emu.add_member(other.id, world.bot.user_id)
        await ws.send(json.dumps({"op": 1, "d": ready["s"]}))
        assert (await recv_json(ws))["op"] == 11, "no GUILD_CREATE came before the heartbeat ACK"


async def test_zlib_stream_uses_one_context_with_sync_flush(world: World) -> None:
    async with connect(world.emu.gateway_url + "/?v=10&encoding=json&compress=zlib-stream") as ws:
        inflater = zlib.decompressobj()
        raw: list[bytes] = []
        frames = []
        for index in range(3):
            if index == 1:
                await ws.send(identify(world.bot.token))
            async with asyncio.timeout(5):
                frame = await ws.recv()
            assert isinstance(frame, bytes) and frame.endswith(b"\x00\x00\xff\xff")
            raw.append(frame)
            frames.append(json.loads(inflater.decompress(frame)))
        assert [f["op"] for f in frames] == [10, 0, 0]
        assert [f["t"] for f in frames[1:]] == ["READY", "GUILD_CREATE"]
        assert world.emu.gateway_connections[0].compress
        # One stream per connection: a later frame is not readable on its own.
        with pytest.raises(zlib.error):
            zlib.decompressobj().decompress(raw[2])


@pytest.mark.parametrize(
    ("messages", "code"),
    [
        (["{not json"], 4002),
        (['["a list"]'], 4002),
        (['{"op": "1"}'], 4002),
        (['{"op": 1, "d": "x"}'], 4002),
        (['{"op": 99, "d": null}'], 4001),
        (['{"op": 0, "d": {}}'], 4001),
        (
            ['{"op": 4, "d": {"guild_id": "1", "channel_id": null, "self_mute": false, "self_deaf": false}}'],
            4003,
        ),
        (["{}" + " " * 5000], 4002),
        ([identify("wrong-token")], 4004),
        (['{"op": 2, "d": {"token": "x", "properties": {}}}'], 4002),
        ([json.dumps({"op": 6, "d": {"token": "x", "session_id": 5, "seq": 0}})], 4002),
    ],
)
async def test_client_mistakes_get_the_documented_close_codes(
    world: World, messages: list[str], code: int
) -> None:
    async with connect(world.emu.gateway_url + "/?v=10&encoding=json") as ws:
        await recv_json(ws)
        assert await close_code_after(ws, *messages) == code
    assert world.emu.main_gateway.stats.closes[code] == 1
    # The emulator stays up: a well-behaved client still logs in.
    async with await logged_in(world) as ws:
        assert (await recv_json(ws))["t"] == "READY"


async def test_authenticated_mistakes(world: World) -> None:
    stats = world.emu.main_gateway.stats
    async with await logged_in(world) as ws:
        await recv_until(ws, "GUILD_CREATE")
        assert await close_code_after(ws, identify(world.bot.token)) == 4005
    async with await logged_in(world) as ws:
        await recv_until(ws, "GUILD_CREATE")
        bad_op4 = json.dumps({"op": 4, "d": {"guild_id": "nope", "channel_id": None}})
        assert await close_code_after(ws, bad_op4) == 4002
    async with connect(world.emu.gateway_url + "/?v=10") as ws:
        await recv_json(ws)
        assert await close_code_after(ws, identify(world.bot.token, intents=1 << 30)) == 4013
    async with connect(world.emu.gateway_url + "/?v=10") as ws:
        await recv_json(ws)
        assert await close_code_after(ws, identify(world.bot.token, shard=[1, 1])) == 4010
    async with connect(world.emu.gateway_url + "/?v=8") as ws:
        assert await close_code_after(ws) == 4012
    async with connect(world.emu.gateway_url + "/?v=10&compress=zstd-stream") as ws:
        assert await close_code_after(ws) == 1003
    assert (stats.closes[4005], stats.closes[4002], stats.closes[4013], stats.closes[4010]) == (1, 1, 1, 1)
    assert (stats.closes[4012], stats.closes[1003]) == (1, 1)


async def test_ignored_voice_requests_are_counted(world: World) -> None:
    stats = world.emu.main_gateway.stats
    full = world.emu.create_voice_channel(world.guild.id, "Tiny", user_limit=1)
    human = world.emu.create_user("frank")
    world.emu.add_member(world.guild.id, human.id)
    world.emu.set_voice_state(world.guild.id, human.id, full.id)
    async with await logged_in(world) as ws:
        await recv_until(ws, "GUILD_CREATE")
        for guild_id, channel_id in [
            (world.guild.id, full.id),
            (world.guild.id, 12345),
            (999, world.channel.id),
        ]:
            await ws.send(
                json.dumps(
                    {
                        "op": 4,
                        "d": {
                            "guild_id": str(guild_id),
                            "channel_id": str(channel_id),
                            "self_mute": False,
                            "self_deaf": False,
                        },
                    }
                )
            )
        await ws.send(json.dumps({"op": 1, "d": None}))
        assert (await recv_json(ws))["op"] == 11  # nothing came before the ACK
    assert stats.voice_requests == 3 and stats.voice_requests_ignored == 3


async def test_rate_limit_closes_with_4008() -> None:
    async with Emulator(rate_limit=(5, 60.0)) as emu:
        world = build_world(emu)
        async with connect(emu.gateway_url) as ws:
            await recv_json(ws)
            beats = [json.dumps({"op": 1, "d": None})] * 6
            assert await close_code_after(ws, *beats) == 4008
        assert world.emu.main_gateway.stats.closes[4008] == 1


async def test_heartbeat_timeout_closes_with_4009() -> None:
    async with Emulator(heartbeat_interval=0.1) as emu:
        world = build_world(emu)
        async with connect(emu.gateway_url) as ws:
            await recv_json(ws)
            await ws.send(identify(world.bot.token))
            started = asyncio.get_running_loop().time()
            assert await close_code_after(ws) == 4009
            elapsed = asyncio.get_running_loop().time() - started
        assert 0.15 <= elapsed < 2.0
        # The timed-out session cannot be resumed.
        assert emu.main_gateway.hub.sessions == {}


async def test_resume_replays_missed_dispatches_then_resumed(world: World) -> None:
    emu = world.emu
    async with await logged_in(world) as ws:
        ready = await recv_json(ws)
        session_id = ready["d"]["session_id"]
        last = (await recv_json(ws))["s"]
        await ws.close(4000)
    human = emu.create_user("gina")
    emu.add_member(world.guild.id, human.id)
    emu.set_voice_state(world.guild.id, human.id, world.channel.id)
    emu.set_voice_state(world.guild.id, human.id, None)
    async with connect(emu.gateway_url) as ws:
        await recv_json(ws)
        await ws.send(
            json.dumps({"op": 6, "d": {"token": world.bot.token, "session_id": session_id, "seq": last}})
        )
        replayed = [await recv_json(ws) for _ in range(3)]
    assert [p["t"] for p in replayed] == ["VOICE_STATE_UPDATE", "VOICE_STATE_UPDATE", "RESUMED"]
    assert [p["s"] for p in replayed] == [last + 1, last + 2, last + 3]
    assert replayed[1]["d"]["channel_id"] is None
    assert emu.main_gateway.stats.replayed == 2


async def test_resume_failures(world: World) -> None:
    emu = world.emu
    async with await logged_in(world) as ws:
        session_id = (await recv_json(ws))["d"]["session_id"]
        await ws.close(4000)
    async with connect(emu.gateway_url) as ws:
        await recv_json(ws)
        ahead = {"op": 6, "d": {"token": world.bot.token, "session_id": session_id, "seq": 999}}
        assert await close_code_after(ws, json.dumps(ahead)) == 4007
    async with connect(emu.gateway_url) as ws:
        await recv_json(ws)
        # 4007 ended the session: the resume now gets op 9 d=false, and the same socket may identify.
        await ws.send(
            json.dumps({"op": 6, "d": {"token": world.bot.token, "session_id": session_id, "seq": 1}})
        )
        assert await recv_json(ws) == {"op": 9, "d": False, "s": None, "t": None}
        await ws.send(identify(world.bot.token))
        assert (await recv_json(ws))["t"] == "READY"
    assert emu.main_gateway.stats.invalid_sessions == 1


async def test_client_close_1000_ends_session_other_codes_keep_it(world: World) -> None:
    hub = world.emu.main_gateway.hub
    async with await logged_in(world) as ws:
        await recv_until(ws, "GUILD_CREATE")
        await ws.close(4000)
    await asyncio.sleep(0.05)
    assert len(hub.sessions) == 1 and next(iter(hub.sessions.values())).connection is None
    async with await logged_in(world) as ws:
        await recv_until(ws, "GUILD_CREATE")
    await asyncio.sleep(0.05)
    assert len(hub.sessions) == 1, "the 1000 close ended the second session only"


def http_get(
    url: str, token: str | None = None, *, method: str = "GET", context: ssl.SSLContext | None = None
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bot {token}"} if token else {}
    request = urllib.request.Request(url, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=5, context=context) as response:
            assert response.headers["Content-Type"] == "application/json"
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


async def test_rest_routes(world: World, caplog: pytest.LogCaptureFixture) -> None:
    base, token = world.emu.api_base, world.bot.token

    async def get(path: str, token: str | None = token, method: str = "GET") -> tuple[int, Any]:
        return await asyncio.to_thread(http_get, base + path, token, method=method)

    assert await get("/gateway", None) == (200, {"url": world.emu.gateway_url})
    status, body = await get("/gateway/bot")
    assert status == 200 and body["url"] == world.emu.gateway_url and body["shards"] == 1
    assert body["session_start_limit"]["remaining"] == 1000
    status, me = await get("/users/@me")
    assert status == 200 and me["id"] == str(world.bot.user_id) and me["bot"] is True
    status, app = await get("/oauth2/applications/@me")
    assert (
        status == 200 and app["id"] == str(world.bot.user_id) and app["owner"]["id"] == str(world.bot.user_id)
    )
    status, channel = await get(f"/channels/{world.channel.id}")
    assert status == 200 and channel["type"] == 2
    assert (await get(f"/guilds/{world.guild.id}"))[1]["name"] == "test guild"
    assert await get("/users/@me", "bad") == (401, {"message": "401: Unauthorized", "code": 0})
    assert (await get("/users/@me", None))[0] == 401
    assert (await get("/channels/123"))[1]["code"] == 10003
    with caplog.at_level(logging.WARNING, logger="cordvoice.emulator.rest"):
        assert await get("/guilds/1/bans") == (404, {"message": "404: Not Found", "code": 0})
    assert "no route for GET /api/v10/guilds/1/bans" in caplog.text
    assert (await get("/users/@me", method="DELETE"))[0] == 405
    stats = world.emu.rest.stats
    assert (stats.unauthorized, stats.not_found, stats.method_not_allowed) == (2, 1, 1)
    assert stats.requests["/users/@me"] == 3


async def test_tls_serves_rest_and_gateway_with_a_private_ca() -> None:
    async with Emulator(tls=True) as emu:
        world = build_world(emu)
        assert emu.gateway_url.startswith("wss://") and emu.api_base.startswith("https://")
        assert emu.ca_file is not None and emu.ca_file.read_text().startswith("-----BEGIN CERTIFICATE-----")
        status, me = await asyncio.to_thread(
            http_get, emu.api_base + "/users/@me", world.bot.token, context=emu.client_ssl_context()
        )
        assert status == 200 and me["id"] == str(world.bot.user_id)
        async with connect(emu.gateway_url, ssl=emu.client_ssl_context()) as ws:
            assert (await recv_json(ws))["op"] == 10
        # Without the CA the certificate is rejected: verification really happens.
        with pytest.raises(ssl.SSLCertVerificationError):
            async with connect(emu.gateway_url, ssl=ssl.create_default_context()):
                pass
        ca_file = emu.ca_file
    assert not ca_file.exists()


async def test_shutdown_closes_everything_and_leaves_no_tasks() -> None:
    before = asyncio.all_tasks()
    emu = Emulator(voice_servers=2)
    await emu.start()
    world = build_world(emu)
    ws = await logged_in(world)
    await recv_until(ws, "GUILD_CREATE")
    await emu.close()
    with pytest.raises(ConnectionClosed):
        async with asyncio.timeout(5):
            while True:
                await ws.recv()
    await ws.close()
    await asyncio.sleep(0)
    assert asyncio.all_tasks() - before == set()
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", emu.port)


async def test_non_loopback_host_warns(caplog: pytest.LogCaptureFixture) -> None:
    # An unresolvable name: the warning is logged before binding fails, and nothing is left running.
    with caplog.at_level(logging.WARNING, logger="cordvoice.emulator.server"), pytest.raises(OSError):
        async with Emulator(host="emulator.invalid"):
            pass
    assert "not a loopback address" in caplog.text
