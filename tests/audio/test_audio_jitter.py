"""The sans-IO jitter buffer: ordering, loss reporting, gaps, restarts and counters (with hypothesis)."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cordvoice.audio.jitter import FrameKind, JitterBuffer, JitterFrame, PushResult
from cordvoice.errors import InvalidArgumentError

FRAME = 0.020


def payload(index: int) -> bytes:
    return index.to_bytes(4, "big")


def index_of(frame: JitterFrame) -> int:
    assert frame.payload is not None
    return int.from_bytes(frame.payload, "big")


@dataclass
class Arrival:
    time: float
    index: int


@dataclass
class Run:
    buffer: JitterBuffer
    frames: list[JitterFrame] = field(default_factory=list)

    def of(self, kind: FrameKind) -> list[JitterFrame]:
        return [frame for frame in self.frames if frame.kind is kind]


def simulate(
    arrivals: list[Arrival],
    *,
    seq0: int,
    ts0: int,
    tick: float | None = 0.005,
    buffer: JitterBuffer | None = None,
    ts_of: dict[int, int] | None = None,
) -> Run:
    """Push arrivals in time order, popping at every arrival and on a ``tick`` grid, then drain.

    With ``tick=None`` nothing is popped before the final drain.
    """
    jitter = buffer if buffer is not None else JitterBuffer()
    run = Run(jitter)
    ordered = sorted(arrivals, key=lambda arrival: arrival.time)
    now = 0.0
    for arrival in ordered:
        while tick is not None and now + tick < arrival.time:
            now += tick
            run.frames += jitter.pop(now)
        timestamp = ts_of[arrival.index] if ts_of else ts0 + arrival.index * 960
        jitter.push(
            (seq0 + arrival.index) & 0xFFFF, timestamp & 0xFFFFFFFF, arrival.time, payload(arrival.index)
        )
        if tick is not None:
            run.frames += jitter.pop(arrival.time)
    run.frames += jitter.drain()
    return run


def check_timeline(run: Run) -> None:
    """Playout times never go back, and consecutive slots without a gap between them are 20 ms apart."""
    previous: JitterFrame | None = None
    for frame in run.frames:
        if previous is not None:
            previous_end = previous.playout_time + previous.samples / 48_000
            if frame.kind is not FrameKind.GAP and previous.kind is not FrameKind.GAP:
                assert frame.playout_time == pytest.approx(previous_end, abs=1e-6)
            assert frame.playout_time >= previous_end - 0.6 / 48_000  # gap lengths are rounded to samples
        previous = frame


def missing_runs(delivered: set[int]) -> list[int]:
    """Lengths of the runs of indices missing between the first and the last delivered one."""
    runs, current = [], 0
    for index in range(min(delivered), max(delivered) + 1):
        if index in delivered:
            if current:
                runs.append(current)
            current = 0
        else:
            current += 1
    return runs


@settings(max_examples=150)
@given(
    count=st.integers(1, 120),
    seq0=st.integers(0, 0xFFFF),
    ts0=st.integers(0, 0xFFFFFFFF),
    seed=st.integers(0, 2**32 - 1),
    loss=st.floats(0.0, 0.4),
    duplication=st.floats(0.0, 0.3),
)
def test_disorder_within_the_window_yields_ordered_unique_output(
    count: int, seq0: int, ts0: int, seed: int, loss: float, duplication: float
) -> None:
    rng = random.Random(seed)
    arrivals: list[Arrival] = []
    delivered: set[int] = set()
    for index in range(count):
        if rng.random() < loss and index:  # keep packet 0 so the stream has a defined start
            continue
        delivered.add(index)
        copies = 1 + (rng.random() < duplication) + (rng.random() < duplication / 3)
        # Jitter up to 50 ms (< the 60 ms delay) reorders packets up to two places.
        arrivals.extend(Arrival(index * FRAME + rng.uniform(0.0, 0.05), index) for _ in range(copies))
    run = simulate(arrivals, seq0=seq0, ts0=ts0)
    stats = run.buffer.stats

    audio = [index_of(frame) for frame in run.of(FrameKind.AUDIO)]
    assert audio == sorted(delivered)  # in order, unique, nothing late
    assert [frame.sequence for frame in run.of(FrameKind.AUDIO)] == [(seq0 + i) & 0xFFFF for i in audio]
    assert [frame.timestamp for frame in run.of(FrameKind.AUDIO)] == [
        (ts0 + i * 960) & 0xFFFFFFFF for i in audio
    ]
    runs = missing_runs(delivered)
    assert stats.received == len(arrivals)
    assert stats.duplicates == len(arrivals) - len(delivered)
    assert stats.late == stats.overflow == stats.discarded == stats.restarts == 0
    assert stats.lost == sum(runs)
    concealable = sum(length for length in runs if length <= run.buffer.max_conceal)
    assert len(run.of(FrameKind.LOST)) == concealable
    assert sum(frame.lost for frame in run.of(FrameKind.GAP)) == sum(runs) - concealable
    # Every slot between first and last is accounted for, in sequence order.
    slots = [frame.sequence for frame in run.frames if frame.kind is not FrameKind.GAP]
    expected = [(seq0 + i) & 0xFFFF for i in range(count) if i in delivered or _in_short_run(i, delivered, 5)]
    assert slots == expected
    check_timeline(run)
    # Scheduling happens on arrival, so popping only once at the end gives the same timeline (only the FEC
    # hint differs: whether the next packet had arrived when the lost slot came due).
    unpopped = simulate(arrivals, seq0=seq0, ts0=ts0, tick=None, buffer=JitterBuffer(max_packets=500))
    assert [_timeline_key(f) for f in unpopped.frames] == [_timeline_key(f) for f in run.frames]


def _timeline_key(frame: JitterFrame) -> JitterFrame:
    return frame._replace(next_payload=None, playout_time=round(frame.playout_time, 9))


def _in_short_run(index: int, delivered: set[int], limit: int) -> bool:
    if index > max(delivered):
        return False
    start = index
    while start - 1 not in delivered:
        start -= 1
    end = index
    while end + 1 not in delivered:
        end += 1
    return end - start + 1 <= limit


@settings(max_examples=100)
@given(
    count=st.integers(2, 100),
    seq0=st.integers(0, 0xFFFF),
    seed=st.integers(0, 2**32 - 1),
    max_jitter=st.floats(0.0, 0.3),
    delay=st.sampled_from([0.0, 0.02, 0.06, 0.1]),
)
def test_any_disorder_keeps_output_ordered_and_every_packet_accounted_for(
    count: int, seq0: int, seed: int, max_jitter: float, delay: float
) -> None:
    rng = random.Random(seed)
    arrivals = [
        Arrival(i * FRAME + rng.uniform(0.0, max_jitter), i)
        for i in range(count)
        for _ in range(rng.choice((0, 1, 1, 1, 2)))
    ]
    if not arrivals:
        return
    run = simulate(arrivals, seq0=seq0, ts0=rng.getrandbits(32), buffer=JitterBuffer(delay=delay))
    stats = run.buffer.stats
    audio = [index_of(frame) for frame in run.of(FrameKind.AUDIO)]
    assert audio == sorted(set(audio))  # strictly increasing: ordered, no duplicates
    assert stats.received == len(arrivals)
    assert len(audio) + stats.duplicates + stats.late + stats.overflow + stats.discarded == stats.received
    assert stats.restarts == 0
    check_timeline(run)


def test_single_loss_is_reported_with_the_next_packet_for_fec() -> None:
    arrivals = [Arrival(i * FRAME, i) for i in range(10) if i != 4]
    run = simulate(arrivals, seq0=100, ts0=5000)
    lost = run.of(FrameKind.LOST)
    assert len(lost) == 1
    assert lost[0].sequence == 104 and lost[0].timestamp == 5000 + 4 * 960
    assert lost[0].next_payload == payload(5)
    assert lost[0].playout_time == pytest.approx(4 * FRAME + 0.06)
    assert run.buffer.stats.lost == 1 and run.buffer.stats.gaps == 0


def test_long_loss_becomes_a_gap_instead_of_concealment() -> None:
    arrivals = [Arrival(i * FRAME, i) for i in range(40) if not 10 <= i < 30]
    run = simulate(arrivals, seq0=0, ts0=0)
    assert run.of(FrameKind.LOST) == []
    (gap,) = run.of(FrameKind.GAP)
    assert gap.lost == 20 and gap.samples == 20 * 960
    assert gap.sequence == 30 and gap.playout_time == pytest.approx(10 * FRAME + 0.06)
    assert run.buffer.stats.lost == 20


def test_dtx_timestamp_jump_reports_a_gap_without_loss() -> None:
    # A WebRTC-style sender: 1 s of silence advances the RTP timestamp; the sequence continues.
    timestamps = {i: i * 960 if i < 50 else (i + 50) * 960 for i in range(100)}
    arrivals = [Arrival((i if i < 50 else i + 50) * FRAME + 0.003, i) for i in range(100)]
    run = simulate(arrivals, seq0=65_500, ts0=0, ts_of=timestamps)
    (gap,) = run.of(FrameKind.GAP)
    assert gap.lost == 0 and gap.samples == pytest.approx(48_000, abs=1)
    assert run.buffer.stats.lost == 0 and run.of(FrameKind.LOST) == []
    assert len(run.of(FrameKind.AUDIO)) == 100
    check_timeline(run)


def test_pause_without_timestamp_jump_reports_a_gap_and_drops_nothing() -> None:
    # A discord.py-style sender: it stops for 2 s and resumes with the next timestamp.
    arrivals = [Arrival((i if i < 30 else i + 100) * FRAME, i) for i in range(60)]
    run = simulate(arrivals, seq0=7, ts0=0xFFFFFF00)
    (gap,) = run.of(FrameKind.GAP)
    assert gap.samples == pytest.approx(96_000, abs=10)
    assert len(run.of(FrameKind.AUDIO)) == 60
    assert run.buffer.stats.late == run.buffer.stats.lost == 0


def test_stall_then_burst_reschedules_instead_of_dropping() -> None:
    # 200 ms of network stall, then everything arrives at once: nothing is late or lost.
    arrivals = [Arrival(max(i * FRAME, 0.5) if 15 <= i < 25 else i * FRAME, i) for i in range(50)]
    run = simulate(arrivals, seq0=0, ts0=0)
    assert len(run.of(FrameKind.AUDIO)) == 50
    assert run.buffer.stats.late == 0
    assert len(run.of(FrameKind.GAP)) == 1
    check_timeline(run)


def test_duplicate_and_late_packets_are_told_apart() -> None:
    jitter = JitterBuffer(delay=0.04)
    for i in range(5):
        assert jitter.push(i, i * 960, i * FRAME, payload(i)) is PushResult.ACCEPTED
    assert jitter.push(2, 2 * 960, 0.09, payload(2)) is PushResult.DUPLICATE  # still buffered
    jitter.push(6, 6 * 960, 0.12, payload(6))  # 5 never arrives (yet)
    frames = jitter.pop(0.2)
    assert [f.kind for f in frames] == [FrameKind.AUDIO] * 5 + [FrameKind.LOST, FrameKind.AUDIO]
    assert jitter.push(1, 960, 0.21, payload(1)) is PushResult.DUPLICATE  # already played
    assert jitter.push(5, 5 * 960, 0.22, payload(5)) is PushResult.LATE  # its slot was concealed
    assert jitter.stats.duplicates == 2 and jitter.stats.late == 1 and jitter.stats.lost == 1


def test_reordered_packets_are_counted() -> None:
    arrivals = [Arrival(0.0, 0), Arrival(0.02, 2), Arrival(0.025, 1), Arrival(0.04, 3)]
    run = simulate(arrivals, seq0=0, ts0=0)
    assert [index_of(f) for f in run.frames] == [0, 1, 2, 3]
    assert run.buffer.stats.reordered == 1


def test_first_packets_may_arrive_out_of_order() -> None:
    arrivals = [Arrival(0.0, 3), Arrival(0.01, 1), Arrival(0.015, 0), Arrival(0.02, 2), Arrival(0.03, 4)]
    run = simulate(arrivals, seq0=65_534, ts0=0)
    assert [index_of(f) for f in run.frames] == [0, 1, 2, 3, 4]


def test_overflow_drops_the_oldest_and_counts_it() -> None:
    jitter = JitterBuffer(max_packets=10)
    for i in range(25):
        jitter.push(i, i * 960, 0.0, payload(i))
    assert len(jitter) <= 10
    assert jitter.stats.overflow + len(jitter) == 25
    kept = len(jitter)
    frames = jitter.drain()
    audio = [index_of(f) for f in frames if f.kind is FrameKind.AUDIO]
    assert audio == list(range(25 - kept, 25))


def test_overflow_after_a_stall_does_not_keep_the_buffer_full() -> None:
    """A backlog bigger than the buffer is shed once, not one packet per arrival for the whole talkspurt."""
    jitter = JitterBuffer(max_packets=20)
    for i in range(5):  # normal start
        jitter.push(i, i * 960, i * FRAME, payload(i))
        jitter.pop(i * FRAME)
    stall_end = 1.2  # 60 packets were held up and arrive at once
    for i in range(5, 65):
        jitter.push(i, i * 960, stall_end, payload(i))
    shed = jitter.stats.overflow
    assert shed > 0
    now = stall_end
    for i in range(65, 165):  # the stream continues in real time
        now += FRAME
        jitter.push(i, i * 960, now, payload(i))
        jitter.pop(now)
    assert jitter.stats.overflow == shed  # no further drops once the schedule was pulled forward
    assert len(jitter) <= 20 // 2 + 3  # what was kept, plus the usual 60 ms of buffering


def test_sender_restart_is_confirmed_by_two_consecutive_packets() -> None:
    jitter = JitterBuffer()
    for i in range(10):
        jitter.push(1000 + i, i * 960, i * FRAME, payload(i))
    jitter.pop(1.0)
    # One stray packet far away is held, then discarded when the stream continues normally.
    assert jitter.push(40_000, 123, 0.21, b"stray") is PushResult.HELD
    assert jitter.push(1010, 10 * 960, 0.21, payload(10)) is PushResult.ACCEPTED
    assert jitter.stats.discarded == 1
    # A real restart: two consecutive packets with a new sequence and timestamp origin.
    assert jitter.push(30_000, 777_777, 0.24, payload(100)) is PushResult.HELD
    assert jitter.push(30_001, 777_777 + 960, 0.26, payload(101)) is PushResult.ACCEPTED
    jitter.push(30_002, 777_777 + 1920, 0.28, payload(102))
    assert jitter.stats.restarts == 1
    assert jitter.stats.discarded == 2  # the stray, and packet 10 still buffered from the old stream
    frames = jitter.drain()
    assert [index_of(f) for f in frames if f.kind is FrameKind.AUDIO] == [100, 101, 102]
    assert frames[0].kind is FrameKind.GAP
    assert frames[1].timestamp == 777_777


def test_a_restart_to_a_sequence_just_behind_the_old_one_is_a_restart_not_late_packets() -> None:
    """A sender that starts over at sequence 0 after 40 packets (a new timestamp origin): its new packets
    are behind the playout point by sequence but ahead by timestamp, so they are not old packets. They
    were all refused as late or duplicate until the sequence caught up (up to 2 s of audio)."""
    jitter = JitterBuffer()
    for i in range(40):
        jitter.push(i, 5_000 + i * 960, i * FRAME, payload(i))
    jitter.pop(1.0)
    for i in range(30):
        jitter.push(i, 900_000 + i * 960, 1.5 + i * FRAME, payload(100 + i))
    frames = jitter.drain()
    assert [index_of(f) for f in frames if f.kind is FrameKind.AUDIO] == list(range(100, 130))
    assert jitter.stats.restarts == 1
    assert jitter.stats.late == jitter.stats.duplicates == 0
    # A real late packet and a real repeat are still told apart from a restart.
    assert jitter.push(27, 900_000 + 27 * 960, 2.5, payload(127)) is PushResult.DUPLICATE
    assert jitter.push(10, 900_000 + 10 * 960, 2.5, payload(110)) is PushResult.DUPLICATE


def test_next_deadline_tells_when_to_pop() -> None:
    jitter = JitterBuffer(delay=0.06)
    assert jitter.next_deadline() is None
    jitter.push(5, 0, 10.0, b"a")
    assert jitter.next_deadline() == pytest.approx(10.06)
    assert jitter.pop(10.059) == []
    (frame,) = jitter.pop(10.06)
    assert frame.arrival_time == 10.0 and frame.payload == b"a"
    assert jitter.next_deadline() is None


def test_streams_of_two_users_share_one_timeline() -> None:
    # Two senders with unrelated sequence/timestamp origins, talking at the same moments.
    rng = random.Random(5)
    runs = []
    for seq0, ts0 in ((12, 4_000_000_000), (60_000, 17)):
        arrivals = [Arrival(i * FRAME + rng.uniform(0, 0.01), i) for i in range(200)]
        runs.append(simulate(arrivals, seq0=seq0, ts0=ts0))
    times = [{index_of(f): f.playout_time for f in run.of(FrameKind.AUDIO)} for run in runs]
    assert all(abs(times[0][i] - times[1][i]) <= 0.01 for i in range(200))


def test_reset_keeps_the_timeline_monotonic_and_counts_dropped_packets() -> None:
    jitter = JitterBuffer()
    for i in range(3):
        jitter.push(i, i * 960, i * FRAME, payload(i))
    first = jitter.pop(0.1)
    jitter.push(3, 3 * 960, 0.1, payload(3))
    jitter.reset()
    assert jitter.stats.discarded == 1 and len(jitter) == 0
    jitter.push(500, 99, 0.11, payload(9))
    (gap, frame) = jitter.drain()
    assert gap.kind is FrameKind.GAP and frame.playout_time >= first[-1].playout_time + FRAME


@pytest.mark.parametrize(
    "options",
    [
        {"delay": -1},
        {"delay": math.nan},
        {"delay": "0.06"},  # TypeError from the range check
        {"max_packets": 0},
        {"max_packets": 4.5},  # accepted, then TypeError on the packet path at the first overflow
        {"max_conceal": 1.5},
        {"max_conceal": None},
        {"frame_samples": 960.0},
    ],
)
def test_options_are_checked(options: dict[str, object]) -> None:
    with pytest.raises(InvalidArgumentError):
        JitterBuffer(**options)  # type: ignore[arg-type]


def test_argument_checks() -> None:
    with pytest.raises(InvalidArgumentError):
        JitterBuffer().push(1, 1, 0.0, b"x", samples=0)


@settings(max_examples=200)
@given(
    events=st.lists(
        st.tuples(
            st.one_of(st.integers(-5, 60), st.integers(0, 0xFFFF)),  # sequence offset: near, or anywhere
            st.one_of(st.just(0), st.integers(-(2**31), 2**31 - 1)),  # timestamp skew: none, or anything
            st.floats(0.0, 0.5),  # time since the previous event
            st.booleans(),  # pop after this push?
        ),
        max_size=80,
    )
)
def test_hostile_input_never_breaks_the_invariants(events: list[tuple[int, int, float, bool]]) -> None:
    jitter = JitterBuffer(max_packets=16)
    now = 0.0
    frames: list[JitterFrame] = []
    for number, (offset, skew, elapsed, pop) in enumerate(events):
        now += elapsed
        jitter.push(offset & 0xFFFF, (offset * 960 + skew) & 0xFFFFFFFF, now, payload(number))
        if pop:
            frames += jitter.pop(now)
        deadline = jitter.next_deadline()
        if deadline is not None:
            assert jitter.pop(deadline - 1e-6) == []  # nothing is ever due before the deadline
    frames += jitter.drain()
    stats = jitter.stats
    audio = [frame for frame in frames if frame.kind is FrameKind.AUDIO]
    held = 1 if jitter._probation is not None else 0
    assert (
        len(audio) + stats.duplicates + stats.late + stats.overflow + stats.discarded + held == stats.received
    )
    assert len({index_of(frame) for frame in audio}) == len(audio)
    times = [frame.playout_time for frame in frames]
    assert times == sorted(times)
    assert len(jitter) == 0
