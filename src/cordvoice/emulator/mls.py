"""The slice of MLS (RFC 9420) that the emulator's DAVE delivery service needs, in pure Python.

The delivery service never joins the group: it signs external proposals, checks key packages and reads the
structure of commits and Welcomes (protocol.md §6.9). So this module is a TLS-presentation codec for those few
structures plus ECDSA P-256 signing with `cryptography`, and no ratchet tree. Every parser raises only
:class:`~cordvoice.errors.ProtocolError` on bad input, whatever the bytes.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from cordvoice.errors import InvalidArgumentError, ProtocolError

__all__ = [
    "CIPHER_SUITE",
    "ExternalProposal",
    "ExternalSenderKey",
    "KeyPackage",
    "LeafNodeInfo",
    "ParsedCommit",
    "ParsedWelcome",
    "Reader",
    "WelcomeSecret",
    "build_add_proposal",
    "build_remove_proposal",
    "encode_append_proposals",
    "encode_revoke_proposals",
    "encode_varint",
    "group_id_for_channel",
    "key_package_ref",
    "parse_commit_welcome",
    "parse_key_package",
    "parse_proposal_refs",
    "parse_welcome",
    "proposal_ref",
    "ref_hash",
    "split_proposal_messages",
    "vector",
    "welcome_for_member",
]

MLS_VERSION = 1
CIPHER_SUITE = 2  # MLS_128_DHKEMP256_AES128GCM_SHA256_P256

WIRE_FORMAT_PUBLIC_MESSAGE = 1
WIRE_FORMAT_WELCOME = 3
WIRE_FORMAT_KEY_PACKAGE = 5

SENDER_MEMBER = 1
SENDER_EXTERNAL = 2

CONTENT_PROPOSAL = 2
CONTENT_COMMIT = 3

PROPOSAL_ADD = 1
PROPOSAL_REMOVE = 3

PROPOSAL_OR_REF_INLINE = 1
PROPOSAL_OR_REF_REFERENCE = 2

CREDENTIAL_BASIC = 1

LEAF_SOURCE_KEY_PACKAGE = 1
LEAF_SOURCE_UPDATE = 2
LEAF_SOURCE_COMMIT = 3

U64_MAX = 2**64 - 1
VARINT_MAX = 2**30 - 1
P256_POINT_SIZE = 65
HASH_SIZE = 32

_LABEL_PREFIX = b"MLS 1.0 "
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")


# --------------------------------------------------------------------------------------------------
# TLS presentation language: writer


def encode_varint(value: int) -> bytes:
    """Encode a vector length as RFC 9420 §2.1.2 says: the shortest of 1, 2 or 4 bytes (QUIC-style)."""
    if value < 0 or value > VARINT_MAX:
        raise InvalidArgumentError(f"MLS vector length {value} is out of range 0..{VARINT_MAX}")
    if value < 0x40:
        return bytes((value,))
    if value < 0x4000:
        return _U16.pack(0x4000 | value)
    return _U32.pack(0x8000_0000 | value)


def vector(data: bytes) -> bytes:
    """``<V>``: a varint length prefix followed by the bytes."""
    return encode_varint(len(data)) + data


def u8(value: int) -> bytes:
    return bytes((value,))


def u16(value: int) -> bytes:
    return _U16.pack(value)


def u32(value: int) -> bytes:
    return _U32.pack(value)


def u64(value: int) -> bytes:
    return _U64.pack(value)


# --------------------------------------------------------------------------------------------------
# TLS presentation language: reader


class Reader:
    """A cursor over untrusted bytes; every read checks bounds and raises ProtocolError on short input."""

    __slots__ = ("_data", "pos")

    def __init__(self, data: bytes, pos: int = 0) -> None:
        self._data = data
        self.pos = pos

    @property
    def remaining(self) -> int:
        return len(self._data) - self.pos

    def _take(self, size: int, what: str) -> bytes:
        end = self.pos + size
        if end > len(self._data):
            raise ProtocolError(
                f"MLS {what} needs {size} bytes at offset {self.pos}, only {self.remaining} left"
            )
        chunk = self._data[self.pos : end]
        self.pos = end
        return chunk

    def u8(self, what: str = "u8") -> int:
        if self.pos >= len(self._data):
            raise ProtocolError(f"MLS {what} missing at offset {self.pos}")
        value = self._data[self.pos]
        self.pos += 1
        return value

    def u16(self, what: str = "u16") -> int:
        return int(_U16.unpack(self._take(2, what))[0])

    def u32(self, what: str = "u32") -> int:
        return int(_U32.unpack(self._take(4, what))[0])

    def u64(self, what: str = "u64") -> int:
        return int(_U64.unpack(self._take(8, what))[0])

    def varint(self, what: str = "vector length") -> int:
        start = self.pos
        first = self.u8(what)
        prefix = first >> 6
        if prefix == 0:
            return first
        if prefix == 1:
            value = ((first & 0x3F) << 8) | self.u8(what)
            minimum = 0x40
        elif prefix == 2:
            rest = self._take(3, what)
            value = ((first & 0x3F) << 24) | int.from_bytes(rest, "big")
            minimum = 0x4000
        else:
            raise ProtocolError(f"MLS {what} at offset {start} uses the invalid 0b11 varint prefix")
        if value < minimum:
            raise ProtocolError(f"MLS {what} at offset {start} is not minimally encoded")
        return value

    def vector(self, what: str = "vector") -> bytes:
        size = self.varint(f"{what} length")
        return self._take(size, what)

    def fixed_vector(self, size: int, what: str) -> bytes:
        """A ``<V>`` whose content must have exactly ``size`` bytes (keys, hashes, refs)."""
        data = self.vector(what)
        if len(data) != size:
            raise ProtocolError(f"MLS {what} has {len(data)} bytes, expected {size}")
        return data

    def optional_present(self, what: str) -> bool:
        flag = self.u8(what)
        if flag > 1:
            raise ProtocolError(f"MLS optional {what} has presence byte {flag}, expected 0 or 1")
        return flag == 1

    def since(self, start: int) -> bytes:
        """The bytes read from ``start`` up to the cursor (to keep an item's exact encoding)."""
        return self._data[start : self.pos]

    def end(self, what: str) -> None:
        if self.pos != len(self._data):
            raise ProtocolError(f"{self.remaining} trailing bytes after MLS {what}")


def _u16_list(data: bytes, what: str) -> tuple[int, ...]:
    if len(data) % 2:
        raise ProtocolError(f"MLS {what} list has an odd length {len(data)}")
    return tuple(_U16.unpack_from(data, i)[0] for i in range(0, len(data), 2))


def _read_extensions(reader: Reader, what: str) -> tuple[int, ...]:
    """Read ``Extension extensions<V>`` and return the extension types (their data is not needed)."""
    inner = Reader(reader.vector(what))
    types: list[int] = []
    while inner.remaining:
        types.append(inner.u16(f"{what} type"))
        inner.vector(f"{what} data")
    if len(set(types)) != len(types):
        raise ProtocolError(f"MLS {what} repeat an extension type")
    return tuple(types)


# --------------------------------------------------------------------------------------------------
# Hashes and signatures


def ref_hash(label: bytes, value: bytes) -> bytes:
    """RFC 9420 RefHash: SHA-256 over ``<V>"MLS 1.0 "+label || <V>value``."""
    return hashlib.sha256(vector(_LABEL_PREFIX + label) + vector(value)).digest()


def _sign_content(label: bytes, content: bytes) -> bytes:
    return vector(_LABEL_PREFIX + label) + vector(content)


def key_package_ref(key_package: bytes) -> bytes:
    """KeyPackageRef of a bare KeyPackage (the bytes exactly as the client sent them)."""
    return ref_hash(b"KeyPackage Reference", key_package)


def proposal_ref(authenticated_content: bytes) -> bytes:
    """ProposalRef over AuthenticatedContent = wire_format | FramedContent | auth data."""
    return ref_hash(b"Proposal Reference", authenticated_content)


def group_id_for_channel(channel_id: int) -> bytes:
    """DAVE's MLS group id: the voice channel id as 8 bytes, big-endian."""
    return u64(channel_id)


def _load_public_key(point: bytes, what: str) -> ec.EllipticCurvePublicKey:
    if len(point) != P256_POINT_SIZE or point[0] != 0x04:
        raise ProtocolError(f"MLS {what} is not a 65-byte uncompressed P-256 point")
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
    except ValueError as exc:
        raise ProtocolError(f"MLS {what} is not a point on P-256") from exc


def _verify_with_label(
    key: ec.EllipticCurvePublicKey, label: bytes, content: bytes, signature: bytes, what: str
) -> None:
    try:
        key.verify(signature, _sign_content(label, content), ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError) as exc:
        raise ProtocolError(f"MLS {what} signature does not verify") from exc


class ExternalSenderKey:
    """The voice gateway's ECDSA P-256 identity as DAVE's single MLS external sender (op 25)."""

    def __init__(
        self,
        private_key: ec.EllipticCurvePrivateKey | None = None,
        identity: bytes = b"cordvoice-emulator",
    ) -> None:
        if private_key is None:
            private_key = ec.generate_private_key(ec.SECP256R1())
        if not isinstance(private_key.curve, ec.SECP256R1):
            raise InvalidArgumentError("the DAVE external sender key must be on P-256")
        self._private_key = private_key
        self.identity = identity
        self.public_key = private_key.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)

    def external_sender(self) -> bytes:
        """The op 25 body: ``<V>signature_key | credential_type u16 (basic) | <V>identity``."""
        return vector(self.public_key) + u16(CREDENTIAL_BASIC) + vector(self.identity)

    def sign_with_label(self, label: bytes, content: bytes) -> bytes:
        """RFC 9420 SignWithLabel: DER ECDSA-SHA256 over ``<V>"MLS 1.0 "+label || <V>content``."""
        return self._private_key.sign(_sign_content(label, content), ec.ECDSA(hashes.SHA256()))

    def __repr__(self) -> str:  # never show the private scalar
        return f"ExternalSenderKey(public_key={self.public_key[:5].hex()}…, identity={self.identity!r})"


