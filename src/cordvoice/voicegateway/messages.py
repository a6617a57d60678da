"""Every voice gateway (v8) message as a typed value, and the frames they travel in, both directions.

Sans-IO: this module turns WebSocket frames into messages and back; it never touches a socket. The client
decodes with :func:`decode_server` and encodes with :func:`encode_client`; the emulator does the mirror image.

Wire rules (protocol.md §2):

* JSON text frames are ``{"op": N, "d": ..., "seq": K}``; only server frames carry ``seq``.
* Binary frames carry the DAVE MLS ops 25-30: server frames are ``seq u16 | op u8 | body``, client frames are
  ``op u8 | body``.
* Snowflakes are ``int`` here and strings on the wire (both forms are accepted on decode).
* An opcode this side does not know (including one that only travels the other way) decodes to
  :class:`Unknown`, never to an error, so a newer server cannot break an older client. A known opcode with a
  malformed body raises :class:`~cordvoice.errors.ProtocolError` naming the op and the field; a frame that is
  not a message at all (not JSON, no integer op, empty, text for a binary op or the reverse) raises its
  subclass :class:`~cordvoice.errors.FrameDecodeError`, so a server can answer 4002 rather than 4020.

Decoding validates every field's type and range, because these values feed struct packing, socket
addresses and cipher keys further down; a bad value must stop here, with a message that says where.
Encoding trusts the (typed) caller, except where a bad value would produce an unreadable frame.
"""

from __future__ import annotations

import enum
import json
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeAlias

from cordvoice.errors import FrameDecodeError, InvalidArgumentError, ProtocolError

__all__ = [
    "ClientDisconnect",
    "ClientMessage",
    "ClientsConnect",
    "DaveExecuteTransition",
    "DaveMlsAnnounceCommitTransition",
    "DaveMlsCommitWelcome",
    "DaveMlsExternalSender",
    "DaveMlsInvalidCommitWelcome",
    "DaveMlsKeyPackage",
    "DaveMlsProposals",
    "DaveMlsWelcome",
    "DavePrepareEpoch",
    "DavePrepareTransition",
    "DaveTransitionReady",
    "Heartbeat",
    "HeartbeatAck",
    "Hello",
    "Identify",
    "Opcode",
    "ProposalsOperation",
    "Ready",
    "Resume",
    "Resumed",
    "SelectProtocol",
    "ServerFrame",
    "ServerMessage",
    "SessionDescription",
    "Speaking",
    "SpeakingFlag",
    "Unknown",
    "decode_client",
    "decode_server",
    "encode_client",
    "encode_server",
]

_U8 = 0xFF
_U16 = 0xFFFF
_U32 = 0xFFFF_FFFF
_U64 = 0xFFFF_FFFF_FFFF_FFFF
#: JSON ``seq`` is a wrapping counter that the binary form fixes at u16; Discord does not document the JSON
#: width, so decoding accepts up to u32 rather than fail a long session if it ever runs past 65535.
_MAX_JSON_SEQ = _U32
_SECRET_KEY_SIZE = 32


class Opcode(enum.IntEnum):
    """Voice gateway opcodes (protocol.md §2.2)."""

    IDENTIFY = 0
    SELECT_PROTOCOL = 1
    READY = 2
    HEARTBEAT = 3
    SESSION_DESCRIPTION = 4
    SPEAKING = 5
    HEARTBEAT_ACK = 6
    RESUME = 7
    HELLO = 8
    RESUMED = 9
    CLIENTS_CONNECT = 11
    CLIENT_CONNECT_LEGACY = 12
    CLIENT_DISCONNECT = 13
    SESSION_UPDATE = 14
    MEDIA_SINK_WANTS = 15
    VOICE_BACKEND_VERSION = 16
    CHANNEL_OPTIONS_UPDATE = 17
    CLIENT_FLAGS = 18
    SPEED_TEST = 19
    CLIENT_PLATFORM = 20
    DAVE_PREPARE_TRANSITION = 21
    DAVE_EXECUTE_TRANSITION = 22
    DAVE_TRANSITION_READY = 23
    DAVE_PREPARE_EPOCH = 24
    DAVE_MLS_EXTERNAL_SENDER = 25
    DAVE_MLS_KEY_PACKAGE = 26
    DAVE_MLS_PROPOSALS = 27
    DAVE_MLS_COMMIT_WELCOME = 28
    DAVE_MLS_ANNOUNCE_COMMIT_TRANSITION = 29
    DAVE_MLS_WELCOME = 30
    DAVE_MLS_INVALID_COMMIT_WELCOME = 31


