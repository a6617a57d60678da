"""The public surface on a scripted server: errors, timeouts, context managers, handlers, arguments."""

from __future__ import annotations

import asyncio
import logging
import math
import ssl
import threading
from dataclasses import replace

import pytest

from cordvoice import (
    DisconnectedError,
    DisconnectedEvent,
    GatewayError,
    InvalidArgumentError,
    JoinTimeoutError,
    MovedEvent,
    ReadyEvent,
    ResumedEvent,
    Session,
    SessionEvent,
    SessionState,
    SpeakingEvent,
    SpeakingFlag,
    Voice,
    VoiceError,
)
from cordvoice.gateway.events import VoiceServerUpdate, VoiceStateUpdate
from cordvoice.reconnect import ReconnectConfig

from .client_fakes import FakeAdapter, RawConnection, RawVoiceServer, close_first
from .conftest import FAST_RECONNECT, LoopErrors, wait_until

GUILD, CHANNEL, OTHER_CHANNEL = 5, 6, 7


def make_voice(adapter: FakeAdapter, **kwargs: object) -> Voice:
    options: dict[str, object] = {"ssl": False, "reconnect": FAST_RECONNECT, "join_timeout": 5.0}
    options.update(kwargs)
    return Voice(adapter, **options)  # type: ignore[arg-type]


async def test_client_join_timeout_leaves_nothing_behind(loop_errors: LoopErrors) -> None:
    adapter = FakeAdapter("127.0.0.1:1", answer=False)
    voice = make_voice(adapter)
    with pytest.raises(JoinTimeoutError) as caught:
        await voice.join_channel(GUILD, CHANNEL, timeout=0.2)
    assert isinstance(caught.value, TimeoutError) and str(CHANNEL) in str(caught.value)
    assert voice.sessions == {}
    assert adapter.requests == [(GUILD, CHANNEL), (GUILD, None)], "asked to join, then left"
    await voice.close()
    assert adapter.listener is None


async def test_client_join_timeout_names_why_the_voice_connections_failed(loop_errors: LoopErrors) -> None:
    async with RawVoiceServer() as server:
        # A TLS client against a plain voice gateway (an emulator without tls=True) retries until the timeout.
        slower = replace(FAST_RECONNECT, backoff_base=0.3)  # the join times out before retries run out
        voice = make_voice(FakeAdapter(server.endpoint), ssl=ssl.create_default_context(), reconnect=slower)
        with pytest.raises(JoinTimeoutError) as caught:
            await voice.join_channel(GUILD, CHANNEL, timeout=1.0)
        assert "could not connect to the voice gateway at wss://" in str(caught.value)
        assert "check that the channel exists" not in str(caught.value)
        await voice.close()


async def test_client_gateway_session_lost_during_the_join_sends_op4_again(loop_errors: LoopErrors) -> None:
    async with RawVoiceServer() as server:
        adapter = FakeAdapter(server.endpoint, answer=False)  # the op 4 dies with the old gateway session
        async with make_voice(adapter) as voice:
            join = asyncio.ensure_future(voice.join_channel(GUILD, CHANNEL))
            await wait_until(lambda: adapter.requests == [(GUILD, CHANNEL)])
            adapter.answer = True
            voice.on_gateway_session_lost()
            session = await join
            assert session.channel_id == CHANNEL and session.state is SessionState.READY
            assert adapter.requests == [(GUILD, CHANNEL), (GUILD, CHANNEL)], "op 4 again, once"


async def test_client_join_fails_cleanly_when_the_gateway_cannot_send(loop_errors: LoopErrors) -> None:
    class Broken(FakeAdapter):
        async def update_voice_state(self, guild_id: int, channel_id: int | None, **kwargs: bool) -> None:
            raise GatewayError("not connected")

    voice = make_voice(Broken("127.0.0.1:1"))
    with pytest.raises(GatewayError):
        await voice.join_channel(GUILD, CHANNEL)
    assert voice.sessions == {}
    await voice.close()