# --------------------------------------------------------------------------------------------------
# Leaf nodes and key packages


@dataclass(frozen=True, slots=True)
class LeafNodeInfo:
    """What the delivery service reads from a LeafNode: keys, identity and where it came from."""

    encryption_key: bytes
    signature_key: bytes
    identity: bytes
    source: int
    tbs: bytes
    """The signed part of the node, before any group context RFC 9420 adds for update/commit sources."""
    signature: bytes

    @property
    def user_id(self) -> int:
        return int.from_bytes(self.identity, "big")


def _read_leaf_node(reader: Reader, data: bytes, what: str) -> LeafNodeInfo:
    start = reader.pos
    encryption_key = reader.fixed_vector(P256_POINT_SIZE, f"{what} encryption_key")
    signature_key = reader.fixed_vector(P256_POINT_SIZE, f"{what} signature_key")
    credential_type = reader.u16(f"{what} credential_type")
    if credential_type != CREDENTIAL_BASIC:
        raise ProtocolError(f"MLS {what} credential type {credential_type} is not basic (1)")
    identity = reader.vector(f"{what} identity")
    if len(identity) != 8:
        raise ProtocolError(f"MLS {what} identity has {len(identity)} bytes, expected an 8-byte user id")
    versions = _u16_list(reader.vector(f"{what} capabilities.versions"), "versions")
    suites = _u16_list(reader.vector(f"{what} capabilities.cipher_suites"), "cipher suites")
    _u16_list(reader.vector(f"{what} capabilities.extensions"), "extensions")
    _u16_list(reader.vector(f"{what} capabilities.proposals"), "proposals")
    credentials = _u16_list(reader.vector(f"{what} capabilities.credentials"), "credentials")
    if MLS_VERSION not in versions or CIPHER_SUITE not in suites or CREDENTIAL_BASIC not in credentials:
        raise ProtocolError(f"MLS {what} capabilities lack MLS 1.0, cipher suite 2 or the basic credential")
    source = reader.u8(f"{what} leaf_node_source")
    if source == LEAF_SOURCE_KEY_PACKAGE:
        not_before = reader.u64(f"{what} lifetime.not_before")
        not_after = reader.u64(f"{what} lifetime.not_after")
        if not_before != 0 or not_after != U64_MAX:
            raise ProtocolError(f"MLS {what} lifetime is {not_before}..{not_after}, DAVE requires 0..2^64-1")
    elif source == LEAF_SOURCE_COMMIT:
        reader.vector(f"{what} parent_hash")
    elif source != LEAF_SOURCE_UPDATE:
        raise ProtocolError(f"MLS {what} has unknown leaf_node_source {source}")
    _read_extensions(reader, f"{what} extensions")
    tbs = data[start : reader.pos]
    signature = reader.vector(f"{what} signature")
    if not signature:
        raise ProtocolError(f"MLS {what} has an empty signature")
    return LeafNodeInfo(encryption_key, signature_key, identity, source, tbs, signature)


