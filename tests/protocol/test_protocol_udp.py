"""UDP cores: IP discovery, RTP parsing and wraparound, both AEAD modes and the RTP sender."""

from __future__ import annotations

import ipaddress
import os
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cordvoice.errors import DecryptionError, InvalidArgumentError, ProtocolError
from cordvoice.udp import crypto, discovery, rtp
from cordvoice.udp.sender import RtpSender

U16 = st.integers(0, 0xFFFF)
U32 = st.integers(0, 0xFFFF_FFFF)
MODES = st.sampled_from(crypto.SUPPORTED_MODES)
KEYS = st.binary(min_size=32, max_size=32)
ADDRESSES = st.ip_addresses().map(str)

# --------------------------------------------------------------------------------------------------
# IP discovery
# --------------------------------------------------------------------------------------------------


@given(U32, ADDRESSES, U16)
def test_discovery_round_trip(ssrc: int, address: str, port: int) -> None:
    request = discovery.build_request(ssrc)
    assert len(request) == discovery.PACKET_SIZE
    assert discovery.parse_request(request) == ssrc
    response = discovery.build_response(ssrc, address, port)
    assert len(response) == discovery.PACKET_SIZE
    assert discovery.parse_response(response) == discovery.DiscoveryResult(ssrc, address, port)


def test_discovery_rejects_the_wrong_packets() -> None:
    request = discovery.build_request(7)
    response = discovery.build_response(7, "10.0.0.1", 9)
    with pytest.raises(ProtocolError, match="type"):
        discovery.parse_response(request)
    with pytest.raises(ProtocolError, match="type"):
        discovery.parse_request(response)
    with pytest.raises(ProtocolError, match="74 bytes"):
        discovery.parse_response(response[:-1])
    with pytest.raises(ProtocolError, match="length"):
        discovery.parse_response(response[:2] + b"\x00\x45" + response[4:])
    no_address = response[:8] + b"not an ip".ljust(64, b"\0") + response[72:]
    with pytest.raises(ProtocolError, match="address"):
        discovery.parse_response(no_address)
    non_ascii = response[:8] + b"\xff\xfe".ljust(64, b"\0") + response[72:]
    with pytest.raises(ProtocolError, match="address"):
        discovery.parse_response(non_ascii)


def test_discovery_build_rejects_bad_arguments() -> None:
    with pytest.raises(InvalidArgumentError):
        discovery.build_request(2**32)
    with pytest.raises(InvalidArgumentError):
        discovery.build_response(1, "example.com", 1)
    with pytest.raises(InvalidArgumentError):
        discovery.build_response(1, "10.0.0.1", 65536)
    with pytest.raises(InvalidArgumentError, match="does not fit"):
        discovery.build_response(1, "fe80::1%" + "x" * 60, 1)


# --------------------------------------------------------------------------------------------------
# RTP
# --------------------------------------------------------------------------------------------------


@given(U16, U32, U32)
def test_header_round_trip(sequence: int, timestamp: int, ssrc: int) -> None:
    header = rtp.build_header(sequence, timestamp, ssrc)
    assert header[:2] == b"\x80\x78"
    parsed = rtp.parse_rtp(header)
    assert (parsed.sequence, parsed.timestamp, parsed.ssrc) == (sequence, timestamp, ssrc)
    assert (parsed.version, parsed.padding, parsed.extension, parsed.marker) == (2, False, False, False)
    assert (parsed.csrcs, parsed.header_length, parsed.extension_length) == ((), 12, 0)


def test_build_header_rejects_out_of_range() -> None:
    with pytest.raises(InvalidArgumentError):
        rtp.build_header(65536, 0, 0)
    with pytest.raises(InvalidArgumentError):
        rtp.build_header(0, -1, 0)


def test_rtcp_is_recognised_by_the_full_second_byte() -> None:
    for byte1 in range(256):
        assert rtp.is_rtcp(bytes((0x80, byte1))) == (200 <= byte1 <= 204)
    # Marker + PT 120 masks to 0x78 but is RTP; 0xC8 (200) is RTCP even though it masks to PT 72.
    assert not rtp.is_rtcp(b"\x80\xf8")
    assert not rtp.is_rtcp(b"\x80")
    with pytest.raises(ProtocolError, match="RTCP"):
        rtp.parse_rtp(b"\x81\xc9" + bytes(30))


