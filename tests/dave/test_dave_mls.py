"""The emulator's MLS codec against real davey sessions, plus malformed-input fuzzing."""

from __future__ import annotations

import contextlib
import random

import davey
import pytest

from cordvoice.emulator import mls
from cordvoice.errors import InvalidArgumentError, ProtocolError

CHANNEL = 987_654_321_012_345_678
APPEND = davey.ProposalsOperationType.append


@pytest.fixture(scope="module")
def signer() -> mls.ExternalSenderKey:
    return mls.ExternalSenderKey(identity=b"\x00\x01\x01\x00")


def _session(signer: mls.ExternalSenderKey, user_id: int) -> davey.DaveSession:
    session = davey.DaveSession(1, user_id, CHANNEL)
    session.set_external_sender(signer.external_sender())
    return session


@pytest.fixture(scope="module")
def material(signer: mls.ExternalSenderKey) -> dict[str, bytes]:
    """A key package, an add commit + welcome and a remove commit, all made by davey."""
    group_id = mls.group_id_for_channel(CHANNEL)
    a, b, c = (_session(signer, uid) for uid in (11, 22, 33))
    kp_b = b.get_serialized_key_package()
    kp_c = c.get_serialized_key_package()
    adds = [mls.build_add_proposal(signer, group_id, 0, kp).message for kp in (kp_b, kp_c)]
    add_cw = a.process_proposals(APPEND, mls.encode_append_proposals(adds))
    assert add_cw is not None and add_cw.welcome is not None
    a.process_commit(add_cw.commit)
    b.process_welcome(add_cw.welcome)
    remove = mls.build_remove_proposal(signer, group_id, 1, 2)
    remove_cw = b.process_proposals(APPEND, mls.encode_append_proposals([remove.message]))
    assert remove_cw is not None and remove_cw.welcome is None
    return {
        "key_package": kp_b,
        "add_commit": add_cw.commit,
        "add_welcome": add_cw.welcome,
        "remove_commit": remove_cw.commit,
    }


# -------------------------------------------------------------------------------------------------- codec


@pytest.mark.parametrize(
    ("value", "encoded"),
    [(0, "00"), (63, "3f"), (64, "4040"), (16383, "7fff"), (16384, "80004000"), (2**30 - 1, "bfffffff")],
)
def test_varint_round_trip(value: int, encoded: str) -> None:
    assert mls.encode_varint(value).hex() == encoded
    assert mls.Reader(bytes.fromhex(encoded)).varint() == value


@pytest.mark.parametrize("encoded", ["4001", "4000", "80000001", "80003fff", "c0000000"])
def test_varint_rejects_non_minimal_and_reserved(encoded: str) -> None:
    with pytest.raises(ProtocolError):
        mls.Reader(bytes.fromhex(encoded)).varint()


def test_varint_out_of_range_is_a_caller_error() -> None:
    with pytest.raises(InvalidArgumentError):
        mls.encode_varint(2**30)


def test_reader_bounds() -> None:
    reader = mls.Reader(b"\x05abc")
    with pytest.raises(ProtocolError):
        reader.vector()
    with pytest.raises(ProtocolError):
        mls.Reader(b"\x00").u16()
    with pytest.raises(ProtocolError):
        mls.Reader(b"\x02").optional_present("x")
    with pytest.raises(ProtocolError):
        mls.Reader(b"\x00\x01").end("x")


def test_external_sender_layout_and_davey_accepts_it(signer: mls.ExternalSenderKey) -> None:
    data = signer.external_sender()
    assert len(data) == 74  # 1 + 65 + 2 + 1 + 4 for a 4-byte identity (protocol.md §6.3)
    assert data[:2] == b"\x40\x41" and data[2] == 0x04 and data[67:69] == b"\x00\x01"
    session = davey.DaveSession(1, 5, CHANNEL)
    session.set_external_sender(data)
    assert session.status == davey.SessionStatus.pending
    assert "private" not in repr(signer) and signer.public_key[:5].hex() in repr(signer)