class SpeakingFlag(enum.IntFlag):
    """Bits of op 5 ``speaking`` (protocol.md §2.4)."""

    NONE = 0
    MICROPHONE = 1
    SOUNDSHARE = 2
    PRIORITY = 4


class ProposalsOperation(enum.IntEnum):
    """The ``op_type`` byte of op 27: append new proposals or revoke earlier ones."""

    APPEND = 0
    REVOKE = 1


# --------------------------------------------------------------------------------------------------
# Messages
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Identify:
    """op 0, client: open a new voice session. ``max_dave_protocol_version`` 0 means no DAVE."""

    op: ClassVar[Opcode] = Opcode.IDENTIFY
    server_id: int
    user_id: int
    session_id: str
    token: str = field(repr=False)
    max_dave_protocol_version: int = 0


@dataclass(frozen=True, slots=True)
class SelectProtocol:
    """op 1, client: our external address from IP discovery and the chosen transport mode."""

    op: ClassVar[Opcode] = Opcode.SELECT_PROTOCOL
    address: str
    port: int
    mode: str
    protocol: str = "udp"


@dataclass(frozen=True, slots=True)
class Ready:
    """op 2, server: our SSRC, the media server's UDP address and the transport modes it offers."""

    op: ClassVar[Opcode] = Opcode.READY
    ssrc: int
    ip: str
    port: int
    modes: tuple[str, ...]
    experiments: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """op 3, client: ``nonce`` is echoed by op 6; ``seq_ack`` is the last server seq seen (None: none yet)."""

    op: ClassVar[Opcode] = Opcode.HEARTBEAT
    nonce: int
    seq_ack: int | None = None


@dataclass(frozen=True, slots=True)
class SessionDescription:
    """op 4, server: the transport key and mode, and whether DAVE is on (``dave_protocol_version`` > 0)."""

    op: ClassVar[Opcode] = Opcode.SESSION_DESCRIPTION
    mode: str
    secret_key: bytes = field(repr=False)
    dave_protocol_version: int = 0
    audio_codec: str | None = None
    video_codec: str | None = None
    media_session_id: str | None = None


@dataclass(frozen=True, slots=True)
class Speaking:
    """op 5, both ways. The client sends flags, delay and its SSRC; the server adds ``user_id``.

    The server's op 5 is what maps an incoming SSRC to a user.
    """

    op: ClassVar[Opcode] = Opcode.SPEAKING
    speaking: int
    ssrc: int
    delay: int = 0
    user_id: int | None = None


@dataclass(frozen=True, slots=True)
class HeartbeatAck:
    """op 6, server: echoes the heartbeat's nonce."""

    op: ClassVar[Opcode] = Opcode.HEARTBEAT_ACK
    nonce: int


@dataclass(frozen=True, slots=True)
class Resume:
    """op 7, client: continue a dropped session; the server replays its messages after ``seq_ack``."""

    op: ClassVar[Opcode] = Opcode.RESUME
    server_id: int
    session_id: str
    token: str = field(repr=False)
    seq_ack: int | None = None


@dataclass(frozen=True, slots=True)
class Hello:
    """op 8, server: the heartbeat interval in milliseconds (may be fractional) and the gateway version."""

    op: ClassVar[Opcode] = Opcode.HELLO
    heartbeat_interval: float
    version: int | None = None


@dataclass(frozen=True, slots=True)
class Resumed:
    """op 9, server: the resume worked; replayed messages follow."""

    op: ClassVar[Opcode] = Opcode.RESUMED


@dataclass(frozen=True, slots=True)
class ClientsConnect:
    """op 11, server: these users are in the call (sent on join and whenever someone arrives)."""

    op: ClassVar[Opcode] = Opcode.CLIENTS_CONNECT
    user_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ClientDisconnect:
    """op 13, server: this user left the call."""

    op: ClassVar[Opcode] = Opcode.CLIENT_DISCONNECT
    user_id: int


@dataclass(frozen=True, slots=True)
class DavePrepareTransition:
    """op 21, server: a transition to ``protocol_version`` is coming (transition id 0: execute now)."""

    op: ClassVar[Opcode] = Opcode.DAVE_PREPARE_TRANSITION
    protocol_version: int
    transition_id: int


@dataclass(frozen=True, slots=True)
class DaveExecuteTransition:
    """op 22, server: switch the sender to the prepared transition now."""

    op: ClassVar[Opcode] = Opcode.DAVE_EXECUTE_TRANSITION
    transition_id: int


@dataclass(frozen=True, slots=True)
class DaveTransitionReady:
    """op 23, client: we are ready for this transition."""

    op: ClassVar[Opcode] = Opcode.DAVE_TRANSITION_READY
    transition_id: int


