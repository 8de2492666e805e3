"""The consortium's public-key infrastructure: a CA, certificates for the coordinator,
nodes and operators, and the gRPC credentials of mutual TLS.

Every primitive is the `cryptography` package's (ECDSA P-256, SHA-256, X.509); gRPC's
TLS stack checks the chain and the validity period at the handshake. A certificate
carries its holder's role (coordinator, node or operator) in its organizational unit,
so that the coordinator can tell a node from an operator; a node is then known by the
SHA-256 fingerprint of its certificate.

Every party keeps one directory: ``ca.pem`` (the consortium CA), ``cert.pem`` and
``key.pem`` (its own). The CA's key stays in the CA directory.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedtrain.errors import TLSError
from fedtrain.storage import write_private

ROLES = ("coordinator", "node", "operator")
CA_CERT, CA_KEY = "ca.pem", "ca.key"
CERT, KEY = "cert.pem", "key.pem"
# The names a coordinator certificate answers to unless others are given: the demo's.
DEFAULT_HOSTS = ("localhost", "127.0.0.1")


@dataclass(frozen=True)
class Identity:
    """One party's TLS material, checked: its certificate is valid now and issued by the CA."""

    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes
    role: str
    name: str
    fingerprint: str
    not_after: dt.datetime

    def server_credentials(self) -> grpc.ServerCredentials:
        """Mutual TLS: a client without a certificate from the CA fails the handshake."""
        return grpc.ssl_server_credentials([(self.key_pem, self.cert_pem)], root_certificates=self.ca_pem,
                                           require_client_auth=True)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(self.ca_pem, self.key_pem, self.cert_pem)


def fingerprint(cert: x509.Certificate) -> str:
    return "sha256:" + cert.fingerprint(hashes.SHA256()).hex()


def role_and_name(cert: x509.Certificate) -> tuple[str, str]:
    def one(oid) -> str:
        attrs = cert.subject.get_attributes_for_oid(oid)
        return str(attrs[0].value) if attrs else ""

    return one(NameOID.ORGANIZATIONAL_UNIT_NAME), one(NameOID.COMMON_NAME)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def init_ca(ca_dir: Path, name: str = "fedtrain consortium CA", days: int = 3650) -> Path:
    """Create a CA in ``ca_dir``; refuses to overwrite one (every issued certificate hangs on it)."""
    ca_dir.mkdir(parents=True, exist_ok=True)
    if (ca_dir / CA_KEY).exists():
        raise TLSError(f"{ca_dir} already holds a CA; certificates issued by it would stop working"
                       " if it were replaced. Choose another --ca-dir")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _now()
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    write_private(ca_dir / CA_KEY, _key_pem(key))
    (ca_dir / CA_CERT).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return ca_dir / CA_CERT


def issue(ca_dir: Path, role: str, name: str, out_dir: Path, *, days: int = 365,
          hosts: tuple[str, ...] = DEFAULT_HOSTS, not_before: dt.datetime | None = None,
          force: bool = False) -> Identity:
    """Issue a certificate for ``name`` in ``role``, writing ca.pem, cert.pem and key.pem to ``out_dir``.

    A coordinator certificate names the ``hosts`` nodes dial (DNS names or IP addresses).
    An existing certificate or key there is replaced only with ``force``.
    """
    if role not in ROLES:
        raise TLSError(f"role {role!r} is not one of {', '.join(ROLES)}")
    if not (0 < len(name) <= 128 and name.replace("-", "").replace("_", "").replace(".", "").isalnum()):
        raise TLSError(f"name {name!r} must be 1-128 of [A-Za-z0-9_.-]")
    existing = [str(out_dir / f) for f in (CERT, KEY) if (out_dir / f).exists()]
    if existing and not force:
        # They may be a running party's identity: replacing them would lock it out.
        raise TLSError(f"{' and '.join(existing)} already exist; whoever uses them would be locked out until"
                       " given the new ones. Choose another --out, or pass --force to replace them")
    try:
        ca_key = serialization.load_pem_private_key((ca_dir / CA_KEY).read_bytes(), password=None)
        ca_cert = x509.load_pem_x509_certificate((ca_dir / CA_CERT).read_bytes())
    except FileNotFoundError:
        raise TLSError(f"{ca_dir} holds no CA; create one with `fedtrain certs init --ca-dir {ca_dir}`") from None
    key = ec.generate_private_key(ec.SECP256R1())
    start = not_before or _now() - dt.timedelta(minutes=5)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if role == "coordinator" else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
                                 x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()), critical=False)
    )
    if role == "coordinator":
        names = []
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / CA_CERT).write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    write_private(out_dir / KEY, _key_pem(key))
    (out_dir / CERT).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return load_identity(out_dir, role, check_time=False)


def load_identity(tls_dir: Path, role: str, *, check_time: bool = True) -> Identity:
    """Read a party's TLS directory and check it before any connection is tried."""
    try:
        ca_pem, cert_pem, key_pem = ((tls_dir / f).read_bytes() for f in (CA_CERT, CERT, KEY))
    except FileNotFoundError as err:
        raise TLSError(f"{err.filename} is missing: a TLS directory holds {CA_CERT}, {CERT} and {KEY}"
                       " (`fedtrain certs issue` writes them), or run with --insecure") from None
    try:
        ca = x509.load_pem_x509_certificate(ca_pem)
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
    except ValueError as err:
        raise TLSError(f"{tls_dir} holds an unreadable PEM file: {err}") from None
    if key.public_key() != cert.public_key():
        raise TLSError(f"{tls_dir / KEY} is not the key of {tls_dir / CERT}")
    try:
        cert.verify_directly_issued_by(ca)
    except (InvalidSignature, ValueError, TypeError):
        raise TLSError(f"{tls_dir / CERT} was not issued by the CA in {tls_dir / CA_CERT}") from None
    cert_role, name = role_and_name(cert)
    if cert_role != role:
        raise TLSError(f"{tls_dir / CERT} is a {cert_role or 'role-less'} certificate; this needs a {role}"
                       f" certificate (`fedtrain certs issue --{role} ...`)")
    if check_time:
        now = _now()
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise TLSError(f"{tls_dir / CERT} ({name}) is valid from {cert.not_valid_before_utc:%Y-%m-%d %H:%M}"
                           f" to {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC, not now;"
                           " ask the consortium for a new one")
    return Identity(ca_pem, cert_pem, key_pem, role, name, fingerprint(cert), cert.not_valid_after_utc)


def peer_certificate(context: grpc.ServicerContext) -> x509.Certificate | None:
    """The client certificate a TLS handshake verified, or None on a plaintext connection."""
    pem = context.auth_context().get("x509_pem_cert")
    return x509.load_pem_x509_certificate(pem[0]) if pem else None


def channel(address: str, identity: Identity | None, options: list) -> grpc.Channel:
    """A channel to the coordinator: mutual TLS with ``identity``, plaintext without."""
    if identity is None:
        return grpc.insecure_channel(address, options=options)
    return grpc.secure_channel(address, identity.channel_credentials(), options=options)
