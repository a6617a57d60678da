"""Seeded fuzzing: each parser takes >= 20,000 random and mutated inputs and raises only ProtocolError.

Inputs start from valid samples and are bit-flipped, truncated, spliced, extended and (for JSON) given
values of the wrong type, so most of them reach deep into the parsers instead of failing on byte one.
``CORDVOICE_FUZZ_SEED`` picks another seed and ``CORDVOICE_FUZZ_SCALE`` multiplies the counts for long runs.
"""

from __future__ import annotations

import copy
import json
import os
import random
import struct
from collections.abc import Callable
from typing import Any

import pytest

from cordvoice.errors import ProtocolError
from cordvoice.udp import crypto, discovery, rtp
from cordvoice.voicegateway import messages as m

SEED = int(os.environ.get("CORDVOICE_FUZZ_SEED", "20261123"))
COUNT = 20_000 * int(os.environ.get("CORDVOICE_FUZZ_SCALE", "1"))

# fmt: off
WEIRD_VALUES: tuple[Any, ...] = (
    None, True, False, 0, -1, 1, 255, 256, 65535, 65536, 2**32, 2**64, 2**70, -(2**63), 1.5, 1e308,
    float("nan"), float("inf"), "", "x", "123", "-1", "0x10", "\u0663", "\ud800", "9" * 30, [], {}, [1, 2],
    {"a": 1}, [None], list(range(32)), [256] * 32,
)
# fmt: on


def _run(parser: Callable[[Any], object], inputs: Any, *, min_ok: int = 1, min_errors: int = 1) -> None:
    ok = errors = 0
    for data in inputs:
        try:
            parser(data)
        except ProtocolError:
            errors += 1
        except Exception as exc:
            pytest.fail(f"{parser.__name__} raised {type(exc).__name__}: {exc} on input {data!r:.300}")
        else:
            ok += 1
    assert ok + errors >= COUNT
    # Both outcomes must occur, or the mutations are not exercising the parser.
    assert ok >= min_ok, f"{parser.__name__}: only {ok} of {ok + errors} inputs parsed"
    assert errors >= min_errors, f"{parser.__name__}: no input was rejected"


def _mutate_bytes(rng: random.Random, samples: list[bytes]) -> bytes:
    data = bytearray(rng.choice(samples))
    for _ in range(rng.randint(1, 3)):
        kind = rng.randrange(8)
        if kind == 0:
            data = bytearray(rng.randbytes(rng.randrange(0, 120)))
        elif kind == 1 and data:
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        elif kind == 2:
            del data[rng.randrange(len(data) + 1) :]
        elif kind == 3:
            other = rng.choice(samples)
            data = data[: rng.randrange(len(data) + 1)] + other[rng.randrange(len(other) + 1) :]
        elif kind == 4:
            at = rng.randrange(len(data) + 1)
            data[at:at] = rng.randbytes(rng.randint(1, 8))
        elif kind == 5 and data:
            at = rng.randrange(len(data))
            del data[at : at + rng.randint(1, 8)]
        elif kind == 6 and data:
            data[rng.randrange(len(data))] = rng.choice((0x00, 0xFF, 0x7F, 0x80, 0x78, 0xC8, 0x90, 0xBF))
        else:
            data += rng.randbytes(rng.randint(1, 40))
    return bytes(data)


def _flip_bytes(rng: random.Random, samples: list[bytes]) -> bytes:
    """Length-preserving damage, so fixed-size parsers get past their size check."""
    data = bytearray(rng.choice(samples))
    for _ in range(rng.randint(1, 4)):
        index = rng.randrange(len(data))
        if rng.randrange(2):
            data[index] ^= 1 << rng.randrange(8)
        else:
            data[index] = rng.randrange(256)
    return bytes(data)


def _slots(value: Any) -> list[tuple[Any, Any]]:
    """Every (container, key) pair inside a JSON value, for targeted replacement."""
    found: list[tuple[Any, Any]] = []
    stack = [value]
    while stack:
        current = stack.pop()
        if isinstance(current, dict):
            items: Any = current.items()
        elif isinstance(current, list):
            items = enumerate(current)
        else:
            continue
        for key, child in items:
            found.append((current, key))
            stack.append(child)
    return found


