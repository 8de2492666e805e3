"""The coordinator's SQLite file: its schema, and the one connection that the node registry
(``coordinator.registry``) and the job store (``coordinator.job_store``) share."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

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
    created_at REAL NOT NULL,
    -- From created_at until the first task went out: the wait for nodes (and owners) to accept.
    approval_wait_seconds REAL NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS job_nodes (
    job_id TEXT NOT NULL REFERENCES jobs(id),
    node_id INTEGER NOT NULL REFERENCES nodes(id),
    decision TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    told_ended INTEGER NOT NULL DEFAULT 0,  -- the node has been told that the job ended
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
    ("jobs", "approval_wait_seconds", "REAL NOT NULL DEFAULT 0"),
    ("job_nodes", "told_ended", "INTEGER NOT NULL DEFAULT 0"),
)


class Database:
    """``coordinator.db``: one autocommit connection, shared by the gRPC worker threads and the
    job runners under one lock."""

    def __init__(self, path: str | Path):
        self._db = open_db(path, _SCHEMA, _ADDED_COLUMNS)
        self.lock = threading.RLock()

    def execute(self, sql: str, args: tuple = ()) -> sqlite3.Cursor:
        with self.lock:
            return self._db.execute(sql, args)

    def rows(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self.lock:
            return self._db.execute(sql, args).fetchall()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """The connection, for statements that are committed together or not at all."""
        with self.lock:
            self._db.execute("BEGIN")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def close(self) -> None:
        self._db.close()
