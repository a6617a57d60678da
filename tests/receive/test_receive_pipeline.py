"""The sans-IO receive core with real davey groups and real Opus: mapping, holds, DAVE edges, stats."""

from __future__ import annotations

import itertools
import math
import os
import time

import numpy as np
import pytest

from cordvoice.audio.opus import OPUS_SILENCE, STATUS_FEC, STATUS_OK, STATUS_PLC, OpusDecoder, decode_slots
from cordvoice.audio.receive_pipeline import DecodeJob, ReceivePipeline, UserStats, VoiceFrame
from cordvoice.audio.samples import speech_like
from cordvoice.errors import DaveDecryptError, InvalidArgumentError
from cordvoice.udp.crypto import MODE_AES256_GCM, make_cipher
from cordvoice.udp.rtp import build_header, parse_rtp

from .receive_helpers import DaveGroup, aligned_correlation, encode_pcm, rtp_header, to_mono

SSRC_A = 0x1111
SSRC_B = 0x2222
USER_A = 501
USER_B = 502
RECEIVER = 500


@pytest.fixture(scope="module")
def speech_frames() -> list[bytes]:
    return encode_pcm(speech_like(2.0, voice=1))


def feed_run(
    pipeline: ReceivePipeline,
    frames: list[bytes],
    *,
    ssrc: int,
    start_seq: int = 0,
    t0: float = 0.0,
    encrypt: object = None,
    skip: frozenset[int] = frozenset(),
    out: list[VoiceFrame] | None = None,
) -> None:
    """Feed packets 20 ms apart; with ``out``, tick at every arrival as the clock would, collecting frames."""
    for index, frame in enumerate(frames):
        if index in skip:
            continue
        seq = start_seq + index
        payload = encrypt(frame) if callable(encrypt) else frame
        now = t0 + index * 0.020
        pipeline.feed(rtp_header(seq, seq * 960, ssrc), payload, now)
        if out is not None:
            out.extend(pipeline.tick(now).frames)


def audio(frames: list[VoiceFrame]) -> list[VoiceFrame]:
    return [f for f in frames if not f.concealed]


def test_plain_stream_in_order_with_stats(speech_frames: list[bytes]) -> None:
    pipeline = ReceivePipeline(None)
    pipeline.on_speaking(USER_A, SSRC_A, 1, 0.0)
    feed_run(pipeline, speech_frames[:3], ssrc=SSRC_A)
    # Nothing plays before its time: the first frame is due 60 ms after its arrival.
    assert pipeline.tick(0.05).frames == []
    first = pipeline.tick(0.07)
    assert [f.sequence for f in first.frames] == [0]
    assert first.jobs == []  # nobody asked for PCM: no decoder work at all
    frames = list(first.frames)
    feed_run(pipeline, speech_frames[3:], ssrc=SSRC_A, start_seq=3, t0=0.06, out=frames)
    frames += pipeline.tick(100.0).frames
    assert [f.opus for f in frames] == speech_frames
    assert [f.sequence for f in frames] == list(range(len(speech_frames)))
    assert frames[0].playout_time == pytest.approx(0.060)
    assert frames[1].playout_time - frames[0].playout_time == pytest.approx(0.020)
    assert {f.user_id for f in frames} == {USER_A}
    stats = pipeline.stats(USER_A)
    count = len(speech_frames)
    assert (stats.received, stats.delivered, stats.lost, stats.undecryptable) == (count, count, 0, 0)


def test_unknown_ssrc_is_held_then_replayed_with_original_arrival(speech_frames: list[bytes]) -> None:
    pipeline = ReceivePipeline(None)
    feed_run(pipeline, speech_frames[:10], ssrc=SSRC_A)
    assert pipeline.tick(1.0).frames == []
    assert pipeline.counters.unknown_ssrc_held == 10
    pipeline.on_speaking(USER_A, SSRC_A, 1, 0.15)
    out = pipeline.tick(5.0)
    assert [f.sequence for f in audio(out.frames)] == list(range(10))
    assert out.frames[0].arrival_time == 0.0
    assert pipeline.counters.unknown_ssrc_replayed == 10
    assert pipeline.counters.unknown_ssrc_dropped == 0