@dataclass(frozen=True, slots=True)
class DavePrepareEpoch:
    """op 24, server: epoch 1 means a new MLS group is being created (send a fresh key package)."""

    op: ClassVar[Opcode] = Opcode.DAVE_PREPARE_EPOCH
    protocol_version: int
    epoch: int
    transition_id: int | None = None


@dataclass(frozen=True, slots=True)
class DaveMlsExternalSender:
    """op 25, server (binary): the gateway's MLS external sender, for ``DaveSession.set_external_sender``."""

    op: ClassVar[Opcode] = Opcode.DAVE_MLS_EXTERNAL_SENDER
    external_sender: bytes


@dataclass(frozen=True, slots=True)
class DaveMlsKeyPackage:
    """op 26, client (binary): our serialized MLS key package."""

    op: ClassVar[Opcode] = Opcode.DAVE_MLS_KEY_PACKAGE
    key_package: bytes


@dataclass(frozen=True, slots=True)
class DaveMlsProposals:
    """op 27, server (binary). ``proposals`` is the length-prefixed vector exactly as davey's
    ``process_proposals`` expects it (the bytes after the op_type byte)."""

    op: ClassVar[Opcode] = Opcode.DAVE_MLS_PROPOSALS
    operation: ProposalsOperation
    proposals: bytes


@dataclass(frozen=True, slots=True)
class DaveMlsCommitWelcome:
    """op 28, client (binary): an MLS commit, followed by a Welcome when the commit adds members."""

    op: ClassVar[Opcode] = Opcode.DAVE_MLS_COMMIT_WELCOME
    commit_welcome: bytes


@dataclass(frozen=True, slots=True)
class DaveMlsAnnounceCommitTransition:
    """op 29, server (binary): the winning commit for this transition, for ``process_commit``."""

    op: ClassVar[Opcode] = Opcode.DAVE_MLS_ANNOUNCE_COMMIT_TRANSITION
    transition_id: int
    commit: bytes


@dataclass(frozen=True, slots=True)
class DaveMlsWelcome:
    """op 30, server (binary): a Welcome into the group, for ``process_welcome``."""

    op: ClassVar[Opcode] = Opcode.DAVE_MLS_WELCOME
    transition_id: int
    welcome: bytes


@dataclass(frozen=True, slots=True)
class DaveMlsInvalidCommitWelcome:
    """op 31, client: the commit or Welcome of this transition failed; please remove and re-add us."""

    op: ClassVar[Opcode] = Opcode.DAVE_MLS_INVALID_COMMIT_WELCOME
    transition_id: int


@dataclass(frozen=True, slots=True)
class Unknown:
    """An opcode this side does not handle, kept as received so it can be logged (and its seq tracked).

    ``data`` is the JSON ``d`` value for text frames and the body bytes for binary frames.
    """

    op: int
    data: Any = None


ServerMessage: TypeAlias = (
    Ready
    | SessionDescription
    | Speaking
    | HeartbeatAck
    | Hello
    | Resumed
    | ClientsConnect
    | ClientDisconnect
    | DavePrepareTransition
    | DaveExecuteTransition
    | DavePrepareEpoch
    | DaveMlsExternalSender
    | DaveMlsProposals
    | DaveMlsAnnounceCommitTransition
    | DaveMlsWelcome
    | Unknown
)

ClientMessage: TypeAlias = (
    Identify
    | SelectProtocol
    | Heartbeat
    | Speaking
    | Resume
    | DaveTransitionReady
    | DaveMlsKeyPackage
    | DaveMlsCommitWelcome
    | DaveMlsInvalidCommitWelcome
    | Unknown
)


@dataclass(frozen=True, slots=True)
class ServerFrame:
    """A decoded server frame: the message and its sequence number (None when the frame had none)."""

    message: ServerMessage
    seq: int | None = None


# --------------------------------------------------------------------------------------------------
# Field readers: each raises ProtocolError naming the op and the field
# --------------------------------------------------------------------------------------------------

_OP_LABEL = {op.value: f"op {op.value} ({op.name})" for op in Opcode}


def _fail(op: int, message: str) -> ProtocolError:
    return ProtocolError(f"{_OP_LABEL.get(op, f'op {op}')}: {message}")


def _body(op: int, d: object) -> dict[str, Any]:
    if type(d) is not dict:
        raise _fail(op, f"'d' must be an object, got {type(d).__name__}")
    return d


def _get(op: int, d: dict[str, Any], key: str) -> Any:
    try:
        return d[key]
    except KeyError:
        raise _fail(op, f"missing field {key!r}") from None


