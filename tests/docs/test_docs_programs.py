"""Every complete program in the docs runs: each one against the emulator, unmodified.

The blocks are marked ``<!-- doc-test: NAME -->`` in the Markdown. Programs meant for Discord run in a
subprocess with only their environment pointed at an emulator (``$CORDVOICE_API_BASE`` and ``$SSL_CERT_FILE``
for cordvoice's client; discord.py, which has no such setting, through a small launcher); test modules run
in an inner pytest session (a subprocess), as a user's suite would.
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import cordvoice
from cordvoice.audio.opus import OpusEncoder
from cordvoice.audio.pcm import iter_frames
from cordvoice.audio.samples import tone, write_demo_ogg
from cordvoice.emulator import DiscordEmulator, Participant
from cordvoice.gateway import Client

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


def test_the_documented_programs_pass_mypy_strict(tmp_path: Path) -> None:
    """cordvoice ships py.typed: the programs a user copies type-check strictly as written."""
    programs = [str(_program(tmp_path, name)) for name in ("readme-bot", "discordpy-bot", "bare-adapter")]
    source = Path(cordvoice.__file__).resolve().parents[1]
    env = dict(os.environ)
    if source.name != "site-packages":  # a checkout (PYTHONPATH=src, or an editable install)
        env["MYPYPATH"] = str(source)
    command = [sys.executable, "-m", "mypy", "--strict", "--cache-dir", str(tmp_path / "cache"), *programs]
    result = subprocess.run(
        command, check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_discordpy_voice_client_is_reachable_after_import_cordvoice() -> None:
    """The README says "use ``cls=cordvoice.discordpy.VoiceClient`` and keep the rest": the rest imports
    only ``cordvoice`` (run in a fresh interpreter, where nothing has imported the submodule yet)."""
    code = "import cordvoice; print(cordvoice.discordpy.VoiceClient.__name__, cordvoice.audio.Track.__name__)"
    result = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120
    )
    assert result.stdout.split() == ["VoiceClient", "Track"], result.stderr


def _definitions(name: str) -> dict[str, Any]:
    """The imports, classes and functions of the program ``name``, without running it."""
    tree = ast.parse(named_block(name).code)
    kept = (ast.Import, ast.ImportFrom, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    tree.body = [node for node in tree.body if isinstance(node, kept)]
    namespace: dict[str, Any] = {}
    exec(compile(tree, name, "exec"), namespace)
    return namespace


async def test_the_bare_adapter_follows_the_adapter_rules_when_its_socket_is_gone() -> None:
    # docs/adapters.md: update_voice_state "raises cordvoice.GatewayError if it cannot be sent".
    from websockets.asyncio.client import connect  # noqa: PLC0415
    from websockets.asyncio.server import ServerConnection, serve  # noqa: PLC0415

    async def close_at_once(ws: ServerConnection) -> None:
        await ws.close()

    adapter_class = _definitions("bare-adapter")["BareAdapter"]
    async with serve(close_at_once, "127.0.0.1", 0) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        async with connect(f"ws://127.0.0.1:{port}") as ws:
            await ws.wait_closed()
            adapter = adapter_class(ws, 1)
            with pytest.raises(cordvoice.GatewayError):
                await adapter.update_voice_state(2, 3)


async def _run_fragment(name: str, namespace: dict[str, Any]) -> None:
    """Run the block ``name``, a fragment with top-level awaits, with ``namespace`` as its globals."""
    code = compile(named_block(name).code, name, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    result = eval(code, namespace)
    if inspect.isawaitable(result):
        await result


async def test_the_readme_listening_and_recording_fragments_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)  # the recording goes to ./meeting
    encoder = OpusEncoder()
    frames = [encoder.encode(frame) for frame in iter_frames(tone(440.0, SECONDS))]
    encoder.close()
    async with DiscordEmulator() as emu:
        talker = await emu.listener(name="talker")
        client = Client(emu.bot.token, gateway_url=emu.gateway_url, api_base=emu.api_base)
        async with client, cordvoice.Voice(client, ssl=emu.voice_ssl) as voice:
            session = await voice.join_channel(emu.guild_id, emu.channel_id)
            await talker.wait_dave_ready()
            talked = asyncio.Event()

            async def until_talked(_seconds: float) -> None:
                await talked.wait()  # the recording's "asyncio.sleep(60)": until the talker is done

            listening = asyncio.create_task(_run_fragment("readme-listen", {"session": session}))
            fast = SimpleNamespace(sleep=until_talked)
            recording = asyncio.create_task(
                _run_fragment("readme-record", {"session": session, "asyncio": fast})
            )
            await asyncio.sleep(0.1)  # both fragments are attached
            await talker.play(frames)
            talked.set()
            async with asyncio.timeout(5):
                await recording
                await listening  # closing the receiver ends the stream
    user = talker.user_id
    assert sorted(path.name for path in (tmp_path / "meeting").iterdir()) == sorted(
        [f"{user}.wav", f"{user}.opus", "mixed.wav"]
    )
    lines = capsys.readouterr().out.splitlines()
    heard = [line for line in lines if line.startswith(f"{user} ") and len(line.split()) == 3]
    assert len(heard) >= len(frames), "the listener printed every frame"
    delivered, _lost, undecryptable = map(int, lines[-1].split()[1:])
    assert lines[-1].startswith(f"{user} ") and delivered >= len(frames) and undecryptable == 0


def test_the_documented_bot_tests_pass(pytester: pytest.Pytester) -> None:
    names = ["readme-fixture", "emulator-fault-test"]
    pytester.makepyfile(**{f"test_{name.replace('-', '_')}": named_block(name).code for name in names})
    # In a subprocess: an in-process inner session re-imports cordvoice's modules and mixes class identities.
    result = pytester.runpytest_subprocess(*INNER_OPTIONS, timeout=60)
    result.assert_outcomes(passed=len(names))
