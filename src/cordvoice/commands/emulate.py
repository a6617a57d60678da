"""``cordvoice emulate``: run the local Discord emulator standalone, and inject faults into a running one.

``cordvoice emulate [options]`` starts an :class:`~cordvoice.emulator.Emulator` with bots, guilds, DAVE voice
channels and stage channels, prints how to connect (gateway URL, API base, CA file with ``--tls``, bot tokens,
ids; ``--json`` for one machine-readable line) and serves until Ctrl-C or SIGTERM.

``cordvoice emulate fault --api URL --token TOKEN KIND [NAME=VALUE ...]`` calls one method of ``emu.faults``
on a running emulator through its control route (``KIND`` is the method name, the pairs its keyword
arguments; see :mod:`cordvoice.emulator.control`), e.g. ``close_client user_id=123 code=4015``.
``cordvoice emulate info`` prints the running emulator's connection details again.

The tokens are the emulator's own fake ones, so printing them is fine; binding a non-loopback host prints a
warning, because anyone who can reach the port can then log in and inject faults with what is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import os
import signal
import ssl
import sys
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

from cordvoice.commands._logging import follow_verbosity

__all__ = ["FAULT_KIND_NAMES", "configure", "run"]

#: The fault kinds the control route accepts (``cordvoice.emulator.control.FAULT_KINDS``), listed here so that
#: the command line does not import the emulator just to print its help.
FAULT_KIND_NAMES = (
    "close_client",
    "drop_client",
    "crash",
    "withhold_acks",
    "restore_acks",
    "move_guild",
    "move_client",
    "kick",
    "delete_channel",
    "impair",
    "clear_impairment",
    "clear_impairments",
    "pause_udp",
    "resume_udp",
    "inject_raw",
    "inject_garbage",
    "inject_rtp",
    "inject_rtcp",
)

_TOKEN_VARIABLE = "CORDVOICE_EMULATOR_TOKEN"
_CONTROL_PREFIX = "/_emulator"  # cordvoice.emulator.control.CONTROL_PREFIX, without importing the emulator


def configure(parser: argparse.ArgumentParser) -> None:
    """Options of the standalone emulator, and the ``fault`` / ``info`` client actions."""
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=_port, default=0, help="gateway/API port (default: a free one)")
    parser.add_argument("--voice-servers", type=int, default=1, metavar="N", help="voice servers (default 1)")
    parser.add_argument(
        "--voice-port",
        type=_port,
        action="append",
        default=[],
        metavar="PORT",
        help="WebSocket port of the next voice server (repeat; default: free ports)",
    )
    parser.add_argument(
        "--tls", action="store_true", help="serve TLS with a fresh local CA (discord.py needs it)"
    )
    parser.add_argument("--guilds", type=int, default=1, metavar="N", help="guilds (default 1)")
    parser.add_argument(
        "--channels", type=int, default=1, metavar="N", help="DAVE voice channels per guild (default 1)"
    )
    parser.add_argument(
        "--stages", type=int, default=1, metavar="N", help="stage channels per guild (default 1)"
    )
    parser.add_argument(
        "--bots", type=int, default=1, metavar="N", help="bots, members of every guild (default 1)"
    )
    parser.add_argument(
        "--no-aes", action="store_true", help="do not offer AES-GCM (exercise the XChaCha20 fallback)"
    )
    parser.add_argument("--json", action="store_true", help="print the connection details as one JSON line")
    actions = parser.add_subparsers(dest="emulate_action", metavar="ACTION")
    fault = actions.add_parser(
        "fault",
        help="inject a fault into a running emulator",
        description="Call emu.faults.KIND(NAME=VALUE, ...) on a running emulator through its control "
        f"route. Kinds: {', '.join(FAULT_KIND_NAMES)}. Bytes are hex, lists comma-separated, e.g. "
        "'close_client user_id=123 code=4015' or 'impair loss=0.1 seed=7'.",
    )
    info = actions.add_parser("info", help="print a running emulator's connection details")
    for sub in (fault, info):
        sub.add_argument("--api", required=True, help="the emulator's API base, control or gateway URL")
        sub.add_argument(
            "--token",
            default=os.environ.get(_TOKEN_VARIABLE),
            help=f"the emulator's control token (default: ${_TOKEN_VARIABLE})",
        )
        sub.add_argument("--ca", help="CA file to trust (an emulator started with --tls)")
    fault.add_argument("kind", metavar="KIND", help="the emu.faults method to call")
    fault.add_argument("params", nargs="*", metavar="NAME=VALUE", help="its keyword arguments")


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 65_535:
        raise argparse.ArgumentTypeError(f"{text} is not a port number (0 to 65535)")
    return value


def run(args: argparse.Namespace) -> int:
    action = getattr(args, "emulate_action", None)
    if action in ("fault", "info"):
        return _call_control(args)
    follow_verbosity()
    return asyncio.run(_serve(args))


# ---- the standalone emulator --------------------------------------------------------------------------


async def _serve(args: argparse.Namespace) -> int:
    from cordvoice.emulator import Emulator, VoiceServerConfig  # noqa: PLC0415 - heavy, only when serving
    from cordvoice.emulator.world import describe, populate  # noqa: PLC0415

    emu = Emulator(
        args.host,
        args.port,
        tls=args.tls,
        voice_servers=args.voice_servers,
        voice_ports=args.voice_port,
        voice_config=VoiceServerConfig(offer_aes=not args.no_aes),
    )
    if not _is_loopback(args.host):
        print(
            f"warning: binding {args.host}, which is not a loopback address: anyone who can reach it can log "
            "in with the printed tokens and inject faults",
            file=sys.stderr,
        )
    try:
        await emu.start()
    except OSError as exc:  # the address is taken, or not one of this machine's
        print(f"cordvoice emulate: cannot serve on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    handled: list[signal.Signals] = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, AttributeError, ValueError):  # Windows: Ctrl-C raises
            loop.add_signal_handler(signum, stop.set)
            handled.append(signum)
    try:
        populate(
            emu,
            guilds=args.guilds,
            voice_channels=args.channels,
            stage_channels=args.stages,
            bots=args.bots,
        )
        details = describe(emu)
        if args.json:
            print(json.dumps(details, separators=(",", ":")))
        else:
            print(_human(details))
        sys.stdout.flush()
        await stop.wait()
    finally:
        for signum in handled:
            loop.remove_signal_handler(signum)
        await emu.close()
    print("cordvoice emulator stopped", file=sys.stderr)
    return 0


def _is_loopback(host: str) -> bool:
    import ipaddress  # noqa: PLC0415

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _human(details: dict[str, Any]) -> str:
    lines = [
        "cordvoice Discord emulator (Ctrl-C to stop)",
        f"  gateway URL   {details['gateway_url']}",
        f"  API base      {details['api_base']}",
    ]
    if details["ca_file"]:
        lines.append(f"  CA file       {details['ca_file']}   (trust it: discord.py dials wss:// for voice)")
    lines.extend(
        f"  voice server  {server['id']}: {server['endpoint']} (UDP {server.get('udp', '?')})"
        for server in details["voice_servers"]
    )
    lines.extend(
        f"  bot           {bot['name']}  id {bot['id']}  token {bot['token']}" for bot in details["bots"]
    )
    for guild in details["guilds"]:
        lines.append(f"  guild         {guild['name']}  id {guild['id']}")
        lines.extend(
            f"    voice channel {c['name']}  id {c['id']}  (DAVE required)" for c in guild["voice_channels"]
        )
        lines.extend(
            f"    stage channel {c['name']}  id {c['id']}  (DAVE version 0)" for c in guild["stage_channels"]
        )
    # Voice verifies TLS by default, so a plain emulator's ws:// voice servers need ssl=False.
    trust = (
        f"SSL_CERT_FILE={details['ca_file']}"
        if details["ca_file"]
        else "and Voice(client, ssl=False) (the voice servers speak plain ws://)"
    )
    lines += [
        "",
        f"  cordvoice:   CORDVOICE_API_BASE={details['api_base']} {trust}",
        "  discord.py:  discord.http.Route.BASE = API base; DiscordWebSocket.DEFAULT_GATEWAY = gateway URL",
        "               (or cordvoice.emulator.for_discordpy.discordpy_pointed_at)",
        f"  faults:      {_TOKEN_VARIABLE}={details['control_token']} "
        f"cordvoice emulate fault --api {details['api_base']} KIND [NAME=VALUE ...]",
    ]
    return "\n".join(lines)


# ---- the control client ---------------------------------------------------------------------------------


def _control_base(api: str) -> str:
    """``http(s)://host:port/_emulator`` from any of the emulator's URLs."""
    parts = urlsplit(api if "://" in api else f"http://{api}")
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    return urlunsplit((scheme, parts.netloc, _CONTROL_PREFIX, "", ""))