def test_unknown_ssrc_holds_are_bounded_and_expire(speech_frames: list[bytes]) -> None:
    pipeline = ReceivePipeline(None, unknown_per_ssrc=5, unknown_max_ssrcs=3, unknown_hold=1.0)
    for ssrc in range(100, 110):  # ten random SSRCs, 10 packets each: a flood
        feed_run(pipeline, speech_frames[:10], ssrc=ssrc)
    counters = pipeline.counters
    assert pipeline.buffered <= 3 * 5
    assert counters.unknown_ssrc_held == 100
    assert counters.unknown_ssrc_dropped == 100 - pipeline.buffered
    pipeline.tick(10.0)  # everything left is older than unknown_hold
    assert pipeline.buffered == 0
    assert counters.unknown_ssrc_dropped == 100


def test_dave_stream_decrypts_with_real_group(speech_frames: list[bytes]) -> None:
    group = DaveGroup()
    receiver = group.join(RECEIVER)
    sender = group.join(USER_A)
    group.settle()
    assert receiver.ready and sender.ready
    pipeline = ReceivePipeline(receiver.decrypt)
    pipeline.on_speaking(USER_A, SSRC_A, 1, 0.0)
    encrypted = [sender.encrypt(f) for f in speech_frames]
    assert all(e is not None and e != f for e, f in zip(encrypted, speech_frames, strict=True))
    frames: list[VoiceFrame] = []
    for index, frame in enumerate(encrypted):
        assert frame is not None
        pipeline.feed(rtp_header(index, index * 960, SSRC_A), frame, index * 0.02)
        frames += pipeline.tick(index * 0.02).frames
    frames += pipeline.tick(100.0).frames
    assert [f.opus for f in frames] == speech_frames
    assert pipeline.stats(USER_A).undecryptable == 0


def test_frames_before_their_key_are_held_and_recovered_after_the_epoch_change(
    speech_frames: list[bytes],
) -> None:
    """A third member joins; the sender applies the commit before we do and encrypts with the new key."""
    group = DaveGroup()
    receiver = group.join(RECEIVER)
    sender = group.join(USER_A)
    group.settle()
    pipeline = ReceivePipeline(receiver.decrypt)
    group.on_epoch[RECEIVER] = lambda _event: pipeline.on_epoch_changed(0.5)
    pipeline.on_speaking(USER_A, SSRC_A, 1, 0.0)
    old = [sender.encrypt(f) for f in speech_frames[:10]]
    group.hold(RECEIVER)
    group.join(USER_B)
    group.settle()
    assert sender.epoch == 2 and receiver.epoch == 1
    new = [sender.encrypt(f) for f in speech_frames[10:20]]
    for index, frame in enumerate(old + new):
        assert frame is not None
        pipeline.feed(rtp_header(index, index * 960, SSRC_A), frame, index * 0.02)
    stats = pipeline.stats(USER_A)
    assert stats.key_held == 10 and stats.undecryptable == 0
    group.release(RECEIVER)  # the commit arrives: EpochChanged -> on_epoch_changed
    assert receiver.epoch == 2
    out = pipeline.tick(100.0)
    assert [f.opus for f in out.frames] == speech_frames[:20]
    stats = pipeline.stats(USER_A)
    assert (stats.key_recovered, stats.undecryptable, stats.late, stats.lost) == (10, 0, 0, 0)


def test_held_frames_also_retry_when_a_later_frame_decrypts(speech_frames: list[bytes]) -> None:
    """Without any epoch signal, a frame of the same sender that decrypts releases the held ones."""
    group = DaveGroup()
    receiver = group.join(RECEIVER)
    sender = group.join(USER_A)
    group.settle()
    pipeline = ReceivePipeline(receiver.decrypt)  # nobody calls on_epoch_changed
    pipeline.on_speaking(USER_A, SSRC_A, 1, 0.0)
    group.hold(RECEIVER)
    group.join(USER_B)
    group.settle()
    early = [sender.encrypt(f) for f in speech_frames[:5]]
    for index, frame in enumerate(early):
        assert frame is not None
        pipeline.feed(rtp_header(index, index * 960, SSRC_A), frame, index * 0.02)
    group.release(RECEIVER)
    later = sender.encrypt(speech_frames[5])
    assert later is not None
    pipeline.feed(rtp_header(5, 5 * 960, SSRC_A), later, 0.1)
    out = pipeline.tick(100.0)
    assert [f.opus for f in out.frames] == speech_frames[:6]
    assert pipeline.stats(USER_A).key_recovered == 5


