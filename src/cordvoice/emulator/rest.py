"""The emulator's REST API: the few routes a bot library calls to log in and find the gateway.

Sans-IO: :meth:`RestApi.handle` takes a method, a request target and the Authorization header and returns a
status and a JSON body. The emulator's WebSocket server answers plain HTTP requests with it (websockets'
``process_request``), so the API and the gateway share one port.

Routes (under ``/api/v10``, and ``/api/v9`` for older clients), all truthful for the emulated world:

* ``GET /gateway`` (no auth) and ``GET /gateway/bot``: the gateway URL (and one shard);
* ``GET /users/@me``, ``GET /users/{id}``: the bot itself, any user;
* ``GET /oauth2/applications/@me`` and ``GET /applications/@me``: the bot's application (discord.py's login
  reads it);
* ``GET /guilds/{id}``, ``GET /channels/{id}``: a guild the bot is in, one of its voice channels.

Wrong tokens get Discord's 401 body, unknown routes a logged 404, known paths with another method 405.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from cordvoice.emulator.state import EmulatorState, User
from cordvoice.errors import EmulatorError

__all__ = ["RestApi", "RestResponse", "RestStats"]

logger = logging.getLogger(__name__)

_PREFIX = re.compile(r"^/api/v(?:9|10)(?=/)")
_SNOWFLAKE = re.compile(r"^[0-9]{1,20}$")
_SESSION_START_TOTAL = 1000


@dataclass(frozen=True)
class RestResponse:
    """A status and the JSON body to send with it."""

    status: int
    body: dict[str, Any] | list[Any]


@dataclass
class RestStats:
    """What the REST API answered, by route and by refusal."""

    requests: Counter[str] = field(default_factory=Counter)
    unauthorized: int = 0
    not_found: int = 0
    method_not_allowed: int = 0


def _error(status: int, message: str, code: int = 0) -> RestResponse:
    return RestResponse(status, {"message": message, "code": code})


_UNAUTHORIZED = _error(401, "401: Unauthorized")

Handler = Callable[[User, str], RestResponse]


class RestApi:
    """Answers REST requests from the emulator's state."""

    def __init__(
        self, state: EmulatorState, *, gateway_url: str = "", session_starts: Counter[int] | None = None
    ) -> None:
        self.state = state
        self.gateway_url = gateway_url
        self.stats = RestStats()
        # Identifies per user id, kept by the main gateway, so that session_start_limit.remaining is truthful.
        self._session_starts = session_starts if session_starts is not None else Counter()
        self._authed: dict[str, Handler] = {
            "/gateway/bot": self._gateway_bot,
            "/users/@me": self._me,
            "/oauth2/applications/@me": self._application,
            "/applications/@me": self._application,
        }
        self._authed_by_id: dict[str, Handler] = {
            "users": self._user,
            "guilds": self._guild,
            "channels": self._channel,
        }

    def handle(self, method: str, target: str, authorization: str | None) -> RestResponse:
        """Answer one request; ``target`` is the request path with its query."""
        path = urlsplit(target).path.rstrip("/")
        match = _PREFIX.match(path)
        route = path[match.end() :] if match else None
        if route is None or not self._known(route):
            self.stats.not_found += 1
            logger.warning("emulator REST: no route for %s %s; answering 404", method, path)
            return _error(404, "404: Not Found")
        if method != "GET":
            self.stats.method_not_allowed += 1
            logger.warning("emulator REST: %s %s is not supported; answering 405", method, path)
            return _error(405, "405: Method Not Allowed")
        collection, _, item = route.lstrip("/").partition("/")
        fixed = route == "/gateway" or route in self._authed
        self.stats.requests[route if fixed else f"/{collection}/{{id}}"] += 1
        if route == "/gateway":
            return RestResponse(200, {"url": self.gateway_url})
        user = self._authenticate(authorization)
        if user is None:
            self.stats.unauthorized += 1
            return _UNAUTHORIZED
        if fixed:
            return self._authed[route](user, route)
        return self._authed_by_id[collection](user, item)

    def _known(self, route: str) -> bool:
        if route == "/gateway" or route in self._authed:
            return True
        collection, _, item = route.lstrip("/").partition("/")
        return collection in self._authed_by_id and bool(_SNOWFLAKE.match(item))

    def _authenticate(self, authorization: str | None) -> User | None:
        # Bot tokens must be sent as "Bot <token>"; a bare token is a 401 on Discord too.
        if authorization is None or not authorization.startswith("Bot "):
            return None
        return self.state.user_for_token(authorization.removeprefix("Bot ").strip())

    # ---- routes ---------------------------------------------------------------------------------------

    def _gateway_bot(self, user: User, route: str) -> RestResponse:
        remaining = max(0, _SESSION_START_TOTAL - self._session_starts[user.id])
        return RestResponse(
            200,
            {
                "url": self.gateway_url,
                "shards": 1,
                "session_start_limit": {
                    "total": _SESSION_START_TOTAL,
                    "remaining": remaining,
                    "reset_after": 86_400_000,
                    "max_concurrency": 1,
                },
            },
        )

    def _me(self, user: User, route: str) -> RestResponse:
        return RestResponse(200, user.to_payload() | {"locale": "en-US", "email": None})

    def _application(self, user: User, route: str) -> RestResponse:
        return RestResponse(
            200,
            {
                "id": str(user.id),
                "name": user.name,
                "icon": None,
                "description": "",
                "summary": "",
                "type": None,
                "bot_public": True,
                "bot_require_code_grant": False,
                "bot": user.to_payload(),
                "owner": user.to_payload(),
                "team": None,
                "verify_key": "0" * 64,
                "flags": 0,
                "rpc_origins": [],
                "terms_of_service_url": None,
                "privacy_policy_url": None,
                "interactions_endpoint_url": None,
                "tags": [],
                "redirect_uris": [],
                "approximate_guild_count": len(self.state.guilds_of(user.id)),
            },
        )

    def _user(self, user: User, item: str) -> RestResponse:
        try:
            return RestResponse(200, self.state.user(int(item)).to_payload())
        except EmulatorError:
            return _error(404, "Unknown User", 10013)

    def _guild(self, user: User, item: str) -> RestResponse:
        guild = self.state.guilds.get(int(item))
        if guild is None or user.id not in guild.members:
            return _error(404, "Unknown Guild", 10004)
        payload = self.state.guild_payload(guild.id, for_user=user.id, with_voice_states=False)
        for key in ("members", "channels", "threads", "presences", "joined_at", "large", "member_count"):
            payload.pop(key, None)
        return RestResponse(200, payload)

    def _channel(self, user: User, item: str) -> RestResponse:
        try:
            channel = self.state.channel(int(item))
        except EmulatorError:
            return _error(404, "Unknown Channel", 10003)
        if user.id not in self.state.guilds[channel.guild_id].members:
            return _error(403, "Missing Access", 50001)
        return RestResponse(200, channel.to_payload())