async def test_client_invalid_arguments(loop_errors: LoopErrors) -> None:
    async with RawVoiceServer() as server, make_voice(FakeAdapter(server.endpoint)) as voice:
        with pytest.raises(InvalidArgumentError):
            await voice.join_channel(0, CHANNEL)
        with pytest.raises(InvalidArgumentError):
            await voice.join_channel(GUILD, True)  # type: ignore[arg-type]
        for timeout in (0.0, -1.0, math.nan, math.inf):
            with pytest.raises(InvalidArgumentError, match="timeout"):
                await voice.join_channel(GUILD, CHANNEL, timeout=timeout)
        session = await voice.join_channel(GUILD, CHANNEL)
        # A str id (from a config file) was no session of this Voice: leave() returned, the bot stayed.
        with pytest.raises(InvalidArgumentError, match="guild_id"):
            await voice.leave(str(GUILD))  # type: ignore[arg-type]
        assert not session.ending
        with pytest.raises(InvalidArgumentError):
            await session.write(b"")
        with pytest.raises(InvalidArgumentError):
            await session.write("text")  # type: ignore[arg-type]
        # 20 ms of PCM (the usual mix-up), a 40 ms Opus packet, a 10 ms one: sent as they were, nobody could
        # decode the PCM and the others played at the wrong speed.
        for frame in (bytes(3840), b"\xfd\x03" + bytes(60), b"\xf4" + bytes(60)):
            with pytest.raises(InvalidArgumentError, match="20 ms"):
                await session.write(frame)
        assert session.queued_frames == 0
        with pytest.raises(InvalidArgumentError):
            session.on(int, print)  # type: ignore[arg-type]
        # Not callable: each failed only when used (an event, a packet, a tick), far from the mistake.
        with pytest.raises(InvalidArgumentError, match="handler"):
            session.on(ReadyEvent, "print")  # type: ignore[arg-type]
        with pytest.raises(InvalidArgumentError, match="hook"):
            session.set_receive_hook(b"hook")  # type: ignore[arg-type]
        with pytest.raises(InvalidArgumentError, match="provider"):
            session.set_provider([b"\xfc\xff\xfe"])  # type: ignore[arg-type]
        assert session.receive_hook is None
        with pytest.raises(InvalidArgumentError):
            await session.wait_for(int, timeout=1)  # type: ignore[type-var]
        for timeout in (math.nan, "5"):  # NaN waited forever: asyncio never reaches a NaN deadline
            with pytest.raises(InvalidArgumentError, match="timeout"):
                await asyncio.wait_for(session.wait_for(ReadyEvent, timeout=timeout), 2)  # type: ignore[arg-type]
        for user_id in (-1, 0, 1 << 64, "9"):
            with pytest.raises(InvalidArgumentError):
                session.verification_code(user_id)  # type: ignore[arg-type]
        for flags in (-1, 1 << 32, "1"):
            with pytest.raises(InvalidArgumentError):
                await session.speaking(flags)  # type: ignore[arg-type]
        await session.speaking(SpeakingFlag.MICROPHONE | SpeakingFlag.PRIORITY)
        assert session.state is SessionState.READY and session.dave_ready
    assert not session.dave_ready, "an ended session sends nothing, encrypted or not"
    with pytest.raises(InvalidArgumentError):
        Voice(FakeAdapter("x:1"), queue_frames=0)


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("join_timeout", math.nan),
        ("open_timeout", -1.0),
        ("open_timeout", math.nan),
        ("handshake_timeout", 0.0),
        ("discovery_timeout", math.inf),
        ("idle_grace", math.nan),
        ("idle_grace", math.inf),
        ("idle_grace", -0.5),
        ("queue_frames", 2.5),
        ("join_timeout", "30"),
        # Accepted, these failed only inside a session: the first reconnect or the UDP socket's opening
        # ended it as "cordvoice failed internally".
        ("reconnect", {"max_resumes": 1}),
        ("dial", 5),
        ("dave", "no"),
    ],
)
def test_client_voice_refuses_unusable_options(option: str, value: object) -> None:
    # Caught here, not as a join that "timed out" after its retries or a ValueError from deep in a join.
    with pytest.raises(InvalidArgumentError, match=option):
        Voice(FakeAdapter("x:1"), **{option: value})  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="move_wait"):
        ReconnectConfig(move_wait=math.nan)


def test_client_voice_refuses_what_is_not_an_adapter() -> None:
    """``Voice(bot)`` with a discord.py bot was an AttributeError ('set_listener') pointing nowhere."""
    import discord  # noqa: PLC0415 - optional dependency, installed for the tests

    for adapter in (discord.Client(intents=discord.Intents.none()), "token", None):
        with pytest.raises(InvalidArgumentError, match="from_discordpy"):
            Voice(adapter)  # type: ignore[arg-type]