def test_held_frames_whose_key_never_comes_expire_as_undecryptable(speech_frames: list[bytes]) -> None:
    group = DaveGroup()
    receiver = group.join(RECEIVER)
    sender = group.join(USER_A)
    group.settle()
    pipeline = ReceivePipeline(receiver.decrypt, key_hold=0.5, key_hold_max=4)
    pipeline.on_speaking(USER_A, SSRC_A, 1, 0.0)
    group.hold(RECEIVER)
    group.join(USER_B)
    group.settle()
    frames = [sender.encrypt(f) for f in speech_frames[:6]]
    for index, frame in enumerate(frames):
        assert frame is not None
        pipeline.feed(rtp_header(index, index * 960, SSRC_A), frame, index * 0.02)
    stats = pipeline.stats(USER_A)
    assert stats.key_held == 6 and stats.undecryptable == 2  # bounded: the two oldest were dropped
    assert pipeline.tick(0.3).frames == []
    pipeline.tick(2.0)
    stats = pipeline.stats(USER_A)
    assert stats.undecryptable == 6 and pipeline.buffered == 0


def test_replayed_and_garbage_frames_do_not_disturb_the_stream(speech_frames: list[bytes]) -> None:
    group = DaveGroup()
    receiver = group.join(RECEIVER)
    sender = group.join(USER_A)
    group.settle()
    pipeline = ReceivePipeline(receiver.decrypt, key_hold=0.2)
    pipeline.on_speaking(USER_A, SSRC_A, 1, 0.0)
    encrypted = [sender.encrypt(f) for f in speech_frames[:20]]
    seq = 0
    for index, frame in enumerate(encrypted):
        assert frame is not None
        pipeline.feed(rtp_header(index, index * 960, SSRC_A), frame, index * 0.02)
        seq = index
        if index % 5 == 4:
            # A replay of a DAVE frame (same bytes in a new packet and RTP sequence), garbage, a bare marker.
            pipeline.feed(rtp_header(1000 + index, 0, SSRC_A), bytes(bytearray(frame)), index * 0.02)
            pipeline.feed(rtp_header(2000 + index, 0, SSRC_A), os.urandom(40), index * 0.02)
            pipeline.feed(rtp_header(3000 + index, 0, SSRC_A), b"\xfa\xfa", index * 0.02)
    out = pipeline.tick(100.0)
    assert [f.opus for f in audio(out.frames)] == speech_frames[: seq + 1]
    stats = pipeline.stats(USER_A)
    assert stats.undecryptable == 12  # 4 replays (held, then expired), 4 garbage, 4 markers
    assert stats.lost == 0 and stats.concealed == 0


def test_silence_frames_pass_through_dave(speech_frames: list[bytes]) -> None:
    group = DaveGroup()
    receiver = group.join(RECEIVER)
    group.join(USER_A)
    group.settle()
    pipeline = ReceivePipeline(receiver.decrypt)
    pipeline.on_speaking(USER_A, SSRC_A, 1, 0.0)
    for index in range(5):
        pipeline.feed(rtp_header(index, index * 960, SSRC_A), OPUS_SILENCE, index * 0.02)
    out = pipeline.tick(10.0)
    assert [f.is_silence for f in out.frames] == [True] * 5


def test_loss_reorder_duplicates_and_late_packets_are_counted(speech_frames: list[bytes]) -> None:
    pipeline = ReceivePipeline(None)
    pipeline.on_speaking(USER_A, SSRC_A, 1, 0.0)
    order = list(range(30))
    order[10], order[11] = order[11], order[10]  # reordered within the jitter delay
    order.remove(20)  # lost
    for seq in order:
        pipeline.feed(rtp_header(seq, seq * 960, SSRC_A), speech_frames[seq], seq * 0.02 + 0.001)
    pipeline.feed(rtp_header(5, 5 * 960, SSRC_A), speech_frames[5], 0.2)  # duplicate
    out = pipeline.tick(1.0)
    pipeline.feed(rtp_header(20, 20 * 960, SSRC_A), speech_frames[20], 1.0)  # long after its slot: late
    out2 = pipeline.tick(2.0)
    frames = out.frames + out2.frames
    assert [f.sequence for f in frames] == list(range(30))
    concealed = [f for f in frames if f.concealed]
    assert [f.sequence for f in concealed] == [20]
    assert concealed[0].opus is None and concealed[0].arrival_time is None
    assert concealed[0].playout_time == pytest.approx(frames[19].playout_time + 0.02)
    stats = pipeline.stats(USER_A)
    assert (stats.lost, stats.concealed, stats.duplicate, stats.late) == (1, 1, 1, 1)
    assert stats.received == 31 and stats.delivered == 29