def test_parse_rtp_rejects_bad_version_and_truncation() -> None:
    with pytest.raises(ProtocolError, match="version"):
        rtp.parse_rtp(b"\x40\x78" + bytes(10))
    with pytest.raises(ProtocolError, match="shorter"):
        rtp.parse_rtp(b"\x80\x78" + bytes(9))
    with pytest.raises(ProtocolError, match="clear header"):
        rtp.parse_rtp(b"\x83\x78" + bytes(10 + 8))  # three CSRCs announced, two present
    with pytest.raises(ProtocolError, match="clear header"):
        rtp.parse_rtp(b"\x90\x78" + bytes(10 + 3))  # extension preamble cut short


@given(st.integers(0, 0xFFFF), st.integers(-32768, 32767))
def test_sequence_wraparound(sequence: int, step: int) -> None:
    later = rtp.seq_add(sequence, step)
    assert 0 <= later <= 0xFFFF
    assert rtp.seq_delta(later, sequence) == step
    if step != -32768:  # +32768 is outside the range; that distance reads as -32768 both ways
        assert rtp.seq_delta(sequence, later) == -step


@given(U32, st.integers(-(2**31), 2**31 - 1))
def test_timestamp_wraparound(timestamp: int, step: int) -> None:
    later = rtp.ts_add(timestamp, step)
    assert 0 <= later <= 0xFFFF_FFFF
    assert rtp.ts_delta(later, timestamp) == step


def test_wraparound_examples() -> None:
    assert rtp.seq_add(65535, 1) == 0
    assert rtp.seq_delta(0, 65535) == 1
    assert rtp.ts_add(2**32 - 960, 960) == 0
    assert rtp.ts_delta(0, 2**32 - 960) == 960


# --------------------------------------------------------------------------------------------------
# Transport encryption
# --------------------------------------------------------------------------------------------------


@st.composite
def incoming_rtp(draw: st.DrawFn) -> tuple[bytes, bytes, bytes, int]:
    """(clear header, plaintext to seal, expected payload, nonce) for an RTP packet with any features."""
    csrcs = draw(st.lists(U32, max_size=15))
    ext_words = draw(st.none() | st.integers(0, 8))
    payload = draw(st.binary(max_size=300))
    padding = draw(st.integers(0, 32))
    marker = draw(st.booleans())
    byte0 = 0x80 | len(csrcs) | (0x10 if ext_words is not None else 0) | (0x20 if padding else 0)
    byte1 = (0x80 if marker else 0) | rtp.OPUS_PAYLOAD_TYPE
    header = struct.pack(">BBHII", byte0, byte1, draw(U16), draw(U32), draw(U32))
    header += b"".join(struct.pack(">I", c) for c in csrcs)
    body = b""
    if ext_words is not None:
        header += struct.pack(">HH", 0xBEDE, ext_words)
        body = draw(st.binary(min_size=4 * ext_words, max_size=4 * ext_words))
    pad = bytes(padding - 1) + bytes((padding,)) if padding else b""
    return header, body + payload + pad, payload, draw(U32)


@given(MODES, KEYS, incoming_rtp())
def test_rtp_round_trip_with_csrc_extension_and_padding(
    mode: str, key: bytes, packet_parts: tuple[bytes, bytes, bytes, int]
) -> None:
    header, plaintext, payload, nonce = packet_parts
    cipher = crypto.make_cipher(mode, key)
    packet = cipher.seal(header, plaintext, nonce)
    assert packet[-4:] == struct.pack(">I", nonce)
    assert len(packet) == len(header) + len(plaintext) + crypto.TAG_SIZE + crypto.NONCE_SIZE
    parsed, opened = cipher.open_rtp(packet)
    assert opened == payload
    assert parsed.header_length == len(header)


@given(MODES, KEYS, U32, st.binary(max_size=200), U32)
def test_rtcp_round_trip(mode: str, key: bytes, ssrc: int, body: bytes, nonce: int) -> None:
    cipher = crypto.make_cipher(mode, key)
    clear = struct.pack(">BBHI", 0x81, 201, 7, ssrc)
    assert cipher.open_rtcp(cipher.seal(clear, body, nonce)) == body


