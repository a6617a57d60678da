"""Tokens, transport keys and MLS secrets never reach logs, reprs, exceptions or ``--json`` output.

One full life of a session on the emulator, with every logger of the process at DEBUG (the websockets
library's frame logs included): join, DAVE with a participant, audio, a resume (4015), a rejoin (4006: new
token and key), a server move, and a leave; then a wrong bot token.
Every secret the emulator issued (recorded as it was made) and every DAVE epoch authenticator is looked for,
in the forms it could leak in, in every log record, in the reprs and strings of every object and event the
application can hold, and in the text of every error.

``cordvoice demo --json`` runs in-process the same way and its JSON document is scanned too.
"""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from websockets.frames import Frame

from cordvoice import (
    DaveEpochEvent,
    ReadyEvent,
    ResumedEvent,
    SessionEvent,
    Voice,
)
from cordvoice.emulator import Emulator
from cordvoice.errors import GatewayError, VoiceError
from cordvoice.gateway import Client
from cordvoice.gateway.events import VoiceServerUpdate
from cordvoice.reconnect import ReconnectConfig
from cordvoice.voicegateway import messages as m
from cordvoice.voicegateway.protocol import Credentials

from .security_helpers import SecretRecorder, find_leaks

FAST = ReconnectConfig(backoff_base=0.05, backoff_cap=0.5, move_wait=1.0, server_wait=3.0, rejoin_timeout=3.0)


def _texts_of(records: list[logging.LogRecord]) -> list[str]:
    texts = []
    for record in records:
        texts.append(f"{record.name}: {record.getMessage()}")
        if record.exc_info and record.exc_info[1] is not None:
            texts.append(repr(record.exc_info[1]))
    return texts


async def _wait(predicate: Any, within: float = 10.0) -> None:
    async with asyncio.timeout(within):
        while not predicate():
            await asyncio.sleep(0.01)


