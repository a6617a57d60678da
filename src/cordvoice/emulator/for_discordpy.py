"""Point discord.py (2.x) at the emulator, for tests of bots written with it.

discord.py has no setting for Discord's endpoints, so :func:`discordpy_pointed_at` swaps its REST base
(``discord.http.Route.BASE``) and the gateway it dials (``DiscordWebSocket.DEFAULT_GATEWAY``) for the
duration of a ``with`` block and restores them afterwards. discord.py always dials ``wss://`` for voice, so
voice needs ``Emulator(tls=True)`` and a client that trusts the emulator's CA: pass
``connector=discordpy_connector(emu)`` to ``discord.Client``. Importing this module imports discord.py.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import aiohttp
import discord.gateway
import discord.http
import yarl

from cordvoice.emulator.server import Emulator

__all__ = ["discordpy_connector", "discordpy_pointed_at"]


@contextlib.contextmanager
def discordpy_pointed_at(emu: Emulator) -> Iterator[None]:
    """Within the block, discord.py logs in to ``emu`` instead of Discord (not thread- or task-local)."""
    old_base = discord.http.Route.BASE
    old_gateway = discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY
    discord.http.Route.BASE = emu.api_base
    discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(emu.gateway_url)
    try:
        yield
    finally:
        discord.http.Route.BASE = old_base
        discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = old_gateway


def discordpy_connector(emu: Emulator) -> aiohttp.TCPConnector:
    """An aiohttp connector for ``discord.Client(connector=...)`` that trusts the emulator's TLS CA.

    Call it inside a running event loop (aiohttp binds connectors to the loop).
    """
    context = emu.client_ssl_context()
    return aiohttp.TCPConnector(ssl=context if context is not None else False)
