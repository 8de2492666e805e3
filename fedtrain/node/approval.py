"""Owner approvals of job specs, signed with the node's Ed25519 key.

An approval is a signature over the job id and the sha256 of the canonical spec. The
node signs when the owner approves (or when its policy accepts a job within its
bounds) and checks the signature, and the spec a task is for, before every round: a
job book edited behind the agent's back, or a task for another spec than the one
approved, is refused before anything is trained or sent.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedtrain.spec import JobSpec


def load_or_create_key(path: Path) -> Ed25519PrivateKey:
    """The node's signing key (PEM, readable by its owner only), created on first use."""
    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{path} does not hold an Ed25519 private key")
        return key
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    return key


def _message(job_id: str, spec_sha256: str) -> bytes:
    return f"fedtrain-approval/v1/{job_id}/{spec_sha256}".encode()


def sign(key: Ed25519PrivateKey, job_id: str, spec_sha256: str) -> bytes:
    return key.sign(_message(job_id, spec_sha256))


def verify(public: Ed25519PublicKey, job_id: str, spec_sha256: str, signature: bytes) -> bool:
    try:
        public.verify(signature, _message(job_id, spec_sha256))
        return True
    except InvalidSignature:
        return False


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else k))
        return out
    return {prefix: value}


def spec_difference(approved: JobSpec, other: JobSpec) -> list[str]:
    """The fields where ``other`` differs from ``approved``, each as 'field: approved -> other'."""
    a = _flatten(json.loads(approved.canonical_json()))
    b = _flatten(json.loads(other.canonical_json()))
    return [f"{k}: {json.dumps(a.get(k))} approved, {json.dumps(b.get(k))} in the task"
            for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]
