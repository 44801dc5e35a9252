"""A development certificate authority: one CA, a server and a client certificate.

Built with the ``cryptography`` package (``pip install 'streampipe[secure]'``), not by
hand and not by shelling out to ``openssl``. Keys are ECDSA P-256. The CA's private key
is never written anywhere: once the two certificates are signed nobody, not even their
owner, can issue more under this CA, so a leaked working directory cannot be used to
mint new identities. Run ``init-secure`` again to start over.

>>> pki = DevPKI.create(["localhost", "127.0.0.1"])
>>> pki.server_cert_pem.startswith(b"-----BEGIN CERTIFICATE-----")
True
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["DevPKI", "MissingCryptography"]

INSTALL_HINT = (
    "creating certificates needs the 'cryptography' package: "
    "pip install 'streampipe[secure]' (or: pip install cryptography)"
)


class MissingCryptography(RuntimeError):
    """The optional ``cryptography`` dependency is not installed."""


@dataclass(frozen=True, slots=True)
class DevPKI:
    """PEM bytes of a development CA certificate and the certificates it signed."""

    ca_cert_pem: bytes
    server_cert_pem: bytes
    server_key_pem: bytes
    client_cert_pem: bytes
    client_key_pem: bytes

    @classmethod
    def create(
        cls,
        server_names: Sequence[str],
        *,
        client_name: str = "streampipe-client",
        days: int = 825,
        organisation: str = "streampipe development CA",
    ) -> DevPKI:
        """A fresh CA, a server certificate for ``server_names`` (host names or IP
        addresses, all in its subjectAltName) and a client certificate."""
        try:
            from cryptography import x509
            from cryptography.hazmat.primitives import hashes, serialization
            from cryptography.hazmat.primitives.asymmetric import ec
            from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
        except ImportError:
            raise MissingCryptography(INSTALL_HINT) from None
        if not server_names:
            raise ValueError("the server certificate needs at least one host name")
        if days < 1:
            raise ValueError(f"certificates must be valid for at least a day, not {days}")

        now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)  # tolerate clock skew
        until = now + dt.timedelta(days=days)

        def name(cn: str) -> x509.Name:
            return x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, organisation),
                    x509.NameAttribute(NameOID.COMMON_NAME, cn),
                ]
            )

        def pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
            return key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )

        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = name("streampipe development CA")
        ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(until + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
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
            .add_extension(ca_ski, critical=False)
            .sign(ca_key, hashes.SHA256())
        )

        def leaf(
            cn: str, usage: x509.ObjectIdentifier, sans: list[x509.GeneralName]
        ) -> tuple[bytes, bytes]:
            key = ec.generate_private_key(ec.SECP256R1())
            builder = (
                x509.CertificateBuilder()
                .subject_name(name(cn))
                .issuer_name(ca_name)
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now)
                .not_valid_after(until)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(
                    x509.KeyUsage(
                        digital_signature=True,
                        content_commitment=False,
                        key_encipherment=False,
                        data_encipherment=False,
                        key_agreement=True,
                        key_cert_sign=False,
                        crl_sign=False,
                        encipher_only=False,
                        decipher_only=False,
                    ),
                    critical=True,
                )
                .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                .add_extension(
                    x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
                )
                .add_extension(
                    x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                    critical=False,
                )
            )
            if sans:
                builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
            cert = builder.sign(ca_key, hashes.SHA256())
            return cert.public_bytes(serialization.Encoding.PEM), pem_key(key)

        sans: list[x509.GeneralName] = []
        for host in dict.fromkeys(server_names):
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                sans.append(x509.DNSName(host))
        server_cert, server_key = leaf(server_names[0], ExtendedKeyUsageOID.SERVER_AUTH, sans)
        client_cert, client_key = leaf(client_name, ExtendedKeyUsageOID.CLIENT_AUTH, [])
        return cls(
            ca_cert_pem=ca_cert.public_bytes(serialization.Encoding.PEM),
            server_cert_pem=server_cert,
            server_key_pem=server_key,
            client_cert_pem=client_cert,
            client_key_pem=client_key,
        )
