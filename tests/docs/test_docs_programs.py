"""Every complete program in the docs runs: each one against the emulator, unmodified.

The blocks are marked ``<!-- doc-test: NAME -->`` in the Markdown. Programs meant for Discord run in a
subprocess with only their environment pointed at an emulator (``$CORDVOICE_API_BASE`` and ``$SSL_CERT_FILE``
for cordvoice's client; discord.py, which has no such setting, through a small launcher); test modules run
in an inner pytest session (a subprocess), as a user's suite would.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

from cordvoice.audio.samples import write_demo_ogg
from cordvoice.emulator import DiscordEmulator, Participant

from .docs_helpers import named_block

pytest_plugins = ["pytester"]

SECONDS = 1.0
AUDIO_FRAMES = 51  # write_demo_ogg's packets for 1 s: 50, plus one that flushes the encoder
INNER_OPTIONS = (
    "-o",
    "asyncio_default_fixture_loop_scope=function",
    "-o",
    "asyncio_mode=auto",
    "-p",
    "no:cacheprovider",
)

DISCORDPY_LAUNCHER = """
import runpy, sys

import discord.gateway, discord.http, yarl

discord.http.Route.BASE = sys.argv[1]
discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(sys.argv[2])
program = sys.argv[3]
sys.argv = [program, *sys.argv[4:]]
runpy.run_path(program, run_name="__main__")
"""


@pytest.fixture
def sample(tmp_path: Path) -> Path:
    path = tmp_path / "sample.ogg"
    write_demo_ogg(path, SECONDS)
    return path


async def _run(*argv: str, env: dict[str, str], timeout: float = 60.0) -> tuple[int, str]:  # noqa: ASYNC109
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *argv,
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        async with asyncio.timeout(timeout):
            output, _ = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    return process.returncode or 0, output.decode(errors="replace")


async def _heard(listener: Participant, user_id: int) -> list[bytes]:
    async with asyncio.timeout(5):
        while len(listener.payloads_from(user_id)) < AUDIO_FRAMES:
            await asyncio.sleep(0.02)
    return listener.payloads_from(user_id)


def _program(tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name.replace('-', '_')}.py"
    path.write_text(named_block(name).code, encoding="utf-8")
    return path


async def test_the_readme_bot_plays_a_file_on_the_emulator(tmp_path: Path, sample: Path) -> None:
    program = _program(tmp_path, "readme-bot")
    assert len([line for line in program.read_text().splitlines() if line.strip()]) <= 15
    async with DiscordEmulator(tls=True) as emu:  # the bot verifies TLS, as it must on Discord
        listener = await emu.listener()
        env = {
            "DISCORD_TOKEN": emu.bot.token or "",
            "CORDVOICE_API_BASE": emu.api_base,
            "SSL_CERT_FILE": str(emu.ca_file),
        }
        status, output = await _run(
            str(program), str(emu.guild_id), str(emu.channel_id), str(sample), env=env
        )
        assert status == 0, output
        assert len(await _heard(listener, emu.bot.user_id)) == AUDIO_FRAMES


async def test_the_bare_adapter_plays_a_file_on_the_emulator(tmp_path: Path, sample: Path) -> None:
    program = _program(tmp_path, "bare-adapter")
    async with DiscordEmulator() as emu:
        listener = await emu.listener()
        env = {"DISCORD_TOKEN": emu.bot.token or "", "GATEWAY_URL": emu.gateway_url}
        status, output = await _run(
            str(program), str(emu.guild_id), str(emu.channel_id), str(sample), env=env
        )
        assert status == 0, output
        assert len(await _heard(listener, emu.bot.user_id)) == AUDIO_FRAMES


async def test_the_discordpy_bot_plays_a_file_on_the_emulator(tmp_path: Path, sample: Path) -> None:
    program = _program(tmp_path, "discordpy-bot")
    launcher = tmp_path / "launch.py"
    launcher.write_text(DISCORDPY_LAUNCHER, encoding="utf-8")
    async with DiscordEmulator(tls=True) as emu:
        listener = await emu.listener()
        env = {"DISCORD_TOKEN": emu.bot.token or "", "SSL_CERT_FILE": str(emu.ca_file)}
        argv = (str(launcher), emu.api_base, emu.gateway_url, str(program), str(emu.channel_id), str(sample))
        status, output = await _run(*argv, env=env)
        assert status == 0, output
        assert len(await _heard(listener, emu.bot.user_id)) == AUDIO_FRAMES


def test_the_documented_bot_tests_pass(pytester: pytest.Pytester) -> None:
    names = ["readme-fixture", "emulator-fault-test"]
    pytester.makepyfile(**{f"test_{name.replace('-', '_')}": named_block(name).code for name in names})
    # In a subprocess: an in-process inner session re-imports cordvoice's modules and mixes class identities.
    result = pytester.runpytest_subprocess(*INNER_OPTIONS, timeout=60)
    result.assert_outcomes(passed=len(names))