def _int(op: int, key: str, value: object, low: int, high: int) -> int:
    # type() rather than isinstance(): bool is an int subclass, and True is not a port number.
    if type(value) is not int:
        raise _fail(op, f"field {key!r} must be an integer, got {type(value).__name__}")
    if not low <= value <= high:
        raise _fail(op, f"field {key!r} = {value} is outside {low}..{high}")
    return value


def _snowflake(op: int, key: str, value: object) -> int:
    if type(value) is str:
        if not (0 < len(value) <= 20 and value.isascii() and value.isdigit()):
            raise _fail(op, f"field {key!r} is not a snowflake: {value[:40]!r}")
        number = int(value)
        if number > _U64:
            raise _fail(op, f"field {key!r} = {number} does not fit in 64 bits")
        return number
    return _int(op, key, value, 0, _U64)


def _str(op: int, key: str, value: object) -> str:
    if type(value) is not str:
        raise _fail(op, f"field {key!r} must be a string, got {type(value).__name__}")
    return value


def _optional_str(op: int, d: dict[str, Any], key: str) -> str | None:
    value = d.get(key)
    return None if value is None else _str(op, key, value)


def _str_list(op: int, key: str, value: object) -> tuple[str, ...]:
    if type(value) is not list or any(type(item) is not str for item in value):
        raise _fail(op, f"field {key!r} must be a list of strings")
    return tuple(value)


def _seq_ack(op: int, d: dict[str, Any]) -> int | None:
    value = d.get("seq_ack")
    if value is None or (type(value) is int and value == -1):
        return None
    return _int(op, "seq_ack", value, 0, _MAX_JSON_SEQ)


def _nonce(op: int, d: object) -> int:
    # v8 sends {"t": nonce, ...}; older versions send the bare integer.
    if type(d) is dict:
        return _int(op, "t", _get(op, d, "t"), 0, _U64)
    return _int(op, "d", d, 0, _U64)


def _nonempty(op: int, key: str, body: bytes) -> bytes:
    if not body:
        raise _fail(op, f"empty {key}")
    return body


def _transition_prefix(op: int, body: bytes) -> tuple[int, bytes]:
    if len(body) < 3:
        raise _fail(op, f"binary body of {len(body)} bytes is too short for transition_id and data")
    return (body[0] << 8) | body[1], body[2:]


# --------------------------------------------------------------------------------------------------
# Decoders, one per opcode and direction
# --------------------------------------------------------------------------------------------------


def _decode_identify(d: object) -> Identify:
    op = 0
    b = _body(op, d)
    dave = b.get("max_dave_protocol_version")
    return Identify(
        server_id=_snowflake(op, "server_id", _get(op, b, "server_id")),
        user_id=_snowflake(op, "user_id", _get(op, b, "user_id")),
        session_id=_str(op, "session_id", _get(op, b, "session_id")),
        token=_str(op, "token", _get(op, b, "token")),
        max_dave_protocol_version=0 if dave is None else _int(op, "max_dave_protocol_version", dave, 0, _U8),
    )


def _decode_select_protocol(d: object) -> SelectProtocol:
    op = 1
    b = _body(op, d)
    data = _get(op, b, "data")
    if type(data) is not dict:
        raise _fail(op, "field 'data' must be an object")
    return SelectProtocol(
        protocol=_str(op, "protocol", _get(op, b, "protocol")),
        address=_str(op, "data.address", _get(op, data, "address")),
        port=_int(op, "data.port", _get(op, data, "port"), 0, _U16),
        mode=_str(op, "data.mode", _get(op, data, "mode")),
    )


def _decode_ready(d: object) -> Ready:
    op = 2
    b = _body(op, d)
    experiments = b.get("experiments")
    return Ready(
        ssrc=_int(op, "ssrc", _get(op, b, "ssrc"), 0, _U32),
        ip=_str(op, "ip", _get(op, b, "ip")),
        port=_int(op, "port", _get(op, b, "port"), 0, _U16),
        modes=_str_list(op, "modes", _get(op, b, "modes")),
        experiments=() if experiments is None else _str_list(op, "experiments", experiments),
    )


def _decode_heartbeat(d: object) -> Heartbeat:
    op = 3
    if type(d) is dict:
        return Heartbeat(nonce=_nonce(op, d), seq_ack=_seq_ack(op, d))
    return Heartbeat(nonce=_nonce(op, d))


