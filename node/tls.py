"""TLS for the listener: `wharf cert` (a self-signed certificate for test set-ups) and no credentials in clear."""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .config import Config, ConfigError

CERT_FILE = "domain.crt"
KEY_FILE = "domain.key"


def check_listener(config: Config) -> None:
    """Refuse plain HTTP with authentication on: passwords and tokens would cross the wire in clear."""
    if config.auth.mode is None or config.http.tls.certificate or config.http.insecure:
        return
    raise ConfigError(
        f"auth.{config.auth.mode}: authentication is on but http.tls.certificate is not set: credentials "
        "would be sent in clear. Configure TLS (http.tls.certificate and http.tls.key, or "
        "REGISTRY_HTTP_TLS_CERTIFICATE and REGISTRY_HTTP_TLS_KEY; `wharf cert HOST` makes a test certificate), "
        "or set http.insecure: true (REGISTRY_HTTP_INSECURE=true) when a TLS-terminating proxy is in front."
    )


def check_certificates(config: Config) -> None:
    """Load the listener's certificate, key and client CAs once, so a bad file stops start-up with one
    line rather than every worker with a traceback."""
    tls = config.http.tls
    if not tls.certificate:
        return
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    for key, path in (("http.tls.certificate", tls.certificate), ("http.tls.key", tls.key)):
        if not os.path.isfile(path):
            raise ConfigError(f"{key}: expected a PEM file, got {path!r}, which does not exist")
    try:
        context.load_cert_chain(tls.certificate, tls.key)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            f"http.tls.certificate, http.tls.key: expected a PEM certificate and its private key, got "
            f"{tls.certificate!r} and {tls.key!r} ({getattr(exc, 'reason', None) or exc.strerror or exc})"
        ) from None
    for path in tls.clientcas:
        try:
            context.load_verify_locations(path)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(
                f"http.tls.clientcas: expected PEM CA certificates, got {path!r} "
                f"({getattr(exc, 'reason', None) or exc.strerror or exc})"
            ) from None


def _alternative_names(hosts: list[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host.strip("[]"))))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def make_certificate(hosts: list[str], *, days: int = 365, key_type: str = "ec") -> tuple[bytes, bytes]:
    """(certificate PEM, private key PEM): self-signed for `hosts`, usable as its own CA.

    What the registry guide's `openssl req -x509 ... -addext subjectAltName=DNS:HOST` makes: clients
    trust it by having the certificate itself as a CA (skopeo's and docker's `ca.crt`).
    """
    if not hosts:
        raise ValueError("at least one host name or address is required")
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
    if key_type == "ec":
        key = ec.generate_private_key(ec.SECP256R1())
    elif key_type == "rsa":
        key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    else:
        raise ValueError("key type must be ec or rsa")
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0][:64])])
    now = datetime.datetime.now(datetime.UTC)
    public_key = key.public_key()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(_alternative_names(hosts)), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=key_type == "rsa",
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return certificate.public_bytes(serialization.Encoding.PEM), key_pem


def write_certificate(
    directory: str | Path, hosts: list[str], *, days: int = 365, key_type: str = "ec", force: bool = False
) -> tuple[Path, Path]:
    """Write domain.crt and domain.key (mode 0600) into `directory`; refuse to overwrite unless `force`."""
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = folder / CERT_FILE, folder / KEY_FILE
    if not force:
        for path in (cert_path, key_path):
            if path.exists():
                raise FileExistsError(f"{path} exists (use --force to replace it)")
    cert_pem, key_pem = make_certificate(hosts, days=days, key_type=key_type)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(key_pem)
    os.chmod(key_path, 0o600)
    cert_path.write_bytes(cert_pem)
    return cert_path, key_path