@pytest.mark.parametrize("mode", crypto.SUPPORTED_MODES)
def test_every_single_bit_flip_is_rejected(mode: str) -> None:
    cipher = crypto.make_cipher(mode, os.urandom(32))
    header = struct.pack(">BBHII", 0x91, 0x78, 1, 2, 3) + struct.pack(">I", 9) + b"\xbe\xde\x00\x01"
    packet = cipher.seal(header, b"\x01\x02\x03\x04" + b"opus payload", 5)
    for index in range(len(packet)):
        for bit in (0x01, 0x80):
            tampered = bytearray(packet)
            tampered[index] ^= bit
            with pytest.raises(ProtocolError):  # DecryptionError, or a structural error for header bits
                cipher.open_rtp(bytes(tampered))
    rtcp = cipher.seal(struct.pack(">BBHI", 0x80, 201, 1, 2), b"report", 1)
    for index in range(len(rtcp)):
        tampered = bytearray(rtcp)
        tampered[index] ^= 0x01
        with pytest.raises(ProtocolError):
            cipher.open_rtcp(bytes(tampered))


@pytest.mark.parametrize("mode", crypto.SUPPORTED_MODES)
def test_wrong_key_and_wrong_mode_fail_authentication(mode: str) -> None:
    key = os.urandom(32)
    packet = crypto.make_cipher(mode, key).seal(rtp.build_header(1, 2, 3), b"frame", 0)
    with pytest.raises(DecryptionError):
        crypto.make_cipher(mode, os.urandom(32)).open_rtp(packet)
    other = next(m for m in crypto.SUPPORTED_MODES if m != mode)
    with pytest.raises(DecryptionError):
        crypto.make_cipher(other, key).open_rtp(packet)


@pytest.mark.parametrize("mode", crypto.SUPPORTED_MODES)
def test_structural_errors_after_decryption(mode: str) -> None:
    cipher = crypto.make_cipher(mode, os.urandom(32))
    with_ext = struct.pack(">BBHII", 0x90, 0x78, 1, 2, 3) + b"\xbe\xde\x00\x04"
    with pytest.raises(ProtocolError, match="extension"):
        cipher.open_rtp(cipher.seal(with_ext, b"short", 0))  # 16-byte extension body, 5-byte plaintext
    padded = struct.pack(">BBHII", 0xA0, 0x78, 1, 2, 3)
    with pytest.raises(ProtocolError, match="padding"):
        cipher.open_rtp(cipher.seal(padded, b"ab\x05", 0))
    with pytest.raises(ProtocolError, match="padding"):
        cipher.open_rtp(cipher.seal(padded, b"ab\x00", 0))
    with pytest.raises(ProtocolError, match="padding"):
        cipher.open_rtp(cipher.seal(padded, b"", 0))
    with pytest.raises(ProtocolError, match="too short"):
        cipher.open_rtp(rtp.build_header(1, 2, 3) + bytes(19))
    with pytest.raises(ProtocolError, match="RTCP"):
        cipher.open_rtcp(rtp.build_header(1, 2, 3) + bytes(40))
    with pytest.raises(ProtocolError, match="shorter"):
        cipher.open_rtcp(b"\x80\xc9" + bytes(25))


def test_choose_mode_prefers_aes_gcm() -> None:
    both = ["xsalsa20_poly1305_lite_rtpsize", crypto.MODE_XCHACHA20_POLY1305, crypto.MODE_AES256_GCM]
    assert crypto.choose_mode(both) == crypto.MODE_AES256_GCM
    assert crypto.choose_mode([crypto.MODE_XCHACHA20_POLY1305, "aead_aes256_gcm"]) == (
        crypto.MODE_XCHACHA20_POLY1305
    )
    with pytest.raises(ProtocolError, match="no supported transport mode"):
        crypto.choose_mode(["xsalsa20_poly1305", "aead_aes256_gcm"])


def test_make_cipher_rejects_bad_arguments() -> None:
    with pytest.raises(InvalidArgumentError):
        crypto.make_cipher(crypto.MODE_AES256_GCM, bytes(31))
    with pytest.raises(InvalidArgumentError):
        crypto.make_cipher("xsalsa20_poly1305", bytes(32))
    with pytest.raises(InvalidArgumentError):
        crypto.make_cipher(crypto.MODE_AES256_GCM, bytes(32)).seal(b"h", b"p", 2**32)


def test_seal_accepts_bytes_like_inputs() -> None:
    for mode in crypto.SUPPORTED_MODES:
        cipher = crypto.make_cipher(mode, bytes(32))
        header = rtp.build_header(1, 2, 3)
        expected = cipher.seal(header, b"abc", 1)
        assert cipher.seal(bytearray(header), memoryview(b"abc"), 1) == expected
        assert cipher.open_rtp(bytearray(expected))[1] == b"abc"


