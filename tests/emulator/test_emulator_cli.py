"""``cordvoice emulate`` as a user runs it: a subprocess that prints how to connect and stops on Ctrl-C.

A raw gateway client logs in with the printed bot token, a participant joins voice with the credentials the
emulator announces, ``cordvoice emulate fault`` closes its socket with 4015 through the control route, and
SIGINT stops the emulator cleanly.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import signal
import socket
import sys
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from cordvoice import cli
from cordvoice.commands import emulate
from cordvoice.emulator import Participant
from cordvoice.emulator.control import FAULT_KINDS

from .emulator_helpers import RawGateway


def command() -> list[str]:
    script = Path(sys.executable).with_name("cordvoice")
    return [str(script)] if script.exists() else [sys.executable, "-m", "cordvoice"]


async def run_cli(*args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *command(), *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    async with asyncio.timeout(30):
        out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


@contextlib.asynccontextmanager
async def running_emulator(*args: str) -> AsyncIterator[tuple[asyncio.subprocess.Process, dict[str, Any]]]:
    process = await asyncio.create_subprocess_exec(
        *command(), "emulate", "--json", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        assert process.stdout is not None
        async with asyncio.timeout(30):
            line = await process.stdout.readline()
        assert line, "the emulator printed nothing"
        yield process, json.loads(line)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


def control_get(url: str, token: str) -> Any:
    request = urllib.request.Request(url, headers={"Authorization": f"Emulator {token}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


class _Emu:
    """Just enough of an Emulator for RawGateway.login against a URL from the JSON output."""

    def __init__(self, gateway_url: str) -> None:
        self.gateway_url = gateway_url

    def client_ssl_context(self) -> None:
        return None


async def test_emulate_prints_json_serves_a_client_takes_a_fault_and_stops_on_sigint() -> None:
    async with running_emulator("--channels", "2", "--bots", "2") as (process, info):
        assert info["gateway_url"].startswith("ws://127.0.0.1:") and info["api_base"].endswith("/api/v10")
        assert info["ca_file"] is None and info["tls"] is False
        assert len(info["bots"]) == 2 and all(len(bot["token"]) > 50 for bot in info["bots"])
        (guild,) = info["guilds"]
        assert [c["dave_required"] for c in guild["voice_channels"]] == [True, True]
        assert len(guild["stage_channels"]) == 1 and len(info["voice_servers"]) == 1

        bot = info["bots"][0]
        bot_id, guild_id = int(bot["id"]), int(guild["id"])
        channel_id = int(guild["voice_channels"][0]["id"])
        gateway = await RawGateway.login(_Emu(info["gateway_url"]), bot["token"])  # type: ignore[arg-type]
        await gateway.join(guild_id, channel_id)
        _, _, state = await gateway.expect("VOICE_STATE_UPDATE")
        _, _, server = await gateway.expect("VOICE_SERVER_UPDATE")
        assert server["endpoint"] == info["voice_servers"][0]["endpoint"]
        voice = await Participant.connect(
            endpoint=server["endpoint"],
            server_id=guild_id,
            user_id=bot_id,
            session_id=state["session_id"],
            token=server["token"],
            channel_id=channel_id,
        )
        assert voice.dave_protocol_version == 1

        token = info["control_token"]
        code, out, err = await run_cli(
            "emulate", "fault", "--api", info["api_base"], "--token", token,
            "close_client", f"user_id={bot_id}", "code=4015",
        )  # fmt: skip
        assert code == 0, err
        assert json.loads(out) == {"ok": True, "kind": "close_client", "result": 1}
        assert await voice.wait_closed() == 4015
        inspection = await asyncio.to_thread(
            control_get, f"{info['control_url']}/inspect?user_id={bot_id}", token
        )
        assert inspection["faults"] == {"close": 1, "close_4015": 1}
        assert inspection["closes_sent"] == [4015] and inspection["dave_protocol_version"] == 1

        code, out, err = await run_cli("emulate", "info", "--api", info["gateway_url"], "--token", token)
        assert code == 0 and json.loads(out)["bots"] == info["bots"]
        code, _, err = await run_cli(
            "emulate", "fault", "--api", info["api_base"], "--token", "nope", "crash"
        )
        assert code == 1 and "401" in err
        code, _, err = await run_cli(
            "emulate", "fault", "--api", info["api_base"], "--token", token, "explode"
        )
        assert code == 1 and "unknown fault kind 'explode'" in err
        code, _, err = await run_cli(
            "emulate", "fault", "--api", info["api_base"], "--token", token, "close_client", "user_id=1"
        )
        assert code == 1 and "missing ['code']" in err

        await voice.close()
        await gateway.close()
        process.send_signal(signal.SIGINT)
        async with asyncio.timeout(15):
            assert await process.wait() == 0
        assert process.stderr is not None
        assert "cordvoice emulator stopped" in (await process.stderr.read()).decode()


async def test_emulate_with_tls_prints_a_ca_file_that_exists() -> None:
    async with running_emulator("--tls", "--no-aes") as (process, info):
        assert info["tls"] is True and info["gateway_url"].startswith("wss://")
        ca = Path(info["ca_file"])
        assert ca.read_text().startswith("-----BEGIN CERTIFICATE-----")  # noqa: ASYNC240
        code, out, err = await run_cli(
            "emulate", "info", "--api", info["api_base"], "--token", info["control_token"], "--ca", str(ca)
        )
        assert code == 0, err
        assert json.loads(out)["ca_file"] == str(ca)
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(15):
            assert await process.wait() == 0
        assert not ca.exists(), "the temporary CA is removed on exit"  # noqa: ASYNC240


async def served_in_process(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[str, str]:
    """What ``cordvoice emulate ARGV`` prints before it serves (run in this event loop, then stopped)."""
    parser = argparse.ArgumentParser()
    emulate.configure(parser)
    serving = asyncio.create_task(emulate._serve(parser.parse_args(argv)))
    out = err = ""
    async with asyncio.timeout(10):
        while "faults:" not in out:
            await asyncio.sleep(0.05)
            captured = capsys.readouterr()
            out, err = out + captured.out, err + captured.err
    serving.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await serving
    return out, err


@pytest.mark.parametrize("tls", [False, True])
async def test_emulate_says_how_to_point_a_cordvoice_bot_at_it(
    tls: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    """A cordvoice bot's Voice verifies TLS by default: a plain emulator needs ssl=False, a TLS one its CA."""
    out, _ = await served_in_process(capsys, *(["--tls"] if tls else []))
    api_base = re.search(r"API base +(\S+)", out)
    assert api_base is not None, out
    assert f"CORDVOICE_API_BASE={api_base.group(1)}" in out
    if tls:
        ca_file = re.search(r"CA file +(\S+)", out)
        assert ca_file is not None and f"SSL_CERT_FILE={ca_file.group(1)}" in out
    else:
        assert "Voice(client, ssl=False)" in out