async def test_client_session_used_from_another_thread_says_so(loop_errors: LoopErrors) -> None:
    """``asyncio.run(session.write(frame))`` on a worker thread (a discord.py habit) hung that thread for
    good once the queue was full; ``session.play`` there raised a bare RuntimeError."""
    async with RawVoiceServer() as server, make_voice(FakeAdapter(server.endpoint)) as voice:
        session = await voice.join_channel(GUILD, CHANNEL)
        errors: list[BaseException] = []

        async def write_some() -> None:
            for _ in range(20):  # more than the queue holds
                await session.write(b"\xfc\xff\xfe")

        def worker() -> None:
            for call in (lambda: asyncio.run(write_some()), lambda: session.play(b"\x00" * 3840)):
                try:
                    call()
                except BaseException as exc:
                    errors.append(exc)

        thread = threading.Thread(target=worker, daemon=True)
        thread.start()
        await asyncio.to_thread(thread.join, 5)
        assert not thread.is_alive(), "the worker thread hung in session.write"
        assert [type(e) for e in errors] == [VoiceError, VoiceError], errors
        assert all("event loop" in str(e) for e in errors)
        assert session.queued_frames == 0 and session.state is SessionState.READY
        # The Voice too, before it forgets the session: a leave or close from there changed nothing.
        for call in (voice.leave(GUILD), voice.close(), voice.join_channel(GUILD, OTHER_CHANNEL)):
            with pytest.raises(VoiceError, match="event loop"):
                await asyncio.to_thread(asyncio.run, call)
        assert voice.session(GUILD) is session and not session.ending and not voice.closed


async def test_client_context_managers_and_concurrent_disconnects(loop_errors: LoopErrors) -> None:
    async with RawVoiceServer() as server:
        adapter = FakeAdapter(server.endpoint)
        async with make_voice(adapter) as voice:
            async with await voice.join_channel(GUILD, CHANNEL) as session:
                assert session.state is SessionState.READY and voice.session(GUILD) is session
            assert session.closed and voice.sessions == {}
            again = await voice.join_channel(GUILD, CHANNEL)
            ended: list[DisconnectedEvent] = []
            again.on(DisconnectedEvent, ended.append)
            await asyncio.gather(again.disconnect(), again.disconnect(), voice.leave(GUILD))
            assert len(ended) == 1 and ended[0].error is None
            assert adapter.requests.count((GUILD, None)) == 2, "one leave per session"
            with pytest.raises(DisconnectedError):
                await again.write(b"\xfc")
            with pytest.raises(DisconnectedError):
                await again.wait_for(ReadyEvent)
            assert (await again.wait_for(DisconnectedEvent)) is ended[0]
            await again.stop_speaking()  # a no-op once closed
        assert server.close_codes.count(1000) == 2


async def test_client_handler_failures_are_logged_not_lost(
    loop_errors: LoopErrors, caplog: pytest.LogCaptureFixture
) -> None:
    holder: list[RawConnection] = []

    async def script(conn: RawConnection) -> None:
        holder.append(conn)
        while True:
            await conn.recv_json(within=3600)

    async with RawVoiceServer(script) as server, make_voice(FakeAdapter(server.endpoint)) as voice:
        session = await voice.join_channel(GUILD, CHANNEL)
        seen: list[SpeakingEvent] = []

        async def async_broken(event: SpeakingEvent) -> None:
            raise RuntimeError("async handler bug")

        session.on(SpeakingEvent, lambda e: 1 / 0)
        session.on(SpeakingEvent, async_broken)
        unsubscribe = session.on(SpeakingEvent, seen.append)
        with caplog.at_level(logging.ERROR, logger="cordvoice"):
            await holder[0].send(5, {"user_id": "9", "ssrc": 90, "speaking": 1})
            await wait_until(lambda: len(seen) == 1)
            await wait_until(lambda: "async handler bug" in caplog.text)
        assert "ZeroDivisionError" in caplog.text
        unsubscribe()
        await holder[0].send(5, {"user_id": "9", "ssrc": 91, "speaking": 1})
        await wait_until(lambda: session.ssrc_users.get(91) == 9)
        assert len(seen) == 1
        assert session.state is SessionState.READY


