"""``cordvoice doctor``: show dependency versions and prove each native piece works on this machine.

Every dependency cordvoice needs at run time ships as a wheel (PyAV even bundles libopus), so a plain
``pip install cordvoice`` should pass every check; when one fails, the line says what to install.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import importlib.metadata
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cordvoice import __version__

__all__ = ["configure", "run"]

#: import name -> what to ``pip install`` when it is missing.
_REQUIREMENTS = {
    "cryptography": "cryptography>=42",
    "nacl": "PyNaCl>=1.5",
    "davey": "davey==0.1.7",
    "av": "av>=18,<19",
    "numpy": "numpy>=1.26",
    "websockets": "websockets>=13,<18",
}


@dataclass(frozen=True, slots=True)
class _Check:
    title: str
    function: Callable[[], str]
    fix: str


def configure(parser: argparse.ArgumentParser) -> None:
    """``doctor`` takes no arguments."""
    del parser


def run(args: argparse.Namespace) -> int:
    """Print versions and check results; 0 only when every check passes."""
    del args
    print(f"cordvoice doctor {__version__}\n\nVersions")
    for name, version in _versions():
        print(f"  {name:<13} {version}")
    print("\nChecks")
    failures = 0
    for check in _CHECKS:
        try:
            detail = check.function()
        except Exception as exc:  # a check reports any failure; it never crashes the doctor
            failures += 1
            print(f"  FAIL  {check.title}: {type(exc).__name__}: {exc}")
            print(f"        fix: {_fix_for(exc, check.fix)}")
        else:
            print(f"  pass  {check.title}: {detail}")
    print()
    if failures:
        print(
            f"{failures} of {len(_CHECKS)} checks failed: install what is listed above, then run "
            "`cordvoice doctor` again."
        )
        return 1
    print(f"All {len(_CHECKS)} checks passed.")
    return 0


def _fix_for(exc: Exception, default: str) -> str:
    if isinstance(exc, ModuleNotFoundError) and exc.name:
        requirement = _REQUIREMENTS.get(exc.name.split(".")[0])
        if requirement:
            return f"pip install '{requirement}'"
    return default


# --------------------------------------------------------------------------------------------------
# Versions
# --------------------------------------------------------------------------------------------------


def _versions() -> list[tuple[str, str]]:
    python = (
        f"{platform.python_version()} ({platform.python_implementation()}, "
        f"{platform.system()} {platform.machine()})"
    )
    return [
        ("Python", python),
        ("cordvoice", __version__),
        ("websockets", _distribution_version("websockets")),
        ("cryptography", _with_extra(_distribution_version("cryptography"), _openssl_version)),
        ("PyNaCl", _with_extra(_distribution_version("PyNaCl"), _sodium_details)),
        ("davey", _distribution_version("davey")),
        ("PyAV", _with_extra(_distribution_version("av"), _av_details)),
    ]


def _distribution_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _with_extra(version: str, extra: Callable[[], str]) -> str:
    if version == "not installed":
        return version
    try:
        return f"{version} ({extra()})"
    except Exception as exc:  # version details are informative only
        return f"{version} (details unavailable: {type(exc).__name__})"


def _openssl_version() -> str:
    from cryptography.hazmat.backends.openssl.backend import backend  # noqa: PLC0415

    return str(backend.openssl_version_text())


def _sodium_details() -> str:
    from cordvoice.udp.crypto import XCHACHA_FAST_PATH  # noqa: PLC0415

    return f"XChaCha20 fast path {'on' if XCHACHA_FAST_PATH else 'off'}"


def _av_details() -> str:
    import av  # noqa: PLC0415

    codec = av.library_versions.get("libavcodec")
    parts = [f"libavcodec {'.'.join(map(str, codec))}"] if codec else []
    opus = libopus_version()
    parts.append(opus if opus else "libopus not found")
    return ", ".join(parts)


def libopus_version() -> str | None:
    """The version string of the libopus PyAV bundles (or the system one), via ``opus_get_version_string``."""
    candidates: list[str] = []
    try:
        import av  # noqa: PLC0415

        package_dir = Path(av.__file__).resolve().parent
        for folder in (package_dir.parent / "av.libs", package_dir / ".dylibs"):
            if folder.is_dir():
                candidates += sorted(str(p) for p in folder.glob("libopus*"))
    except ImportError:
        pass
    system = ctypes.util.find_library("opus")
    if system:
        candidates.append(system)
    for candidate in candidates:
        try:
            library = ctypes.CDLL(candidate)
            get_version = library.opus_get_version_string
        except (OSError, AttributeError):
            continue
        get_version.restype = ctypes.c_char_p
        get_version.argtypes = []
        raw = get_version()
        if isinstance(raw, bytes):
            where = (
                "bundled with PyAV" if "av.libs" in candidate or ".dylibs" in candidate else "from the system"
            )
            return f"{raw.decode('ascii', 'replace')} {where}"
    return None


# --------------------------------------------------------------------------------------------------
# Checks: each returns a short detail on success and raises on failure
# --------------------------------------------------------------------------------------------------


def _transport_round_trip(mode: str) -> str:
    from cordvoice.errors import DecryptionError  # noqa: PLC0415
    from cordvoice.udp.crypto import make_cipher  # noqa: PLC0415
    from cordvoice.udp.sender import RtpSender  # noqa: PLC0415

    cipher = make_cipher(mode, os.urandom(32))
    sender = RtpSender(0x1234_5678, cipher, sequence=65_535, timestamp=2**32 - 960, nonce=41)
    frame = b"\xfc" + os.urandom(119)
    packet = sender.build(frame)
    header, payload = cipher.open_rtp(packet)
    if payload != frame or (header.sequence, header.timestamp) != (65_535, 2**32 - 960):
        raise RuntimeError("the decrypted packet differs from what was sealed")
    tampered = packet[:20] + bytes((packet[20] ^ 0x01,)) + packet[21:]
    try:
        cipher.open_rtp(tampered)
    except DecryptionError:
        pass
    else:
        raise RuntimeError("a tampered packet was accepted")
    return f"{mode}: {len(packet)}-byte packet sealed, opened, tampered copy rejected"


def _check_aes() -> str:
    from cordvoice.udp.crypto import MODE_AES256_GCM  # noqa: PLC0415

    return _transport_round_trip(MODE_AES256_GCM)


def _check_xchacha() -> str:
    from cordvoice.udp.crypto import MODE_XCHACHA20_POLY1305  # noqa: PLC0415

    return _transport_round_trip(MODE_XCHACHA20_POLY1305)


def _check_davey() -> str:
    import davey  # noqa: PLC0415

    session = davey.DaveSession(1, 80_351_110_224_678_912, 41_771_983_423_143_937)
    key_package = bytes(session.get_serialized_key_package())
    # A raw MLS KeyPackage starts with version 1 and cipher suite 2 (P-256, AES-128-GCM, SHA-256).
    if key_package[:4] != b"\x00\x01\x00\x02":
        raise RuntimeError(f"unexpected key package header {key_package[:4].hex()}")
    return f"DaveSession(1, user, channel) created; {len(key_package)}-byte MLS key package"


def _check_opus() -> str:
    import av  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    frames, samples_per_frame = 10, 960
    encoder = av.CodecContext.create("libopus", "w")
    encoder.sample_rate = 48_000
    encoder.layout = "stereo"
    encoder.format = "s16"
    encoder.bit_rate = 64_000
    encoder.open()
    time = np.arange(frames * samples_per_frame) / 48_000
    tone = (np.sin(2 * np.pi * 440 * time) * 8_000).astype(np.int16)
    interleaved = np.repeat(tone, 2).reshape(1, -1)
    packets: list[bytes] = []
    for index in range(frames):
        chunk = interleaved[:, index * 2 * samples_per_frame : (index + 1) * 2 * samples_per_frame]
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk), format="s16", layout="stereo")
        frame.sample_rate = 48_000
        frame.pts = index * samples_per_frame
        packets += [bytes(packet) for packet in encoder.encode(frame)]
    packets += [bytes(packet) for packet in encoder.encode(None)]
    if not packets:
        raise RuntimeError("the Opus encoder produced no packets")

    decoder = av.CodecContext.create("opus", "r")
    decoder.sample_rate = 48_000
    decoder.layout = "stereo"
    decoded = [frame.to_ndarray() for packet in packets for frame in decoder.decode(av.Packet(packet))]
    if not decoded:
        raise RuntimeError("the Opus decoder produced no audio")
    audio = np.concatenate([np.asarray(block, dtype=np.float64).reshape(-1) for block in decoded])
    expected_rms = 8_000 / 32_768 / np.sqrt(2)
    rms = float(np.sqrt(np.mean(audio**2)))
    if not 0.5 * expected_rms < rms < 1.5 * expected_rms:
        raise RuntimeError(f"decoded level {rms:.3f} is far from the encoded {expected_rms:.3f}")
    average = sum(map(len, packets)) / len(packets)
    return (
        f"{len(packets)} packets encoded with libopus (avg {average:.0f} bytes) and decoded, "
        f"level {rms / expected_rms:.0%} of the input"
    )


_CHECKS = (
    _Check("AES-256-GCM round trip", _check_aes, "pip install --upgrade 'cryptography>=42'"),
    _Check("XChaCha20-Poly1305 round trip", _check_xchacha, "pip install --upgrade 'PyNaCl>=1.5'"),
    _Check("DAVE session", _check_davey, "pip install 'davey==0.1.7' (a wheel exists for CPython 3.11+)"),
    _Check(
        "Opus encode/decode through PyAV",
        _check_opus,
        "pip install 'av>=18,<19' (its wheels bundle FFmpeg and libopus)",
    ),
)