@dataclass(frozen=True, slots=True)
class KeyPackage:
    """A validated key package; ``data`` is the bare KeyPackage that Add proposals carry unchanged."""

    data: bytes
    ref: bytes
    user_id: int
    signature_key: bytes
    init_key: bytes
    encryption_key: bytes


def parse_key_package(data: bytes, *, verify_signatures: bool = True) -> KeyPackage:
    """Parse and validate an op 26 body, bare (what davey/libdave send) or wrapped in an MLSMessage.

    Checks protocol.md §6.9.3: MLS 1.0, suite 2, basic credential with an 8-byte identity, lifetime exactly
    0..2^64-1, and (unless ``verify_signatures`` is false) the LeafNodeTBS and KeyPackageTBS signatures.
    """
    data = bytes(data)
    reader = Reader(data)
    version = reader.u16("version")
    if version != MLS_VERSION:
        raise ProtocolError(f"MLS key package version {version} is not MLS 1.0 (1)")
    second = reader.u16("cipher_suite or wire_format")
    if second == WIRE_FORMAT_KEY_PACKAGE:
        data = data[4:]
        reader = Reader(data)
        version = reader.u16("version")
        if version != MLS_VERSION:
            raise ProtocolError(f"MLS key package version {version} is not MLS 1.0 (1)")
        second = reader.u16("cipher_suite")
    if second != CIPHER_SUITE:
        raise ProtocolError(f"MLS key package cipher suite {second} is not 2 (P-256)")
    init_key = reader.fixed_vector(P256_POINT_SIZE, "key package init_key")
    leaf = _read_leaf_node(reader, data, "key package leaf node")
    if leaf.source != LEAF_SOURCE_KEY_PACKAGE:
        raise ProtocolError(f"MLS key package leaf node has source {leaf.source}, expected key_package")
    if init_key == leaf.encryption_key:
        raise ProtocolError("MLS key package reuses its init key as the leaf encryption key")
    _read_extensions(reader, "key package extensions")
    tbs_end = reader.pos
    signature = reader.vector("key package signature")
    reader.end("key package")
    if not signature:
        raise ProtocolError("MLS key package has an empty signature")
    if verify_signatures:
        key = _load_public_key(leaf.signature_key, "key package signature key")
        _verify_with_label(key, b"LeafNodeTBS", leaf.tbs, leaf.signature, "leaf node")
        _verify_with_label(key, b"KeyPackageTBS", data[:tbs_end], signature, "key package")
    return KeyPackage(
        data=data,
        ref=key_package_ref(data),
        user_id=leaf.user_id,
        signature_key=leaf.signature_key,
        init_key=init_key,
        encryption_key=leaf.encryption_key,
    )


