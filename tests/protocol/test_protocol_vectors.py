"""Every case of shared/vectors/transport.json, computed independently of our code, must pass as given."""

from __future__ import annotations

from typing import Any

import pytest

from cordvoice.errors import DecryptionError
from cordvoice.udp import crypto, discovery, rtp
from cordvoice.udp.sender import RtpSender

KNOWN_GROUPS = {
    "about",
    "ip_discovery",
    "rtp_headers",
    "outgoing",
    "incoming_extension_padding_csrc",
    "incoming_rtcp",
    "tampered",
    "opus_silence_frame_hex",
}


def _ciphers(mode: str, key_hex: str) -> list[crypto.TransportCipher]:
    """The cipher for ``mode`` and, for XChaCha, both the fast and the public libsodium paths."""
    key = bytes.fromhex(key_hex)
    ciphers = [crypto.make_cipher(mode, key)]
    if mode == crypto.MODE_XCHACHA20_POLY1305:
        ciphers.append(crypto._XChaChaCipher(key, fast=False))
        if crypto.XCHACHA_FAST_PATH:
            ciphers.append(crypto._XChaChaCipher(key, fast=True))
    return ciphers


def test_every_vector_group_is_covered(transport_vectors: dict[str, Any]) -> None:
    # A group added to the file later must not be silently ignored by this module.
    assert set(transport_vectors) == KNOWN_GROUPS


def test_both_modes_have_outgoing_incoming_rtcp_and_tampered_cases(transport_vectors: dict[str, Any]) -> None:
    for group in ("outgoing", "incoming_extension_padding_csrc", "incoming_rtcp", "tampered"):
        assert {case["mode"] for case in transport_vectors[group]} == set(crypto.SUPPORTED_MODES), group


def test_ip_discovery(transport_vectors: dict[str, Any]) -> None:
    case = transport_vectors["ip_discovery"]
    request = bytes.fromhex(case["request_hex"])
    response = bytes.fromhex(case["response_hex"])
    assert discovery.build_request(case["ssrc"]) == request
    assert discovery.parse_request(request) == case["ssrc"]
    assert discovery.build_response(case["ssrc"], case["address"], case["port"]) == response
    assert discovery.parse_response(response) == discovery.DiscoveryResult(
        case["ssrc"], case["address"], case["port"]
    )


def test_rtp_headers(transport_vectors: dict[str, Any]) -> None:
    cases = transport_vectors["rtp_headers"]
    assert cases
    for case in cases:
        expected = bytes.fromhex(case["hex"])
        assert rtp.build_header(case["sequence"], case["timestamp"], case["ssrc"]) == expected, case
        header = rtp.parse_rtp(expected)
        assert (header.sequence, header.timestamp, header.ssrc) == (
            case["sequence"],
            case["timestamp"],
            case["ssrc"],
        )
        assert header.payload_type == rtp.OPUS_PAYLOAD_TYPE
        assert header.header_length == rtp.HEADER_SIZE


def test_outgoing_packets(transport_vectors: dict[str, Any]) -> None:
    for case in transport_vectors["outgoing"]:
        expected = bytes.fromhex(case["packet_hex"])
        opus = bytes.fromhex(case["opus_hex"])
        header = rtp.build_header(case["sequence"], case["timestamp"], case["ssrc"])
        for cipher in _ciphers(case["mode"], case["key_hex"]):
            assert cipher.seal(header, opus, case["nonce_counter"]) == expected, case["mode"]
            sender = RtpSender(
                case["ssrc"],
                cipher,
                sequence=case["sequence"],
                timestamp=case["timestamp"],
                nonce=case["nonce_counter"],
            )
            assert sender.build(opus) == expected, case["mode"]
            parsed, payload = cipher.open_rtp(expected)
            assert payload == opus
            assert (parsed.sequence, parsed.timestamp, parsed.ssrc) == (
                case["sequence"],
                case["timestamp"],
                case["ssrc"],
            )


def test_incoming_rtp_with_extension_padding_and_csrc(transport_vectors: dict[str, Any]) -> None:
    for case in transport_vectors["incoming_extension_padding_csrc"]:
        packet = bytes.fromhex(case["packet_hex"])
        for cipher in _ciphers(case["mode"], case["key_hex"]):
            header, payload = cipher.open_rtp(packet)
            assert payload == bytes.fromhex(case["expected_opus_hex"]), case["mode"]
            assert header.ssrc == case["ssrc"]
            assert header.sequence == case["sequence"]
            assert header.timestamp == case["timestamp"]
            assert list(header.csrcs) == case["csrcs"]
            assert header.extension and header.padding
            assert header.header_length == 12 + 4 * len(case["csrcs"]) + 4


def test_incoming_rtcp(transport_vectors: dict[str, Any]) -> None:
    for case in transport_vectors["incoming_rtcp"]:
        packet = bytes.fromhex(case["packet_hex"])
        assert rtp.is_rtcp(packet)
        assert packet[1] == case["payload_type"]
        for cipher in _ciphers(case["mode"], case["key_hex"]):
            assert cipher.open_rtcp(packet) == bytes.fromhex(case["expected_plaintext_hex"]), case["mode"]


def test_tampered_packets_are_rejected(transport_vectors: dict[str, Any]) -> None:
    for case in transport_vectors["tampered"]:
        packet = bytes.fromhex(case["packet_hex"])
        for cipher in _ciphers(case["mode"], case["key_hex"]):
            with pytest.raises(DecryptionError):
                cipher.open_rtp(packet)


def test_opus_silence_frame(transport_vectors: dict[str, Any]) -> None:
    assert bytes.fromhex(transport_vectors["opus_silence_frame_hex"]) == rtp.OPUS_SILENCE
