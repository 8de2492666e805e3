"""Who may call the coordinator, and how often: the caller's certificate and role, revoked
certificates, known node ids, and the per-caller limits (``coordinator.limits``).

Each check raises the typed error (``fedtrain.errors``) that the servicers answer with.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

import grpc
from cryptography import x509

from fedtrain.errors import PermissionDenied, RateLimited, UnknownNode
from fedtrain.protocol.tls import Identity, fingerprint, peer_certificate, role_and_name
from coordinator.limits import ConcurrencyLimit, RateLimiter
from coordinator.registry import NodeRow, Registry

log = logging.getLogger("fedtrain.coordinator")

# Node RPCs per second per node (and per peer address for unregistered callers), and burst.
RATE_PER_SECOND = 50.0
RATE_BURST = 200
# Open long polls per node: an agent keeps one, and one more covers its restart.
MAX_POLLS_PER_NODE = 2


def _peer_address(context: grpc.ServicerContext) -> str:
    return context.peer().rsplit(":", 1)[0]


class Auth:
    def __init__(self, identity: Identity | None, registry: Registry):
        """``identity``: the coordinator's own, when it speaks mutual TLS (None: plaintext)."""
        self.identity = identity
        self.registry = registry
        # Per node id for registered nodes, per peer address for the others.
        self.limits = RateLimiter(per_second=RATE_PER_SECOND, burst=RATE_BURST)
        self.polls = ConcurrencyLimit(MAX_POLLS_PER_NODE)

    def _limit(self, key, who: str) -> None:
        if not self.limits.allow(key):
            log.warning("rate limit: %s exceeds %g requests/s", who, RATE_PER_SECOND)
            raise RateLimited(f"{who} sends more than {RATE_PER_SECOND:g} requests per second; slow down and retry")

    def limit_peer(self, context: grpc.ServicerContext) -> None:
        """A caller that is no known node is limited by its address."""
        self._limit(_peer_address(context), f"peer {context.peer()}")

    def certificate(self, context: grpc.ServicerContext, role: str) -> x509.Certificate | None:
        """The caller's verified certificate, which must be an unrevoked ``role`` certificate
        (None on a plaintext coordinator)."""
        if self.identity is None:
            return None
        cert = peer_certificate(context)
        cert_role, name = role_and_name(cert)
        if cert_role != role:
            raise PermissionDenied(f"a {cert_role or 'role-less'} certificate ({name}) may not call the {role}s' service")
        revoked = self.registry.revoked_at(fingerprint(cert))
        if revoked is not None:
            raise PermissionDenied(f"certificate of {name} ({fingerprint(cert)[:23]}…) was revoked"
                                   f" {time.strftime('%Y-%m-%d %H:%M', time.gmtime(revoked))} UTC")
        return cert

    def node(self, context: grpc.ServicerContext, node_id: int) -> NodeRow:
        """The calling node ``node_id``: known, calling with its own unrevoked certificate, and within its rate."""
        # Ids are SQLite integers; a larger uint64 from the wire names no node.
        node = self.registry.node(node_id) if node_id < 2**63 else None
        if node is None:
            self.limit_peer(context)
            raise UnknownNode(f"unknown node id {node_id}: call Register first")
        cert = self.certificate(context, "node")
        if cert is not None and fingerprint(cert) != node.fingerprint:
            raise PermissionDenied(f"node id {node_id} is {node.name}, enrolled with another certificate than"
                                   f" {role_and_name(cert)[1]}'s; call Register")
        if node.revoked_at is not None:
            raise PermissionDenied(f"node {node.name} was revoked")
        self._limit(node_id, f"node {node_id} ({node.name})")
        return node

    @contextmanager
    def poll_slot(self, node_id: int) -> Iterator[None]:
        """One of the node's ``MAX_POLLS_PER_NODE`` open long polls, for the duration of the block."""
        if not self.polls.acquire(node_id):
            raise RateLimited(f"node {node_id} already has {MAX_POLLS_PER_NODE} polls open;"
                              " poll again when one has returned")
        try:
            yield
        finally:
            self.polls.release(node_id)