def _mutate_json(rng: random.Random, samples: list[dict[str, Any]]) -> str:
    kind = rng.randrange(20)
    if kind == 0:
        return rng.randbytes(rng.randrange(60)).decode("latin-1")
    obj = copy.deepcopy(rng.choice(samples))
    for _ in range(rng.randint(1, 3)):
        slots = _slots(obj)
        if not slots:
            break
        container, key = rng.choice(slots)
        action = rng.randrange(10)
        if action < 6:
            container[key] = copy.deepcopy(rng.choice(WEIRD_VALUES))
        elif action < 8 and isinstance(container, dict):
            del container[key]
        elif action < 9 and isinstance(container, dict):
            name = rng.choice(("seq", "op", "d", "user_id", "t", "seq_ack", "zz"))
            container[name] = copy.deepcopy(rng.choice(WEIRD_VALUES))
        else:
            obj["op"] = rng.choice((rng.randrange(40), rng.randrange(256), -1, 2**40))
    text = json.dumps(obj)
    if kind >= 16:  # text-level damage on top of the structural one
        chars = list(text)
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(len(chars) + 1)
            choice = rng.randrange(3)
            if choice == 0:
                del chars[at:]
            elif choice == 1:
                chars[at:at] = rng.choice(['"', "{", "}", "[", ",", ":", "1", "\\", "\u00e9", "NaN"])
            elif chars:
                del chars[at : at + rng.randint(1, 4)]
        text = "".join(chars)
    return text


def _server_samples() -> tuple[list[dict[str, Any]], list[bytes]]:
    messages: list[Any] = [
        m.Ready(1234, "127.0.0.1", 50000, (crypto.MODE_AES256_GCM, crypto.MODE_XCHACHA20_POLY1305), ("x",)),
        m.SessionDescription(crypto.MODE_AES256_GCM, bytes(range(32)), 1, "opus", None, "abc"),
        m.Speaking(1, 99, 0, 80351110224678912),
        m.HeartbeatAck(1700000000000),
        m.Hello(13750.0, 8),
        m.Resumed(),
        m.ClientsConnect((1, 2, 3)),
        m.ClientDisconnect(5),
        m.DavePrepareTransition(1, 3),
        m.DaveExecuteTransition(3),
        m.DavePrepareEpoch(1, 1, 0),
        m.Unknown(15, {"any": 100}),
    ]
    binary: list[Any] = [
        m.DaveMlsExternalSender(b"\x40\x41\x04" + bytes(64) + b"\x00\x01\x04abcd"),
        m.DaveMlsProposals(m.ProposalsOperation.APPEND, b"\x05hello"),
        m.DaveMlsProposals(m.ProposalsOperation.REVOKE, b"\x21" + bytes(33)),
        m.DaveMlsAnnounceCommitTransition(7, b"\x00\x01\x00\x01commit"),
        m.DaveMlsWelcome(7, b"\x00\x02welcome"),
    ]
    json_samples = [json.loads(m.encode_server(message, seq)) for seq, message in enumerate(messages)]
    binary_samples = [m.encode_server(message, seq) for seq, message in enumerate(binary)]
    return json_samples, [b for b in binary_samples if isinstance(b, bytes)]


def _client_samples() -> tuple[list[dict[str, Any]], list[bytes]]:
    messages: list[Any] = [
        m.Identify(1, 2, "session", "token", 1),
        m.SelectProtocol("203.0.113.7", 50004, crypto.MODE_AES256_GCM),
        m.Heartbeat(1700000000000, 3),
        m.Speaking(1, 99),
        m.Resume(1, "session", "token", 9),
        m.DaveTransitionReady(3),
        m.DaveMlsInvalidCommitWelcome(3),
    ]
    binary: list[Any] = [
        m.DaveMlsKeyPackage(b"\x00\x01\x00\x02" + bytes(60)),
        m.DaveMlsCommitWelcome(b"cw" * 20),
    ]
    return (
        [json.loads(m.encode_client(message)) for message in messages],
        [b for b in map(m.encode_client, binary) if isinstance(b, bytes)],
    )


