"""The primitives secure aggregation is built from; none is implemented here.

- key agreement: X25519, then HKDF-SHA256 whose info binds the job, the round, the
  purpose and the pair of nodes, so no key is ever reused across rounds or roles;
- share encryption: ChaCha20-Poly1305, with the same binding as associated data,
  so a share replayed from another round or redirected to another node fails;
- masks: the AES-256-CTR keystream of a 32-byte seed, read as uint32 field elements;
- secret sharing: Shamir over GF(2^128) (PyCryptodome, through Flower's helpers).
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares

from fedtrain.errors import SecAggError

KEY_BYTES = 32
SEED_BYTES = 32
_NONCE_BYTES = 12


def new_private_key() -> X25519PrivateKey:
    return X25519PrivateKey.generate()


def public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes_raw()


def private_bytes(key: X25519PrivateKey) -> bytes:
    return key.private_bytes_raw()


def private_from_bytes(raw: bytes) -> X25519PrivateKey:
    try:
        return X25519PrivateKey.from_private_bytes(raw)
    except ValueError:
        raise SecAggError(f"a reconstructed private key has {len(raw)} bytes, not {KEY_BYTES}") from None


def context(purpose: str, job_id: str, round: int, a: int, b: int) -> bytes:
    """What a derived key or a ciphertext is bound to. ``a``, ``b`` are node ids (ordered for a
    shared key, sender then receiver for a ciphertext)."""
    return f"fedtrain-secagg/v1/{purpose}/{job_id}/{round}/{a}/{b}".encode()


def agree(private: X25519PrivateKey, peer_public: bytes, info: bytes) -> bytes:
    """A 32-byte key shared with the owner of ``peer_public``."""
    try:
        secret = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as err:  # wrong length, or a low-order point giving an all-zero secret
        raise SecAggError(f"unusable public key: {err}") from None
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(secret)


def seal(key: bytes, plaintext: bytes, associated: bytes) -> bytes:
    nonce = os.urandom(_NONCE_BYTES)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, associated)


def unseal(key: bytes, sealed: bytes, associated: bytes) -> bytes | None:
    """The plaintext, or None when ``sealed`` was not made with this key for this binding."""
    try:
        return ChaCha20Poly1305(key).decrypt(sealed[:_NONCE_BYTES], sealed[_NONCE_BYTES:], associated)
    except (InvalidTag, ValueError):
        return None


def mask(seed: bytes, length: int) -> np.ndarray:
    """``length`` pseudo-random uint32 field elements expanded from ``seed``."""
    # Each seed expands exactly one mask, so the all-zero counter block is never reused.
    keystream = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor().update(bytes(4 * length))
    return np.frombuffer(keystream, dtype="<u4").astype(np.uint32)


def new_seed() -> bytes:
    return os.urandom(SEED_BYTES)


def commitment(seed: bytes) -> bytes:
    return hashlib.sha256(seed).digest()


def split(secret: bytes, threshold: int, holders: int) -> list[bytes]:
    """Shamir shares of ``secret``, any ``threshold`` of which reconstruct it."""
    return create_shares(secret, threshold, holders)


def combine(shares: list[bytes]) -> bytes:
    if len({s[:4] for s in shares}) != len(shares):
        raise SecAggError("two shares of one secret carry the same index")
    try:
        return combine_shares(shares)
    except ValueError as err:
        raise SecAggError(f"shares do not combine: {err}") from None
