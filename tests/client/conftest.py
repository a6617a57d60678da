"""Fixtures for the client tests: an emulator with a bot logged in through the standalone gateway client.

Every test here also fails if any task or callback on the loop ended with an exception nobody handled
(``loop_errors``): the client must contain everything.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from cordvoice import Voice
from cordvoice.audio.opus import OpusEncoder
from cordvoice.audio.samples import speech_like
from cordvoice.emulator import Bot, Channel, Emulator, Guild, VoiceServerConfig
from cordvoice.gateway import Client
from cordvoice.reconnect import ReconnectConfig

FRAME_BYTES = 3840  # 20 ms of 48 kHz stereo s16


@functools.cache
def opus_frames(count: int, voice: int = 0) -> tuple[bytes, ...]:
    """``count`` distinct real Opus frames (speech-like audio through libopus), cached per test run."""
    pcm = speech_like(count * 0.020, voice=voice)
    encoder = OpusEncoder(bitrate=48_000)
    try:
        return tuple(encoder.encode(pcm[i * FRAME_BYTES : (i + 1) * FRAME_BYTES]) for i in range(count))
    finally:
        encoder.close()


@dataclass
class LoopErrors:
    """Collects what reaches the loop's exception handler."""

    contexts: list[dict[str, Any]] = field(default_factory=list)

    def handler(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        self.contexts.append(context)
        loop.default_exception_handler(context)

    def check(self) -> None:
        messages = [f"{c.get('message')}: {c.get('exception')!r}" for c in self.contexts]
        assert not messages, f"unhandled errors on the event loop: {messages}"


@pytest.fixture
async def loop_errors() -> AsyncIterator[LoopErrors]:
    loop = asyncio.get_running_loop()
    errors = LoopErrors()
    previous = loop.get_exception_handler()
    loop.set_exception_handler(errors.handler)
    try:
        yield errors
    finally:
        loop.set_exception_handler(previous)
    errors.check()


# Short waits for tests: the defaults are tuned for real Discord.
FAST_RECONNECT = ReconnectConfig(
    backoff_base=0.05, backoff_cap=0.5, move_wait=1.0, server_wait=3.0, rejoin_timeout=3.0
)


@dataclass
class VoiceWorld:
    emu: Emulator
    bot: Bot
    guild: Guild
    channel: Channel
    stage: Channel
    client: Client
    voice: Voice

    def make_voice(self, **kwargs: Any) -> Voice:
        """Another Voice on the same client (the fixture's one is closed first by the caller)."""
        options: dict[str, Any] = {"ssl": False, "reconnect": FAST_RECONNECT, "join_timeout": 10.0}
        options.update(kwargs)
        return Voice(self.client, **options)


@contextlib.asynccontextmanager
async def voice_world(
    *,
    voice_config: VoiceServerConfig | None = None,
    voice_servers: int = 1,
    tls: bool = False,
    **voice_kwargs: Any,
) -> AsyncIterator[VoiceWorld]:
    """An emulator (no rate limits), a bot logged in with the standalone client, and its Voice."""
    emulator = Emulator(rate_limit=None, voice_config=voice_config, voice_servers=voice_servers, tls=tls)
    async with emulator as emu:
        bot = emu.create_bot("cordvoice-client-test")
        guild = emu.create_guild("client tests", members=[bot.user_id])
        channel = emu.create_voice_channel(guild.id, "General")
        stage = emu.create_stage_channel(guild.id, "Stage")
        client = Client(
            bot.token,
            gateway_url=emu.gateway_url,
            api_base=emu.api_base,
            ssl=emu.client_ssl_context(),
            send_limit=None,
        )
        async with client:
            options: dict[str, Any] = {
                "ssl": emu.client_ssl_context() if tls else False,
                "reconnect": FAST_RECONNECT,
                "join_timeout": 10.0,
            }
            options.update(voice_kwargs)
            voice = Voice(client, **options)
            world = VoiceWorld(emu, bot, guild, channel, stage, client, voice)
            try:
                yield world
            finally:
                await voice.close()
                for participant in list(emu.participants):
                    await participant.close()


@pytest.fixture
async def world(loop_errors: LoopErrors) -> AsyncIterator[VoiceWorld]:
    async with voice_world() as w:
        yield w


async def wait_until(predicate: Callable[[], bool], within: float = 5.0, step: float = 0.005) -> None:
    """Poll ``predicate`` until it holds (bounded)."""
    async with asyncio.timeout(within):
        while not predicate():
            await asyncio.sleep(step)
