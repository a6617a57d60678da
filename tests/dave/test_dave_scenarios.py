"""The delivery service and real DAVE clients together, under shuffled delivery orders.

Every scenario runs under many seeds. A seed fixes the interleaving of deliveries across connections
(each connection stays FIFO, like a WebSocket), the moments op 23s arrive, and which op 23s are lost
so that transitions time out. After each step every member must agree with the DS on the epoch, share
one privacy code and decrypt every other member's fresh frames (``Harness.assert_converged``).

Clients are ours (``DaveClient``), naive ones that behave exactly like discord.py 2.7.1, or a mix.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from .dave_harness import Harness

Scenario = Callable[[Harness, Callable[[], str]], None]


def _step(h: Harness) -> None:
    h.settle()
    h.assert_converged()


def _op31_total(h: Harness) -> int:
    return sum(m.op31_sent for m in h.members.values()) + h.departed_recoveries


def two_members_form_a_group(h: Harness, kind: Callable[[], str]) -> None:
    h.join(1, kind())
    _step(h)
    h.join(2, kind())
    _step(h)


def three_members_join_at_once(h: Harness, kind: Callable[[], str]) -> None:
    for uid in (1, 2, 3):
        h.join(uid, kind())
    _step(h)


def a_fourth_joins_later(h: Harness, kind: Callable[[], str]) -> None:
    three_members_join_at_once(h, kind)
    h.join(4, kind())
    _step(h)


def one_member_leaves(h: Harness, kind: Callable[[], str]) -> None:
    three_members_join_at_once(h, kind)
    h.leave(h.rng.choice(sorted(h.members)))
    _step(h)


def two_members_leave_at_once(h: Harness, kind: Callable[[], str]) -> None:
    a_fourth_joins_later(h, kind)
    for uid in h.rng.sample(sorted(h.members), 2):
        h.leave(uid)
    _step(h)


def op31_and_readd(h: Harness, kind: Callable[[], str]) -> None:
    three_members_join_at_once(h, kind)
    victim = h.members[h.rng.choice(sorted(h.members))]
    victim.corrupt_next.add("on_announce_commit")  # its op 29 arrives damaged
    h.join(4, kind())
    _step(h)
    assert victim.op31_sent >= 1 and h.ds.counters["invalid_commit_welcome"] >= 1
    joiner = h.join(5, kind())
    joiner.corrupt_next.add("on_welcome")  # the newcomer's op 30 arrives damaged
    _step(h)
    assert joiner.op31_sent >= 1
    # Recovery converges without a remove/re-add loop.
    assert _op31_total(h) <= 4, {m.user_id: m.op31_sent for m in h.members.values()}


def drop_to_one_then_grow(h: Harness, kind: Callable[[], str]) -> None:
    three_members_join_at_once(h, kind)
    for uid in h.rng.sample(sorted(h.members), 2):
        h.leave(uid)
    _step(h)  # the survivor was reset (op 24 + op 21 tid 0) and is pending alone
    assert h.ds.counters["group_resets"] == 1
    h.join(6, kind())
    h.join(7, kind())
    _step(h)


SCENARIOS: dict[str, Scenario] = {
    f.__name__: f
    for f in (
        two_members_form_a_group,
        three_members_join_at_once,
        a_fourth_joins_later,
        one_member_leaves,
        two_members_leave_at_once,
        op31_and_readd,
        drop_to_one_then_grow,
    )
}
FAULTY = {"op31_and_readd"}


def _kinds(kind: str, rng: random.Random) -> Callable[[], str]:
    if kind == "mixed":
        return lambda: rng.choice(("ours", "naive"))
    return lambda: kind


def _run(name: str, kind: str, seed: int) -> None:
    h = Harness(seed * 7919 + len(name))
    SCENARIOS[name](h, _kinds(kind, random.Random(seed)))
    if name not in FAULTY:
        assert _op31_total(h) == 0, "an op 31 without a fault means the DS broke a client"


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_dave_scenario_our_clients(name: str, seed: int) -> None:
    _run(name, "ours", seed)


@pytest.mark.parametrize("seed", range(20, 30))
@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_dave_scenario_naive_discordpy_clients(name: str, seed: int) -> None:
    _run(name, "naive", seed)


@pytest.mark.parametrize("seed", range(30, 40))
@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_dave_scenario_mixed_clients(name: str, seed: int) -> None:
    _run(name, "mixed", seed)


@pytest.mark.parametrize("seed", range(20))
def test_dave_churn_without_settling(seed: int) -> None:
    """Joins and leaves land at random points of each other's MLS exchanges, then everyone settles."""
    rng = random.Random(seed)
    h = Harness(seed + 1000)
    present: list[int] = []
    next_id = 10
    for _ in range(10):
        if len(present) < 2 or (rng.random() < 0.6 and len(present) < 5):
            h.join(next_id, rng.choice(("ours", "naive")))
            present.append(next_id)
            next_id += 1
        else:
            uid = rng.choice(present)
            present.remove(uid)
            h.leave(uid)
        h.run(rng.randint(0, 40))
    _step(h)
    assert _op31_total(h) == 0


@pytest.mark.parametrize("seed", range(5))
def test_dave_garbage_from_one_client_disturbs_nobody(seed: int) -> None:
    """A member sending random op 26/28/23/31 traffic is counted and dropped; the group carries on."""
    rng = random.Random(seed)
    h = Harness(seed + 2000)
    for uid in (1, 2, 3):
        h.join(uid)
    _step(h)
    ds = h.ds
    epoch = ds.epoch
    for _ in range(300):
        junk = rng.randbytes(rng.randint(0, 200))
        if rng.random() < 0.5:
            junk = b"\x00\x01\x00" + junk[:1] + junk[1:]
        assert ds.commit_welcome_received(3, junk) == []
        assert ds.key_package_received(99, junk) == []
        assert ds.transition_ready(3, rng.randint(0, 0xFFFF)) == []
    assert ds.key_package_received(3, rng.randbytes(400)) == []
    assert ds.epoch == epoch and ds.counters["commit_invalid"] > 0
    ds.counters.clear()  # the garbage counters are expected here
    h.join(4)
    _step(h)
