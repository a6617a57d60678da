"""Throwaway TLS for the emulator: a private CA and a server certificate for the bound address.

discord.py always dials ``wss://`` for voice, so a voice server it can reach must speak TLS, and the client
must trust the certificate. :class:`TlsMaterial` makes a fresh CA and a leaf certificate (EC P-256, IP and DNS
subject alternative names), writes them to a private temporary directory, and hands out server and client
``ssl.SSLContext`` objects. ``ca_file`` is the PEM to give to clients that want a path (``SSL_CERT_FILE``,
``aiohttp.TCPConnector(ssl=ssl.create_default_context(cafile=...))``).
"""

from __future__ import annotations

import datetime
import ipaddress
import shutil
import ssl
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cordvoice.errors import EmulatorError

__all__ = ["TlsMaterial"]

_VALIDITY = datetime.timedelta(days=2)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "cordvoice emulator"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _alt_names(hosts: tuple[str, ...]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = [
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    ]
    for host in hosts:
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            general: x509.GeneralName = x509.DNSName(host)
        else:
            general = x509.IPAddress(address)
        if general not in names:
            names.append(general)
    return names


class TlsMaterial:
    """A CA and a server certificate for ``hosts`` (plus localhost and 127.0.0.1), on disk until closed."""

    def __init__(self, hosts: tuple[str, ...] = ("127.0.0.1",)) -> None:
        now = datetime.datetime.now(datetime.UTC)
        not_before = now - datetime.timedelta(minutes=5)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = _name("cordvoice emulator CA")
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(now + _VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        server_key = ec.generate_private_key(ec.SECP256R1())
        server_cert = (
            x509.CertificateBuilder()
            .subject_name(_name(hosts[0] if hosts else "127.0.0.1"))
            .issuer_name(ca_name)
            .public_key(server_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(now + _VALIDITY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(_alt_names(hosts)), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
            )
            .sign(ca_key, hashes.SHA256())
        )
        self._directory: Path | None = Path(tempfile.mkdtemp(prefix="cordvoice-emulator-tls-"))
        self.ca_file = self._directory / "ca.pem"
        self.cert_file = self._directory / "server.pem"
        self._key_file = self._directory / "server.key"
        self.ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
        self.cert_file.write_bytes(
            server_cert.public_bytes(serialization.Encoding.PEM)
            + ca_cert.public_bytes(serialization.Encoding.PEM)
        )
        self._key_file.touch(mode=0o600)
        self._key_file.write_bytes(
            server_key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        self.server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.server_context.minimum_version = ssl.TLSVersion.TLSv1_2
        self.server_context.load_cert_chain(self.cert_file, self._key_file)

    def client_context(self) -> ssl.SSLContext:
        """A verifying client context that trusts only the emulator's CA (hostname checks stay on)."""
        if self._directory is None:
            raise EmulatorError("the emulator's TLS material was already removed")
        return ssl.create_default_context(cafile=str(self.ca_file))

    def close(self) -> None:
        """Delete the files (the contexts already loaded keep working)."""
        if self._directory is not None:
            shutil.rmtree(self._directory, ignore_errors=True)
            self._directory = None
