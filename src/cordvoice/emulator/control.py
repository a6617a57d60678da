"""The emulator's control routes: fault injection and inspection over HTTP, for ``cordvoice emulate fault``.

They share the emulator's port with the gateway and the REST API, under ``/_emulator/``, and need the
emulator's control token (``Authorization: Emulator <token>``). websockets answers plain HTTP only for
body-less requests, so every route is a ``GET`` with query parameters:

* ``GET /_emulator/info``: what ``cordvoice emulate --json`` prints (URLs, tokens, ids);
* ``GET /_emulator/inspect?user_id=...``: ``emu.inspect(user_id)`` as JSON;
* ``GET /_emulator/fault?kind=<method>&<parameter>=<value>...``: one call on ``emu.faults``. ``kind`` is the
  method name (``close_client``, ``crash``, ``impair``, ...; dashes work too) and the parameters are its
  keyword arguments; bytes are hexadecimal and lists comma-separated. :data:`FAULT_KINDS` lists them.

Errors are JSON ``{"message": ...}`` with 400 (bad parameters), 401 (wrong token), 404 (unknown route) or 409
(an unknown id, or a fault the emulator's state does not allow, e.g. a user who is not in voice).
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit

from cordvoice.emulator.faults import Impairment
from cordvoice.emulator.rest import RestResponse
from cordvoice.emulator.state import VoiceServer
from cordvoice.emulator.world import describe
from cordvoice.errors import EmulatorError, InvalidArgumentError

if TYPE_CHECKING:
    from cordvoice.emulator.server import Emulator

__all__ = ["CONTROL_PREFIX", "FAULT_KINDS", "ControlApi"]

logger = logging.getLogger(__name__)

CONTROL_PREFIX = "/_emulator"

_Convert = Callable[[str], Any]


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{text!r} is not a boolean")


def _hex(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


def _ints(text: str) -> list[int]:
    return [int(part, 0) for part in text.split(",") if part.strip()]


def _int(text: str) -> int:
    return int(text, 0)


_USER = {"user_id": _int, "guild_id": _int}
_SERVER = {"server_id": _int, "guild_id": _int}

#: kind -> (required parameters, optional parameters), each with its converter.
FAULT_KINDS: dict[str, tuple[dict[str, _Convert], dict[str, _Convert]]] = {
    "close_client": ({"user_id": _int, "code": _int}, {"reason": str, "guild_id": _int}),
    "drop_client": ({"user_id": _int}, {"guild_id": _int}),
    "crash": ({}, {**_SERVER, "code": _int}),
    "withhold_acks": ({"user_id": _int}, {"count": _int, "guild_id": _int}),
    "restore_acks": ({"user_id": _int}, {"guild_id": _int}),
    "move_guild": (
        {"guild_id": _int},
        {"server_id": _int, "null_endpoint_first": _bool, "pause": float},
    ),
    "move_client": (
        {"user_id": _int},
        {"server_id": _int, "guild_id": _int, "null_endpoint_first": _bool, "pause": float},
    ),
    "kick": ({"user_id": _int}, {"guild_id": _int}),
    "delete_channel": ({"channel_id": _int}, {}),
    "impair": (
        {},
        {
            "user_id": _int,
            "loss": float,
            "duplicate": float,
            "reorder": float,
            "delay": float,
            "jitter": float,
            "seed": _int,
        },
    ),
    "clear_impairment": ({}, {"user_id": _int}),
    "clear_impairments": ({}, {}),
    "pause_udp": ({}, dict(_SERVER)),
    "resume_udp": ({}, dict(_SERVER)),
    "inject_raw": ({"user_id": _int, "data": _hex}, {"guild_id": _int}),
    "inject_garbage": ({"user_id": _int}, {"size": _int, "seed": _int, "guild_id": _int}),
    "inject_rtp": (
        {"user_id": _int},
        {
            "ssrc": _int,
            "sequence": _int,
            "timestamp": _int,
            "payload": _hex,
            "marker": _bool,
            "payload_type": _int,
            "extension": _hex,
            "extension_profile": _int,
            "padding": _int,
            "csrcs": _ints,
            "wrong_key": _bool,
            "guild_id": _int,
        },
    ),
    "inject_rtcp": (
        {"user_id": _int},
        {"packet_type": _int, "ssrc": _int, "body": _hex, "wrong_key": _bool, "guild_id": _int},
    ),
}


def _jsonable(value: Any) -> Any:
    """Results and inspections as JSON: bytes in hex, dataclasses as objects, dict keys as strings."""
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, VoiceServer):
        return {"id": value.id, "endpoint": value.endpoint}
    if isinstance(value, Impairment):
        return {"config": _jsonable(value.config), "counters": dict(value.counters)}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return repr(value)


def _error(status: int, message: str) -> RestResponse:
    return RestResponse(status, {"message": message})


class ControlApi:
    """Answers ``/_emulator/...`` requests against one emulator (see the module docstring)."""

    def __init__(self, emulator: Emulator) -> None:
        self._emu = emulator
        self.requests: Counter[str] = Counter()
        """Requests by route, plus ``unauthorized`` and ``failed``."""

    async def handle(self, target: str, authorization: str | None) -> RestResponse:
        """Answer one request; ``target`` is the path with its query."""
        split = urlsplit(target)
        route = split.path.removeprefix(CONTROL_PREFIX).strip("/")
        expected = f"Emulator {self._emu.control_token}"
        if authorization is None or not secrets.compare_digest(authorization.encode(), expected.encode()):
            self.requests["unauthorized"] += 1
            return _error(401, "401: the control routes need 'Authorization: Emulator <control token>'")
        self.requests[route] += 1
        try:
            params = dict(parse_qsl(split.query, keep_blank_values=True, strict_parsing=False))
        except ValueError:
            return _error(400, "the query string is malformed")
        try:
            if route == "info":
                return RestResponse(200, describe(self._emu))
            if route == "inspect":
                user_id = _int(params.get("user_id", ""))
                guild_id = _int(params["guild_id"]) if "guild_id" in params else None
                return RestResponse(200, _jsonable(self._emu.inspect(user_id, guild_id=guild_id)))
            if route == "fault":
                return await self._fault(params)
        except (InvalidArgumentError, ValueError) as exc:
            self.requests["failed"] += 1
            return _error(400, str(exc))
        except EmulatorError as exc:  # an unknown id, or a fault the current state does not allow
            self.requests["failed"] += 1
            return _error(409, str(exc))
        return _error(404, f"no control route {split.path!r}; try /_emulator/info, /inspect or /fault")

    async def _fault(self, params: dict[str, str]) -> RestResponse:
        kind = params.pop("kind", "").replace("-", "_")
        spec = FAULT_KINDS.get(kind)
        if spec is None:
            return _error(400, f"unknown fault kind {kind!r}; kinds: {', '.join(FAULT_KINDS)}")
        required, optional = spec
        missing = [name for name in required if name not in params]
        unknown = [name for name in params if name not in required and name not in optional]
        if missing or unknown:
            return _error(
                400,
                f"{kind}: missing {missing or 'nothing'}, unknown {unknown or 'nothing'}; "
                f"takes {list(required)} and optionally {list(optional)}",
            )
        arguments: dict[str, Any] = {}
        for name, text in params.items():
            convert = required.get(name) or optional[name]
            try:
                arguments[name] = convert(text)
            except ValueError as exc:
                raise InvalidArgumentError(f"{kind}: {name}={text!r}: {exc}") from None
        method = getattr(self._emu.faults, kind)
        result = method(**arguments)
        if hasattr(result, "__await__"):
            result = await result
        logger.info("emulator control: fault %s %s", kind, arguments)
        return RestResponse(200, {"ok": True, "kind": kind, "result": _jsonable(result)})
