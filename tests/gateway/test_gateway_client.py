"""cordvoice.gateway.Client against the emulator's main gateway, over real loopback sockets."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from cordvoice.emulator import Emulator
from cordvoice.errors import GatewayError, InvalidArgumentError
from cordvoice.gateway import Client, VoiceAdapter, VoiceServerUpdate, VoiceStateUpdate

from .conftest import Recorder, World, build_world


def make_client(world: World, **kwargs: Any) -> Client:
    kwargs.setdefault("backoff_base", 0.01)
    return Client(world.bot.token, gateway_url=world.emu.gateway_url, api_base=world.emu.api_base, **kwargs)


@contextlib.asynccontextmanager
async def scripted_gateway(guilds: list[Any], *after_ready: str) -> AsyncIterator[str]:
    """A main gateway that says Hello, takes the Identify, sends READY with ``guilds``, then the raw frames
    ``after_ready`` (what the emulator never sends); yields its URL."""

    async def handler(ws: ServerConnection) -> None:
        await ws.send(json.dumps({"op": 10, "d": {"heartbeat_interval": 45000}}))
        await ws.recv()
        ready = {"session_id": "abc", "user": {"id": "1234567890"}, "guilds": guilds}
        await ws.send(json.dumps({"op": 0, "s": 1, "t": "READY", "d": ready}))
        for frame in after_ready:
            await ws.send(frame)
        with contextlib.suppress(ConnectionClosed):
            await ws.wait_closed()

    async with serve(handler, "127.0.0.1", 0, compression=None) as server:
        yield f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}"


async def test_login_fills_the_guild_cache(world: World) -> None:
    async with make_client(world) as client:
        assert isinstance(client, VoiceAdapter)
        assert client.user_id == world.bot.user_id
        assert client.session_id is not None
        guild = client.guilds[world.guild.id]
        assert set(guild.voice_channels) == {world.channel.id, world.other_channel.id}
        assert guild.voice_channels[world.channel.id].name == "General"
        assert world.emu.main_gateway.stats.identifies == 1


async def test_guild_cache_includes_existing_voice_states_and_new_channels(world: World) -> None:
    human = world.emu.create_user("alice")
    world.emu.add_member(world.guild.id, human.id)
    world.emu.set_voice_state(world.guild.id, human.id, world.channel.id)
    async with make_client(world) as client:
        state = client.voice_state(world.guild.id, human.id)
        assert state is not None and state.channel_id == world.channel.id
        stage = world.emu.create_stage_channel(world.guild.id)
        async with asyncio.timeout(5):
            while stage.id not in client.guilds[world.guild.id].voice_channels:
                await asyncio.sleep(0.01)
        assert client.guilds[world.guild.id].voice_channels[stage.id].is_stage


async def test_join_move_leave_deliver_events_with_fresh_tokens(world: World) -> None:
    recorder = Recorder()
    async with make_client(world) as client:
        client.set_listener(recorder)
        await client.update_voice_state(world.guild.id, world.channel.id, self_deaf=True)
        state, server = await recorder.pair()
        assert state.user_id == world.bot.user_id
        assert state.channel_id == world.channel.id
        assert state.session_id == client.session_id
        assert state.self_deaf and not state.self_mute
        assert server.guild_id == world.guild.id
        endpoint = world.emu.state.guild_voice_server(world.guild.id).endpoint
        assert server.endpoint == endpoint
        assert server.voice_gateway_url() == f"wss://{endpoint}/?v=8"
        session = world.emu.state.lookup_voice_session(
            world.guild.id, world.bot.user_id, state.session_id, server.token
        )
        assert session is not None and session.channel_id == world.channel.id

        await client.update_voice_state(world.guild.id, world.other_channel.id)
        moved, moved_server = await recorder.pair()
        assert moved.channel_id == world.other_channel.id
        assert moved_server.token != server.token
        assert (
            world.emu.state.lookup_voice_session(
                world.guild.id, world.bot.user_id, state.session_id, server.token
            )
            is None
        )

        await client.update_voice_state(world.guild.id, None)
        left = await recorder.next()
        assert isinstance(left, VoiceStateUpdate) and left.channel_id is None
        assert client.voice_state(world.guild.id, world.bot.user_id) is None
        assert recorder.events.empty()


async def test_flag_only_update_keeps_the_voice_session_and_a_repeat_gets_both_updates(world: World) -> None:
    recorder = Recorder()
    async with make_client(world) as client:
        client.set_listener(recorder)
        await client.update_voice_state(world.guild.id, world.channel.id)
        _, server = await recorder.pair()
        await client.update_voice_state(world.guild.id, world.channel.id, self_mute=True)
        muted = await recorder.next()
        assert isinstance(muted, VoiceStateUpdate) and muted.self_mute
        await asyncio.sleep(0.05)
        assert recorder.events.empty(), "a mute toggle must not issue a new voice server update"
        # The same op 4 again (discord.py after 4015, discord.js rejoin): both updates, the same token and
        # endpoint while the voice session is valid.
        await client.update_voice_state(world.guild.id, world.channel.id, self_mute=True)
        repeated_state, repeated = await recorder.pair()
        assert repeated_state.channel_id == world.channel.id and repeated_state.self_mute
        assert (repeated.token, repeated.endpoint) == (server.token, server.endpoint)
        # Once the voice side revokes the session (e.g. after 4006), the same channel gets a new token.
        world.emu.state.revoke_voice_session(world.guild.id, world.bot.user_id)
        await client.update_voice_state(world.guild.id, world.channel.id, self_mute=True)
        _, again = await recorder.pair()
        assert again.token != server.token and again.endpoint == server.endpoint
        await asyncio.sleep(0.05)
        assert recorder.events.empty(), "exactly one VOICE_SERVER_UPDATE per op 4"


async def test_participants_kicks_and_server_moves_reach_the_listener(world: World) -> None:
    emu = world.emu
    recorder = Recorder()
    human = emu.create_user("bob")
    emu.add_member(world.guild.id, human.id)
    async with make_client(world) as client:
        client.set_listener(recorder)
        emu.set_voice_state(world.guild.id, human.id, world.channel.id)
        joined = await recorder.next()
        assert isinstance(joined, VoiceStateUpdate) and joined.user_id == human.id
        emu.set_voice_state(world.guild.id, human.id, None)
        left = await recorder.next()
        assert isinstance(left, VoiceStateUpdate) and left.user_id == human.id and left.channel_id is None

        await client.update_voice_state(world.guild.id, world.channel.id)
        _, first = await recorder.pair()
        second_server = await emu.add_voice_server()
        await emu.move_guild(world.guild.id, second_server.id, null_endpoint_first=True)
        gone = await recorder.next()
        assert isinstance(gone, VoiceServerUpdate) and gone.endpoint is None
        moved = await recorder.next()
        assert isinstance(moved, VoiceServerUpdate)
        assert moved.endpoint == second_server.endpoint and moved.token != first.token

        emu.disconnect_member(world.guild.id, world.bot.user_id)
        kicked = await recorder.next()
        assert isinstance(kicked, VoiceStateUpdate) and kicked.channel_id is None
        assert kicked.user_id == world.bot.user_id


async def test_bad_token_is_a_clear_gateway_error(world: World) -> None:
    client = Client("not-a-real-token", gateway_url=world.emu.gateway_url, api_base=world.emu.api_base)
    with pytest.raises(GatewayError, match="4004"):
        await client.start()
    assert world.emu.main_gateway.stats.closes[4004] == 1
    # Discovery through REST says the same thing without opening a socket.
    discovering = Client("not-a-real-token", api_base=world.emu.api_base)
    with pytest.raises(GatewayError, match="401"):
        await discovering.start()
    assert world.emu.rest.stats.unauthorized == 1


async def test_gateway_discovery_through_rest(world: World) -> None:
    async with Client(world.bot.token, api_base=world.emu.api_base) as client:
        assert client.user_id == world.bot.user_id
    assert world.emu.rest.stats.requests["/gateway/bot"] == 1


async def test_unreachable_gateway_fails_start_quickly() -> None:
    async with Emulator(voice_servers=0) as emu:
        url = emu.gateway_url
    client = Client("token", gateway_url=url)
    async with asyncio.timeout(5):
        with pytest.raises(GatewayError, match="could not connect"):
            await client.start()


async def test_a_start_that_times_out_while_the_socket_opens_returns_at_once() -> None:
    """A gateway that accepts TCP and never answers the WebSocket handshake: start() gives up after its
    ready_timeout, and close() (which start() runs) must not wait 5 s for the opening socket first."""
    accepted: list[asyncio.StreamWriter] = []

    async def silent(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    async with server:
        url = f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        client = Client("token", gateway_url=url, ready_timeout=0.3)
        started = asyncio.get_running_loop().time()
        with pytest.raises(GatewayError, match="did not become ready"):
            await client.start()
        assert asyncio.get_running_loop().time() - started < 2.0
        for writer in accepted:
            writer.close()


async def test_resume_after_a_drop_replays_missed_dispatches(world: World) -> None:
    emu = world.emu
    recorder = Recorder()
    human = emu.create_user("carol")
    emu.add_member(world.guild.id, human.id)
    async with make_client(world) as client:
        client.set_listener(recorder)
        session_id = client.session_id
        # Cut TCP without a close frame, then change the world before the client can come back.
        await emu.main_gateway.drop(user_id=world.bot.user_id)
        emu.set_voice_state(world.guild.id, human.id, world.channel.id)
        missed = await recorder.next()
        assert isinstance(missed, VoiceStateUpdate) and missed.user_id == human.id
        async with asyncio.timeout(5):
            while not client.is_ready:
                await asyncio.sleep(0.01)
        assert client.session_id == session_id
        assert client.stats.resumes == 1 and client.stats.identifies == 1
        assert emu.main_gateway.stats.resumes == 1
        assert emu.main_gateway.stats.replayed >= 1
        assert recorder.sessions_lost == 0
        # The resumed socket carries op 4 again.
        await client.update_voice_state(world.guild.id, world.channel.id)
        state, _ = await recorder.pair()
        assert state.session_id == session_id


async def test_reconnect_request_resumes(world: World) -> None:
    async with make_client(world) as client:
        assert world.emu.main_gateway.request_reconnect(user_id=world.bot.user_id) == 1
        async with asyncio.timeout(5):
            while client.stats.resumes < 1 or not client.is_ready:
                await asyncio.sleep(0.01)
        assert world.emu.main_gateway.stats.resumes == 1


async def test_invalid_session_identifies_again_and_tells_the_listener(world: World) -> None:
    recorder = Recorder()
    async with make_client(world) as client:
        client.set_listener(recorder)
        await client.update_voice_state(world.guild.id, world.channel.id)
        await recorder.pair()
        old_session = client.session_id
        assert old_session is not None
        world.emu.main_gateway.invalidate_session(old_session)
        assert await recorder.next() == "session_lost"
        async with asyncio.timeout(5):
            while not client.is_ready or client.session_id == old_session:
                await asyncio.sleep(0.01)
        assert client.stats.identifies == 2 and client.stats.invalid_sessions == 1
        # The voice state belonged to the dead session: the new session's GUILD_CREATE no longer shows it.
        assert world.emu.state.voice_state(world.guild.id, world.bot.user_id) is None
        async with asyncio.timeout(5):
            while world.guild.id not in client.guilds:
                await asyncio.sleep(0.01)
        assert client.voice_state(world.guild.id, world.bot.user_id) is None


async def test_zombie_connection_is_detected_and_resumed() -> None:
    async with Emulator(heartbeat_interval=0.1) as emu:
        world = build_world(emu)
        async with make_client(world) as client:
            emu.gateway_connections[0].ack_heartbeats = False
            async with asyncio.timeout(5):
                while client.stats.resumes < 1 or not client.is_ready:
                    await asyncio.sleep(0.01)
            assert client.stats.zombie_connections == 1
            assert emu.main_gateway.stats.acks_withheld >= 1
            # The resumed socket acknowledges again, which gives a latency reading.
            async with asyncio.timeout(5):
                while client.stats.heartbeat_acks < 1:
                    await asyncio.sleep(0.01)
            assert client.latency is not None and 0 <= client.latency < 1


async def test_compressed_stream_and_close_ends_the_session(world: World) -> None:
    recorder = Recorder()
    async with make_client(world, compress=True) as client:
        assert world.emu.gateway_connections[0].compress
        client.set_listener(recorder)
        await client.update_voice_state(world.guild.id, world.channel.id)
        await recorder.pair()
    # A client close (1000) ends the session on Discord's side, and with it the bot's voice state.
    async with asyncio.timeout(5):
        while world.emu.main_gateway.hub.sessions:
            await asyncio.sleep(0.01)
    assert world.emu.state.voice_state(world.guild.id, world.bot.user_id) is None


async def test_heartbeat_timeout_ends_the_session_and_the_client_identifies_again() -> None:
    async with Emulator(heartbeat_interval=0.1, heartbeat_timeout=0.15) as emu:
        world = build_world(emu)
        recorder = Recorder()
        async with make_client(world) as client:
            client.set_listener(recorder)
            old = client.session_id
            # From the next heartbeat on, the emulator's deadline is "now": as if the client had gone quiet.
            emu.gateway_connections[0].heartbeat_timeout = 0.0
            assert await recorder.next() == "session_lost"
            async with asyncio.timeout(5):
                while not client.is_ready or client.session_id == old:
                    await asyncio.sleep(0.01)
            assert emu.main_gateway.stats.closes[4009] >= 1


async def test_update_voice_state_validates_and_fails_after_close(world: World) -> None:
    client = make_client(world)
    await client.start()
    with pytest.raises(InvalidArgumentError):
        await client.update_voice_state(0, world.channel.id)
    await client.close()
    with pytest.raises(GatewayError):
        await client.update_voice_state(world.guild.id, world.channel.id)


async def test_listener_errors_are_counted_not_fatal(world: World) -> None:
    class Broken(Recorder):
        def on_voice_state_update(self, event: VoiceStateUpdate) -> None:
            raise RuntimeError("listener bug")

    broken = Broken()
    async with make_client(world) as client:
        client.set_listener(broken)
        await client.update_voice_state(world.guild.id, world.channel.id)
        server = await broken.next()
        assert isinstance(server, VoiceServerUpdate)
        assert client.stats.listener_errors == 1
        assert client.is_ready


async def test_client_shutdown_leaves_no_tasks(world: World) -> None:
    before = asyncio.all_tasks()
    async with make_client(world) as client:
        await client.update_voice_state(world.guild.id, world.channel.id)
    await asyncio.sleep(0)
    assert asyncio.all_tasks() - before == set()


async def test_a_drop_while_identifying_after_an_invalid_session_reconnects(world: World) -> None:
    # backoff_base 0.3: the client waits 0.3-1.5 s after op 9 before its Identify, on a socket cut meanwhile.
    async with make_client(world, backoff_base=0.3) as client:
        old = client.session_id
        assert old is not None
        world.emu.main_gateway.invalidate_session(old)
        async with asyncio.timeout(5):
            while client.is_ready:
                await asyncio.sleep(0.01)
        await world.emu.main_gateway.drop(user_id=world.bot.user_id)
        async with asyncio.timeout(8):
            while not client.is_ready or client.session_id in (None, old):
                await asyncio.sleep(0.02)
        # Three Identify attempts, the one in the middle on the cut socket; two reached the emulator.
        assert client.stats.identifies == 3 and client.stats.connects == 2
        assert world.emu.main_gateway.stats.identifies == 2


async def test_without_reconnect_a_drop_ends_the_client_and_wakes_a_waiting_caller(world: World) -> None:
    client = make_client(world, backoff_base=0.3, reconnect=False, request_timeout=30.0)
    await client.start()
    try:
        assert client.session_id is not None
        world.emu.main_gateway.invalidate_session(client.session_id)
        async with asyncio.timeout(5):
            while client.is_ready:
                await asyncio.sleep(0.01)
        pending = asyncio.create_task(client.update_voice_state(world.guild.id, world.channel.id))
        await world.emu.main_gateway.drop(user_id=world.bot.user_id)
        # The Identify fails on the cut socket: the client stops, and the waiting caller hears of it at once.
        async with asyncio.timeout(5):
            with pytest.raises(GatewayError, match="closed"):
                await pending
            with pytest.raises(GatewayError, match="reconnect=False"):
                await client.wait_closed()
    finally:
        await client.close()


async def test_a_caller_waiting_for_readiness_fails_at_once_on_close(world: World) -> None:
    client = make_client(world, backoff_base=1.0, request_timeout=30.0)
    await client.start()
    assert client.session_id is not None
    world.emu.main_gateway.invalidate_session(client.session_id)  # not ready for 1-5 s
    async with asyncio.timeout(5):
        while client.is_ready:
            await asyncio.sleep(0.01)
    pending = asyncio.create_task(client.update_voice_state(world.guild.id, world.channel.id))
    await asyncio.sleep(0.05)
    assert not pending.done()
    async with asyncio.timeout(1):
        await client.close()
        with pytest.raises(GatewayError, match="closed"):
            await pending


async def test_an_unexpected_failure_stops_the_client_with_a_gateway_error(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with make_client(world) as client:

        def broken(event: object) -> None:
            raise RuntimeError("a bug in a dispatch handler")

        monkeypatch.setattr(client, "_on_dispatch", broken)
        world.emu.create_voice_channel(world.guild.id, "Third")  # CHANNEL_CREATE
        async with asyncio.timeout(5):
            with pytest.raises(GatewayError, match="a bug in a dispatch handler"):
                await client.wait_closed()


async def test_concurrent_voice_state_updates_respect_the_send_limit(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    loop = asyncio.get_running_loop()
    hub = world.emu.main_gateway.hub
    arrivals: list[float] = []
    original = hub.request_voice_state

    def spy(session: Any, data: object) -> None:
        arrivals.append(loop.time())
        original(session, data)

    monkeypatch.setattr(hub, "request_voice_state", spy)
    limit, period = 3, 0.5
    async with make_client(world, send_limit=(limit, period)) as client:
        channels = [world.channel.id, world.other_channel.id]
        await asyncio.gather(*(client.update_voice_state(world.guild.id, channels[i % 2]) for i in range(6)))
        async with asyncio.timeout(5):
            while len(arrivals) < 6:
                await asyncio.sleep(0.01)
    # Callers that wait together must not all take the one freed slot: no window of ``period`` (less a margin
    # for delivery jitter) holds more than ``limit`` op 4s.
    busiest = max(sum(1 for u in arrivals if t <= u < t + period * 0.8) for t in arrivals)
    assert busiest <= limit, [round(t - arrivals[0], 3) for t in arrivals]


async def test_a_voice_state_update_waits_for_the_send_limit_beyond_the_request_timeout(world: World) -> None:
    # request_timeout bounds waiting for a connection; a queue behind the send limit is not "not connected"
    # (it used to fail a burst of joins or leaves with "could not send ... not connected").
    async with make_client(world, send_limit=(2, 2.0), request_timeout=0.5) as client:  # Identify took one
        await client.update_voice_state(world.guild.id, world.channel.id)
        async with asyncio.timeout(5):
            await client.update_voice_state(world.guild.id, None)
        assert client.stats.connects == 1


def test_send_limit_is_validated() -> None:
    for bad in ((0, 60.0), (10, 0.0), (10, float("nan")), "110/60", (110,)):
        with pytest.raises(InvalidArgumentError):
            Client("token", gateway_url="ws://127.0.0.1:1", send_limit=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("ready_timeout", float("nan")),  # no timeout at all: start() could wait forever
        ("ready_timeout", 0.0),
        ("request_timeout", -1.0),
        ("request_timeout", float("nan")),
        ("guild_ready_timeout", float("nan")),
        ("guild_ready_timeout", -1.0),
        ("backoff_base", float("nan")),
        ("backoff_cap", float("nan")),
        ("intents", "641"),  # failed inside the client's task, as 'a bug in cordvoice'
        ("intents", -1),
        ("intents", 1.5),
        # Voice's ssl=True means "verified TLS"; here it failed inside urllib at start() (AttributeError).
        ("ssl", True),
        ("ssl", "cert.pem"),
    ],
)
def test_client_options_are_validated(option: str, value: object) -> None:
    with pytest.raises(InvalidArgumentError, match=option):
        Client("token", gateway_url="ws://127.0.0.1:1", **{option: value})  # type: ignore[arg-type]


async def test_a_deeply_nested_message_is_dropped_and_the_client_goes_on() -> None:
    nested = '{"op":0,"s":2,"t":"X","d":' + "[" * 200_000 + "]" * 200_000 + "}"
    guild = {"id": "5", "name": "g", "channels": [], "voice_states": []}
    after = json.dumps({"op": 0, "s": 3, "t": "GUILD_CREATE", "d": guild})
    async with scripted_gateway([], nested, after) as url, Client("token", gateway_url=url) as client:
        async with asyncio.timeout(5):
            while 5 not in client.guilds:
                await asyncio.sleep(0.01)
        assert client.stats.malformed_messages == 1
        assert client.is_ready and client.stats.connects == 1


async def test_ready_with_a_malformed_guild_entry_still_becomes_ready() -> None:
    guilds = [{"id": "not-a-snowflake", "unavailable": True}, "junk", {"id": "5", "unavailable": True}]
    guild = {"id": "5", "name": "g", "channels": [], "voice_states": []}
    create = json.dumps({"op": 0, "s": 2, "t": "GUILD_CREATE", "d": guild})
    async with scripted_gateway(guilds, create) as url:
        client = Client("token", gateway_url=url, ready_timeout=2.0, guild_ready_timeout=2.0)
        async with client:
            assert client.is_ready and client.user_id == 1234567890
            # The good entry still counts: start() waited for its GUILD_CREATE.
            assert 5 in client.guilds
            assert client.stats.malformed_messages == 2