def _decode_session_description(d: object) -> SessionDescription:
    op = 4
    b = _body(op, d)
    key = _get(op, b, "secret_key")
    if (
        type(key) is not list
        or len(key) != _SECRET_KEY_SIZE
        or any(type(x) is not int or not 0 <= x <= _U8 for x in key)
    ):
        raise _fail(op, f"field 'secret_key' must be a list of {_SECRET_KEY_SIZE} integers 0..255")
    dave = b.get("dave_protocol_version")
    return SessionDescription(
        mode=_str(op, "mode", _get(op, b, "mode")),
        secret_key=bytes(key),
        dave_protocol_version=0 if dave is None else _int(op, "dave_protocol_version", dave, 0, _U8),
        audio_codec=_optional_str(op, b, "audio_codec"),
        video_codec=_optional_str(op, b, "video_codec"),
        media_session_id=_optional_str(op, b, "media_session_id"),
    )


def _decode_speaking(d: object) -> Speaking:
    op = 5
    b = _body(op, d)
    delay = b.get("delay")
    user_id = b.get("user_id")
    return Speaking(
        speaking=_int(op, "speaking", _get(op, b, "speaking"), 0, _U32),
        ssrc=_int(op, "ssrc", _get(op, b, "ssrc"), 0, _U32),
        delay=0 if delay is None else _int(op, "delay", delay, 0, _U32),
        user_id=None if user_id is None else _snowflake(op, "user_id", user_id),
    )


def _decode_heartbeat_ack(d: object) -> HeartbeatAck:
    return HeartbeatAck(nonce=_nonce(6, d))


def _decode_resume(d: object) -> Resume:
    op = 7
    b = _body(op, d)
    return Resume(
        server_id=_snowflake(op, "server_id", _get(op, b, "server_id")),
        session_id=_str(op, "session_id", _get(op, b, "session_id")),
        token=_str(op, "token", _get(op, b, "token")),
        seq_ack=_seq_ack(op, b),
    )


def _decode_hello(d: object) -> Hello:
    op = 8
    b = _body(op, d)
    interval = _get(op, b, "heartbeat_interval")
    # float's largest value, not infinity, bounds it: a bigger JSON integer would make float() overflow.
    if type(interval) not in (int, float) or not (0 < interval <= sys.float_info.max):
        raise _fail(op, "field 'heartbeat_interval' must be a positive finite number")
    version = b.get("v")
    return Hello(
        heartbeat_interval=float(interval),
        version=None if version is None else _int(op, "v", version, 0, _U8),
    )


def _decode_resumed(d: object) -> Resumed:
    return Resumed()


def _decode_clients_connect(d: object) -> ClientsConnect:
    op = 11
    b = _body(op, d)
    ids = _get(op, b, "user_ids")
    if type(ids) is not list:
        raise _fail(op, "field 'user_ids' must be a list")
    return ClientsConnect(user_ids=tuple(_snowflake(op, "user_ids[]", x) for x in ids))


def _decode_client_disconnect(d: object) -> ClientDisconnect:
    op = 13
    b = _body(op, d)
    return ClientDisconnect(user_id=_snowflake(op, "user_id", _get(op, b, "user_id")))


def _transition_id(op: int, b: dict[str, Any]) -> int:
    return _int(op, "transition_id", _get(op, b, "transition_id"), 0, _U16)


def _decode_prepare_transition(d: object) -> DavePrepareTransition:
    op = 21
    b = _body(op, d)
    return DavePrepareTransition(
        protocol_version=_int(op, "protocol_version", _get(op, b, "protocol_version"), 0, _U8),
        transition_id=_transition_id(op, b),
    )


def _decode_execute_transition(d: object) -> DaveExecuteTransition:
    return DaveExecuteTransition(transition_id=_transition_id(22, _body(22, d)))


def _decode_transition_ready(d: object) -> DaveTransitionReady:
    return DaveTransitionReady(transition_id=_transition_id(23, _body(23, d)))


def _decode_prepare_epoch(d: object) -> DavePrepareEpoch:
    op = 24
    b = _body(op, d)
    tid = b.get("transition_id")
    return DavePrepareEpoch(
        protocol_version=_int(op, "protocol_version", _get(op, b, "protocol_version"), 0, _U8),
        epoch=_int(op, "epoch", _get(op, b, "epoch"), 0, _U64),
        transition_id=None if tid is None else _int(op, "transition_id", tid, 0, _U16),
    )


def _decode_invalid_commit_welcome(d: object) -> DaveMlsInvalidCommitWelcome:
    return DaveMlsInvalidCommitWelcome(transition_id=_transition_id(31, _body(31, d)))


def _decode_external_sender(body: bytes) -> DaveMlsExternalSender:
    return DaveMlsExternalSender(external_sender=_nonempty(25, "external_sender", body))


def _decode_key_package(body: bytes) -> DaveMlsKeyPackage:
    return DaveMlsKeyPackage(key_package=_nonempty(26, "key_package", body))