# --------------------------------------------------------------------------------------------------
# External proposals (op 27)


@dataclass(frozen=True, slots=True)
class ExternalProposal:
    """One signed external proposal: the MLSMessage for op 27 and its ProposalRef."""

    message: bytes
    ref: bytes


def _external_proposal(
    signer: ExternalSenderKey, group_id: bytes, epoch: int, proposal: bytes
) -> ExternalProposal:
    framed_content = (
        vector(group_id)
        + u64(epoch)
        + u8(SENDER_EXTERNAL)
        + u32(0)  # sender_index: the first (and only) entry of the external_senders extension
        + vector(b"")  # authenticated_data
        + u8(CONTENT_PROPOSAL)
        + proposal
    )
    wire_format = u16(WIRE_FORMAT_PUBLIC_MESSAGE)
    # External senders sign FramedContentTBS without a GroupContext (RFC 9420 §6.1).
    tbs = u16(MLS_VERSION) + wire_format + framed_content
    auth = vector(signer.sign_with_label(b"FramedContentTBS", tbs))
    return ExternalProposal(
        message=tbs + auth,  # MLSMessage: version | wire_format | PublicMessage (no tags for externals)
        ref=proposal_ref(wire_format + framed_content + auth),
    )


def build_add_proposal(
    signer: ExternalSenderKey, group_id: bytes, epoch: int, key_package: bytes
) -> ExternalProposal:
    """External Add carrying the bare key package exactly as the client sent it."""
    return _external_proposal(signer, group_id, epoch, u16(PROPOSAL_ADD) + key_package)


