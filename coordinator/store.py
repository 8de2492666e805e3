"""The coordinator's durable state: nodes, jobs, node decisions, rounds and models (SQLite)."""

from __future__ import annotations

import hashlib
import json
import secrets
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedtrain.protocol import fedtrain_pb2 as pb
from fedtrain.protocol.codec import decode_arrays, encode_arrays
from fedtrain.storage import open_db

_SCHEMA = """
CREATE TABLE IF NOT EXISTS nodes (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT UNIQUE NOT NULL,
    registered_at REAL NOT NULL,
    last_seen REAL NOT NULL,
    -- With mutual TLS a node is known by its certificate (NULL on a plaintext coordinator).
    fingerprint TEXT,
    cert_expires REAL,
    revoked_at REAL
);
CREATE UNIQUE INDEX IF NOT EXISTS nodes_fingerprint ON nodes(fingerprint);
-- One-time join tokens (stored hashed); each enrolls one named node's certificate.
CREATE TABLE IF NOT EXISTS join_tokens (
    token_sha256 TEXT PRIMARY KEY,
    node_name TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    used_at REAL
);
-- Certificates refused for good, whatever node they belonged to.
CREATE TABLE IF NOT EXISTS revoked_certs (
    fingerprint TEXT PRIMARY KEY,
    node_name TEXT NOT NULL,
    revoked_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    spec_json TEXT NOT NULL,
    state TEXT NOT NULL,
    error TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS job_nodes (
    job_id TEXT NOT NULL REFERENCES jobs(id),
    node_id INTEGER NOT NULL REFERENCES nodes(id),
    decision TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (job_id, node_id)
);
CREATE TABLE IF NOT EXISTS rounds (
    job_id TEXT NOT NULL REFERENCES jobs(id),
    round INTEGER NOT NULL,
    metrics_json TEXT NOT NULL,
    wall_seconds REAL NOT NULL,
    skipped TEXT NOT NULL DEFAULT '',  -- why the round left the global model unchanged
    PRIMARY KEY (job_id, round)
);
CREATE TABLE IF NOT EXISTS node_rounds (
    job_id TEXT NOT NULL REFERENCES jobs(id),
    round INTEGER NOT NULL,
    node_id INTEGER NOT NULL REFERENCES nodes(id),
    metrics_json TEXT NOT NULL,
    refusal TEXT NOT NULL DEFAULT '',
    bytes_received INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (job_id, round, node_id)
);
-- The global model (all trainable tensors: a whole tabular model, or an adapter)
-- after every round, round 0 being the starting point, and the strategy's own state
-- (e.g. FedAdam's moments) that a restarted coordinator resumes with.
CREATE TABLE IF NOT EXISTS checkpoints (
    job_id TEXT NOT NULL REFERENCES jobs(id),
    round INTEGER NOT NULL,
    tensors BLOB NOT NULL,
    strategy_state BLOB,
    PRIMARY KEY (job_id, round)
);
"""
# Columns added since the first release (see open_db).
_ADDED_COLUMNS = (
    ("nodes", "fingerprint", "TEXT"),
    ("nodes", "cert_expires", "REAL"),
    ("nodes", "revoked_at", "REAL"),
    ("rounds", "skipped", "TEXT NOT NULL DEFAULT ''"),
    ("checkpoints", "strategy_state", "BLOB"),
)


class EnrollmentError(Exception):
    """A node's certificate cannot be enrolled or used; the message says why."""


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


@dataclass(frozen=True)
class JobRow:
    id: str
    name: str
    spec_json: str
    state: str
    error: str