async def test_client_voice_ignores_other_users_and_stray_events(loop_errors: LoopErrors) -> None:
    async with RawVoiceServer() as server:
        adapter = FakeAdapter(server.endpoint)
        async with make_voice(adapter) as voice:
            session: Session = await voice.join_channel(GUILD, CHANNEL)
            assert adapter.listener is voice
            other_user = VoiceStateUpdate(guild_id=GUILD, channel_id=None, user_id=999, session_id="x")
            voice.on_voice_state_update(other_user)  # someone else left: not us
            other_guild = VoiceStateUpdate(
                guild_id=77, channel_id=None, user_id=adapter.user_id, session_id="x"
            )
            voice.on_voice_state_update(other_guild)
            await asyncio.sleep(0.05)
            assert session.state is SessionState.READY


async def test_client_null_endpoint_immediately_followed_by_a_new_one(loop_errors: LoopErrors) -> None:
    async with RawVoiceServer() as first, RawVoiceServer() as second:
        adapter = FakeAdapter(first.endpoint)
        async with make_voice(adapter) as voice:
            session = await voice.join_channel(GUILD, CHANNEL)
            ready = asyncio.ensure_future(session.wait_for(ReadyEvent, timeout=5))
            adapter.announce_server(GUILD, endpoint=None)
            adapter.endpoint = second.endpoint
            adapter.announce_server(GUILD)  # in the same loop iteration as the null one
            event = await ready
            assert event.endpoint == second.endpoint and session.state is SessionState.READY
            assert session.stats.moves == 1


async def test_client_move_with_the_server_update_before_the_state_update(loop_errors: LoopErrors) -> None:
    class ServerUpdateFirst(FakeAdapter):
        """VOICE_SERVER_UPDATE first, the VOICE_STATE_UPDATE a moment later (protocol.md §1.2: any order)."""

        def _answer(self, guild_id: int, channel_id: int | None) -> None:
            listener = self.listener
            if channel_id is None or listener is None:
                super()._answer(guild_id, channel_id)
                return
            self.announce_server(guild_id)
            state = VoiceStateUpdate(
                guild_id=guild_id, channel_id=channel_id, user_id=self.user_id, session_id=self.session_id
            )
            asyncio.get_running_loop().call_later(0.3, listener.on_voice_state_update, state)

    async with RawVoiceServer() as server, make_voice(ServerUpdateFirst(server.endpoint)) as voice:
        session = await voice.join_channel(GUILD, CHANNEL)
        moves: list[MovedEvent] = []
        session.on(MovedEvent, moves.append)
        assert await voice.join_channel(GUILD, OTHER_CHANNEL) is session
        assert session.channel_id == OTHER_CHANNEL and session.state is SessionState.READY
        assert moves and moves[-1].channel_id == OTHER_CHANNEL


async def test_client_second_rejoin_leaves_and_joins_without_taking_its_echo_for_a_kick(
    loop_errors: LoopErrors,
) -> None:
    script = close_first(2, 4006, "session no longer valid")
    async with RawVoiceServer(script) as server:
        adapter = FakeAdapter(server.endpoint)
        async with make_voice(adapter) as voice:
            session = await voice.join_channel(GUILD, CHANNEL)
            await wait_until(lambda: len(server.connections) == 3 and session.state is SessionState.READY)
            assert adapter.requests == [
                (GUILD, CHANNEL),  # the join
                (GUILD, CHANNEL),  # rejoin 1: op 4 again
                (GUILD, None),  # rejoin 2: leave ...
                (GUILD, CHANNEL),  # ... and join, for a certainly new token
            ]
            assert session.stats.reconnects == 2 and not session.closed
            # The expectation of our own leave's echo is gone: a real kick still ends the session.
            adapter._answer(GUILD, None)
            final = await session.wait_closed()
            assert "removed from the voice channel" in final.reason


async def test_client_replies_lost_with_the_socket_are_sent_after_the_resume(loop_errors: LoopErrors) -> None:
    script = close_first(1, 4015, "crashed right after Session Description")
    async with (
        RawVoiceServer(script, dave_version=1) as server,
        make_voice(FakeAdapter(server.endpoint)) as voice,
    ):
        session = await voice.join_channel(GUILD, CHANNEL)
        await wait_until(lambda: len(server.connections) == 2 and session.state is SessionState.READY)
        resumed = server.connections[1].received
        await wait_until(lambda: any(isinstance(m, bytes) and m[:1] == b"\x1a" for m in resumed))
        ops = [
            m["op"] if isinstance(m, dict) else m[0]
            for m in resumed
            if not (isinstance(m, dict) and m["op"] == 3)
        ]
        assert ops[:3] == [7, 5, 26], "Resume, then the op 5 and key package that never went out"


