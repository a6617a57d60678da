"""Close codes: every code of protocol.md §3 maps to the documented action."""

from __future__ import annotations

import pytest

from cordvoice.voicegateway.closecodes import CloseAction, CloseCode, describe

RESUME, REJOIN, FINAL, MOVED = (
    CloseAction.RESUME,
    CloseAction.REJOIN,
    CloseAction.FINAL,
    CloseAction.FINAL_UNLESS_MOVED,
)

EXPECTED = {
    1000: (RESUME, False),
    1001: (RESUME, False),
    1006: (RESUME, False),
    4001: (REJOIN, True),
    4002: (REJOIN, True),
    4003: (REJOIN, True),
    4004: (REJOIN, False),
    4005: (REJOIN, True),
    4006: (REJOIN, False),
    4009: (REJOIN, False),
    4011: (REJOIN, False),
    4012: (FINAL, True),
    4014: (MOVED, False),
    4015: (RESUME, False),
    4016: (FINAL, True),
    4017: (FINAL, False),
    4020: (FINAL, True),
    4021: (FINAL, False),
    4022: (MOVED, False),
}


def test_enum_has_exactly_the_documented_codes() -> None:
    assert {int(code) for code in CloseCode} == set(EXPECTED)


@pytest.mark.parametrize(("code", "expected"), sorted(EXPECTED.items()))
def test_action_and_client_bug(code: int, expected: tuple[CloseAction, bool]) -> None:
    info = describe(code)
    assert (info.action, info.client_bug) == expected
    assert info.code == code
    assert info.name == CloseCode(code).name
    assert len(info.message) > 20


def test_messages_are_distinct_enough_to_act_on() -> None:
    messages = [describe(code).message for code in EXPECTED if code >= 4000]
    assert len(set(messages)) == len(messages)
    assert "DAVE" in describe(4017).message
    assert "rate" in describe(4021).message.lower()


def test_no_close_frame_resumes() -> None:
    info = describe(None)
    assert info.code is None
    assert info.action is RESUME
    assert not info.client_bug


def test_unknown_codes() -> None:
    transport = describe(1011)
    assert (transport.name, transport.action) == ("UNKNOWN", RESUME)
    application = describe(4999)
    assert (application.name, application.action, application.client_bug) == ("UNKNOWN", REJOIN, False)
    assert "4999" in application.message


def test_accepts_enum_members() -> None:
    assert describe(CloseCode.E2EE_REQUIRED) is describe(4017)
