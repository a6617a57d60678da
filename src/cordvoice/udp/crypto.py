"""Transport encryption for the two rtpsize AEAD modes Discord accepts (protocol.md §4.5, §5).

Packet layout, both modes: ``clear header (AAD) | ciphertext | 16-byte tag | nonce u32 BE``. The AEAD nonce
is those 4 bytes followed by zeros (12 bytes for AES-256-GCM, 24 for XChaCha20-Poly1305). For RTP the clear
header is the fixed 12 bytes, the CSRCs and the 4-byte extension preamble; the extension body and any
padding are inside the ciphertext. For RTCP the clear part is the first 8 bytes.

AES-256-GCM goes through ``cryptography`` (one reused ``AESGCM`` object per key). ``cryptography`` has no
XChaCha20-Poly1305, so that mode uses libsodium from PyNaCl. PyNaCl's public binding spends ~3 µs per call
on argument checks and allocation around a ~0.5 µs primitive, so when PyNaCl's private cffi module is
present and passes a self-test against the public binding at import, the same libsodium function is called
through it directly. Set ``CORDVOICE_NO_SODIUM_FAST_PATH=1`` to always use the public binding.
"""

from __future__ import annotations

import abc
import logging
import os
import struct
from collections.abc import Callable, Iterable
from typing import ClassVar

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from nacl.bindings import (
    crypto_aead_xchacha20poly1305_ietf_decrypt,
    crypto_aead_xchacha20poly1305_ietf_encrypt,
)
from nacl.exceptions import CryptoError

from cordvoice.errors import DecryptionError, InvalidArgumentError, ProtocolError
from cordvoice.udp.rtp import HEADER_SIZE, RTCP_CLEAR_SIZE, RTP_VERSION, RtpHeader, is_rtcp, parse_rtp

__all__ = [
    "KEY_SIZE",
    "MODE_AES256_GCM",
    "MODE_XCHACHA20_POLY1305",
    "NONCE_SIZE",
    "SUPPORTED_MODES",
    "TAG_SIZE",
    "XCHACHA_FAST_PATH",
    "TransportCipher",
    "choose_mode",
    "make_cipher",
]

logger = logging.getLogger(__name__)

MODE_AES256_GCM = "aead_aes256_gcm_rtpsize"
MODE_XCHACHA20_POLY1305 = "aead_xchacha20_poly1305_rtpsize"
#: Modes we implement, most preferred first (AES-GCM is faster; XChaCha is the one always offered).
SUPPORTED_MODES: tuple[str, ...] = (MODE_AES256_GCM, MODE_XCHACHA20_POLY1305)
KEY_SIZE = 32
TAG_SIZE = 16
#: Size of the nonce counter appended to every packet.
NONCE_SIZE = 4

_NONCE = struct.Struct(">I")
_AES_NONCE_PAD = bytes(12 - NONCE_SIZE)
_XCHACHA_NONCE_PAD = bytes(24 - NONCE_SIZE)
_MIN_RTCP_SIZE = RTCP_CLEAR_SIZE + TAG_SIZE + NONCE_SIZE
_MIN_PLAIN_RTP_SIZE = HEADER_SIZE + TAG_SIZE + NONCE_SIZE
_PLAIN_BYTE0 = RTP_VERSION << 6  # V=2, P=0, X=0, CC=0
_PLAIN_FIELDS = struct.Struct(">HII")  # sequence, timestamp, SSRC at offset 2
_RTCP_FIRST = 200
_RTCP_LAST = 204

_new_tuple = tuple.__new__
"""Builds an :class:`RtpHeader` from a full tuple of its fields without the NamedTuple's Python-level
``__new__`` (it runs for every received packet)."""

_AeadFn = Callable[[bytes, bytes, bytes, bytes], bytes]  # (input, aad, nonce, key) -> output