def test_pcm_jobs_only_for_wanted_users_and_decode_with_fec() -> None:
    pcm = speech_like(1.0, voice=2)
    frames = encode_pcm(pcm, fec=True)
    pipeline = ReceivePipeline(None)
    pipeline.on_speaking(USER_A, SSRC_A, 1, 0.0)
    pipeline.on_speaking(USER_B, SSRC_B, 1, 0.0)
    wanted = {USER_A}
    out_frames: list[VoiceFrame] = []
    jobs: list[DecodeJob] = []
    for index, frame in enumerate(frames):
        now = index * 0.02
        if index != 25:
            pipeline.feed(rtp_header(index, index * 960, SSRC_A), frame, now)
        pipeline.feed(rtp_header(index, index * 960, SSRC_B), frame, now)
        tick = pipeline.tick(now, wanted.__contains__)
        assert {tick.frames[i].user_id for i, _ in tick.jobs} <= wanted
        out_frames += tick.frames
        jobs += [job for _, job in tick.jobs]
    tick = pipeline.tick(100.0, wanted.__contains__)
    out_frames += tick.frames
    jobs += [job for _, job in tick.jobs]
    assert len(out_frames) == 2 * len(frames)
    assert len(jobs) == len(frames)
    results = decode_slots(jobs)
    statuses = [status for _, status in results]
    assert statuses[25] == STATUS_FEC  # the next packet was buffered: its FEC data rebuilt the slot
    assert statuses.count(STATUS_OK) == len(frames) - 1
    decoded = b"".join(p for p, _ in results)
    correlation, _ = aligned_correlation(to_mono(pcm), to_mono(decoded), 2000)
    assert correlation > 0.9


def test_decode_jobs_conceal_without_next_packet_and_survive_corrupt_opus() -> None:
    decoder = OpusDecoder()
    frames = encode_pcm(speech_like(0.2))
    jobs = [
        DecodeJob(decoder, 0, frames[0], 960),
        DecodeJob(decoder, 1, None, 960),
        DecodeJob(decoder, 0, b"\xff\xff\xff\xff\xff", 960),  # code 3 with an invalid frame count
    ]
    results = decode_slots(jobs)
    assert [status for _, status in results] == [STATUS_OK, STATUS_PLC, 3]
    assert all(len(p) == 3840 for p, _ in results)


def test_speaking_changes_from_op5_and_from_audio_with_hangover(speech_frames: list[bytes]) -> None:
    pipeline = ReceivePipeline(None, activity_start_frames=2, activity_hangover=0.2)
    pipeline.on_speaking(USER_A, SSRC_A, 1, 0.0)
    pipeline.on_speaking(USER_A, SSRC_A, 1, 0.01)  # no change: no event
    feed_run(pipeline, speech_frames[:10], ssrc=SSRC_A)
    feed_run(pipeline, [OPUS_SILENCE] * 5, ssrc=SSRC_A, start_seq=10, t0=0.2)
    first = pipeline.tick(0.07).speaking
    assert [(c.source, c.speaking) for c in first] == [("gateway", True)]
    assert [(c.source, c.speaking, c.time) for c in pipeline.tick(0.09).speaking] == [
        ("audio", True, pytest.approx(0.080))  # the second voiced frame's playout: hysteresis of 2
    ]
    assert pipeline.tick(0.3).speaking == []
    # Voiced frames play until 0.26 s; the trailing silence frames do not count; the hangover ends at 0.46.
    assert pipeline.tick(0.45).speaking == []
    stop = pipeline.tick(0.47).speaking
    assert [(c.source, c.speaking) for c in stop] == [("audio", False)]
    assert stop[0].time == pytest.approx(0.46)
    pipeline.on_speaking(USER_A, SSRC_A, 0, 0.6)
    out = pipeline.tick(0.7)
    assert [(c.source, c.speaking) for c in out.speaking] == [("gateway", False)]


