"""The consortium's nodes as the coordinator knows them: registration, join tokens,
certificate enrollment, revocation and liveness (tables ``nodes``, ``join_tokens`` and
``revoked_certs`` of ``coordinator.db``)."""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass

from fedtrain.errors import EnrollmentError
from coordinator.db import Database


@dataclass(frozen=True)
class NodeRow:
    id: int
    name: str
    registered_at: float
    last_seen: float
    fingerprint: str | None
    cert_expires: float | None
    revoked_at: float | None


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _utc(at: float) -> str:
    return time.strftime('%Y-%m-%d %H:%M', time.gmtime(at)) + " UTC"


class Registry:
    _NODE_COLUMNS = "id, name, registered_at, last_seen, fingerprint, cert_expires, revoked_at"

    def __init__(self, db: Database):
        self.db = db

    # --- registration and enrollment ----------------------------------------------
    def register_node(self, name: str, fingerprint: str | None = None) -> int:
        """The id of the node ``name`` (created on first contact); with ``fingerprint``, the node
        that certificate was enrolled as. (A (re)started node has lost the offers it never
        answered: ``JobStore.forget_unanswered_offers`` offers them again.)"""
        now = time.time()
        with self.db.lock:
            if fingerprint is None:
                self.db.execute(
                    "INSERT INTO nodes (name, registered_at, last_seen) VALUES (?, ?, ?)"
                    " ON CONFLICT(name) DO UPDATE SET last_seen = excluded.last_seen",
                    (name, now, now),
                )
                (node_id,) = self.db.rows("SELECT id FROM nodes WHERE name = ?", (name,))[0]
                return node_id
            node = self.node_by_fingerprint(fingerprint)
            if node is None:
                raise EnrollmentError(f"certificate {fingerprint} is not enrolled")
            self.touch_node(node.id)
            return node.id

    def create_token(self, name: str, ttl_seconds: float) -> str:
        """A one-time token that enrolls the certificate of node ``name``; only its hash is kept."""
        token = secrets.token_urlsafe(24)
        now = time.time()
        self.db.execute("INSERT INTO join_tokens (token_sha256, node_name, created_at, expires_at)"
                        " VALUES (?, ?, ?, ?)", (_token_hash(token), name, now, now + ttl_seconds))
        return token

    def enroll(self, token: str, name: str, fingerprint: str, cert_expires: float) -> int:
        """Spend ``token`` to bind the certificate ``fingerprint`` to node ``name``; a node enrolled
        before (e.g. with a renewed certificate) keeps its id and history."""
        now = time.time()
        with self.db.lock:
            rows = self.db.rows("SELECT node_name, expires_at, used_at FROM join_tokens WHERE token_sha256 = ?",
                                (_token_hash(token),))
            if not rows:
                raise EnrollmentError("the join token is not one this coordinator issued")
            token_name, expires_at, used_at = rows[0]
            if used_at is not None:
                raise EnrollmentError(f"the join token for {token_name} was already used {_utc(used_at)}")
            if expires_at < now:
                raise EnrollmentError(f"the join token for {token_name} expired {_utc(expires_at)}")
            if token_name != name:
                raise EnrollmentError(f"the join token is for node {token_name!r}, the certificate for {name!r}")
            with self.db.transaction() as db:
                db.execute("UPDATE join_tokens SET used_at = ? WHERE token_sha256 = ?", (now, _token_hash(token)))
                db.execute(
                    "INSERT INTO nodes (name, registered_at, last_seen, fingerprint, cert_expires)"
                    " VALUES (?, ?, ?, ?, ?) ON CONFLICT(name) DO UPDATE SET last_seen = excluded.last_seen,"
                    " fingerprint = excluded.fingerprint, cert_expires = excluded.cert_expires, revoked_at = NULL",
                    (name, now, now, fingerprint, cert_expires),
                )
            return self.register_node(name, fingerprint)

    def open_tokens(self) -> list[tuple[str, float]]:
        """(node name, expiry) of tokens not used yet and not expired."""
        return self.db.rows("SELECT node_name, expires_at FROM join_tokens WHERE used_at IS NULL AND expires_at >= ?"
                            " ORDER BY created_at", (time.time(),))

    # --- revocation -------------------------------------------------------------------
    def revoke(self, name: str) -> NodeRow:
        """Refuse node ``name``'s certificate from now on; a new token and certificate re-enroll it."""
        now = time.time()
        with self.db.lock:
            node = self.node_by_name(name)
            if node is None:
                raise EnrollmentError(f"no node named {name!r}; `fedtrain coordinator nodes` lists them")
            if node.fingerprint is not None:
                self.db.execute("INSERT OR IGNORE INTO revoked_certs (fingerprint, node_name, revoked_at)"
                                " VALUES (?, ?, ?)", (node.fingerprint, name, now))
            self.db.execute("UPDATE nodes SET revoked_at = ? WHERE id = ?", (now, node.id))
            # Its unused tokens die with it.
            self.db.execute("UPDATE join_tokens SET used_at = ? WHERE node_name = ? AND used_at IS NULL", (now, name))
            return self.node_by_name(name)

    def revoked_at(self, fingerprint: str) -> float | None:
        rows = self.db.rows("SELECT revoked_at FROM revoked_certs WHERE fingerprint = ?", (fingerprint,))
        return rows[0][0] if rows else None

    # --- lookups and liveness -----------------------------------------------------------
    def _node_where(self, clause: str, arg) -> NodeRow | None:
        rows = self.db.rows(f"SELECT {self._NODE_COLUMNS} FROM nodes WHERE {clause}", (arg,))
        return NodeRow(*rows[0]) if rows else None

    def node(self, node_id: int) -> NodeRow | None:
        return self._node_where("id = ?", node_id)

    def node_by_name(self, name: str) -> NodeRow | None:
        return self._node_where("name = ?", name)

    def node_by_fingerprint(self, fingerprint: str) -> NodeRow | None:
        return self._node_where("fingerprint = ?", fingerprint)

    def nodes(self) -> list[NodeRow]:
        return [NodeRow(*r) for r in self.db.rows(f"SELECT {self._NODE_COLUMNS} FROM nodes ORDER BY id")]

    def connected_count(self, seen_since: float) -> int:
        """Unrevoked nodes seen since ``seen_since`` (``grid.NODE_LIVENESS_SECONDS`` ago: connected)."""
        return self.db.rows("SELECT COUNT(*) FROM nodes WHERE last_seen >= ? AND revoked_at IS NULL",
                            (seen_since,))[0][0]

    def touch_node(self, node_id: int) -> None:
        """The node is connected now (``grid.NODE_LIVENESS_SECONDS``)."""
        self.db.execute("UPDATE nodes SET last_seen = ? WHERE id = ?", (time.time(), node_id))