def _decode_proposals(body: bytes) -> DaveMlsProposals:
    op = 27
    if len(body) < 2:
        raise _fail(op, f"binary body of {len(body)} bytes is too short for op_type and proposals")
    if body[0] > 1:
        raise _fail(op, f"field 'op_type' = {body[0]} is outside 0..1")
    return DaveMlsProposals(operation=ProposalsOperation(body[0]), proposals=body[1:])


def _decode_commit_welcome(body: bytes) -> DaveMlsCommitWelcome:
    return DaveMlsCommitWelcome(commit_welcome=_nonempty(28, "commit_welcome", body))


def _decode_announce_commit(body: bytes) -> DaveMlsAnnounceCommitTransition:
    tid, commit = _transition_prefix(29, body)
    return DaveMlsAnnounceCommitTransition(transition_id=tid, commit=commit)


def _decode_welcome(body: bytes) -> DaveMlsWelcome:
    tid, welcome = _transition_prefix(30, body)
    return DaveMlsWelcome(transition_id=tid, welcome=welcome)


_SERVER_JSON: dict[int, Callable[[object], ServerMessage]] = {
    2: _decode_ready,
    4: _decode_session_description,
    5: _decode_speaking,
    6: _decode_heartbeat_ack,
    8: _decode_hello,
    9: _decode_resumed,
    11: _decode_clients_connect,
    13: _decode_client_disconnect,
    21: _decode_prepare_transition,
    22: _decode_execute_transition,
    24: _decode_prepare_epoch,
}
_SERVER_BINARY: dict[int, Callable[[bytes], ServerMessage]] = {
    25: _decode_external_sender,
    27: _decode_proposals,
    29: _decode_announce_commit,
    30: _decode_welcome,
}
_CLIENT_JSON: dict[int, Callable[[object], ClientMessage]] = {
    0: _decode_identify,
    1: _decode_select_protocol,
    3: _decode_heartbeat,
    5: _decode_speaking,
    7: _decode_resume,
    23: _decode_transition_ready,
    31: _decode_invalid_commit_welcome,
}
_CLIENT_BINARY: dict[int, Callable[[bytes], ClientMessage]] = {
    26: _decode_key_package,
    28: _decode_commit_welcome,
}

_SERVER_BINARY_HEADER = struct.Struct(">HB")


def _load_json(frame: str) -> tuple[int, object, dict[str, Any]]:
    """Parse a text frame into (op, d, whole object); a frame that is not a message is a FrameDecodeError."""
    try:
        payload = json.loads(frame)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise FrameDecodeError(f"text frame is not valid JSON: {exc}") from None
    if type(payload) is not dict:
        raise FrameDecodeError(f"text frame must be a JSON object, got {type(payload).__name__}")
    op = payload.get("op")
    if type(op) is not int:
        raise FrameDecodeError(f"text frame has no integer 'op' (got {type(op).__name__})")
    if not 0 <= op <= 255:  # opcodes are bytes on the binary side; a huge one would be kept and logged whole
        raise FrameDecodeError(f"text frame has an 'op' outside 0..255 ({op!r:.40})")
    return op, payload.get("d"), payload


def _wrong_kind(op: int, message: str) -> FrameDecodeError:
    return FrameDecodeError(f"{_OP_LABEL.get(op, f'op {op}')}: {message}")


def _as_bytes(frame: object) -> bytes:
    if type(frame) is bytes:
        return frame
    if isinstance(frame, (bytes, bytearray, memoryview)):
        return bytes(frame)
    raise FrameDecodeError(f"a frame must be str or bytes, got {type(frame).__name__}")


def decode_server(frame: str | bytes) -> ServerFrame:
    """Decode one frame the voice gateway sent. Raises ProtocolError on malformed input."""
    if type(frame) is str:
        op, d, payload = _load_json(frame)
        seq = payload.get("seq")
        if seq is not None and (type(seq) is not int or not 0 <= seq <= _MAX_JSON_SEQ):
            raise _fail(op, f"'seq' must be an integer 0..{_MAX_JSON_SEQ}, got {seq!r:.40}")
        decoder = _SERVER_JSON.get(op)
        if decoder is not None:
            return ServerFrame(decoder(d), seq)
        if op in _SERVER_BINARY:
            raise _wrong_kind(op, "arrived as text, but this op is binary")
        return ServerFrame(Unknown(op, d), seq)
    data = _as_bytes(frame)
    if len(data) < 3:
        raise FrameDecodeError(f"binary server frame of {len(data)} bytes is shorter than seq + opcode")
    seq, op = _SERVER_BINARY_HEADER.unpack_from(data)
    binary_decoder = _SERVER_BINARY.get(op)
    if binary_decoder is not None:
        return ServerFrame(binary_decoder(data[3:]), seq)
    if op in _SERVER_JSON:
        raise _wrong_kind(op, "arrived as binary, but this op is JSON")
    return ServerFrame(Unknown(op, data[3:]), seq)


