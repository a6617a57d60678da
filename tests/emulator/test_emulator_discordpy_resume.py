"""discord.py 2.7.1 against a voice server that closes its socket with 4015 ("voice server crashed").

The emulator does exactly what protocol.md §2.5 says: the session survives the close, op 7 Resume is
answered by op 9 Resumed plus the missed numbered messages, and no Session Description follows (it is not a
missed message). What discord.py then does is a finding about discord.py, pinned here:

* its 4015 handler re-sends op 4 for the same channel and waits for VOICE_STATE_UPDATE *and*
  VOICE_SERVER_UPDATE. The VOICE_SERVER_UPDATE arrives while it still counts as connected, which moves it
  out of the connected state, so its player stops sending at once;
* if VOICE_SERVER_UPDATE comes first, it then reaches "got both updates", opens a new socket and sends op 7,
  gets op 9, and waits in ``_handshake_websocket`` for a Session Description (``ws.secret_key``) that a resume
  never brings. If VOICE_STATE_UPDATE comes first (protocol.md allows either order), it never even sends op 7;
* either way, ``timeout`` seconds (the ``channel.connect`` timeout, 30 s by default) after the close it logs
  "Could not resume the voice connection... Disconnecting...", leaves the channel (op 4 with a null channel,
  which ends the voice session: the resumed socket gets 4014) and its player gives up.

Audio sent before the close arrives complete and in order; nothing comes after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Callable

import discord
import pytest

from cordvoice.emulator import Emulator
from cordvoice.emulator.for_discordpy import discordpy_connector
from cordvoice.udp.rtp import OPUS_SILENCE

from .emulator_helpers import build_voice_world

DiscordpyBot = Callable[..., contextlib.AbstractAsyncContextManager[discord.Client]]
"""The ``discordpy_bot`` fixture (tests/conftest.py)."""

TIMEOUT = 2.5  # discord.py's connect timeout here; its default is 30 s


class CountingSource(discord.AudioSource):
    """Distinct Opus-looking frames (TOC 0xFC + a counter), one per 20 ms read, forever."""

    def __init__(self) -> None:
        self.count = 0

    def read(self) -> bytes:
        self.count += 1
        return b"\xfc" + self.count.to_bytes(4, "big") + bytes(40)

    def is_opus(self) -> bool:
        return True


@pytest.mark.parametrize("server_update_first", [True, False], ids=["server-update-first", "state-first"])
async def test_discordpy_after_4015_resumes_on_the_wire_then_gives_up(
    server_update_first: bool, caplog: pytest.LogCaptureFixture, discordpy_bot: DiscordpyBot
) -> None:
    caplog.set_level(logging.DEBUG, logger="discord.gateway")
    caplog.set_level(logging.DEBUG, logger="discord.voice_state")
    async with Emulator(tls=True, voice_server_update_first=server_update_first) as emu:
        world = build_voice_world(emu)
        bot_id = world.bot.user_id
        listener = await emu.add_participant(world.channel.id, name="listener")
        async with discordpy_bot(emu, world.bot.token, connector=discordpy_connector(emu)) as client:
            channel = client.get_channel(world.channel.id)
            assert isinstance(channel, discord.VoiceChannel)
            voice = await channel.connect(timeout=TIMEOUT)
            async with asyncio.timeout(10):
                while not (listener.privacy_code and voice.voice_privacy_code == listener.privacy_code):
                    await asyncio.sleep(0.02)
            source = CountingSource()
            finished = asyncio.Event()
            voice.play(source, after=lambda _: client.loop.call_soon_threadsafe(finished.set))
            await listener.wait_for_frames(bot_id, 25, timeout=5)

            loop = asyncio.get_running_loop()
            closed_at = loop.time()
            assert await emu.faults.close_client(bot_id, 4015, "voice server crashed") == 1
            async with asyncio.timeout(TIMEOUT + 5):
                while emu.state.voice_state(world.guild.id, bot_id) is not None:
                    await asyncio.sleep(0.01)
            gave_up_after = loop.time() - closed_at
            async with asyncio.timeout(TIMEOUT + 5):
                await finished.wait()
            await listener.wait_until(lambda: bot_id not in listener.clients)

            seen = emu.inspect(bot_id)
            resumed_part = seen.opcode_order[seen.opcode_order.index(5) :]
            if server_update_first:
                assert 7 in resumed_part, "discord.py sent op 7 Resume"
                assert seen.resumes == 1 and seen.connections == 2, "and the emulator answered op 9 Resumed"
                assert "Voice RESUME succeeded." in caplog.messages, "discord.py received op 9"
                assert seen.closes_sent == (4015, 4014), "its leave then ended the resumed session"
            else:
                assert 7 not in resumed_part and seen.resumes == 0, "stuck waiting for 'both' updates"
                assert seen.closes_sent == (4015,)
            assert emu.voice_server().stats.resumes == seen.resumes
            assert seen.ended and seen.faults == {"close": 1, "close_4015": 1}
            # It waits out its whole connect timeout, then leaves the channel (op 4 with a null channel).
            assert TIMEOUT * 0.9 <= gave_up_after <= TIMEOUT + 1.5, gave_up_after
            assert not voice.is_connected()
            assert "Could not resume the voice connection... Disconnecting..." in caplog.messages

            frames = [f for f in listener.frames_from(bot_id) if f.payload != OPUS_SILENCE]
            counters = [int.from_bytes(f.payload[1:5], "big") for f in frames]
            assert counters == list(range(1, len(counters) + 1)), "complete and in order up to the close"
            assert all(f.dave for f in frames) and listener.stats.dave_undecryptable.total() == 0
            sent_after_close = [f for f in frames if f.arrival > closed_at + 0.1]
            assert sent_after_close == [], "discord.py's player stops when the server update arrives"
            assert all(b - a <= 0.1 for a, b in itertools.pairwise(f.arrival for f in frames))