def test_key_package_raw_and_wrapped(material: dict[str, bytes]) -> None:
    raw = material["key_package"]
    parsed = mls.parse_key_package(raw)
    assert parsed.user_id == 22
    assert parsed.data == raw
    assert parsed.ref == mls.ref_hash(b"KeyPackage Reference", raw)
    assert len(parsed.signature_key) == 65
    wrapped = mls.parse_key_package(b"\x00\x01\x00\x05" + raw)
    assert wrapped.data == raw and wrapped.ref == parsed.ref


def test_key_package_signature_tampering_is_detected(material: dict[str, bytes]) -> None:
    raw = bytearray(material["key_package"])
    raw[10] ^= 0x01  # inside init_key: structure intact, KeyPackageTBS changed
    with pytest.raises(ProtocolError, match="signature"):
        mls.parse_key_package(bytes(raw))
    # The same bytes parse when signatures are not checked, so it really was the signature.
    assert mls.parse_key_package(bytes(raw), verify_signatures=False).user_id == 22


def test_key_package_lifetime_must_be_the_full_span(material: dict[str, bytes]) -> None:
    raw = material["key_package"]
    lifetime = (b"\x00" * 8) + (b"\xff" * 8)
    index = raw.index(b"\x01" + lifetime)  # leaf_node_source key_package, then the lifetime
    tampered = raw[: index + 1] + b"\x00" * 7 + b"\x01" + raw[index + 9 :]
    with pytest.raises(ProtocolError, match="lifetime"):
        mls.parse_key_package(tampered, verify_signatures=False)


def test_key_package_wrong_suite_and_version(material: dict[str, bytes]) -> None:
    raw = material["key_package"]
    with pytest.raises(ProtocolError, match="cipher suite"):
        mls.parse_key_package(raw[:2] + b"\x00\x01" + raw[4:])
    with pytest.raises(ProtocolError, match="version"):
        mls.parse_key_package(b"\x00\x02" + raw[2:])


def test_proposal_refs_match_what_davey_commits_to(signer: mls.ExternalSenderKey) -> None:
    group_id = mls.group_id_for_channel(CHANNEL)
    a, b = _session(signer, 1), _session(signer, 2)
    add = mls.build_add_proposal(signer, group_id, 0, b.get_serialized_key_package())
    cw = a.process_proposals(APPEND, mls.encode_append_proposals([add.message]))
    assert cw is not None
    parsed = mls.parse_commit_welcome(cw.commit + (cw.welcome or b""))
    assert parsed.proposal_refs == (add.ref,)
    [(kind, body, epoch)] = mls.split_proposal_messages(mls.encode_append_proposals([add.message]))
    assert kind == mls.PROPOSAL_ADD and epoch == 0 and mls.parse_key_package(body).user_id == 2
    assert mls.parse_proposal_refs(mls.encode_revoke_proposals([add.ref, add.ref])) == (add.ref,) * 2


def test_parse_add_commit_and_welcome(material: dict[str, bytes]) -> None:
    parsed = mls.parse_commit_welcome(material["add_commit"] + material["add_welcome"])
    assert parsed.commit == material["add_commit"]
    assert parsed.group_id == mls.group_id_for_channel(CHANNEL)
    assert parsed.epoch == 0 and parsed.sender_leaf == 0
    assert len(parsed.proposal_refs) == 2 and not parsed.has_path
    assert parsed.welcome is not None and parsed.welcome.data == material["add_welcome"]
    assert len(parsed.welcome.new_members) == 2
    kp_ref = mls.parse_key_package(material["key_package"]).ref
    assert kp_ref in parsed.welcome.new_members
    single = mls.welcome_for_member(parsed.welcome, kp_ref)
    assert mls.parse_welcome(single).new_members == {kp_ref}
    with pytest.raises(InvalidArgumentError):
        mls.welcome_for_member(parsed.welcome, b"\x00" * 32)