needs_fast_path = pytest.mark.skipif(
    not crypto.XCHACHA_FAST_PATH, reason="PyNaCl's private cffi module is not usable here"
)


@needs_fast_path
@given(KEYS, st.binary(min_size=4, max_size=4), st.binary(max_size=400), st.binary(max_size=40))
def test_sodium_fast_path_matches_public_binding(
    key: bytes, nonce: bytes, payload: bytes, aad: bytes
) -> None:
    fast = crypto._XChaChaCipher(key, fast=True)
    public = crypto._XChaChaCipher(key, fast=False)
    sealed = fast._encrypt(nonce, payload, aad)
    assert sealed == public._encrypt(nonce, payload, aad)
    assert fast._decrypt(nonce, sealed, aad) == public._decrypt(nonce, sealed, aad) == payload
    tampered = sealed[:-1] + bytes((sealed[-1] ^ 0x40,))
    for cipher in (fast, public):
        with pytest.raises(DecryptionError):
            cipher._decrypt(nonce, tampered, aad)


@needs_fast_path
def test_fast_path_is_the_default_when_available() -> None:
    cipher = crypto.make_cipher(crypto.MODE_XCHACHA20_POLY1305, bytes(32))
    assert isinstance(cipher, crypto._XChaChaCipher)
    assert cipher._encrypt_fn is not crypto._public_encrypt


# --------------------------------------------------------------------------------------------------
# Sender
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", crypto.SUPPORTED_MODES)
def test_sender_advances_and_wraps_every_counter(mode: str) -> None:
    cipher = crypto.make_cipher(mode, os.urandom(32))
    sender = RtpSender(0xCAFE, cipher, sequence=65535, timestamp=2**32 - 960, nonce=2**32 - 1)
    first = sender.build(b"one")
    assert (sender.sequence, sender.timestamp, sender.nonce) == (0, 0, 0)
    second = sender.build(rtp.OPUS_SILENCE)
    assert (sender.sequence, sender.timestamp, sender.nonce) == (1, 960, 1)
    header, payload = cipher.open_rtp(first)
    assert (header.sequence, header.timestamp, header.ssrc, payload) == (65535, 2**32 - 960, 0xCAFE, b"one")
    assert first[-4:] == b"\xff\xff\xff\xff"
    assert first == cipher.seal(first[:12], b"one", 2**32 - 1), "the inline AES-GCM seal is the general one"
    header, payload = cipher.open_rtp(second)
    assert (header.sequence, header.timestamp, payload) == (0, 0, rtp.OPUS_SILENCE)
    assert second[-4:] == b"\x00\x00\x00\x00"


def test_sender_skip_moves_only_the_timestamp() -> None:
    sender = RtpSender(1, crypto.make_cipher(crypto.MODE_AES256_GCM, bytes(32)), timestamp=2**32 - 960)
    sender.skip(3)
    assert (sender.sequence, sender.timestamp, sender.nonce) == (0, 1920, 0)
    with pytest.raises(InvalidArgumentError):
        sender.skip(-1)


def test_sender_counters_survive_a_resume() -> None:
    cipher = crypto.make_cipher(crypto.MODE_XCHACHA20_POLY1305, bytes(range(32)))
    original = RtpSender(42, cipher, sequence=100, timestamp=5000, nonce=7)
    for _ in range(5):
        original.build(b"x")
    resumed = RtpSender(
        original.ssrc, cipher, sequence=original.sequence, timestamp=original.timestamp, nonce=original.nonce
    )
    assert resumed.build(b"next") == original.build(b"next")


def test_sender_rejects_bad_counters() -> None:
    cipher = crypto.make_cipher(crypto.MODE_AES256_GCM, bytes(32))
    for kwargs in ({"sequence": 65536}, {"timestamp": -1}, {"nonce": 2**32}, {"sequence": True}):
        with pytest.raises(InvalidArgumentError):
            RtpSender(1, cipher, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError):
        RtpSender(2**32, cipher)


def test_ip_address_strategy_sanity() -> None:
    # The discovery response must carry any normalised IPv6 text form within its 64-byte field.
    longest = str(ipaddress.ip_address("ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255"))
    assert discovery.parse_response(discovery.build_response(1, longest, 2)).address == longest