class SameTokenAdapter(FakeAdapter):
    """Answers a repeated op 4 for the current channel as Discord does: with the same, still valid token."""

    token = "same-token"

    def announce_server(self, guild_id: int, endpoint: str | None = "same") -> None:
        assert self.listener is not None
        target = self.endpoint if endpoint == "same" else endpoint
        self.listener.on_voice_server_update(
            VoiceServerUpdate(guild_id=guild_id, token=self.token, endpoint=target)
        )


class SlowResumeServer(RawVoiceServer):
    """Accepts a Resume only after ``resume_delay`` seconds, so a test can act while the session resumes."""

    resume_delay = 0.5

    async def _handshake(self, conn: RawConnection) -> None:
        if len(self.connections) == 1:
            await super()._handshake(conn)
            return
        await conn.send(8, {"heartbeat_interval": 5000, "v": 8}, numbered=False)
        assert (await conn.recv_json())["op"] == 7
        await asyncio.sleep(self.resume_delay)
        await conn.send(9, None, numbered=False)


async def test_client_join_of_the_current_channel_while_resuming_returns_once_resumed(
    loop_errors: LoopErrors,
) -> None:
    script = close_first(1, 4015, "voice server crashed")
    async with SlowResumeServer(script) as server:
        adapter = SameTokenAdapter(server.endpoint)
        async with make_voice(adapter, join_timeout=3.0) as voice:
            session = await voice.join_channel(GUILD, CHANNEL)
            await wait_until(lambda: session.state is SessionState.RESUMING)
            # Only Resumed follows (no Ready): the repeated op 4 brings back the same token.
            assert await voice.join_channel(GUILD, CHANNEL) is session
            assert session.state is SessionState.READY and session.channel_id == CHANNEL
            assert session.stats.resumes == 1 and session.stats.reconnects == 0
            assert len(server.connections) == 2


async def test_client_queued_join_fails_once_the_voice_is_closed(loop_errors: LoopErrors) -> None:
    adapter = FakeAdapter("127.0.0.1:1", answer=False)  # the first join is never answered
    voice = make_voice(adapter)
    first = asyncio.ensure_future(voice.join_channel(GUILD, CHANNEL))
    await wait_until(lambda: adapter.requests == [(GUILD, CHANNEL)])
    queued = asyncio.ensure_future(voice.join_channel(GUILD, CHANNEL + 1))
    await asyncio.sleep(0.01)
    await voice.close()
    async with asyncio.timeout(1.0):  # not join_timeout: the queued join must not even start
        results = await asyncio.gather(first, queued, return_exceptions=True)
    assert isinstance(results[0], DisconnectedError), results
    assert type(results[1]) is VoiceError and "closed" in str(results[1]), results
    assert (GUILD, CHANNEL + 1) not in adapter.requests, "no op 4 after close()"
    assert voice.sessions == {}


async def test_client_join_during_a_leave_waits_for_the_leave_to_go_out(loop_errors: LoopErrors) -> None:
    async with RawVoiceServer() as server:
        adapter = FakeAdapter(server.endpoint)
        async with make_voice(adapter) as voice:
            await voice.join_channel(GUILD, CHANNEL)
            leaving = asyncio.ensure_future(voice.leave(GUILD))
            await asyncio.sleep(0)  # the leave has begun; its op 4 (channel null) is not out yet
            assert adapter.requests == [(GUILD, CHANNEL)]
            session = await voice.join_channel(GUILD, CHANNEL)
            await leaving
            # Discord applies op 4s in order: the join's must come last, or the new session is kicked.
            assert adapter.requests == [(GUILD, CHANNEL), (GUILD, None), (GUILD, CHANNEL)]
            await asyncio.sleep(0.1)
            assert session.state is SessionState.READY and voice.session(GUILD) is session


async def test_client_leave_ends_a_pending_join_at_once(loop_errors: LoopErrors) -> None:
    adapter = FakeAdapter("127.0.0.1:1", answer=False)
    async with make_voice(adapter, join_timeout=30.0) as voice:
        joining = asyncio.ensure_future(voice.join_channel(GUILD, CHANNEL))
        await wait_until(lambda: adapter.requests == [(GUILD, CHANNEL)])
        async with asyncio.timeout(2.0):  # it does not wait for the join's 30 s timeout
            await voice.leave(GUILD)
            with pytest.raises(DisconnectedError):
                await joining
        assert adapter.requests == [(GUILD, CHANNEL), (GUILD, None)]