def decode_client(frame: str | bytes) -> ClientMessage:
    """Decode one frame a client sent (the emulator's side). Raises ProtocolError on malformed input."""
    if type(frame) is str:
        op, d, _ = _load_json(frame)
        decoder = _CLIENT_JSON.get(op)
        if decoder is not None:
            return decoder(d)
        if op in _CLIENT_BINARY:
            raise _wrong_kind(op, "arrived as text, but this op is binary")
        return Unknown(op, d)
    data = _as_bytes(frame)
    if not data:
        raise FrameDecodeError("empty binary client frame")
    op = data[0]
    binary_decoder = _CLIENT_BINARY.get(op)
    if binary_decoder is not None:
        return binary_decoder(data[1:])
    if op in _CLIENT_JSON:
        raise _wrong_kind(op, "arrived as binary, but this op is JSON")
    return Unknown(op, data[1:])


# --------------------------------------------------------------------------------------------------
# Encoders
# --------------------------------------------------------------------------------------------------


def _seq_ack_wire(seq_ack: int | None) -> int:
    return -1 if seq_ack is None else seq_ack


def _identify_d(m: Identify) -> object:
    return {
        "server_id": str(m.server_id),
        "user_id": str(m.user_id),
        "session_id": m.session_id,
        "token": m.token,
        "max_dave_protocol_version": m.max_dave_protocol_version,
    }


def _select_protocol_d(m: SelectProtocol) -> object:
    return {"protocol": m.protocol, "data": {"address": m.address, "port": m.port, "mode": m.mode}}


def _ready_d(m: Ready) -> object:
    return {
        "ssrc": m.ssrc,
        "ip": m.ip,
        "port": m.port,
        "modes": list(m.modes),
        "experiments": list(m.experiments),
    }


def _heartbeat_d(m: Heartbeat) -> object:
    return {"t": m.nonce, "seq_ack": _seq_ack_wire(m.seq_ack)}


def _session_description_d(m: SessionDescription) -> object:
    if len(m.secret_key) != _SECRET_KEY_SIZE:
        raise InvalidArgumentError(f"secret_key must be {_SECRET_KEY_SIZE} bytes, got {len(m.secret_key)}")
    d: dict[str, object] = {
        "mode": m.mode,
        "secret_key": list(m.secret_key),
        "dave_protocol_version": m.dave_protocol_version,
    }
    for key in ("audio_codec", "video_codec", "media_session_id"):
        value = getattr(m, key)
        if value is not None:
            d[key] = value
    return d


def _speaking_d(m: Speaking) -> object:
    d: dict[str, object] = {"speaking": int(m.speaking), "delay": m.delay, "ssrc": m.ssrc}
    if m.user_id is not None:
        d["user_id"] = str(m.user_id)
    return d


def _resume_d(m: Resume) -> object:
    return {
        "server_id": str(m.server_id),
        "session_id": m.session_id,
        "token": m.token,
        "seq_ack": _seq_ack_wire(m.seq_ack),
    }


def _hello_d(m: Hello) -> object:
    d: dict[str, object] = {"heartbeat_interval": m.heartbeat_interval}
    if m.version is not None:
        d["v"] = m.version
    return d


def _prepare_epoch_d(m: DavePrepareEpoch) -> object:
    d: dict[str, object] = {"protocol_version": m.protocol_version, "epoch": m.epoch}
    if m.transition_id is not None:
        d["transition_id"] = m.transition_id
    return d


def _u16_prefix(transition_id: int) -> bytes:
    if not 0 <= transition_id <= _U16:
        raise InvalidArgumentError(f"transition_id {transition_id} is outside 0..65535")
    return transition_id.to_bytes(2, "big")


_JSON_ENCODERS: dict[type, Callable[[Any], object]] = {
    Identify: _identify_d,
    SelectProtocol: _select_protocol_d,
    Ready: _ready_d,
    Heartbeat: _heartbeat_d,
    SessionDescription: _session_description_d,
    Speaking: _speaking_d,
    HeartbeatAck: lambda m: {"t": m.nonce},
    Resume: _resume_d,
    Hello: _hello_d,
    Resumed: lambda m: None,
    ClientsConnect: lambda m: {"user_ids": [str(u) for u in m.user_ids]},
    ClientDisconnect: lambda m: {"user_id": str(m.user_id)},
    DavePrepareTransition: lambda m: {
        "protocol_version": m.protocol_version,
        "transition_id": m.transition_id,
    },
    DaveExecuteTransition: lambda m: {"transition_id": m.transition_id},
    DaveTransitionReady: lambda m: {"transition_id": m.transition_id},
    DavePrepareEpoch: _prepare_epoch_d,
    DaveMlsInvalidCommitWelcome: lambda m: {"transition_id": m.transition_id},
}

