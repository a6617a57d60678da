"""``decode_slots``, the batch decoder the receiver runs per tick: the same PCM as the per-frame methods."""

from __future__ import annotations

import threading

import pytest

from cordvoice.audio.opus import (
    SLOT_DECODE,
    SLOT_LOST,
    STATUS_ERROR,
    STATUS_FEC,
    STATUS_OK,
    STATUS_PLC,
    DecodeSlot,
    OpusDecoder,
    decode_slots,
)
from cordvoice.audio.samples import speech_like
from cordvoice.errors import AudioError, InvalidArgumentError

from .receive_helpers import encode_pcm

CORRUPT = b"\xff\xff\xff\xff\xff"  # frame-count code 3 with an invalid count: libopus refuses it


def _one_by_one(slots: list[DecodeSlot]) -> list[tuple[bytes, int]]:
    """The rules of ``decode_slots`` spelled out with the public per-frame methods (the reference)."""
    out: list[tuple[bytes, int]] = []
    for decoder, kind, data, samples in slots:
        try:
            if kind == SLOT_DECODE:
                assert data is not None
                out.append((decoder.decode(data), STATUS_OK))
            elif data and data[0] >> 3 < 16 and decoder.has_fec:
                out.append((decoder.decode_fec(data, samples), STATUS_FEC))
            else:
                out.append((decoder.conceal(samples), STATUS_PLC))
        except (AudioError, InvalidArgumentError):
            try:
                out.append((decoder.conceal(samples), STATUS_ERROR))
            except (AudioError, InvalidArgumentError):
                out.append((bytes(samples * 4), STATUS_ERROR))
    return out


def _script(decoders: list[OpusDecoder], silk: list[bytes], celt: list[bytes]) -> list[DecodeSlot]:
    """Two interleaved streams with every kind of slot: decodes, FEC, PLC, corrupt packets, bad sizes."""
    a, b = decoders
    return [
        (a, SLOT_DECODE, silk[0], 960),
        (b, SLOT_DECODE, celt[0], 960),
        (a, SLOT_LOST, silk[2], 960),  # SILK next packet: FEC
        (b, SLOT_LOST, celt[2], 960),  # CELT next packet: no FEC inside, PLC
        (a, SLOT_DECODE, silk[2], 960),
        (b, SLOT_DECODE, celt[2], 960),
        (a, SLOT_LOST, None, 960),  # nothing after it: PLC
        (b, SLOT_DECODE, CORRUPT, 960),  # refused: concealed, counted as an error
        (a, SLOT_DECODE, silk[3], 960),
        (b, SLOT_DECODE, celt[3], 960),
        (a, SLOT_LOST, silk[5], 100),  # not a multiple of 2.5 ms: silence, an error
        (b, SLOT_DECODE, b"", 960),  # empty: an error
        (a, SLOT_DECODE, silk[5], 960),
        (b, SLOT_DECODE, celt[4], 1920),
    ]


@pytest.fixture(scope="module")
def packets() -> tuple[list[bytes], list[bytes]]:
    silk = encode_pcm(speech_like(0.2, voice=1), fec=True)  # FEC makes libopus pick SILK/hybrid
    celt = encode_pcm(speech_like(0.2, voice=2))
    assert silk[2][0] >> 3 < 16 and celt[2][0] >> 3 >= 16
    return silk, celt


def test_decode_slots_matches_the_per_frame_methods(packets: tuple[list[bytes], list[bytes]]) -> None:
    silk, celt = packets
    reference = _one_by_one(_script([OpusDecoder(), OpusDecoder()], silk, celt))
    batch = decode_slots(_script([OpusDecoder(), OpusDecoder()], silk, celt))
    assert [status for _, status in batch] == [
        STATUS_OK,
        STATUS_OK,
        STATUS_FEC,
        STATUS_PLC,
        STATUS_OK,
        STATUS_OK,
        STATUS_PLC,
        STATUS_ERROR,
        STATUS_OK,
        STATUS_OK,
        STATUS_ERROR,
        STATUS_ERROR,
        STATUS_OK,
        STATUS_OK,
    ]
    assert batch == reference  # byte for byte: the same decoder states, the same concealment
    assert len(batch[10][0]) == 400 and not any(batch[10][0])


def test_decode_slots_on_a_closed_or_pyav_decoder(packets: tuple[list[bytes], list[bytes]]) -> None:
    _, celt = packets
    closed = OpusDecoder()
    closed.close()
    pyav = OpusDecoder(backend="pyav")
    reference = OpusDecoder(backend="pyav")
    results = decode_slots([(closed, SLOT_DECODE, celt[0], 960), (pyav, SLOT_DECODE, celt[0], 960)])
    assert results[0] == (bytes(3840), STATUS_ERROR)
    assert results[1] == (reference.decode(celt[0]), STATUS_OK)


def test_decode_slots_on_many_threads_keep_each_output(packets: tuple[list[bytes], list[bytes]]) -> None:
    """Each thread has its own output buffer: concurrent batches never see each other's PCM."""
    _, celt = packets
    streams = 8
    expected = []
    for _ in range(streams):
        decoder = OpusDecoder()
        expected.append([decoder.decode(packet) for packet in celt])
    results: dict[int, list[bytes]] = {}
    barrier = threading.Barrier(4)

    def work(first: int) -> None:
        decoders = {index: OpusDecoder() for index in range(first, streams, 4)}
        barrier.wait()
        out: dict[int, list[bytes]] = {index: [] for index in decoders}
        for packet in celt:
            slots = [(decoder, SLOT_DECODE, packet, 960) for decoder in decoders.values()]
            for index, (pcm, status) in zip(decoders, decode_slots(slots), strict=True):
                assert status == STATUS_OK
                out[index].append(pcm)
        results.update(out)

    threads = [threading.Thread(target=work, args=(first,)) for first in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert [results[index] for index in range(streams)] == expected