async def test_client_disconnect_handler_may_join_again(loop_errors: LoopErrors) -> None:
    async with RawVoiceServer() as server:
        adapter = FakeAdapter(server.endpoint)
        async with make_voice(adapter) as voice:
            session = await voice.join_channel(GUILD, CHANNEL)
            rejoined: list[Session] = []

            async def join_again(event: DisconnectedEvent) -> None:
                rejoined.append(await voice.join_channel(GUILD, CHANNEL + 1))

            session.on(DisconnectedEvent, join_again)
            loop = asyncio.get_running_loop()
            started = loop.time()
            await voice.leave(GUILD)  # waits for the handler (the session drains its tasks)
            assert loop.time() - started < 1.0, "the handler's join did not wait on the leave"
            assert len(rejoined) == 1 and rejoined[0] is not session
            assert rejoined[0].state is SessionState.READY and rejoined[0].channel_id == CHANNEL + 1
            assert adapter.requests == [(GUILD, CHANNEL), (GUILD, None), (GUILD, CHANNEL + 1)]


class SlowLeaveAdapter(FakeAdapter):
    """Holds every op 4 with no channel until ``release`` is set, as a busy main gateway would."""

    def __init__(self, endpoint: str) -> None:
        super().__init__(endpoint)
        self.release = asyncio.Event()

    async def update_voice_state(
        self, guild_id: int, channel_id: int | None, *, self_mute: bool = False, self_deaf: bool = False
    ) -> None:
        if channel_id is None:
            await self.release.wait()
        await super().update_voice_state(guild_id, channel_id, self_mute=self_mute, self_deaf=self_deaf)


async def test_client_join_while_a_session_ends_on_its_own_joins_afresh(loop_errors: LoopErrors) -> None:
    # 4021 is final: the session ends and leaves the channel.
    async with RawVoiceServer(close_first(1, 4021, "rate limited")) as server:
        adapter = SlowLeaveAdapter(server.endpoint)
        async with make_voice(adapter) as voice:
            first = await voice.join_channel(GUILD, CHANNEL)
            await wait_until(lambda: first.ending)
            assert not first.closed, "still leaving: its op 4 with no channel is held"
            joining = asyncio.ensure_future(voice.join_channel(GUILD, CHANNEL))
            await asyncio.sleep(0.05)
            assert not joining.done(), "the join waits for the ending session's leave to go out"
            adapter.release.set()
            second = await joining
            assert second is not first and second.state is SessionState.READY
            assert adapter.requests == [(GUILD, CHANNEL), (GUILD, None), (GUILD, CHANNEL)]
            final = first.disconnected_event
            assert final is not None and final.close_code == 4021


async def test_client_wait_for_that_the_end_cannot_satisfy_raises(loop_errors: LoopErrors) -> None:
    # Waiting on a base class with a check (several kinds of event): the session's end, which the check
    # rejects, is the last event there will ever be, so the wait fails instead of hanging.
    async with RawVoiceServer() as server, make_voice(FakeAdapter(server.endpoint)) as voice:
        session = await voice.join_channel(GUILD, CHANNEL)
        resumed_or_moved = asyncio.ensure_future(
            session.wait_for(SessionEvent, check=lambda e: isinstance(e, ResumedEvent | MovedEvent))
        )
        failed_end = asyncio.ensure_future(
            session.wait_for(DisconnectedEvent, check=lambda e: e.error is not None)
        )
        await asyncio.sleep(0)
        await session.disconnect()
        async with asyncio.timeout(2):
            for waiter in (resumed_or_moved, failed_end):
                with pytest.raises(DisconnectedError):
                    await waiter


async def test_client_close_waits_for_a_leave_in_progress(loop_errors: LoopErrors) -> None:
    # A bot closes its Voice (and then its gateway) while a command's leave() is still going out: close()
    # returns only once that leave's op 4 was sent, or the bot would stay in the channel on Discord.
    async with RawVoiceServer() as server:
        adapter = FakeAdapter(server.endpoint)
        voice = make_voice(adapter)
        await voice.join_channel(GUILD, CHANNEL)
        leaving = asyncio.ensure_future(voice.leave(GUILD))
        await asyncio.sleep(0)
        await voice.close()
        assert (GUILD, None) in adapter.requests
        await leaving