class Store:
    def __init__(self, path: str | Path):
        self._db = open_db(path, _SCHEMA, _ADDED_COLUMNS)
        # One connection shared by gRPC worker threads and job runners.
        self._lock = threading.RLock()

    def _exec(self, sql: str, args: tuple = ()) -> sqlite3.Cursor:
        with self._lock:
            return self._db.execute(sql, args)

    def _all(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def close(self) -> None:
        self._db.close()

    # --- nodes ----------------------------------------------------------------
    def register_node(self, name: str, fingerprint: str | None = None) -> int:
        """The id of the node ``name`` (created on first contact); with ``fingerprint``, the node
        that certificate was enrolled as."""
        now = time.time()
        with self._lock:
            if fingerprint is None:
                self._exec(
                    "INSERT INTO nodes (name, registered_at, last_seen) VALUES (?, ?, ?)"
                    " ON CONFLICT(name) DO UPDATE SET last_seen = excluded.last_seen",
                    (name, now, now),
                )
                (node_id,) = self._all("SELECT id FROM nodes WHERE name = ?", (name,))[0]
            else:
                node = self.node_by_fingerprint(fingerprint)
                if node is None:
                    raise EnrollmentError(f"certificate {fingerprint} is not enrolled")
                node_id = node.id
                self.touch_node(node_id)
            # A (re)started node has lost offers it never answered: offer them again.
            self._exec("DELETE FROM job_nodes WHERE node_id = ? AND decision = 'offered'", (node_id,))
        return node_id

    def create_token(self, name: str, ttl_seconds: float) -> str:
        """A one-time token that enrolls the certificate of node ``name``; only its hash is kept."""
        token = secrets.token_urlsafe(24)
        now = time.time()
        self._exec("INSERT INTO join_tokens (token_sha256, node_name, created_at, expires_at) VALUES (?, ?, ?, ?)",
                   (_token_hash(token), name, now, now + ttl_seconds))
        return token

    def enroll(self, token: str, name: str, fingerprint: str, cert_expires: float) -> int:
        """Spend ``token`` to bind the certificate ``fingerprint`` to node ``name``; a node enrolled
        before (e.g. with a renewed certificate) keeps its id and history."""
        now = time.time()
        with self._lock:
            rows = self._all("SELECT node_name, expires_at, used_at FROM join_tokens WHERE token_sha256 = ?",
                             (_token_hash(token),))
            if not rows:
                raise EnrollmentError("the join token is not one this coordinator issued")
            token_name, expires_at, used_at = rows[0]
            if used_at is not None:
                raise EnrollmentError(f"the join token for {token_name} was already used"
                                      f" {time.strftime('%Y-%m-%d %H:%M', time.gmtime(used_at))} UTC")
            if expires_at < now:
                raise EnrollmentError(f"the join token for {token_name} expired"
                                      f" {time.strftime('%Y-%m-%d %H:%M', time.gmtime(expires_at))} UTC")
            if token_name != name:
                raise EnrollmentError(f"the join token is for node {token_name!r}, the certificate for {name!r}")
            self._db.execute("BEGIN")
            try:
                self._db.execute("UPDATE join_tokens SET used_at = ? WHERE token_sha256 = ?", (now, _token_hash(token)))
                self._db.execute(
                    "INSERT INTO nodes (name, registered_at, last_seen, fingerprint, cert_expires)"
                    " VALUES (?, ?, ?, ?, ?) ON CONFLICT(name) DO UPDATE SET last_seen = excluded.last_seen,"
                    " fingerprint = excluded.fingerprint, cert_expires = excluded.cert_expires, revoked_at = NULL",
                    (name, now, now, fingerprint, cert_expires),
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return self.register_node(name, fingerprint)

    def revoke(self, name: str) -> NodeRow:
        """Refuse node ``name``'s certificate from now on; a new token and certificate re-enroll it."""
        now = time.time()
        with self._lock:
            node = self.node_by_name(name)
            if node is None:
                raise EnrollmentError(f"no node named {name!r}; `fedtrain coordinator nodes` lists them")
            if node.fingerprint is not None:
                self._exec("INSERT OR IGNORE INTO revoked_certs (fingerprint, node_name, revoked_at) VALUES (?, ?, ?)",
                           (node.fingerprint, name, now))
            self._exec("UPDATE nodes SET revoked_at = ? WHERE id = ?", (now, node.id))
            # Its unused tokens die with it.
            self._exec("UPDATE join_tokens SET used_at = ? WHERE node_name = ? AND used_at IS NULL", (now, name))
        return self.node_by_name(name)

    def revoked_at(self, fingerprint: str) -> float | None:
        rows = self._all("SELECT revoked_at FROM revoked_certs WHERE fingerprint = ?", (fingerprint,))
        return rows[0][0] if rows else None

    _NODE_COLUMNS = "id, name, registered_at, last_seen, fingerprint, cert_expires, revoked_at"

    def _node_where(self, clause: str, arg) -> NodeRow | None:
        rows = self._all(f"SELECT {self._NODE_COLUMNS} FROM nodes WHERE {clause}", (arg,))
        return NodeRow(*rows[0]) if rows else None

    def node(self, node_id: int) -> NodeRow | None:
        return self._node_where("id = ?", node_id)

    def node_by_name(self, name: str) -> NodeRow | None:
        return self._node_where("name = ?", name)

    def node_by_fingerprint(self, fingerprint: str) -> NodeRow | None:
        return self._node_where("fingerprint = ?", fingerprint)

    def nodes(self) -> list[NodeRow]:
        return [NodeRow(*r) for r in self._all(f"SELECT {self._NODE_COLUMNS} FROM nodes ORDER BY id")]

    def open_tokens(self) -> list[tuple[str, float]]:
        """(node name, expiry) of tokens not used yet and not expired."""
        return self._all("SELECT node_name, expires_at FROM join_tokens WHERE used_at IS NULL AND expires_at >= ?"
                         " ORDER BY created_at", (time.time(),))

    def touch_node(self, node_id: int) -> None:
        self._exec("UPDATE nodes SET last_seen = ? WHERE id = ?", (time.time(), node_id))

    # --- jobs ----------------------------------------------------------------
    def create_job(self, name: str, spec_json: str) -> str:
        job_id = uuid.uuid4().hex[:12]
        self._exec(
            "INSERT INTO jobs (id, name, spec_json, state, created_at) VALUES (?, ?, ?, 'waiting', ?)",
            (job_id, name, spec_json, time.time()),
        )
        return job_id

    def job(self, job_id: str) -> JobRow | None:
        rows = self._all("SELECT id, name, spec_json, state, error FROM jobs WHERE id = ?", (job_id,))
        return JobRow(*rows[0]) if rows else None

    def jobs(self) -> list[JobRow]:
        return [JobRow(*r) for r in self._all("SELECT id, name, spec_json, state, error FROM jobs ORDER BY created_at")]

    def set_job_state(self, job_id: str, state: str, error: str = "") -> None:
        self._exec("UPDATE jobs SET state = ?, error = ? WHERE id = ?", (state, error, job_id))

    def mark_running(self, job_id: str) -> None:
        """A waiting job has sent its first task; the error text (of skipped rounds) stays."""
        self._exec("UPDATE jobs SET state = 'running' WHERE id = ? AND state = 'waiting'", (job_id,))

    def active_jobs(self) -> list[JobRow]:
        """Jobs that were waiting or running when the coordinator last stopped."""
        return [JobRow(*r) for r in self._all("SELECT id, name, spec_json, state, error FROM jobs"
                                              " WHERE state IN ('waiting', 'running') ORDER BY created_at")]

    # --- offers and decisions ----------------------------------------------------
    def next_offer(self, node_id: int) -> JobRow | None:
        """An active job this node has not been offered yet; marks it offered."""
        with self._lock:
            rows = self._all(
                "SELECT id, name, spec_json, state, error FROM jobs WHERE state IN ('waiting', 'running')"
                " AND id NOT IN (SELECT job_id FROM job_nodes WHERE node_id = ?) ORDER BY created_at LIMIT 1",
                (node_id,),
            )
            if not rows:
                return None
            job = JobRow(*rows[0])
            self._exec("INSERT INTO job_nodes (job_id, node_id, decision) VALUES (?, ?, 'offered')", (job.id, node_id))
            return job

    def set_decision(self, job_id: str, node_id: int, decision: str, reason: str) -> None:
        self._exec(
            "INSERT INTO job_nodes (job_id, node_id, decision, reason) VALUES (?, ?, ?, ?)"
            " ON CONFLICT(job_id, node_id) DO UPDATE SET decision = excluded.decision, reason = excluded.reason",
            (job_id, node_id, decision, reason),
        )

    def decisions(self, job_id: str) -> list[tuple[int, str, str, str]]:
        """(node_id, node name, decision, reason) for every node offered the job."""
        return self._all(
            "SELECT n.id, n.name, jn.decision, jn.reason FROM job_nodes jn JOIN nodes n ON n.id = jn.node_id"
            " WHERE jn.job_id = ? ORDER BY n.id",
            (job_id,),
        )

    def accepted_nodes(self, job_id: str, seen_since: float) -> list[int]:
        return [
            r[0]
            for r in self._all(
                "SELECT n.id FROM job_nodes jn JOIN nodes n ON n.id = jn.node_id"
                " WHERE jn.job_id = ? AND jn.decision = 'accepted' AND n.last_seen >= ? AND n.revoked_at IS NULL"
                " ORDER BY n.id",
                (job_id, seen_since),
            )
        ]

    def undecided_nodes(self, job_id: str, seen_since: float) -> list[int]:
        """Connected nodes that have not answered the job's offer yet (a pending owner approval is an answer)."""
        return [
            r[0]
            for r in self._all(
                "SELECT n.id FROM nodes n LEFT JOIN job_nodes jn ON jn.node_id = n.id AND jn.job_id = ?"
                " WHERE n.last_seen >= ? AND n.revoked_at IS NULL AND (jn.decision IS NULL OR jn.decision = 'offered')"
                " ORDER BY n.id",
                (job_id, seen_since),
            )
        ]

    # --- rounds and models -------------------------------------------------------
    def record_node_round(
        self, job_id: str, round: int, node_id: int, metrics: dict, refusal: str, bytes_received: int
    ) -> None:
        """Add what a node sent in a round. A securely aggregated round takes several messages:
        bytes add up, and the metrics and refusal of the latest message that has them stay."""
        self._exec(
            "INSERT INTO node_rounds (job_id, round, node_id, metrics_json, refusal, bytes_received)"
            " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (job_id, round, node_id) DO UPDATE SET"
            " metrics_json = CASE WHEN excluded.metrics_json = '{}' THEN metrics_json ELSE excluded.metrics_json END,"
            " refusal = CASE WHEN excluded.refusal = '' THEN refusal ELSE excluded.refusal END,"
            " bytes_received = bytes_received + excluded.bytes_received",
            (job_id, round, node_id, json.dumps(metrics), refusal, bytes_received),
        )

    def node_rounds(self, job_id: str, round: int) -> list[tuple[int, str, dict, str, int]]:
        return [
            (nid, name, json.loads(m), refusal, nbytes)
            for nid, name, m, refusal, nbytes in self._all(
                "SELECT nr.node_id, n.name, nr.metrics_json, nr.refusal, nr.bytes_received FROM node_rounds nr"
                " JOIN nodes n ON n.id = nr.node_id WHERE nr.job_id = ? AND nr.round = ? ORDER BY nr.node_id",
                (job_id, round),
            )
        ]

    def finish_round(self, job_id: str, round: int, metrics: dict[str, float], wall_seconds: float,
                     arrays: dict[str, np.ndarray], strategy_state: dict[str, np.ndarray] | None = None,
                     skipped: str = "") -> None:
        """Checkpoint a round: its metrics, the global model after it and the strategy's state,
        in one transaction (a round is either wholly done or not at all)."""
        blob = _tensor_blob(arrays)
        state = _tensor_blob(strategy_state or {})
        with self._lock:
            self._db.execute("BEGIN")
            try:
                self._db.execute(
                    "INSERT OR REPLACE INTO rounds (job_id, round, metrics_json, wall_seconds, skipped)"
                    " VALUES (?, ?, ?, ?, ?)", (job_id, round, json.dumps(metrics), wall_seconds, skipped),
                )
                self._db.execute(
                    "INSERT OR REPLACE INTO checkpoints (job_id, round, tensors, strategy_state) VALUES (?, ?, ?, ?)",
                    (job_id, round, blob, state),
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def checkpoint(self, job_id: str) -> tuple[int, dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(round, global model, strategy state) of the job's latest checkpoint."""
        round, blob, state = self._all(
            "SELECT round, tensors, strategy_state FROM checkpoints WHERE job_id = ? ORDER BY round DESC LIMIT 1",
            (job_id,))[0]
        return round, _tensors(blob), _tensors(state) if state else {}

    def skipped_rounds(self, job_id: str) -> dict[int, str]:
        return dict(self._all("SELECT round, skipped FROM rounds WHERE job_id = ? AND skipped != ''", (job_id,)))

    def rounds(self, job_id: str) -> list[tuple[int, dict, float]]:
        return [
            (r, json.loads(m), w)
            for r, m, w in self._all(
                "SELECT round, metrics_json, wall_seconds FROM rounds WHERE job_id = ? ORDER BY round", (job_id,)
            )
        ]

    def model(self, job_id: str, round: int | None = None) -> tuple[int, dict[str, np.ndarray]] | None:
        """(round, tensors) of the global model after ``round``, or after the latest round."""
        if round is None:
            rows = self._all("SELECT round, tensors FROM checkpoints WHERE job_id = ? ORDER BY round DESC LIMIT 1",
                             (job_id,))
        else:
            rows = self._all("SELECT round, tensors FROM checkpoints WHERE job_id = ? AND round = ?", (job_id, round))
        if not rows:
            return None
        round, blob = rows[0]
        return round, _tensors(blob)


def _tensor_blob(arrays: dict[str, np.ndarray]) -> bytes:
    return pb.TensorSet(tensors=list(encode_arrays(arrays))).SerializeToString()


def _tensors(blob: bytes) -> dict[str, np.ndarray]:
    return decode_arrays(pb.TensorSet.FromString(blob).tensors)