def _call_control(args: argparse.Namespace) -> int:
    command = f"cordvoice emulate {args.emulate_action}"
    if not args.token:
        print(f"{command}: pass --token (or set {_TOKEN_VARIABLE}); the emulator printed it", file=sys.stderr)
        return 2
    try:
        base = _control_base(args.api)
    except ValueError as exc:
        print(f"{command}: --api {args.api!r} is not a URL: {exc}", file=sys.stderr)
        return 2
    if args.emulate_action == "info":
        url = f"{base}/info"
    else:
        query: dict[str, str] = {"kind": args.kind}
        for pair in args.params:
            name, sep, value = pair.partition("=")
            if not sep or not name:
                print(f"{command}: expected NAME=VALUE, got {pair!r}", file=sys.stderr)
                return 2
            query[name] = value
        url = f"{base}/fault?{urlencode(query)}"
    request = urllib.request.Request(url, headers={"Authorization": f"Emulator {args.token}"})
    try:
        context = ssl.create_default_context(cafile=args.ca) if args.ca else None
    except OSError as exc:
        print(f"{command}: cannot load the CA file {args.ca!r}: {exc}", file=sys.stderr)
        return 2
    try:
        with urllib.request.urlopen(request, timeout=30, context=context) as response:
            body = json.load(response)
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read()).get("message", exc.reason)
        except ValueError:
            message = exc.reason
        print(f"{command}: {exc.code}: {message}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as exc:
        print(f"{command}: cannot reach the emulator at {base}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(body, indent=None if args.emulate_action == "fault" else 2))
    return 0
