"""The emulator binds loopback unless told otherwise, and warns when it is told otherwise.

Every socket it opens (gateway and REST, each voice server's WebSocket and UDP) is on 127.0.0.1 by default.
A non-loopback host gets a warning from the library (logged) and from ``cordvoice emulate`` (printed): anyone
who can reach the port can log in with the emulator's tokens and inject faults. Binding a real public
address in a test is not acceptable, so the loopback check is told 127.0.0.1 is not loopback.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cordvoice.emulator import Emulator
from cordvoice.emulator import server as emulator_server


def _listening_addresses() -> set[str]:
    """Local addresses of this process's TCP listeners and UDP sockets (from /proc/net)."""
    inodes = set()
    for entry in Path("/proc/self/fd").iterdir():
        try:
            target = os.readlink(entry)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = set()
    for name in ("tcp", "udp", "tcp6", "udp6"):
        path = Path("/proc/net") / name
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            if fields[9] not in inodes or (name.startswith("tcp") and fields[3] != "0A"):  # 0A: LISTEN
                continue
            raw = fields[1].split(":")[0]
            packed = bytes.fromhex(raw)
            if len(packed) == 4:
                found.add(str(ipaddress.IPv4Address(packed[::-1])))
            else:
                words = b"".join(packed[i : i + 4][::-1] for i in range(0, 16, 4))
                found.add(str(ipaddress.IPv6Address(words)))
    return found


async def _new_emulator_addresses() -> dict[str, object]:
    before = _listening_addresses()
    async with Emulator(voice_servers=2) as emu:
        return {
            "addresses": sorted(_listening_addresses() - before),
            "gateway_url": emu.gateway_url,
            "voice_endpoints": [server.endpoint for server in emu._emulated_voice_servers()],
        }


def test_the_emulator_binds_loopback_by_default() -> None:
    """Checked in a fresh interpreter: here, a socket that an earlier test left to a background task (a client
    reconnecting, say) could open during the check and be counted as the emulator's."""
    result = subprocess.run(
        [sys.executable, __file__], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["addresses"] == ["127.0.0.1"], report
    assert report["gateway_url"].startswith("ws://127.0.0.1:")
    assert len(report["voice_endpoints"]) == 2
    assert all(endpoint.startswith("127.0.0.1:") for endpoint in report["voice_endpoints"])
    assert "not a loopback address" not in result.stderr


async def test_a_non_loopback_host_gets_a_warning(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(emulator_server, "_is_loopback", lambda host: False)
    caplog.set_level(logging.WARNING, logger="cordvoice")
    async with Emulator(host="127.0.0.1"):
        pass
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "not a loopback" in r.message]
    assert len(warnings) == 1 and "anyone who can reach" in warnings[0].message


def test_the_loopback_check() -> None:
    assert emulator_server._is_loopback("127.0.0.1") and emulator_server._is_loopback("::1")
    assert emulator_server._is_loopback("localhost")
    for host in ("0.0.0.0", "::", "", "192.168.1.10", "example.com"):
        assert not emulator_server._is_loopback(host), host


def test_emulate_binds_loopback_by_default() -> None:
    """``cordvoice emulate``'s default host (its stderr warning: tests/emulator/test_emulator_cli.py)."""
    import argparse  # noqa: PLC0415

    from cordvoice.commands import emulate  # noqa: PLC0415

    assert emulate._is_loopback("127.0.0.1") and not emulate._is_loopback("0.0.0.0")
    parser = argparse.ArgumentParser()
    emulate.configure(parser)
    assert parser.parse_args([]).host == "127.0.0.1", "the command binds loopback unless told otherwise"


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    print(json.dumps(asyncio.run(_new_emulator_addresses())))