def test_parse_remove_commit_has_a_signed_path(material: dict[str, bytes]) -> None:
    parsed = mls.parse_commit_welcome(material["remove_commit"])
    assert parsed.welcome is None and parsed.epoch == 1 and parsed.sender_leaf == 1
    assert parsed.path_leaf is not None and parsed.path_leaf.user_id == 22
    parsed.verify_path_leaf()
    signature_key = mls.parse_key_package(material["key_package"]).signature_key
    assert parsed.path_leaf.signature_key == signature_key


def test_inline_proposal_is_rejected(material: dict[str, bytes]) -> None:
    commit = material["add_commit"]
    parsed = mls.parse_commit_welcome(commit)
    # Find the first ProposalOrRef (type 02, then <V>32-byte ref) and turn it into an inline proposal.
    marker = b"\x02\x20" + parsed.proposal_refs[0]
    index = commit.index(marker)
    inline = commit[:index] + b"\x01" + commit[index + 1 :]
    with pytest.raises(ProtocolError, match="inline"):
        mls.parse_commit_welcome(inline)


def test_trailing_garbage_after_commit_is_not_a_welcome(material: dict[str, bytes]) -> None:
    with pytest.raises(ProtocolError):
        mls.parse_commit_welcome(material["remove_commit"] + b"\x00\x02\x00")


# -------------------------------------------------------------------------------------------------- fuzz


def _mutate(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        choice = rng.random()
        if choice < 0.5 and buf:
            buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
        elif choice < 0.65 and buf:
            del buf[rng.randrange(len(buf)) :]
        elif choice < 0.8:
            pos = rng.randrange(len(buf) + 1)
            buf[pos:pos] = rng.randbytes(rng.randint(1, 8))
        elif buf:
            pos = rng.randrange(len(buf))
            del buf[pos : pos + rng.randint(1, 8)]
    return bytes(buf)


def test_fuzzed_key_packages_raise_only_protocol_error(material: dict[str, bytes]) -> None:
    rng = random.Random(1234)
    source = material["key_package"]
    accepted = 0
    for _ in range(2000):
        data = _mutate(rng, source)
        if data == source:  # two flips of the same bit
            continue
        try:
            mls.parse_key_package(data)
        except ProtocolError:
            continue
        accepted += 1
    # A mutation that survives both signature checks would be a forgery.
    assert accepted == 0


def test_fuzzed_commits_and_welcomes_raise_only_protocol_error(material: dict[str, bytes]) -> None:
    rng = random.Random(99)
    sources = [
        material["add_commit"] + material["add_welcome"],
        material["remove_commit"],
        material["add_welcome"],
    ]
    parsed_ok = 0
    for i in range(3000):
        source = sources[i % len(sources)]
        data = _mutate(rng, source)
        try:
            if i % 3 == 2:
                mls.parse_welcome(data)
            else:
                mls.parse_commit_welcome(data)
            parsed_ok += 1
        except ProtocolError:
            pass
    for _ in range(500):
        junk = rng.randbytes(rng.randint(0, 300))
        for parser in (
            mls.parse_commit_welcome,
            mls.parse_welcome,
            mls.parse_key_package,
            mls.split_proposal_messages,
            mls.parse_proposal_refs,
        ):
            with contextlib.suppress(ProtocolError):
                parser(junk)
    # Flips inside opaque fields (ciphertexts, signatures) still parse: the parser checks structure.
    assert 0 < parsed_ok < 3000


def test_every_single_bit_flip_of_a_key_package_is_rejected(material: dict[str, bytes]) -> None:
    """Exhaustive over positions: each flipped byte is caught by the structure or a signature check."""
    source = material["key_package"]
    for position in range(len(source)):
        data = bytearray(source)
        data[position] ^= 1 << (position % 8)
        with pytest.raises(ProtocolError):
            mls.parse_key_package(bytes(data))