async def test_non_loopback_host_prints_a_warning(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Binding a real non-loopback address in a test is not allowed: pretend 127.0.0.1 is one.
    monkeypatch.setattr(emulate, "_is_loopback", lambda host: False)
    out, err = await served_in_process(capsys, "--guilds", "2", "--stages", "0")
    assert "warning: binding 127.0.0.1, which is not a loopback address" in err
    assert out.count("  guild ") == 2 and "stage channel" not in out
    assert "CORDVOICE_EMULATOR_TOKEN=" in out and "voice channel General" in out


def test_the_command_line_and_the_control_route_know_the_same_fault_kinds() -> None:
    assert tuple(FAULT_KINDS) == emulate.FAULT_KIND_NAMES
    assert "emulate" in cli.COMMANDS
    help_text = cli.build_parser("emulate").format_help()
    assert "emulate" in help_text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--port", "70000"], "argument --port: 70000 is not a port number (0 to 65535)"),
        (["--voice-port", "-1"], "argument --voice-port: -1 is not a port number (0 to 65535)"),
        (["fault", "--api", "127.0.0.1:9", "--token", "t", "--ca", "/no/such/ca.pem", "crash"], "CA file"),
        (["info", "--api", "http://[::1", "--token", "t"], "--api 'http://[::1' is not a URL"),
    ],
)
async def test_emulate_refuses_bad_arguments_in_one_line(args: list[str], message: str) -> None:
    code, _, err = await run_cli("emulate", *args)
    assert code == 2 and message in err and "Traceback" not in err, err


async def test_emulate_on_a_port_in_use_says_so() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, out, err = await run_cli("emulate", "--port", str(port))
    assert code == 1 and "Traceback" not in err, err
    assert f"cordvoice emulate: cannot serve on 127.0.0.1:{port}" in err and not out


async def test_a_quiet_emulate_logs_no_connection_events() -> None:
    """Like the other long-running commands, `cordvoice emulate` shows the wire log only with -v."""
    async with running_emulator() as (process, info):
        gateway = await RawGateway.login(_Emu(info["gateway_url"]), info["bots"][0]["token"])  # type: ignore[arg-type]
        await gateway.close()
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(15):
            assert await process.wait() == 0
        assert process.stderr is not None
        err = (await process.stderr.read()).decode()
    assert "INFO" not in err and "cordvoice emulator stopped" in err, err


async def test_emulate_info_from_something_that_is_not_an_emulator_says_so() -> None:
    async def not_http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        writer.write(b"SSH-2.0-OpenSSH_9.6\r\n")
        writer.close()

    async with await asyncio.start_server(not_http, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        for api in (f"127.0.0.1:{port}", "127.0.0.1:port"):
            code, _, err = await run_cli("emulate", "info", "--api", api, "--token", "t")
            assert code == 1 and "cannot reach the emulator" in err and "Traceback" not in err, err
