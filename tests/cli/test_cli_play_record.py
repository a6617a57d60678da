"""``cordvoice play`` and ``cordvoice record``: on an embedded emulator, and every failure's exit status.

The real-Discord path is exercised against an emulator running in the test's event loop, reached through
``--api-base`` exactly as Discord would be (GET /gateway/bot, then the gateway it names). The command runs in
a worker thread, as ``cordvoice`` would in its own process.
"""

from __future__ import annotations

import asyncio
import logging
import re
import signal
import subprocess
import sys
import time
import wave
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import pytest

from cordvoice import cli
from cordvoice.audio.samples import write_demo_ogg
from cordvoice.commands._connect import Exit
from cordvoice.demo import encode_speech
from cordvoice.emulator import Emulator

TOKEN_SENTINEL = "MTIz.not-a-real-token.c2VjcmV0LXNlbnRpbmVs"


@pytest.fixture
def sample(tmp_path: Path) -> Path:
    path = tmp_path / "sample.ogg"
    write_demo_ogg(path, 1.0)
    return path


async def _cli(*argv: str) -> int:
    return await asyncio.to_thread(cli.main, list(argv))


# ---- --emulator ---------------------------------------------------------------------------------------


async def test_play_on_the_emulator_is_heard_in_full(
    sample: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await _cli("play", str(sample), "--emulator") == 0
    out = capsys.readouterr().out
    assert re.search(
        r"emulator: ws://127\.0\.0\.1:\d+ with guild \d+, DAVE voice channel \d+, bot user \d+", out
    )
    heard = re.search(r"the emulator's listener heard (\d+) of (\d+) frames", out)
    assert heard is not None, out
    assert heard.group(1) == heard.group(2) == str(51 + 5)  # the sample's packets and the silence tail


async def test_record_on_the_emulator_writes_everyone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_dir = tmp_path / "rec"
    assert await _cli("record", "--emulator", "--seconds", "3", "--out", str(out_dir)) == 0
    out = capsys.readouterr().out
    talkers = re.search(r"participants (\d+), (\d+) take turns", out)
    assert talkers is not None, out
    for user_id in talkers.groups():
        assert re.search(rf"user {user_id}: \d+ frames, 0 lost, 0 undecryptable", out)
        samples = _wav(out_dir / f"{user_id}.wav")
        assert len(samples) == 3 * 48_000, "every file is exactly --seconds long"
        assert np.sqrt(np.mean(samples.astype(np.float64) ** 2)) > 200
        assert (out_dir / f"{user_id}.opus").read_bytes()[:4] == b"OggS"
    assert len(_wav(out_dir / "mixed.wav")) == 3 * 48_000


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGINT, Exit.INTERRUPTED), (signal.SIGTERM, 143)])
def test_a_stopped_recording_leaves_complete_files(tmp_path: Path, signum: int, status: int) -> None:
    """Ctrl-C or SIGTERM mid-recording: the bot leaves and every file written so far is whole."""
    out_dir = tmp_path / "rec"
    argv = ["record", "--emulator", "--seconds", "60", "--out", str(out_dir)]
    with subprocess.Popen(
        [sys.executable, "-m", "cordvoice", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as process:
        assert process.stdout is not None
        for line in process.stdout:  # the participants take turns from this line on
            if "take turns talking" in line:
                break
        time.sleep(1.5)
        process.send_signal(signum)
        _, err = process.communicate(timeout=30)
    assert process.returncode == status, err
    assert "Traceback" not in err
    lengths = {path.name: _decoded_samples(path) for path in out_dir.iterdir()}
    assert len(lengths) == 3, lengths  # the first talker's WAV and Ogg Opus, and mixed.wav
    assert all(samples >= 48_000 for samples in lengths.values()), lengths
    assert len({samples for name, samples in lengths.items() if name.endswith(".wav")}) == 1, lengths


def _decoded_samples(path: Path) -> int:
    with av.open(str(path)) as container:
        return sum(frame.samples for frame in container.decode(container.streams.audio[0]))


def _wav(path: Path) -> np.ndarray:
    with wave.open(str(path)) as file:
        return np.frombuffer(file.readframes(file.getnframes()), dtype="<i2").reshape(-1, 2)


# ---- the real-Discord path, against an emulator ------------------------------------------------------


@dataclass
class World:
    emu: Emulator
    token: str
    bot_id: int
    guild: int
    channel: int
    full_channel: int
    stage: int
    other_guild: int

    def target(self, *, guild: int | None = None, channel: int | None = None) -> list[str]:
        return [
            "--api-base",
            self.emu.api_base,
            "--guild",
            str(self.guild if guild is None else guild),
            "--channel",
            str(self.channel if channel is None else channel),
        ]


@pytest.fixture
async def world() -> AsyncIterator[World]:
    async with Emulator(close_timeout=0.5) as emu:
        bot = emu.create_bot("cli-bot")
        guild = emu.create_guild("cli guild", members=[bot.user_id])
        channel = emu.create_voice_channel(guild.id, "General")
        full = emu.create_voice_channel(guild.id, "Full", user_limit=1)
        stage = emu.create_stage_channel(guild.id)
        other = emu.create_guild("not the bot's")
        await emu.add_participant(full.id, name="occupant")
        assert bot.token is not None
        yield World(emu, bot.token, bot.user_id, guild.id, channel.id, full.id, stage.id, other.id)


async def test_play_on_discord_plays_to_the_channel(
    world: World, sample: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    listener = await world.emu.add_participant(world.channel, name="listener")
    monkeypatch.setenv("DISCORD_TOKEN", world.token)
    assert await _cli("play", str(sample), *world.target()) == 0
    assert f"in channel {world.channel}: 51 frames" in capsys.readouterr().out
    frames = await listener.wait_for_frames(world.bot_id, 51 + 5)  # the sample and the silence tail
    assert sum(frame.dave for frame in frames) == 51


async def test_play_says_when_the_bot_is_disconnected_halfway(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    long = tmp_path / "long.ogg"
    write_demo_ogg(long, 20.0)
    listener = await world.emu.add_participant(world.channel, name="listener")
    monkeypatch.setenv("DISCORD_TOKEN", world.token)
    playing = asyncio.ensure_future(_cli("play", str(long), *world.target()))
    await listener.wait_for_frames(world.bot_id, 25)
    world.emu.faults.kick(world.bot_id)
    async with asyncio.timeout(10):
        assert await playing == Exit.ERROR
    captured = capsys.readouterr()
    assert "the bot was disconnected from the channel" in captured.err
    assert "played" not in captured.out


async def test_record_stops_when_the_bot_is_disconnected(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    talker = await world.emu.add_participant(world.channel, name="talker")
    talking = asyncio.ensure_future(talker.play(encode_speech(10.0, 1)))
    monkeypatch.setenv("DISCORD_TOKEN", world.token)
    recording = asyncio.ensure_future(
        _cli("record", "--seconds", "60", "--out", str(tmp_path), *world.target())
    )
    try:
        await asyncio.sleep(1.5)
        world.emu.faults.kick(world.bot_id)
        async with asyncio.timeout(10):
            assert await recording == Exit.ERROR
    finally:
        talking.cancel()
    assert "the bot was disconnected from the channel" in capsys.readouterr().err
    kept = len(_wav(tmp_path / "mixed.wav"))
    assert 48_000 < kept < 3 * 48_000 and len(_wav(tmp_path / f"{talker.user_id}.wav")) == kept


async def test_record_on_a_stage_channel_without_dave(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DISCORD_TOKEN", world.token)
    args = [
        "record",
        "--seconds",
        "0.5",
        "--out",
        str(tmp_path),
        "--no-dave",
        *world.target(channel=world.stage),
    ]
    assert await _cli(*args) == 0
    assert len(_wav(tmp_path / "mixed.wav")) == 24_000


async def test_a_recording_that_ends_mid_sentence_is_exactly_seconds_long(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The frames the jitter buffer releases after the end do not make one member's files run longer."""
    monkeypatch.setenv("DISCORD_TOKEN", world.token)
    talker = await world.emu.add_participant(world.channel, name="talker")
    talking = asyncio.ensure_future(talker.play(encode_speech(6.0, 1)))
    try:
        assert await _cli("record", "--seconds", "2", "--out", str(tmp_path), *world.target()) == 0
    finally:
        talking.cancel()
    assert len(_wav(tmp_path / "mixed.wav")) == 2 * 48_000
    assert len(_wav(tmp_path / f"{talker.user_id}.wav")) == 2 * 48_000
    assert abs(_decoded_samples(tmp_path / f"{talker.user_id}.opus") - 2 * 48_000) < 960


async def test_a_file_that_cannot_be_written_fails_the_recording(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A folder where the talker's WAV should go: status 8 and why, and the other files are still whole."""
    monkeypatch.setenv("DISCORD_TOKEN", world.token)
    talker = await world.emu.add_participant(world.channel, name="talker")
    (tmp_path / f"{talker.user_id}.wav").mkdir()
    talking = asyncio.ensure_future(talker.play(encode_speech(3.0, 1)))
    try:
        assert await _cli("record", "--seconds", "2", "--out", str(tmp_path), *world.target()) == Exit.AUDIO
    finally:
        talking.cancel()
    assert f"cannot create {str(tmp_path / f'{talker.user_id}.wav')!r}" in capsys.readouterr().err
    assert len(_wav(tmp_path / "mixed.wav")) == 2 * 48_000
    assert abs(_decoded_samples(tmp_path / f"{talker.user_id}.opus") - 2 * 48_000) < 960


async def test_a_mixed_file_that_cannot_be_written_fails_the_recording(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A full disk under mixed.wav: status 8 and why, not a success that lists a broken mixed.wav."""
    monkeypatch.setenv("DISCORD_TOKEN", world.token)
    talker = await world.emu.add_participant(world.channel, name="talker")
    (tmp_path / "mixed.wav").symlink_to("/dev/full")  # every flush fails (ENOSPC)
    talking = asyncio.ensure_future(talker.play(encode_speech(3.0, 1)))
    try:
        assert await _cli("record", "--seconds", "2", "--out", str(tmp_path), *world.target()) == Exit.AUDIO
    finally:
        talking.cancel()
    captured = capsys.readouterr()
    assert "mixed.wav" in captured.err and "No space left on device" in captured.err
    assert "recorded" not in captured.out
    assert len(_wav(tmp_path / f"{talker.user_id}.wav")) == 2 * 48_000


async def test_missing_token(
    world: World, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("DISCORD_TOKEN", raising=False)
    assert await _cli("record", *world.target()) == Exit.TOKEN
    assert "set $DISCORD_TOKEN" in capsys.readouterr().err


async def test_a_rejected_token_is_explained_and_never_shown(
    world: World,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("DISCORD_TOKEN", TOKEN_SENTINEL)
    assert await _cli("-vv", "record", *world.target()) == Exit.TOKEN
    captured = capsys.readouterr()
    assert "rejected the bot token" in captured.err
    secret = TOKEN_SENTINEL.rsplit(".", maxsplit=1)[-1]
    assert secret not in captured.out + captured.err + caplog.text


@pytest.mark.parametrize("token", [f"{TOKEN_SENTINEL[:8]}\n{TOKEN_SENTINEL[8:]}", f"{TOKEN_SENTINEL}\u20ac"])
async def test_a_malformed_token_is_refused_and_never_shown(
    world: World,
    token: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A token pasted with a line break or a stray character cannot go in an HTTP header: no traceback."""
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("DISCORD_TOKEN", token)
    assert await _cli("-vv", "record", *world.target()) == Exit.TOKEN
    captured = capsys.readouterr()
    assert "$DISCORD_TOKEN is not usable" in captured.err
    secret = TOKEN_SENTINEL.rsplit(".", maxsplit=1)[-1]
    assert secret not in captured.out + captured.err + caplog.text


async def test_the_real_token_is_never_shown(
    world: World,
    sample: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    await world.emu.add_participant(world.channel, name="listener")  # DAVE plays only to a group
    monkeypatch.setenv("DISCORD_TOKEN", world.token)
    assert await _cli("-vv", "play", str(sample), *world.target()) == 0
    captured = capsys.readouterr()
    assert world.token.split(".")[-1] not in captured.out + captured.err + caplog.text


async def test_unknown_guild(
    world: World, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DISCORD_TOKEN", world.token)
    assert await _cli("record", *world.target(guild=world.other_guild)) == Exit.UNKNOWN_TARGET
    err = capsys.readouterr().err
    assert f"not in guild {world.other_guild}" in err and f"'cli guild' ({world.guild})" in err


async def test_unknown_channel(
    world: World, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DISCORD_TOKEN", world.token)
    assert await _cli("record", *world.target(channel=12345)) == Exit.UNKNOWN_TARGET
    err = capsys.readouterr().err
    assert "channel 12345 is not a voice or stage channel" in err and f"'General' ({world.channel})" in err


async def test_join_timeout_explains_a_full_channel(
    world: World, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DISCORD_TOKEN", world.token)
    args = ["record", "--join-timeout", "0.5", *world.target(channel=world.full_channel)]
    assert await _cli(*args) == Exit.JOIN_TIMEOUT
    assert "channel 'Full' is full (1/1)" in capsys.readouterr().err


async def test_dave_required(
    world: World, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DISCORD_TOKEN", world.token)
    assert await _cli("record", "--no-dave", *world.target()) == Exit.DAVE_REQUIRED
    err = capsys.readouterr().err
    assert "requires DAVE" in err and "without --no-dave" in err


async def test_unreachable_discord(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DISCORD_TOKEN", TOKEN_SENTINEL)
    args = ["record", "--api-base", "http://127.0.0.1:9/api/v10", "--guild", "1", "--channel", "2"]
    assert await _cli(*args) == Exit.NETWORK
    assert "could not reach" in capsys.readouterr().err


@pytest.mark.parametrize(
    "api_base", ["discord.com/api/v10", "http://localhost:port/api/v10", "http://[::1/api"]
)
async def test_a_malformed_api_base_is_a_network_error(
    api_base: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DISCORD_TOKEN", TOKEN_SENTINEL)
    assert await _cli("record", "--api-base", api_base, "--guild", "1", "--channel", "2") == Exit.NETWORK
    assert f"could not reach {api_base}/gateway/bot" in capsys.readouterr().err


async def test_an_api_base_that_is_not_http_is_a_network_error(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    async def not_http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        writer.write(b"SSH-2.0-OpenSSH_9.6\r\n")
        writer.close()

    server = await asyncio.start_server(not_http, "127.0.0.1", 0)
    api_base = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/api/v10"
    monkeypatch.setenv("DISCORD_TOKEN", TOKEN_SENTINEL)
    async with server:
        assert await _cli("record", "--api-base", api_base, "--guild", "1", "--channel", "2") == Exit.NETWORK
    assert "BadStatusLine" in capsys.readouterr().err


async def test_unreadable_audio(world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISCORD_TOKEN", world.token)
    assert await _cli("play", str(tmp_path / "missing.ogg"), *world.target()) == Exit.AUDIO
    broken = tmp_path / "broken.ogg"
    broken.write_bytes(b"OggS" + bytes(200))
    assert await _cli("play", str(broken), *world.target()) == Exit.AUDIO


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["record"], "--guild and --channel are required"),
        (["record", "--emulator", "--guild", "1"], "--emulator creates its own guild"),
        (["play", "x.ogg", "--guild", "abc", "--channel", "1"], "is not a numeric Discord id"),
        (["record", "--emulator", "--seconds", "-1"], "more than 0"),
        (["record", "--emulator", "--join-timeout", "nan"], "--join-timeout must be positive"),
    ],
)
def test_usage_errors(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as raised:
        cli.main(argv)
    assert raised.value.code == Exit.USAGE
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("command", ["play", "record"])
def test_help_lists_the_exit_statuses(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    out = capsys.readouterr().out
    for status in Exit:
        assert re.search(rf"^  {int(status)} ", out, re.MULTILINE), (
            f"exit status {int(status)} is not documented"
        )
    assert "$DISCORD_TOKEN" in out