def test_fuzz_decode_server() -> None:
    rng = random.Random(SEED)
    json_samples, binary_samples = _server_samples()
    _run(m.decode_server, (_mutate_json(rng, json_samples) for _ in range(COUNT)), min_ok=COUNT // 50)
    _run(m.decode_server, (_mutate_bytes(rng, binary_samples) for _ in range(COUNT)), min_ok=COUNT // 50)


def test_fuzz_decode_client() -> None:
    rng = random.Random(SEED + 1)
    json_samples, binary_samples = _client_samples()
    _run(m.decode_client, (_mutate_json(rng, json_samples) for _ in range(COUNT)), min_ok=COUNT // 50)
    _run(m.decode_client, (_mutate_bytes(rng, binary_samples) for _ in range(COUNT)), min_ok=COUNT // 50)


def test_fuzz_discovery() -> None:
    rng = random.Random(SEED + 2)
    samples = [
        discovery.build_request(0x01020304),
        discovery.build_response(0x01020304, "203.0.113.7", 50004),
        discovery.build_response(7, "2001:db8::1", 1),
    ]
    for parser in (discovery.parse_request, discovery.parse_response):
        mutate = (_flip_bytes, _mutate_bytes)
        _run(parser, (mutate[index % 2](rng, samples) for index in range(COUNT)), min_ok=COUNT // 50)


def _rtp_samples(ciphers: list[crypto.TransportCipher]) -> list[bytes]:
    headers = [
        rtp.build_header(1, 960, 42),
        struct.pack(">BBHII", 0xB1, 0x78, 77, 2880, 9) + struct.pack(">I", 5) + b"\xbe\xde\x00\x01",
        struct.pack(">BBHII", 0x92, 0xF8, 1, 2, 3) + bytes(8) + b"\x10\x00\x00\x02",
    ]
    bodies = [b"\xfc" + bytes(40), b"\x01\x02\x03\x04frame\x00\x02", b"\x00" * 8 + b"opus\x01"]
    samples = list(headers)
    for cipher in ciphers:
        samples += [cipher.seal(h, b, n) for n, (h, b) in enumerate(zip(headers, bodies, strict=True))]
        samples.append(cipher.seal(struct.pack(">BBHI", 0x81, 201, 7, 9), bytes(24), 9))
    return samples


def _authentic_random_rtp(rng: random.Random, cipher: crypto.TransportCipher) -> bytes:
    """A packet that authenticates but whose header flags and lengths are random."""
    cc = rng.randrange(16)
    byte0 = rng.choice((0x80, rng.randrange(256))) | cc
    header = struct.pack(">BBHII", byte0, rng.choice((0x78, rng.randrange(256))), 1, 2, 3)
    header += rng.randbytes(4 * cc)
    if byte0 & 0x10:
        header += struct.pack(">HH", 0xBEDE, rng.randrange(6))
    return cipher.seal(header, rng.randbytes(rng.randrange(30)), rng.randrange(2**32))


def test_fuzz_parse_rtp() -> None:
    rng = random.Random(SEED + 3)
    samples = _rtp_samples([crypto.make_cipher(crypto.MODE_AES256_GCM, bytes(32))])
    _run(rtp.parse_rtp, (_mutate_bytes(rng, samples) for _ in range(COUNT)), min_ok=COUNT // 50)


@pytest.mark.parametrize("mode", crypto.SUPPORTED_MODES)
def test_fuzz_open_rtp(mode: str) -> None:
    rng = random.Random(SEED + 4)
    cipher = crypto.make_cipher(mode, bytes(range(32)))
    samples = _rtp_samples([cipher])

    def inputs() -> Any:
        for index in range(COUNT):
            yield _mutate_bytes(rng, samples) if index % 2 else _authentic_random_rtp(rng, cipher)

    _run(cipher.open_rtp, inputs(), min_ok=COUNT // 50)


@pytest.mark.parametrize("mode", crypto.SUPPORTED_MODES)
def test_fuzz_open_rtcp(mode: str) -> None:
    rng = random.Random(SEED + 5)
    cipher = crypto.make_cipher(mode, bytes(range(32)))
    samples = [
        cipher.seal(struct.pack(">BBHI", 0x80 | count, 200 + count, 6, 9), bytes(4 + 24 * count), count)
        for count in range(5)
    ] + _rtp_samples([cipher])

    def inputs() -> Any:
        for index in range(COUNT):
            if index % 4 == 0:
                clear = struct.pack(">BBHI", rng.randrange(256), rng.randrange(198, 207), 1, 2)
                yield cipher.seal(clear, rng.randbytes(rng.randrange(40)), index)
            else:
                yield (_flip_bytes if index % 2 else _mutate_bytes)(rng, samples)

    _run(cipher.open_rtcp, inputs(), min_ok=COUNT // 50)
