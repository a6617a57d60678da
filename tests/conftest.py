"""Project-wide test setup: hypothesis profiles, the shared transport vectors, manual-only tests, the
emulator in a child process, and a discord.py bot logged in to an emulator."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from hypothesis import HealthCheck, settings

if TYPE_CHECKING:
    import discord

    from cordvoice.emulator import Emulator

# No per-example deadline: CI machines are shared and a slow example is not a failure. The "ci" profile
# (CI=true) derandomizes so a red build reproduces locally with CI=true.
settings.register_profile("dev", deadline=None)
settings.register_profile("ci", deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci" if os.environ.get("CI") else "dev")

REPO_ROOT = Path(__file__).resolve().parents[1]
VECTORS_ENV = "CORDVOICE_VECTORS"


def find_transport_vectors() -> Path | None:
    """$CORDVOICE_VECTORS, else ``../shared/vectors/transport.json`` beside the repo or the workplace's."""
    from_env = os.environ.get(VECTORS_ENV)
    candidates = [Path(from_env)] if from_env else []
    candidates += [
        REPO_ROOT.parent / "shared" / "vectors" / "transport.json",
        Path("/work/shared/vectors/transport.json"),
    ]
    return next((path for path in candidates if path.is_file()), None)


@pytest.fixture(scope="session")
def transport_vectors() -> dict[str, Any]:
    """The independently computed UDP transport vectors, read (never copied) from shared/."""
    path = find_transport_vectors()
    if path is None:
        pytest.skip(
            f"transport vectors not found: expected {REPO_ROOT.parent / 'shared/vectors/transport.json'} "
            f"or a path in ${VECTORS_ENV}"
        )
    with path.open(encoding="utf-8") as file:
        data: dict[str, Any] = json.load(file)
    return data


# ---- manual-only tests --------------------------------------------------------------------------------
MANUAL_ENV = "CORDVOICE_MANUAL"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``manual`` (5-minute chaos, 10-minute soak) run only with CORDVOICE_MANUAL=1."""
    if os.environ.get(MANUAL_ENV) == "1":
        return
    skip = pytest.mark.skip(reason=f"manual mode: set {MANUAL_ENV}=1 to run")
    for item in items:
        if item.get_closest_marker("manual") is not None:
            item.add_marker(skip)


# ---- the emulator in a child process ------------------------------------------------------------------
EmulatorProcess = Callable[[int], Awaitable[dict[str, Any]]]


@pytest.fixture
async def emulator_process() -> AsyncIterator[EmulatorProcess]:
    """Start ``cordvoice emulate`` (N guilds, 2 bots, no stages) in a child process; its details as JSON.

    For tests that measure this process: with the emulator elsewhere, it holds the bots and nothing else.
    The child is stopped when the test ends.
    """
    children: list[asyncio.subprocess.Process] = []

    async def start(guilds: int) -> dict[str, Any]:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "cordvoice", "emulate", "--guilds", str(guilds), "--bots", "2",
            "--stages", "0", "--json",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        children.append(process)
        assert process.stdout is not None
        async with asyncio.timeout(60):
            line = await process.stdout.readline()
        details: dict[str, Any] = json.loads(line)
        return details

    yield start
    for process in children:
        if process.returncode is None:
            process.terminate()
        async with asyncio.timeout(20):
            await process.wait()


# ---- a discord.py bot against the emulator -------------------------------------------------------------
@contextlib.asynccontextmanager
async def _running_discordpy_bot(
    emu: Emulator, token: str, *, reconnect: bool = False, **client_kwargs: Any
) -> AsyncIterator[discord.Client]:
    import discord  # noqa: PLC0415 - only the discord.py tests pay for importing it

    from cordvoice.emulator.for_discordpy import discordpy_pointed_at  # noqa: PLC0415

    intents = discord.Intents.none()
    intents.guilds = True
    intents.voice_states = True
    client = discord.Client(intents=intents, guild_ready_timeout=0.1, **client_kwargs)
    with discordpy_pointed_at(emu):
        await client.login(token)
        runner = asyncio.create_task(client.connect(reconnect=reconnect))
        try:
            async with asyncio.timeout(10):
                await client.wait_until_ready()
            yield client
        finally:
            await client.close()
            async with asyncio.timeout(10):
                await runner


@pytest.fixture
def discordpy_bot() -> Callable[..., contextlib.AbstractAsyncContextManager[discord.Client]]:
    """``async with discordpy_bot(emu, token, **client_kwargs) as client``: a discord.py 2.x bot (guilds
    and voice-state intents) logged in to ``emu`` and ready, closed when the block ends.
    ``reconnect=True`` lets it resume or identify again after its gateway drops.

    ``client_kwargs`` go to ``discord.Client``; pass ``connector=discordpy_connector(emu)`` for TLS.
    """
    return _running_discordpy_bot