def test_client_disconnect_flushes_the_stream_and_keeps_stats(speech_frames: list[bytes]) -> None:
    pipeline = ReceivePipeline(None)
    pipeline.on_clients_connect([USER_A])
    assert pipeline.recognized_users == {USER_A}
    pipeline.on_speaking(USER_A, SSRC_A, 1, 0.0)
    feed_run(pipeline, speech_frames[:10], ssrc=SSRC_A)
    pipeline.on_client_disconnect(USER_A, 0.2)
    out = pipeline.tick(0.2)  # the buffered frames come out at once: nobody will send more
    assert [f.sequence for f in out.frames] == list(range(10))
    assert pipeline.ssrc_users == {}
    assert pipeline.stats(USER_A).delivered == 10
    # A late packet from the departed SSRC is an unknown SSRC now, not a crash.
    pipeline.feed(rtp_header(10, 9600, SSRC_A), speech_frames[10], 0.3)
    assert pipeline.counters.unknown_ssrc_held == 1


def test_ssrc_moving_to_another_user_starts_a_new_stream(speech_frames: list[bytes]) -> None:
    pipeline = ReceivePipeline(None)
    pipeline.on_speaking(USER_A, SSRC_A, 1, 0.0)
    feed_run(pipeline, speech_frames[:5], ssrc=SSRC_A)
    pipeline.on_speaking(USER_B, SSRC_A, 1, 0.5)
    feed_run(pipeline, speech_frames[:5], ssrc=SSRC_A, start_seq=500, t0=0.5)
    out = pipeline.tick(10.0)
    assert [f.user_id for f in out.frames] == [USER_A] * 5 + [USER_B] * 5


def test_ssrc_moved_before_any_audio_belongs_only_to_the_new_user(speech_frames: list[bytes]) -> None:
    """Op 5 names USER_A, then USER_B, before a packet came: USER_A must not keep the SSRC (it would count
    USER_B's losses and its op 13 would flush USER_B's live stream)."""
    pipeline = ReceivePipeline(None)
    pipeline.on_speaking(USER_A, SSRC_A, 1, 0.0)
    pipeline.on_speaking(USER_B, SSRC_A, 1, 0.01)
    feed_run(pipeline, speech_frames[:10], ssrc=SSRC_A, skip=frozenset({4}))
    assert [f.sequence for f in pipeline.tick(0.15).frames] == [0, 1, 2, 3, 4]  # 4 concealed
    assert pipeline.stats(USER_B).lost == 1
    assert pipeline.stats(USER_A) == UserStats()
    pipeline.on_client_disconnect(USER_A, 0.15)
    assert pipeline.ssrc_users == {SSRC_A: USER_B}
    assert pipeline.tick(0.15).frames == []  # nothing flushed early: USER_B's frames keep their schedule
    rest = pipeline.tick(1.0).frames
    assert [f.sequence for f in rest] == [5, 6, 7, 8, 9]
    assert {f.user_id for f in rest} == {USER_B}
    assert rest[0].playout_time == pytest.approx(0.16)


def test_user_leaving_mid_speech_stops_speaking_after_its_last_frames(speech_frames: list[bytes]) -> None:
    pipeline = ReceivePipeline(None)
    pipeline.map_ssrc(SSRC_A, USER_A)
    feed_run(pipeline, speech_frames[:10], ssrc=SSRC_A)
    changes = list(pipeline.tick(0.1).speaking)
    pipeline.on_client_disconnect(USER_A, 0.1)
    for step in range(50):
        changes += pipeline.tick(0.1 + step * 0.02).speaking
    # One start, one stop where the last voiced frame ends (not a stop/start/stop flap around the flush).
    assert [(c.speaking, c.source, c.time) for c in changes] == [
        (True, "audio", pytest.approx(0.08)),
        (False, "audio", pytest.approx(0.26)),
    ]


def test_user_leaving_within_the_hangover_stops_speaking_at_once(speech_frames: list[bytes]) -> None:
    pipeline = ReceivePipeline(None, activity_hangover=0.3)
    pipeline.map_ssrc(SSRC_A, USER_A)
    feed_run(pipeline, speech_frames[:10], ssrc=SSRC_A)
    started = pipeline.tick(0.3).speaking  # every frame played (until 0.26), the hangover runs until 0.56
    assert [(c.speaking, c.source) for c in started] == [(True, "audio")]
    pipeline.on_client_disconnect(USER_A, 0.35)
    stop = pipeline.tick(0.36).speaking
    assert [(c.speaking, c.source, c.time) for c in stop] == [(False, "audio", 0.35)]
    assert pipeline.tick(1.0).speaking == []