def build_remove_proposal(
    signer: ExternalSenderKey, group_id: bytes, epoch: int, leaf_index: int
) -> ExternalProposal:
    """External Remove of one leaf."""
    return _external_proposal(signer, group_id, epoch, u16(PROPOSAL_REMOVE) + u32(leaf_index))


def encode_append_proposals(messages: Iterable[bytes]) -> bytes:
    """Op 27 append vector (after the operation-type byte): ``<V>`` over concatenated MLSMessages."""
    return vector(b"".join(messages))


def encode_revoke_proposals(refs: Iterable[bytes]) -> bytes:
    """Op 27 revoke vector (after the operation-type byte): ``<V>`` over concatenated ``<V>ProposalRef``."""
    return vector(b"".join(vector(ref) for ref in refs))


# --------------------------------------------------------------------------------------------------
# Welcome and commit (op 28)


@dataclass(frozen=True, slots=True)
class WelcomeSecret:
    """One EncryptedGroupSecrets entry: who it is for, and its exact encoding (for per-member Welcomes)."""

    new_member: bytes
    encoded: bytes


@dataclass(frozen=True, slots=True)
class ParsedWelcome:
    data: bytes
    secrets: tuple[WelcomeSecret, ...]
    encrypted_group_info: bytes

    @property
    def new_members(self) -> frozenset[bytes]:
        return frozenset(secret.new_member for secret in self.secrets)


def parse_welcome(data: bytes) -> ParsedWelcome:
    """Parse a bare RFC 9420 Welcome (op 28 tail, op 30 body)."""
    data = bytes(data)
    reader = Reader(data)
    suite = reader.u16("welcome cipher_suite")
    if suite != CIPHER_SUITE:
        raise ProtocolError(f"MLS welcome cipher suite {suite} is not 2 (P-256)")
    secrets_reader = Reader(reader.vector("welcome secrets"))
    secrets: list[WelcomeSecret] = []
    while secrets_reader.remaining:
        start = secrets_reader.pos
        new_member = secrets_reader.fixed_vector(HASH_SIZE, "welcome new_member")
        secrets_reader.vector("welcome kem_output")
        secrets_reader.vector("welcome ciphertext")
        secrets.append(WelcomeSecret(new_member, secrets_reader.since(start)))
    if not secrets:
        raise ProtocolError("MLS welcome has no secrets")
    encrypted_group_info = reader.vector("welcome encrypted_group_info")
    reader.end("welcome")
    if not encrypted_group_info:
        raise ProtocolError("MLS welcome has an empty encrypted_group_info")
    parsed = ParsedWelcome(data, tuple(secrets), encrypted_group_info)
    if len(parsed.new_members) != len(secrets):
        raise ProtocolError("MLS welcome lists the same new member twice")
    return parsed