class TransportCipher(abc.ABC):
    """Seals outgoing and opens incoming packets for one mode and one session key.

    Build one per Session Description with :func:`make_cipher` and reuse it for every packet.
    """

    __slots__ = ()
    mode: ClassVar[str]

    @abc.abstractmethod
    def _encrypt(self, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
        """Ciphertext with its tag; ``nonce`` is the 4-byte counter."""

    @abc.abstractmethod
    def _decrypt(self, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes:
        """Plaintext; raises DecryptionError if authentication fails."""

    def seal(self, header: bytes, payload: bytes, nonce: int) -> bytes:
        """Return ``header | AEAD(payload) | nonce`` with ``header`` as the associated data.

        ``header`` is whatever stays in clear: our 12-byte RTP header, or the 8 clear bytes of an RTCP
        packet (the emulator sends those). ``nonce`` is the u32 counter, never reused with one key.
        """
        try:
            suffix = _NONCE.pack(nonce)
        except struct.error:
            raise InvalidArgumentError(f"nonce {nonce} is outside 0..2**32-1") from None
        if type(payload) is not bytes:
            payload = bytes(payload)
        if type(header) is not bytes:
            header = bytes(header)
        return header + self._encrypt(suffix, payload, header) + suffix

    def seal_rtp(self, header: bytes, payload: bytes, nonce: int) -> bytes:
        """:meth:`seal` for callers that guarantee ``bytes`` arguments and a u32 ``nonce`` (RtpSender)."""
        suffix = _NONCE.pack(nonce)
        return header + self._encrypt(suffix, payload, header) + suffix

    def open_rtp(self, packet: bytes) -> tuple[RtpHeader, bytes]:
        """Decrypt an RTP packet; return its header and the payload without extension body or padding.

        Raises DecryptionError when authentication fails and ProtocolError when the packet is malformed.
        """
        if type(packet) is not bytes:
            packet = bytes(packet)
        if len(packet) >= _MIN_PLAIN_RTP_SIZE and packet[0] == _PLAIN_BYTE0:
            # The plain 12-byte header (no padding, extension or CSRCs: what every client sends): the same
            # result as below without parse_rtp's general checks, the extension or the padding handling.
            byte1 = packet[1]
            if not _RTCP_FIRST <= byte1 <= _RTCP_LAST:
                sequence, timestamp, ssrc = _PLAIN_FIELDS.unpack_from(packet, 2)
                aad = packet[:HEADER_SIZE]
                payload = self._decrypt(packet[-NONCE_SIZE:], packet[HEADER_SIZE:-NONCE_SIZE], aad)
                # RtpHeader's fields in order: version, padding, extension, csrc_count, marker, payload_type,
                # sequence, timestamp, ssrc, csrcs, header_length, extension_profile, extension_length.
                marker, payload_type = byte1 > 0x7F, byte1 & 0x7F
                fields = (RTP_VERSION, False, False, 0, marker, payload_type, sequence, timestamp, ssrc)
                return _new_tuple(RtpHeader, (*fields, (), HEADER_SIZE, 0, 0)), payload
        header = parse_rtp(packet)
        clear = header.header_length
        if len(packet) < clear + TAG_SIZE + NONCE_SIZE:
            raise ProtocolError(
                f"RTP packet of {len(packet)} bytes is too short for its {clear}-byte header, "
                f"a {TAG_SIZE}-byte tag and a {NONCE_SIZE}-byte nonce"
            )
        payload = self._decrypt(packet[-NONCE_SIZE:], packet[clear:-NONCE_SIZE], packet[:clear])
        if header.extension_length:
            body = 4 * header.extension_length
            if body > len(payload):
                raise ProtocolError(
                    f"RTP header extension of {body} bytes is longer than the {len(payload)}-byte "
                    "decrypted payload"
                )
            payload = payload[body:]
        if header.padding:
            count = payload[-1] if payload else 0
            if not 0 < count <= len(payload):
                raise ProtocolError(f"RTP padding count {count} does not fit the {len(payload)}-byte payload")
            payload = payload[:-count]
        return header, payload

    def open_rtp_fields(self, packet: bytes) -> tuple[int, int, int, bytes]:
        """``(sequence, timestamp, ssrc, payload)``: :meth:`open_rtp` without building the header object.

        Packets with the plain 12-byte header (byte 0 ``0x80``: no padding, extension or CSRCs; what every
        library sends) take a short path that skips building an :class:`~cordvoice.udp.rtp.RtpHeader`, a
        quarter of the per-packet cost for a forwarding server; anything else goes through :meth:`open_rtp`.
        Raises like :meth:`open_rtp`.
        """
        if (
            type(packet) is bytes
            and len(packet) >= _MIN_PLAIN_RTP_SIZE
            and packet[0] == _PLAIN_BYTE0
            and not _RTCP_FIRST <= packet[1] <= _RTCP_LAST
        ):
            nonce, aad = packet[-NONCE_SIZE:], packet[:HEADER_SIZE]
            payload = self._decrypt(nonce, packet[HEADER_SIZE:-NONCE_SIZE], aad)
            sequence, timestamp, ssrc = _PLAIN_FIELDS.unpack_from(packet, 2)
            return sequence, timestamp, ssrc, payload
        header, payload = self.open_rtp(packet)
        return header.sequence, header.timestamp, header.ssrc, payload

    def open_rtcp(self, packet: bytes) -> bytes:
        """Decrypt an RTCP packet; return the plaintext after its 8 clear bytes.

        Padding is left in place: in a compound packet only the last packet's P bit announces it, and
        that header is inside the plaintext. Raises DecryptionError or ProtocolError like :meth:`open_rtp`.
        """
        if type(packet) is not bytes:
            packet = bytes(packet)
        if not is_rtcp(packet):
            raise ProtocolError("not an RTCP packet (second byte outside 200..204)")
        if packet[0] >> 6 != RTP_VERSION:
            raise ProtocolError(f"RTCP version {packet[0] >> 6}, expected {RTP_VERSION}")
        if len(packet) < _MIN_RTCP_SIZE:
            raise ProtocolError(f"RTCP packet of {len(packet)} bytes is shorter than {_MIN_RTCP_SIZE}")
        return self._decrypt(
            packet[-NONCE_SIZE:], packet[RTCP_CLEAR_SIZE:-NONCE_SIZE], packet[:RTCP_CLEAR_SIZE]
        )


class _AesGcmCipher(TransportCipher):
    __slots__ = ("_aead",)
    mode = MODE_AES256_GCM

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)

    def _encrypt(self, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
        return self._aead.encrypt(nonce + _AES_NONCE_PAD, plaintext, aad)

    def seal_rtp(self, header: bytes, payload: bytes, nonce: int) -> bytes:
        # The same bytes as the base class, one call shallower: this is the mode almost every packet uses.
        suffix = _NONCE.pack(nonce)
        return header + self._aead.encrypt(suffix + _AES_NONCE_PAD, payload, header) + suffix

    def _decrypt(self, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes:
        try:
            return self._aead.decrypt(nonce + _AES_NONCE_PAD, ciphertext, aad)
        except InvalidTag:
            raise DecryptionError(f"{self.mode}: packet failed authentication") from None


class _XChaChaCipher(TransportCipher):
    __slots__ = ("_decrypt_fn", "_encrypt_fn", "_key")
    mode = MODE_XCHACHA20_POLY1305

    def __init__(self, key: bytes, *, fast: bool | None = None) -> None:
        use_fast = _FAST_PATH is not None if fast is None else fast
        if use_fast and _FAST_PATH is None:
            raise InvalidArgumentError("the libsodium fast path is not available here")
        self._key = key
        self._encrypt_fn, self._decrypt_fn = (
            _FAST_PATH if use_fast and _FAST_PATH is not None else _PUBLIC_XCHACHA
        )

    def _encrypt(self, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
        return self._encrypt_fn(plaintext, aad, nonce + _XCHACHA_NONCE_PAD, self._key)

    def _decrypt(self, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes:
        try:
            return self._decrypt_fn(ciphertext, aad, nonce + _XCHACHA_NONCE_PAD, self._key)
        except CryptoError:
            raise DecryptionError(f"{self.mode}: packet failed authentication") from None


def _public_encrypt(message: bytes, aad: bytes, nonce: bytes, key: bytes) -> bytes:
    result: bytes = crypto_aead_xchacha20poly1305_ietf_encrypt(message, aad, nonce, key)
    return result


def _public_decrypt(ciphertext: bytes, aad: bytes, nonce: bytes, key: bytes) -> bytes:
    result: bytes = crypto_aead_xchacha20poly1305_ietf_decrypt(ciphertext, aad, nonce, key)
    return result


_PUBLIC_XCHACHA: tuple[_AeadFn, _AeadFn] = (_public_encrypt, _public_decrypt)


def _load_fast_path() -> tuple[_AeadFn, _AeadFn] | None:
    """The same libsodium calls without PyNaCl's per-call checks, or None if unavailable or unproven.

    Callers guarantee the checks PyNaCl would make: bytes arguments, a 32-byte key, a 24-byte nonce and a
    ciphertext of at least the tag's length.
    """
    if os.environ.get("CORDVOICE_NO_SODIUM_FAST_PATH"):
        return None
    try:
        from nacl import _sodium  # noqa: PLC0415  (private: imported only here, behind the self-test)

        ffi = _sodium.ffi
        lib = _sodium.lib
        encrypt_c = lib.crypto_aead_xchacha20poly1305_ietf_encrypt
        decrypt_c = lib.crypto_aead_xchacha20poly1305_ietf_decrypt
        null = ffi.NULL
    except (ImportError, AttributeError):
        return None

    def fast_encrypt(message: bytes, aad: bytes, nonce: bytes, key: bytes) -> bytes:
        size = len(message) + TAG_SIZE
        out = ffi.new("unsigned char[]", size)
        if encrypt_c(out, null, message, len(message), aad, len(aad), null, nonce, key) != 0:
            raise CryptoError("encryption failed")
        data: bytes = ffi.buffer(out, size)[:]
        return data

    def fast_decrypt(ciphertext: bytes, aad: bytes, nonce: bytes, key: bytes) -> bytes:
        size = len(ciphertext) - TAG_SIZE
        if size < 0:
            raise CryptoError("ciphertext shorter than the tag")
        out = ffi.new("unsigned char[]", size or 1)
        if decrypt_c(out, null, null, ciphertext, len(ciphertext), aad, len(aad), nonce, key) != 0:
            raise CryptoError("decryption failed")
        data: bytes = ffi.buffer(out, size)[:]
        return data

    try:
        if not _same_as_public(fast_encrypt, fast_decrypt):
            logger.warning("libsodium fast path disagrees with PyNaCl; using PyNaCl's public binding")
            return None
    except Exception:  # any surprise from a private API means: do not use it
        logger.warning("libsodium fast path failed its self-test; using PyNaCl's public binding")
        return None
    return fast_encrypt, fast_decrypt


def _same_as_public(encrypt: _AeadFn, decrypt: _AeadFn) -> bool:
    key = bytes(range(32))
    nonce = bytes(range(100, 124))
    for message, aad in ((b"", b""), (b"\x01" * 3, bytes(12)), (bytes(range(200)), b"\xff" * 20)):
        sealed = _public_encrypt(message, aad, nonce, key)
        if encrypt(message, aad, nonce, key) != sealed or decrypt(sealed, aad, nonce, key) != message:
            return False
        tampered = sealed[:-1] + bytes((sealed[-1] ^ 1,))
        try:
            decrypt(tampered, aad, nonce, key)
        except CryptoError:
            continue
        return False
    return True


_FAST_PATH = _load_fast_path()
#: Whether XChaCha20-Poly1305 uses the direct libsodium call (see the module docstring).
XCHACHA_FAST_PATH = _FAST_PATH is not None


def choose_mode(offered: Iterable[str]) -> str:
    """Pick the best mode among those Ready offers. Raises ProtocolError if none is usable."""
    available = set(offered)
    for mode in SUPPORTED_MODES:
        if mode in available:
            return mode
    raise ProtocolError(
        f"the voice server offers no supported transport mode: offered {sorted(available)}, "
        f"supported {list(SUPPORTED_MODES)}"
    )


def make_cipher(mode: str, key: bytes) -> TransportCipher:
    """The cipher for ``mode`` with the 32-byte ``secret_key`` from Session Description."""
    if len(key) != KEY_SIZE:
        raise InvalidArgumentError(f"transport key must be {KEY_SIZE} bytes, got {len(key)}")
    key = bytes(key)
    if mode == MODE_AES256_GCM:
        return _AesGcmCipher(key)
    if mode == MODE_XCHACHA20_POLY1305:
        return _XChaChaCipher(key)
    raise InvalidArgumentError(f"unsupported transport mode {mode!r}; supported: {list(SUPPORTED_MODES)}")