def test_feed_datagram_counts_rtcp_garbage_and_bad_authentication(speech_frames: list[bytes]) -> None:
    cipher = make_cipher(MODE_AES256_GCM, bytes(range(32)))
    other = make_cipher(MODE_AES256_GCM, bytes(32))
    pipeline = ReceivePipeline(None)
    pipeline.on_speaking(USER_A, SSRC_A, 1, 0.0)
    good = cipher.seal(build_header(0, 0, SSRC_A), speech_frames[0], 1)
    pipeline.feed_datagram(good, 0.0, cipher)
    pipeline.feed_datagram(cipher.seal(b"\x81\xc9\x00\x07" + bytes(4), b"report", 2), 0.0, cipher)
    pipeline.feed_datagram(other.seal(build_header(1, 960, SSRC_A), speech_frames[1], 1), 0.0, cipher)
    pipeline.feed_datagram(b"\x80\x78\x00", 0.0, cipher)
    pipeline.feed_datagram(bytes(range(60)), 0.0, cipher)  # not RTP v2 (random bytes were RTCP 1 in 200)
    counters = pipeline.counters
    assert counters.rtcp == 1
    assert counters.transport_undecryptable + counters.malformed == 3
    assert [f.opus for f in pipeline.tick(1.0).frames] == [speech_frames[0]]
    assert parse_rtp(good).ssrc == SSRC_A


def test_other_payload_types_and_bad_opus_are_dropped_and_counted(speech_frames: list[bytes]) -> None:
    pipeline = ReceivePipeline(None)
    pipeline.on_speaking(USER_A, SSRC_A, 1, 0.0)
    video = parse_rtp(bytes([0x80, 101]) + build_header(0, 0, SSRC_A)[2:])
    pipeline.feed(video, b"\x00" * 20, 0.0)
    pipeline.feed(rtp_header(1, 960, SSRC_A), b"", 0.0)
    assert pipeline.counters.other_payload_type == 1
    assert pipeline.stats(USER_A).dropped == 1


@pytest.mark.parametrize(
    "options",
    [
        {"jitter_delay": -1},
        {"key_hold_max": 0},
        {"activity_hangover": math.nan},  # no audio speaking ever stopped: no end of utterance
        {"key_hold": math.nan},
        {"unknown_hold": math.inf},
        {"timeline_tolerance": math.nan},
        {"timeline_tolerance": "0.1"},
        {"jitter_delay": "0.02"},
        {"key_hold": "1"},
        {"jitter_max_packets": 4.5},  # the buffer's first overflow raised TypeError on the packet path
        {"max_conceal": None},
        {"activity_start_frames": 1.5},
        {"unknown_per_ssrc": True},
    ],
)
def test_invalid_options_are_refused(options: dict[str, object]) -> None:
    """Receiver(**options) and Receiver.for_session pass these on: a NaN hangover never ended anyone's
    speaking, and a str or float where a number or count belongs failed later inside the tick or raised
    TypeError here."""
    with pytest.raises(InvalidArgumentError):
        ReceivePipeline(None, **options)  # type: ignore[arg-type]


def test_decrypt_errors_outside_dave_are_contained(speech_frames: list[bytes]) -> None:
    def decrypt(user_id: int, frame: bytes) -> bytes:
        if frame[0] == 0:
            raise DaveDecryptError("nope", reason="failed")
        return frame

    pipeline = ReceivePipeline(decrypt)
    pipeline.on_speaking(USER_A, SSRC_A, 1, 0.0)
    pipeline.feed(rtp_header(0, 0, SSRC_A), b"\x00abc", 0.0)
    pipeline.feed(rtp_header(1, 960, SSRC_A), speech_frames[1], 0.02)
    out = pipeline.tick(1.0)
    assert [f.opus for f in audio(out.frames)] == [speech_frames[1]]
    assert pipeline.stats(USER_A).undecryptable == 1
    assert np.isfinite(out.frames[0].playout_time)


