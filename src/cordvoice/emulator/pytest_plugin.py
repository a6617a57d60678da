"""pytest plugin (entry point ``pytest11``): the ``discord_emulator`` fixture, a local Discord for bot tests.

Installed with cordvoice, it needs pytest-asyncio (auto or strict mode). A test that asks for
``discord_emulator`` gets a started :class:`~cordvoice.emulator.fixture.DiscordEmulator`: an
:class:`~cordvoice.emulator.Emulator` on free loopback ports with one bot, one guild, one DAVE voice channel
and one stage channel, closed after the test. Shortcuts: ``bot`` (``bot.token``, ``bot.user_id``),
``guild_id``, ``channel_id``, ``stage_channel_id``, ``listener()`` (a simulated member that records what it
hears, DAVE-decrypted), ``faults`` (closes, crashes, moves, kicks, UDP loss...), ``inspect(user_id)``.

A cordvoice bot::

    async def test_my_bot_speaks(discord_emulator):
        emu = discord_emulator
        listener = await emu.listener()
        client = cordvoice.gateway.Client(emu.bot.token, gateway_url=emu.gateway_url, api_base=emu.api_base)
        async with client, cordvoice.Voice(client, ssl=emu.voice_ssl) as voice:
            session = await voice.join_channel(emu.guild_id, emu.channel_id)
            ...  # play something
        frames = await listener.wait_for_frames(emu.bot.user_id, 50)

A discord.py bot (discord.py dials ``wss://`` for voice, so ask for TLS with the marker)::

    from cordvoice.emulator.for_discordpy import discordpy_connector, discordpy_pointed_at

    @pytest.mark.discord_emulator(tls=True)
    async def test_my_discordpy_bot(discord_emulator):
        emu = discord_emulator
        with discordpy_pointed_at(emu):
            client = discord.Client(intents=..., connector=discordpy_connector(emu))
            await client.login(emu.bot.token)
            ...

``@pytest.mark.discord_emulator(...)`` passes options: ``tls``, ``guilds``, ``voice_channels``,
``stage_channels``, ``bots`` and any other :class:`~cordvoice.emulator.Emulator` keyword (``voice_servers``,
``voice_config``, ...). In strict mode, mark the tests ``@pytest.mark.asyncio`` as usual.

The plugin loads in every pytest run where cordvoice is installed, so it imports nothing but pytest here; the
emulator is imported when a test first asks for the fixture.
"""

from __future__ import annotations

import types
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Literal, cast

import pytest

if TYPE_CHECKING:
    from cordvoice.emulator.fixture import DiscordEmulator

try:
    import pytest_asyncio
except ImportError:  # pragma: no cover - the fixture then explains what to install
    pytest_asyncio = None  # type: ignore[assignment]

__all__ = ["MARKER"]

MARKER = "discord_emulator"

_LoopScope = Literal["session", "package", "module", "class", "function"]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}(**options): options for the discord_emulator fixture "
        "(tls, guilds, voice_channels, stage_channels, bots, or any Emulator keyword)",
    )
    # The fixture is made here because its event loop must be the one the tests run in, which only the
    # configuration knows: a project's asyncio_default_fixture_loop_scope is for its own fixtures, and an
    # emulator serving in another loop than the test's would leave every connection to it hanging.
    fixtures = types.ModuleType(f"{__name__}.fixtures")
    if pytest_asyncio is not None:
        try:
            made = pytest_asyncio.fixture(name=MARKER, loop_scope=_test_loop_scope(config))(_discord_emulator)
        except TypeError:  # pytest-asyncio before 0.24 has no loop_scope: its fixtures use the test's loop
            made = pytest_asyncio.fixture(name=MARKER)(_discord_emulator)
        setattr(fixtures, MARKER, made)
    else:  # pragma: no cover
        setattr(fixtures, MARKER, pytest.fixture(name=MARKER)(_needs_pytest_asyncio))
    config.pluginmanager.register(fixtures, f"{__name__}.fixtures")


def _test_loop_scope(config: pytest.Config) -> _LoopScope:
    """The loop scope pytest-asyncio runs tests in unless a test's mark says otherwise."""
    try:
        scope = config.getini("asyncio_default_test_loop_scope")
    except ValueError:  # pytest-asyncio before 1.0 has no such option: tests run in a function loop
        return "function"
    return cast("_LoopScope", scope) if scope in ("session", "package", "module", "class") else "function"


async def _discord_emulator(request: pytest.FixtureRequest) -> AsyncIterator[DiscordEmulator]:
    """A started local Discord (see the module docstring), closed after the test."""
    from cordvoice.emulator.fixture import DiscordEmulator  # noqa: PLC0415 - keep the plugin cheap to load

    marker = request.node.get_closest_marker(MARKER)
    options: dict[str, Any] = dict(marker.kwargs) if marker is not None else {}
    async with DiscordEmulator(**options) as emulator:
        yield emulator


def _needs_pytest_asyncio() -> None:  # pragma: no cover
    """Needs pytest-asyncio."""
    pytest.fail("the discord_emulator fixture needs pytest-asyncio: pip install pytest-asyncio")
