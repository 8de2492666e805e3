"""Who a node's SecAgg+ peers are: key advertisements signed with enrolled node certificates.

A coordinator free to make up a node's peers would be handed the shares of that node's
self-mask seed and mask key, and so its update in the clear. Each node therefore signs its
public keys, together with the job, the round and its node id, with the key of its consortium
node certificate, and the coordinator relays the certificate with the advertisement. Before
it sends a single share, a node checks every peer's advertisement: the certificate chains to
the consortium CA (the one the node trusts the coordinator by), is valid now, is a node
certificate, is not its own and no other peer's, and its key signed exactly this job, round,
node id and keys. A made-up peer then needs a node certificate from the CA and its private
key: whoever holds the CA key can mint one, nobody else can.

Primitives: ECDSA P-256 with SHA-256 and X.509 path validation, both from ``cryptography``.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.verification import Criticality, ExtensionPolicy, PolicyBuilder, Store, VerificationError

from fedtrain.errors import SecAggError
from fedtrain.protocol import fedtrain_pb2 as pb
from fedtrain.protocol.tls import Identity, fingerprint, role_and_name

_LABEL = b"fedtrain-secagg/v1/public-keys"
_ECDSA = ec.ECDSA(hashes.SHA256())


def signed_bytes(job_id: str, round: int, keys: pb.PublicKeys) -> bytes:
    """What an advertisement's signature covers. Each field is length-prefixed, so that no
    two different advertisements read as the same bytes."""
    fields = (_LABEL, job_id.encode(), round.to_bytes(8, "big"), keys.node_id.to_bytes(8, "big"),
              keys.encryption_key, keys.mask_key, keys.seed_commitment)
    return b"".join(len(f).to_bytes(4, "big") + f for f in fields)


def load_certificate(keys: pb.PublicKeys) -> x509.Certificate | None:
    try:
        return x509.load_der_x509_certificate(keys.certificate)
    except ValueError:
        return None


def signed_by(cert: x509.Certificate, job_id: str, round: int, keys: pb.PublicKeys) -> bool:
    """Whether ``cert``'s key signed ``keys`` for this job and round."""
    public = cert.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey):  # the consortium issues ECDSA keys only
        return False
    try:
        public.verify(keys.signature, signed_bytes(job_id, round, keys), _ECDSA)
    except InvalidSignature:
        return False
    return True


class PeerAuth:
    """A node's side of authenticating SecAgg+ peers, from its TLS identity."""

    def __init__(self, identity: Identity):
        if identity.role != "node":
            raise SecAggError(f"secure aggregation needs a node certificate, not a {identity.role} one")
        self._key = serialization.load_pem_private_key(identity.key_pem, password=None)
        self._der = x509.load_pem_x509_certificate(identity.cert_pem).public_bytes(serialization.Encoding.DER)
        self.fingerprint = identity.fingerprint
        self.name = identity.name
        self._ca = Store(x509.load_pem_x509_certificates(identity.ca_pem))
        # Node certificates name no host: a subjectAltName is allowed, not required.
        self._leaf_policy = ExtensionPolicy.webpki_defaults_ee().may_be_present(
            x509.SubjectAlternativeName, Criticality.AGNOSTIC, None)

    def sign(self, job_id: str, round: int, keys: pb.PublicKeys) -> pb.PublicKeys:
        """``keys`` with this node's certificate and its signature for ``job_id`` and ``round``."""
        keys.certificate = self._der
        keys.signature = self._key.sign(signed_bytes(job_id, round, keys), _ECDSA)
        return keys

    def verify(self, job_id: str, round: int, keys: pb.PublicKeys) -> tuple[str, str]:
        """(fingerprint, name) of the consortium node that advertised ``keys`` for this job and
        round; SecAggError when it is not one, or is this node."""
        who = f"the keys advertised for node {keys.node_id}"
        cert = load_certificate(keys)
        if cert is None:
            raise SecAggError(f"{who} come without a certificate")
        # Built per check: path validation is against the time of the check.
        verifier = (PolicyBuilder().store(self._ca)
                    .extension_policies(ca_policy=ExtensionPolicy.webpki_defaults_ca(), ee_policy=self._leaf_policy)
                    .build_client_verifier())
        try:
            verifier.verify(cert, [])
        except VerificationError as err:
            raise SecAggError(f"{who} come with a certificate the consortium CA does not vouch for: {err}") from None
        role, name = role_and_name(cert)
        if role != "node":
            raise SecAggError(f"{who} come with a {role or 'role-less'} certificate ({name}), not a node's")
        if fingerprint(cert) == self.fingerprint or name == self.name:
            raise SecAggError(f"{who} come with this node's own certificate or name ({name})")
        if not signed_by(cert, job_id, round, keys):
            raise SecAggError(f"{who} are not signed by {name}'s certificate for job {job_id} round {round}")
        return fingerprint(cert), name
