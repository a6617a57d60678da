"""The sans-IO reconnect policy: the table of issue 4 point 7 and protocol.md §3/§7, budgets, and no loops."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cordvoice.errors import DaveRequiredError, DisconnectedError, InvalidArgumentError
from cordvoice.events import ReconnectAction
from cordvoice.reconnect import ConnectionEnd, EndKind, ReconnectConfig, ReconnectPolicy

RESUME = ReconnectAction.RESUME
REJOIN = ReconnectAction.REJOIN
IDENTIFY = ReconnectAction.IDENTIFY
WAIT = ReconnectAction.WAIT_FOR_MOVE


def closed(code: int | None, *, established: bool = True) -> ConnectionEnd:
    return ConnectionEnd(EndKind.CLOSED, code, established=established)


def policy(**config: float) -> ReconnectPolicy:
    return ReconnectPolicy(ReconnectConfig(**config), rng=random.Random(4))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("code", "action"),
    [
        (4015, RESUME),
        (1000, RESUME),
        (1001, RESUME),
        (1006, RESUME),
        (None, RESUME),
        (3999, RESUME),
        (4004, REJOIN),
        (4006, REJOIN),
        (4009, REJOIN),
        (4011, REJOIN),
        (4099, REJOIN),
        (4001, REJOIN),
        (4002, REJOIN),
        (4003, REJOIN),
        (4005, REJOIN),
        (4014, WAIT),
        (4022, WAIT),
        (4012, None),
        (4016, None),
        (4017, None),
        (4020, None),
        (4021, None),
    ],
)
def test_client_policy_table(code: int | None, action: ReconnectAction | None) -> None:
    decision = policy().decide(closed(code), now=0.0)
    assert decision.action is action
    assert decision.close_code == code
    if action is None:
        assert isinstance(decision.error, DisconnectedError) and decision.error.code == code
    else:
        assert decision.error is None


def test_client_policy_4017_is_a_dave_required_error() -> None:
    decision = policy().decide(closed(4017), now=0.0)
    assert isinstance(decision.error, DaveRequiredError)
    assert "DAVE" in str(decision.error)


@pytest.mark.parametrize("kind", [EndKind.NETWORK, EndKind.ZOMBIE, EndKind.HANDSHAKE_TIMEOUT])
def test_client_policy_resumable_failures(kind: EndKind) -> None:
    p = policy()
    assert p.decide(ConnectionEnd(kind, established=True), 0.0).action is RESUME
    # Before the session was ever established there is nothing to resume: identify again.
    assert policy().decide(ConnectionEnd(kind, established=False), 0.0).action is IDENTIFY


def test_client_policy_other_failures_rejoin() -> None:
    assert policy().decide(ConnectionEnd(EndKind.UDP_FAILED, established=True), 0.0).action is REJOIN
    assert policy().decide(ConnectionEnd(EndKind.NO_CREDENTIALS), 0.0).action is REJOIN
    lost = policy().decide(ConnectionEnd(EndKind.GATEWAY_SESSION_LOST, established=True), 0.0)
    assert lost.action is REJOIN and lost.delay == 0.0


def test_client_policy_resume_backoff_then_rejoin_then_give_up() -> None:
    p = policy(max_resumes=3, max_rejoins=2, backoff_base=1.0, backoff_cap=8.0)
    delays = [p.decide(closed(4015), float(t)) for t in range(3)]
    assert [d.action for d in delays] == [RESUME] * 3
    assert delays[0].delay == 0.0, "the first resume is immediate"
    assert 0.5 <= delays[1].delay <= 1.0 and 1.0 <= delays[2].delay <= 2.0
    fallback = p.decide(closed(4015), 3.0)
    assert fallback.action is REJOIN, "resumes that do not last fall back to a fresh join"
    assert p.decide(closed(4006), 4.0).action is REJOIN
    final = p.decide(closed(4006), 5.0)
    assert final.gives_up and "Gave up after 2 attempts" in final.reason


def test_client_policy_rejoin_backoff_is_jittered_exponential_and_capped() -> None:
    p = policy(max_rejoins=12, backoff_base=0.5, backoff_cap=4.0)
    delays = [p.decide(closed(4006), 0.0).delay for _ in range(12)]
    for attempt, delay in enumerate(delays, start=1):
        step = min(4.0, 0.5 * 2 ** (attempt - 1))
        assert step / 2 <= delay <= step
    assert len(set(delays)) > 6, "jittered"


def test_client_policy_client_bug_rejoins_once_in_a_lifetime() -> None:
    p = policy(stable_after=10.0)
    assert p.decide(closed(4001), 0.0).action is REJOIN
    p.connection_ready(1.0)
    # Even after a long stable period the allowance does not come back.
    final = p.decide(closed(4003), 100.0)
    assert final.gives_up and "again after a rejoin" in final.reason


def test_client_policy_stable_connection_resets_the_budget() -> None:
    p = policy(max_rejoins=2, stable_after=60.0)
    assert p.decide(closed(4006), 0.0).action is REJOIN
    assert p.decide(closed(4006), 1.0).action is REJOIN
    p.connection_ready(2.0)
    assert p.decide(closed(4006), 3.0).gives_up, "ready for 1 s is not stable"
    p = policy(max_rejoins=2, stable_after=60.0)
    p.decide(closed(4006), 0.0)
    p.decide(closed(4006), 1.0)
    p.connection_ready(2.0)
    assert p.decide(closed(4006), 70.0).action is REJOIN, "stable for 68 s: the budget is back"


def test_client_policy_move_wait_expired_gives_up_with_the_code() -> None:
    p = policy()
    end = closed(4014)
    assert p.decide(end, 0.0).delay == p.config.move_wait
    final = p.move_wait_expired(end)
    assert final.gives_up and final.close_code == 4014 and isinstance(final.error, DisconnectedError)


failures = st.one_of(
    st.builds(
        closed,
        st.sampled_from([None, 1000, 1006, 4001, 4004, 4006, 4009, 4011, 4015, 4099]),
        established=st.booleans(),
    ),
    st.builds(
        ConnectionEnd,
        st.sampled_from(
            [
                EndKind.NETWORK,
                EndKind.ZOMBIE,
                EndKind.UDP_FAILED,
                EndKind.NO_CREDENTIALS,
                EndKind.HANDSHAKE_TIMEOUT,
            ]
        ),
        established=st.booleans(),
    ),
)


@given(st.lists(failures, min_size=1, max_size=60))
def test_client_policy_never_loops(ends: list[ConnectionEnd]) -> None:
    """Failures in quick succession (no stable connection) always exhaust the budget: no endless retry."""
    config = ReconnectConfig()
    p = ReconnectPolicy(config, rng=random.Random(0))
    bound = (config.max_resumes + 1) * (config.max_rejoins + 1) + 1
    for count, end in enumerate(ends, start=1):
        decision = p.decide(end, now=float(count))
        if decision.gives_up:
            assert isinstance(decision.error, DisconnectedError)
            return
        assert count <= bound
        assert 0.0 <= decision.delay <= config.backoff_cap
    assert len(ends) <= bound


def test_client_policy_resume_storm_ends() -> None:
    """A server that accepts every resume and crashes again at once: resumes, then rejoins, then the end."""
    p = policy()
    decisions = []
    for t in range(100):
        decisions.append(p.decide(closed(4015), float(t)))
        if decisions[-1].gives_up:
            break
    assert decisions[-1].gives_up
    resumes = sum(d.action is RESUME for d in decisions)
    rejoins = sum(d.action is REJOIN for d in decisions)
    assert (resumes, rejoins) == (p.config.max_resumes * (p.config.max_rejoins + 1), p.config.max_rejoins)


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("max_resumes", float("nan")),  # compared false with every count: resumes without end
        ("max_rejoins", float("nan")),
        ("max_rejoins", 2.5),
        ("max_resumes", "5"),
        ("rejoin_timeout", 0.0),  # every rejoin "got no answer" at once: the session gave up on a 4006
        ("backoff_base", "1"),
    ],
)
def test_client_policy_config_refuses_unusable_values(option: str, value: object) -> None:
    with pytest.raises(InvalidArgumentError, match=option):
        ReconnectConfig(**{option: value})  # type: ignore[arg-type]