def test_per_packet_cost_does_not_grow_with_the_number_of_streams(speech_frames: list[bytes]) -> None:
    """Scale guard: 20 and 400 simultaneous speakers cost about the same per packet (no per-stream scans)."""

    def run(streams: int) -> float:
        pipeline = ReceivePipeline(None)
        for stream in range(streams):
            pipeline.on_speaking(10_000 + stream, 20_000 + stream, 1, 0.0)
        headers = [[rtp_header(t, t * 960, 20_000 + s) for s in range(streams)] for t in range(25)]
        start = time.perf_counter()
        for tick in range(25):
            now = tick * 0.02
            row = headers[tick]
            for stream in range(streams):
                pipeline.feed(row[stream], speech_frames[tick], now)
            pipeline.tick(now)
        return (time.perf_counter() - start) / (streams * 25)

    small = min(run(20) for _ in range(3))
    large = min(run(400) for _ in range(3))
    assert large < 3 * small + 5e-6, (small, large)
    assert large < 100e-6  # ~6-10 µs measured; generous for a loaded CI machine


def test_timeline_ignores_a_stall_burst_but_keeps_a_real_pause(speech_frames: list[bytes]) -> None:
    """A 300 ms stall (packets bunched up, then on time) moves nothing; a 500 ms pause moves what follows."""
    pipeline = ReceivePipeline(None)
    pipeline.on_speaking(USER_A, SSRC_A, 1, 0.0)
    frames: list[VoiceFrame] = []
    arrivals = [i * 0.02 for i in range(40)]
    for i in range(10, 25):  # sent on time, but nobody read them until 0.5 s: a burst
        arrivals[i] = max(arrivals[i], 0.5)
    arrivals += [0.5 + i * 0.02 for i in range(40, 60)]  # a pause: the sender was quiet for 0.5 s
    now = 0.0
    for seq, arrival in enumerate(arrivals):
        while now < arrival:
            frames += pipeline.tick(now).frames
            now += 0.005
        pipeline.feed(rtp_header(seq, seq * 960, SSRC_A), speech_frames[seq], arrival)
    frames += pipeline.tick(100.0).frames
    assert [f.sequence for f in frames] == list(range(60))
    timeline = [f.timeline_time for f in frames]
    playout = [f.playout_time for f in frames]
    # The burst was played late (the jitter buffer had to wait), yet its timeline stays on the 20 ms grid.
    assert playout[24] - playout[0] > 24 * 0.02 + 0.2
    assert timeline[39] - timeline[0] == pytest.approx(39 * 0.02)
    # The pause is kept: frame 40 sits 0.5 s after where the grid alone would put it.
    assert timeline[40] - timeline[39] == pytest.approx(0.02 + 0.5, abs=0.005)
    assert timeline[59] - timeline[40] == pytest.approx(19 * 0.02)
    assert all(b >= a + 0.0199 for a, b in itertools.pairwise(timeline))


def test_timeline_keeps_pauses_after_the_sender_restarts_its_stream(speech_frames: list[bytes]) -> None:
    """The sender restarts on the same SSRC with new origins, its sequence "behind" the old one modulo
    2**16: the old stream's transits must not pin the timeline, or every later pause would vanish."""
    pipeline = ReceivePipeline(None)
    pipeline.map_ssrc(SSRC_A, USER_A)
    packets = [(1000 + i, 5_000_000 + i * 960, i * 0.02) for i in range(50)]
    # Restart after a 1 s pause; then a real 2 s pause (DTX: the timestamp jumps by 2 s as well).
    packets += [(41_050 + i, 2_000_000 + i * 960, 2.0 + i * 0.02) for i in range(25)]
    packets += [(41_050 + i, 2_096_000 + i * 960, 4.0 + i * 0.02) for i in range(25, 50)]
    frames: list[VoiceFrame] = []
    for index, (seq, ts, arrival) in enumerate(packets):
        pipeline.feed(rtp_header(seq, ts, SSRC_A), speech_frames[index], arrival)
        frames += pipeline.tick(arrival).frames
    frames += pipeline.drain(10.0).frames
    assert [f.sequence for f in frames] == [seq for seq, _, _ in packets]
    assert pipeline.stats(USER_A).dropped == 0
    timeline = [f.timeline_time for f in frames]
    assert timeline[50] - timeline[49] == pytest.approx(0.02 + 1.0, abs=0.005)
    assert timeline[75] - timeline[74] == pytest.approx(0.02 + 2.0, abs=0.005)
    assert timeline[74] - timeline[50] == pytest.approx(24 * 0.02)
    assert timeline[99] - timeline[75] == pytest.approx(24 * 0.02)
    assert all(b >= a + 0.0199 for a, b in itertools.pairwise(timeline))
