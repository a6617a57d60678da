"""The emulator binds loopback unless told otherwise, and warns when it is told otherwise.

Every socket it opens (gateway and REST, each voice server's WebSocket and UDP) is on 127.0.0.1 by default.
A non-loopback host gets a warning from the library (logged) and from ``cordvoice emulate`` (printed): anyone
who can reach the port can log in with the emulator's tokens and inject faults. Binding a real public
address in a test is not acceptable, so the loopback check is told 127.0.0.1 is not loopback.
"""

from __future__ import annotations

import ipaddress
import logging
import os
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


async def test_the_emulator_binds_loopback_by_default(caplog: pytest.LogCaptureFixture) -> None:
    before = _listening_addresses()
    caplog.set_level(logging.WARNING, logger="cordvoice")
    async with Emulator(voice_servers=2) as emu:
        addresses = _listening_addresses() - before
        assert addresses == {"127.0.0.1"}, addresses
        assert emu.gateway_url.startswith("ws://127.0.0.1:")
        assert all(server.endpoint.startswith("127.0.0.1:") for server in emu._emulated_voice_servers())
    assert "not a loopback address" not in caplog.text


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