def welcome_for_member(welcome: ParsedWelcome, key_package_ref: bytes) -> bytes:
    """The Welcome cut down to one joiner's secrets, as Discord sends op 30 (davey accepts either form)."""
    chosen = [secret.encoded for secret in welcome.secrets if secret.new_member == key_package_ref]
    if not chosen:
        raise InvalidArgumentError("the welcome has no secrets for that key package")
    return u16(CIPHER_SUITE) + vector(b"".join(chosen)) + vector(welcome.encrypted_group_info)


@dataclass(frozen=True, slots=True)
class ParsedCommit:
    """The structure of an op 28 body that the delivery service checks (protocol.md §6.9.5)."""

    commit: bytes
    """The MLSMessage(commit), byte for byte, for op 29."""
    welcome: ParsedWelcome | None
    group_id: bytes
    epoch: int
    sender_leaf: int
    proposal_refs: tuple[bytes, ...]
    path_leaf: LeafNodeInfo | None

    @property
    def has_path(self) -> bool:
        return self.path_leaf is not None

    def verify_path_leaf(self) -> None:
        """Check the UpdatePath leaf signature (LeafNodeTBS with group id and leaf index for source commit).

        This proves the leaf was made by whoever holds ``path_leaf.signature_key``; the delivery service
        compares that key with the one the member joined with. The commit's own signature cannot be checked
        without the GroupContext, i.e. without the ratchet tree.
        """
        leaf = self.path_leaf
        if leaf is None:
            return
        key = _load_public_key(leaf.signature_key, "commit leaf signature key")
        tbs = leaf.tbs + vector(self.group_id) + u32(self.sender_leaf)
        _verify_with_label(key, b"LeafNodeTBS", tbs, leaf.signature, "commit leaf node")


def _read_update_path_nodes(reader: Reader) -> None:
    nodes = Reader(reader.vector("update path nodes"))
    while nodes.remaining:
        nodes.fixed_vector(P256_POINT_SIZE, "update path node encryption_key")
        ciphertexts = Reader(nodes.vector("update path node secrets"))
        while ciphertexts.remaining:
            ciphertexts.vector("update path kem_output")
            ciphertexts.vector("update path ciphertext")


def parse_commit_welcome(data: bytes) -> ParsedCommit:
    """Split and read an op 28 body: ``MLSMessage(PublicMessage commit) [ | Welcome ]``.

    Rejects anything but a member-sent commit that references proposals only (no inline proposals), and
    parses any trailing bytes as a bare Welcome.
    """
    data = bytes(data)
    reader = Reader(data)
    version = reader.u16("commit version")
    if version != MLS_VERSION:
        raise ProtocolError(f"MLS commit version {version} is not MLS 1.0 (1)")
    wire_format = reader.u16("commit wire_format")
    if wire_format != WIRE_FORMAT_PUBLIC_MESSAGE:
        raise ProtocolError(f"MLS commit wire format {wire_format} is not PublicMessage (1)")
    group_id = reader.vector("commit group_id")
    epoch = reader.u64("commit epoch")
    sender_type = reader.u8("commit sender_type")
    if sender_type != SENDER_MEMBER:
        raise ProtocolError(f"MLS commit sender type {sender_type} is not member (1)")
    sender_leaf = reader.u32("commit sender leaf_index")
    reader.vector("commit authenticated_data")
    content_type = reader.u8("commit content_type")
    if content_type != CONTENT_COMMIT:
        raise ProtocolError(f"MLS message content type {content_type} is not commit (3)")
    proposals = Reader(reader.vector("commit proposals"))
    refs: list[bytes] = []
    while proposals.remaining:
        kind = proposals.u8("ProposalOrRef type")
        if kind == PROPOSAL_OR_REF_INLINE:
            raise ProtocolError("MLS commit carries an inline proposal; DAVE allows references only")
        if kind != PROPOSAL_OR_REF_REFERENCE:
            raise ProtocolError(f"MLS commit has unknown ProposalOrRef type {kind}")
        refs.append(proposals.fixed_vector(HASH_SIZE, "commit proposal ref"))
    path_leaf: LeafNodeInfo | None = None
    if reader.optional_present("commit path"):
        path_leaf = _read_leaf_node(reader, data, "commit path leaf node")
        if path_leaf.source != LEAF_SOURCE_COMMIT:
            raise ProtocolError(f"MLS commit path leaf has source {path_leaf.source}, expected commit")
        _read_update_path_nodes(reader)
    if not reader.vector("commit signature"):
        raise ProtocolError("MLS commit has an empty signature")
    reader.fixed_vector(HASH_SIZE, "commit confirmation_tag")
    reader.fixed_vector(HASH_SIZE, "commit membership_tag")
    commit = data[: reader.pos]
    welcome = parse_welcome(data[reader.pos :]) if reader.remaining else None
    return ParsedCommit(
        commit=commit,
        welcome=welcome,
        group_id=group_id,
        epoch=epoch,
        sender_leaf=sender_leaf,
        proposal_refs=tuple(refs),
        path_leaf=path_leaf,
    )


