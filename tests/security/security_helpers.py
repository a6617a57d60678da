"""Secrets and where they must never show: a recorder of every secret the emulator issues, and a scanner.

:class:`SecretRecorder` wraps ``secrets.token_bytes``/``token_urlsafe`` (transport keys, random parts of bot
tokens, the control token), the emulator's bot-token maker and its voice-session issuer while a test runs,
so the test knows every secret of the run without reaching into the client. :func:`needles` turns one secret
into the forms it could leak in (text, hex, base64, ``bytes`` repr, a JSON or Python list of its bytes), and
:func:`find_leaks` looks for them in any text.
"""

from __future__ import annotations

import base64
import json
import secrets
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pytest

from cordvoice.emulator import state as emulator_state

MIN_SECRET = 8
"""Shorter random values (a 4-byte nonce) are not secrets worth scanning for (and would match by chance)."""


def needles(secret: str | bytes) -> set[str]:
    """The forms a secret could leak in; a fragment of a long one counts too (truncated log lines)."""
    found: set[str] = set()
    if isinstance(secret, str):
        if len(secret) >= MIN_SECRET:
            found.add(secret)
            if len(secret) >= 32:
                found.add(secret[len(secret) // 2 - 8 : len(secret) // 2 + 8])
        return found
    if len(secret) < MIN_SECRET:
        return found
    part = secret[:12]
    found.add(part.hex())
    found.add(part.hex().upper())
    for encoded in (base64.b64encode(secret).decode(), base64.urlsafe_b64encode(secret).decode()):
        found.add(encoded.rstrip("=")[:16])
    found.add(repr(part)[2:-1])
    found.add(str(list(part))[:-1])
    found.add(json.dumps(list(part), separators=(",", ":"))[:-1])
    return {n for n in found if len(n) >= MIN_SECRET}


def find_leaks(texts: Iterable[str], secrets_: Iterable[str | bytes]) -> list[str]:
    """``"<needle> in <text excerpt>"`` for every secret form found in any text."""
    wanted = {n: s for s in secrets_ for n in needles(s)}
    leaks = []
    for text in texts:
        for needle in wanted:
            at = text.find(needle)
            if at >= 0:
                leaks.append(f"{needle!r} in ...{text[max(0, at - 60) : at + 60]!r}...")
    return leaks


@dataclass
class SecretRecorder:
    """Every secret the process generates while installed (see the module docstring)."""

    values: list[str | bytes] = field(default_factory=list)

    def install(self, monkeypatch: pytest.MonkeyPatch) -> SecretRecorder:
        token_bytes, token_urlsafe = secrets.token_bytes, secrets.token_urlsafe
        make_bot_token = emulator_state._make_bot_token
        issue = emulator_state.EmulatorState._issue_voice_session

        def recorded(function: Any) -> Any:
            def wrapper(*args: Any) -> Any:
                value = function(*args)
                # websockets' own randomness (the handshake's Sec-WebSocket-Key, frame masks) is a public
                # nonce, not a secret: counting it would let a test fail for a reason that is not a leak.
                if not str(sys._getframe(1).f_globals.get("__name__", "")).startswith("websockets"):
                    self.values.append(value)
                return value

            return wrapper

        def issue_recorded(state: Any, *args: Any) -> Any:
            session = issue(state, *args)
            self.values.append(session.token)  # the voice token VOICE_SERVER_UPDATE carries
            return session

        monkeypatch.setattr(secrets, "token_bytes", recorded(token_bytes))  # keys, random parts of tokens
        monkeypatch.setattr(secrets, "token_urlsafe", recorded(token_urlsafe))  # the control token
        monkeypatch.setattr(emulator_state, "_make_bot_token", recorded(make_bot_token))
        monkeypatch.setattr(emulator_state.EmulatorState, "_issue_voice_session", issue_recorded)
        return self

    def add(self, value: str | bytes | None) -> None:
        if value:
            self.values.append(value)