async def test_secrets_never_appear_across_a_full_session(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder = SecretRecorder().install(monkeypatch)
    caplog.set_level(logging.DEBUG)  # the root: every logger of the process, websockets' too
    # websockets elides frames to 75 characters in its logs, which can hide a token by luck; log them whole.
    monkeypatch.setattr(Frame, "MAX_LOG_SIZE", 1 << 20)
    exposed: list[str] = []  # reprs and strings the application can see
    authenticators: list[bytes] = []

    async with Emulator(rate_limit=None, voice_servers=2) as emu:
        bot = emu.create_bot("secret-bot")
        guild = emu.create_guild("g", members=[bot.user_id])
        channel = emu.create_voice_channel(guild.id, "General")
        listener = await emu.add_participant(channel.id, name="listener", resume=True)
        async with Client(
            bot.token, gateway_url=emu.gateway_url, api_base=emu.api_base, send_limit=None
        ) as client:
            voice = Voice(client, ssl=False, reconnect=FAST, join_timeout=10.0)
            server_updates: list[VoiceServerUpdate] = []
            original = voice.on_voice_server_update

            def spy(event: VoiceServerUpdate) -> None:
                server_updates.append(event)
                original(event)

            voice.on_voice_server_update = spy  # type: ignore[method-assign]
            session = await voice.join_channel(guild.id, channel.id)
            events: list[SessionEvent] = []
            session.on(SessionEvent, events.append)

            def on_epoch(event: DaveEpochEvent) -> None:
                dave = session.dave
                if dave is not None and dave._session is not None and event.epoch is not None:
                    authenticators.append(dave._session.get_epoch_authenticator() or b"")

            session.on(DaveEpochEvent, on_epoch)
            await listener.wait_dave_ready(10)
            await _wait(lambda: session.dave_ready)
            assert session.dave is not None and session.dave._session is not None
            authenticators.append(session.dave._session.get_epoch_authenticator() or b"")
            for index in range(20):
                await session.write(bytes([0xFC, index]) + bytes(60))
            await _wait(lambda: len(listener.frames_from(bot.user_id)) >= 10)

            server = emu.voice_server(guild_id=guild.id)
            resumed = asyncio.ensure_future(session.wait_for(ResumedEvent, timeout=10))
            await emu.faults.close_client(bot.user_id, 4015, "resume please")
            await resumed
            ready = asyncio.ensure_future(session.wait_for(ReadyEvent, timeout=10))
            await emu.faults.close_client(bot.user_id, 4006, "session invalid")
            await ready
            ready = asyncio.ensure_future(session.wait_for(ReadyEvent, timeout=10))
            await emu.faults.move_guild(guild.id)
            await ready
            # The listener stayed behind on the old server (4022); someone to form a DAVE group with.
            second = await emu.add_participant(channel.id, name="second-listener")
            await _wait(lambda: session.dave_ready)
            for index in range(5):
                await session.write(bytes([0xFC, index]) + bytes(60))
            await session.stop_speaking()

            exposed += [repr(session), str(session), repr(voice), repr(client), repr(session.stats)]
            # The client's guild cache: voice states carry the session id Identify and Resume need.
            exposed += [repr(client.voice_state(guild.id, bot.user_id)), repr(client.guilds)]
            exposed += [repr(session.dave), repr(listener), repr(second), repr(server), repr(emu)]
            exposed += [repr(e) for e in events] + [str(e) for e in events]
            exposed += [repr(u) for u in server_updates]
            await voice.leave(guild.id)
            final = session.disconnected_event
            exposed += [repr(final), str(final)]
            await voice.close()

        # Errors: a wrong bot token.
        wrong = "Mz" + bot.token[2:-4] + "abcd"
        recorder.add(wrong)
        with pytest.raises(GatewayError) as refused:
            async with Client(wrong, gateway_url=emu.gateway_url, api_base=emu.api_base, send_limit=None):
                pass
        exposed += [str(refused.value), repr(refused.value)]

    # What the application builds from what it was given holds secrets too: their reprs must not show them.
    for update in server_updates:
        credentials = Credentials(server_id=1, user_id=2, session_id="s", token=update.token)
        exposed.append(repr(credentials))
        exposed.append(repr(m.Identify(server_id=1, user_id=2, session_id="s", token=update.token)))
        exposed.append(repr(m.Resume(server_id=1, session_id="s", token=update.token)))
    for value in recorder.values:
        if isinstance(value, bytes) and len(value) == 32:
            exposed.append(repr(m.SessionDescription(mode="aead_aes256_gcm_rtpsize", secret_key=value)))

    secrets_seen = [*recorder.values, bot.token, *authenticators]
    assert len(server_updates) >= 3 and any(isinstance(v, bytes) and len(v) == 32 for v in recorder.values)
    assert len([a for a in authenticators if a]) >= 2
    texts = _texts_of(caplog.records) + exposed
    assert any(r.levelno == logging.DEBUG and r.name.startswith("cordvoice") for r in caplog.records)
    leaks = find_leaks(texts, secrets_seen)
    assert not leaks, leaks[:10]


async def test_secrets_never_appear_in_the_demo_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from cordvoice.demo import run_demo  # noqa: PLC0415 - heavy

    recorder = SecretRecorder().install(monkeypatch)
    caplog.set_level(logging.DEBUG)
    report = await run_demo(2.0, tmp_path / "demo")
    document = json.dumps(report.to_json())
    assert len(recorder.values) >= 4, "the demo's emulator issued tokens and keys"
    leaks = find_leaks([document, report.summary(), *_texts_of(caplog.records)], recorder.values)
    assert not leaks, leaks[:10]


def test_the_wire_logger_stays_out_of_debug() -> None:
    """websockets logs every frame at DEBUG; cordvoice's sockets log through a logger kept at INFO."""
    from cordvoice.wirelog import WIRE_LOGGER  # noqa: PLC0415

    logging.getLogger().setLevel(logging.DEBUG)
    try:
        assert not WIRE_LOGGER.isEnabledFor(logging.DEBUG)
        assert WIRE_LOGGER.isEnabledFor(logging.ERROR)
    finally:
        logging.getLogger().setLevel(logging.WARNING)
    # Its own default, whatever the commands that ran in this process since chose for it.
    code = "import cordvoice.wirelog as w; print(w.WIRE_LOGGER.level)"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert int(done.stdout) == logging.INFO


def test_voice_errors_do_not_carry_tokens() -> None:
    """Messages the policy and parsers build never quote a token or key, whatever the input."""
    token = "TOKEN-1234567890-abcdef"
    frame = m.encode_client(m.Identify(server_id=1, user_id=2, session_id="s", token=token))
    broken = frame.replace('"server_id"', '"server_idx"') if isinstance(frame, str) else frame
    with pytest.raises(VoiceError) as caught:
        m.decode_client(broken)
    assert token not in str(caught.value)
