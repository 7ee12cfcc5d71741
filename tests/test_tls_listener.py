"""Distribution's TLS keys on both servers: client CAs (mutual TLS), the minimum version, HTTP/2 off, drain time."""

from __future__ import annotations

import datetime
import socket
import ssl
from pathlib import Path

import httpx
import pytest
from services import wait_until
from wharf_process import WharfProcess

from node.config import load
from node.server import granian_options, hypercorn_config

SERVERS = ["granian", "hypercorn"]


def _name(common: str):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _certificate(directory: Path, name: str, *, issuer=None, ca: bool = False, server: bool = False):
    """Write NAME.crt and NAME.key: a CA, or a server or client certificate `issuer` (key, cert) signs."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID

    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    signer_key, signer_cert = issuer if issuer is not None else (key, None)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(signer_cert.subject if signer_cert is not None else _name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    elif not ca:
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    cert = builder.sign(signer_key, hashes.SHA256())
    (directory / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / f"{name}.key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return key, cert


@pytest.fixture
def pki(tmp_path):
    directory = tmp_path / "pki"
    directory.mkdir()
    ca = _certificate(directory, "ca", ca=True)
    _certificate(directory, "server", issuer=ca, server=True)
    _certificate(directory, "client", issuer=ca)
    _certificate(directory, "stranger")  # self-signed: no CA of the server's vouches for it
    return directory


def _context(pki: Path, client: str | None, *, maximum: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    if client:
        context.load_cert_chain(str(pki / f"{client}.crt"), str(pki / f"{client}.key"))
    if maximum is not None:
        context.maximum_version = maximum
    return context


def _get(url: str, context: ssl.SSLContext) -> httpx.Response:
    with httpx.Client(verify=context, http2=True, trust_env=False, timeout=5) as client:
        return client.get(url)


@pytest.mark.parametrize("server", SERVERS)
def test_client_cas_minimum_tls_and_http2_off_reach_the_server(tmp_path, pki, server):
    tls = {
        "certificate": str(pki / "server.crt"),
        "key": str(pki / "server.key"),
        "clientcas": [str(pki / "ca.crt")],
        "minimumtls": "tls1.3",
    }
    node = WharfProcess(
        tmp_path / "node", http={"server": server, "tls": tls, "http2": {"disabled": True}, "debug": {"addr": ""}}
    )
    url = f"https://127.0.0.1:{node.port}/v2/"

    def ready() -> bool:
        assert node.proc is not None and node.proc.poll() is None, node.log_tail()
        try:
            return _get(url, _context(pki, "client")).status_code == 200
        except (httpx.TransportError, ssl.SSLError):
            return False

    node._ready = ready  # type: ignore[method-assign]
    with node:
        response = _get(url, _context(pki, "client"))
        assert response.status_code == 200
        assert response.http_version == "HTTP/1.1"  # h2 offered, http2.disabled
        for refused in (
            _context(pki, None),
            _context(pki, "stranger"),
            _context(pki, "client", maximum=ssl.TLSVersion.TLSv1_2),
        ):
            with pytest.raises((httpx.TransportError, ssl.SSLError)):
                _get(url, refused)
        wait_until(ready, timeout=10, what="still serving")


def test_the_servers_get_distributions_settings(tmp_path):
    config_path = tmp_path / "config.yml"
    config_path.write_text(
        "http:\n  addr: 127.0.0.1:5555\n  draintimeout: 1m30s\n  http2: {disabled: true}\n"
        "  tls: {certificate: /c.pem, key: /k.pem, minimumtls: tls1.3}\n"
    )
    config = load(str(config_path), environ={})
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        options = granian_options(config, sock, "/ca.pem")
        hconfig = hypercorn_config(config, sock, "/ca.pem")
    assert options["workers_kill_timeout"] == 90
    assert (str(options["http"]), str(options["ssl_protocol_min"])) == ("1", "tls1.3")
    assert (options["ssl_ca"], options["ssl_client_verify"]) == (Path("/ca.pem"), True)
    assert options["log_dictconfig"]["incremental"] is True
    assert hconfig.graceful_timeout == 90
    assert hconfig.alpn_protocols == ["http/1.1"]
    assert (hconfig.minimum_tls, hconfig.ca_certs, hconfig.verify_mode) == (
        ssl.TLSVersion.TLSv1_3,
        "/ca.pem",
        ssl.CERT_REQUIRED,
    )
