"""``DiscordEmulator``: an :class:`~cordvoice.emulator.Emulator` that starts already populated for a bot test.

It is what the ``discord_emulator`` pytest fixture yields (:mod:`cordvoice.emulator.pytest_plugin`), and it
works the same in plain asyncio code::

    async with DiscordEmulator() as emu:
        emu.bot.token, emu.guild_id, emu.channel_id, emu.stage_channel_id

After :meth:`start` it holds one bot, one guild, one DAVE voice channel and one stage channel (more with the
counts below); the shortcuts name the first of each.
"""

from __future__ import annotations

import ssl
from typing import Any

from cordvoice.emulator.participant import Participant
from cordvoice.emulator.server import Emulator
from cordvoice.emulator.state import Bot, Channel, Guild
from cordvoice.emulator.world import World, populate
from cordvoice.errors import EmulatorError

__all__ = ["DiscordEmulator"]


class DiscordEmulator(Emulator):
    """An emulator with ``bots`` bots, ``guilds`` guilds, and DAVE voice and stage channels in each.

    Every other keyword goes to :class:`~cordvoice.emulator.Emulator` (``tls=True`` for discord.py voice,
    ``voice_servers``, ``voice_config``, ...).
    """

    def __init__(
        self,
        *,
        guilds: int = 1,
        voice_channels: int = 1,
        stage_channels: int = 1,
        bots: int = 1,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        self._counts = {
            "guilds": guilds,
            "voice_channels": voice_channels,
            "stage_channels": stage_channels,
            "bots": bots,
        }
        self._world: World | None = None

    async def start(self) -> None:
        """Bind, serve, and create the bots, guilds and channels; a world that cannot be built closes all."""
        await super().start()
        try:
            self._world = populate(self, **self._counts)
        except BaseException:  # ``async with`` does not call __aexit__ when __aenter__ fails
            await self.close()
            raise

    @property
    def world(self) -> World:
        """Everything created at start, in order."""
        if self._world is None:
            raise EmulatorError("the emulator is not started yet")
        return self._world

    @property
    def bot(self) -> Bot:
        """The first bot: ``bot.token`` logs in, ``bot.user_id`` is its id."""
        return self.world.bots[0]

    @property
    def guild(self) -> Guild:
        return self.world.guilds[0].guild

    @property
    def guild_id(self) -> int:
        return self.guild.id

    @property
    def channel(self) -> Channel:
        """The first guild's first voice channel (DAVE required)."""
        channels = self.world.guilds[0].voice_channels
        if not channels:
            raise EmulatorError("this emulator was started with voice_channels=0")
        return channels[0]

    @property
    def channel_id(self) -> int:
        return self.channel.id

    @property
    def stage_channel(self) -> Channel:
        """The first guild's first stage channel (DAVE version 0)."""
        channels = self.world.guilds[0].stage_channels
        if not channels:
            raise EmulatorError("this emulator was started with stage_channels=0")
        return channels[0]

    @property
    def stage_channel_id(self) -> int:
        return self.stage_channel.id

    @property
    def voice_ssl(self) -> ssl.SSLContext | bool:
        """What to pass as ``cordvoice.Voice(..., ssl=...)``: the emulator's CA with TLS, else plain ``ws://``."""
        context = self.client_ssl_context()
        return context if context is not None else False

    async def listener(self, channel_id: int | None = None, **options: Any) -> Participant:
        """A simulated member in ``channel_id`` (default: the DAVE voice channel) that records what it hears.

        ``options`` go to :meth:`~cordvoice.emulator.Emulator.add_participant`.
        """
        return await self.add_participant(self.channel_id if channel_id is None else channel_id, **options)