_BINARY_ENCODERS: dict[type, Callable[[Any], bytes]] = {
    DaveMlsExternalSender: lambda m: bytes(m.external_sender),
    DaveMlsKeyPackage: lambda m: bytes(m.key_package),
    DaveMlsProposals: lambda m: bytes((int(m.operation),)) + bytes(m.proposals),
    DaveMlsCommitWelcome: lambda m: bytes(m.commit_welcome),
    DaveMlsAnnounceCommitTransition: lambda m: _u16_prefix(m.transition_id) + bytes(m.commit),
    DaveMlsWelcome: lambda m: _u16_prefix(m.transition_id) + bytes(m.welcome),
}

_SERVER_TYPES = frozenset(
    {
        Ready,
        SessionDescription,
        Speaking,
        HeartbeatAck,
        Hello,
        Resumed,
        ClientsConnect,
        ClientDisconnect,
        DavePrepareTransition,
        DaveExecuteTransition,
        DavePrepareEpoch,
        DaveMlsExternalSender,
        DaveMlsProposals,
        DaveMlsAnnounceCommitTransition,
        DaveMlsWelcome,
        Unknown,
    }
)
_CLIENT_TYPES = frozenset(
    {
        Identify,
        SelectProtocol,
        Heartbeat,
        Speaking,
        Resume,
        DaveTransitionReady,
        DaveMlsKeyPackage,
        DaveMlsCommitWelcome,
        DaveMlsInvalidCommitWelcome,
        Unknown,
    }
)


def _dumps(op: int, d: object, seq: int | None) -> str:
    payload: dict[str, object] = {"op": op, "d": d}
    if seq is not None:
        payload["seq"] = seq
    try:
        return json.dumps(payload, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidArgumentError(f"op {op}: cannot encode {d!r:.80} as JSON: {exc}") from None


def _check_op(op: int) -> None:
    if not isinstance(op, int) or isinstance(op, bool) or not 0 <= op <= _U8:
        raise InvalidArgumentError(f"opcode must be an integer 0..255, got {op!r}")


def encode_server(message: ServerMessage, seq: int | None = None) -> str | bytes:
    """Encode a server message (the emulator's side). Binary ops need ``seq``; JSON ops may carry it."""
    kind = type(message)
    if kind not in _SERVER_TYPES:
        raise InvalidArgumentError(f"{kind.__name__} is not a message the server sends")
    if isinstance(message, Unknown):
        _check_op(message.op)
        binary = isinstance(message.data, (bytes, bytearray))
        op = int(message.op)
        body: bytes | None = bytes(message.data) if binary else None
        d = None if binary else message.data
    else:
        op = int(message.op)
        binary_encoder = _BINARY_ENCODERS.get(kind)
        body = binary_encoder(message) if binary_encoder is not None else None
        d = None if body is not None else _JSON_ENCODERS[kind](message)
    if body is None:
        if seq is not None and not 0 <= seq <= _MAX_JSON_SEQ:
            raise InvalidArgumentError(f"seq {seq} is outside 0..{_MAX_JSON_SEQ}")
        return _dumps(op, d, seq)
    if seq is None:
        raise InvalidArgumentError(f"op {op} is a binary server frame and needs a seq")
    if not 0 <= seq <= _U16:
        raise InvalidArgumentError(f"seq {seq} is outside 0..65535 (binary frames carry a u16)")
    return _SERVER_BINARY_HEADER.pack(seq, op) + body


def encode_client(message: ClientMessage) -> str | bytes:
    """Encode a client message: JSON text, or ``op u8 | body`` for the binary DAVE ops."""
    kind = type(message)
    if kind not in _CLIENT_TYPES:
        raise InvalidArgumentError(f"{kind.__name__} is not a message the client sends")
    if isinstance(message, Unknown):
        _check_op(message.op)
        if isinstance(message.data, (bytes, bytearray)):
            return bytes((message.op,)) + bytes(message.data)
        return _dumps(message.op, message.data, None)
    binary_encoder = _BINARY_ENCODERS.get(kind)
    if binary_encoder is not None:
        return bytes((int(message.op),)) + binary_encoder(message)
    return _dumps(int(message.op), _JSON_ENCODERS[kind](message), None)