def parse_proposal_refs(vector_bytes: bytes) -> tuple[bytes, ...]:
    """Read an op 27 revoke vector back into ProposalRefs (used by tests and simulated peers)."""
    reader = Reader(bytes(vector_bytes))
    inner = Reader(reader.vector("revoke proposals"))
    reader.end("revoke proposals")
    refs: list[bytes] = []
    while inner.remaining:
        refs.append(inner.fixed_vector(HASH_SIZE, "revoked proposal ref"))
    return tuple(refs)


def split_proposal_messages(vector_bytes: bytes) -> tuple[tuple[int, bytes, int], ...]:
    """Read an op 27 append vector into ``(proposal_type, body, epoch)`` per item (tests and diagnostics).

    Only external-sender PublicMessage proposals, as the delivery service builds them, are understood.
    """
    reader = Reader(bytes(vector_bytes))
    inner_bytes = reader.vector("append proposals")
    reader.end("append proposals")
    inner = Reader(inner_bytes)
    items: list[tuple[int, bytes, int]] = []
    while inner.remaining:
        if inner.u16("proposal version") != MLS_VERSION:
            raise ProtocolError("MLS proposal version is not MLS 1.0")
        if inner.u16("proposal wire_format") != WIRE_FORMAT_PUBLIC_MESSAGE:
            raise ProtocolError("MLS proposal is not a PublicMessage")
        inner.vector("proposal group_id")
        epoch = inner.u64("proposal epoch")
        if inner.u8("proposal sender_type") != SENDER_EXTERNAL:
            raise ProtocolError("MLS proposal sender is not external")
        inner.u32("proposal sender_index")
        inner.vector("proposal authenticated_data")
        if inner.u8("proposal content_type") != CONTENT_PROPOSAL:
            raise ProtocolError("MLS message is not a proposal")
        proposal_type = inner.u16("proposal type")
        if proposal_type == PROPOSAL_REMOVE:
            body = u32(inner.u32("remove leaf"))
        elif proposal_type == PROPOSAL_ADD:
            start = inner.pos
            inner.u16("key package version")
            inner.u16("key package cipher_suite")
            inner.vector("key package init_key")
            _read_leaf_node(inner, inner_bytes, "key package leaf node")
            _read_extensions(inner, "key package extensions")
            inner.vector("key package signature")
            body = inner_bytes[start : inner.pos]
        else:
            raise ProtocolError(f"MLS proposal type {proposal_type} is not Add or Remove")
        inner.vector("proposal signature")
        items.append((proposal_type, body, epoch))
    return tuple(items)
