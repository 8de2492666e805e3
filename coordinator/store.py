"""The coordinator's durable state: nodes, jobs, node decisions, rounds and models (SQLite)."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedtrain.protocol import fedtrain_pb2 as pb
from fedtrain.protocol.codec import decode_arrays, encode_arrays

_SCHEMA = """
CREATE TABLE IF NOT EXISTS nodes (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT UNIQUE NOT NULL,
    registered_at REAL NOT NULL,
    last_seen REAL NOT NULL
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
-- after every round, round 0 being the starting point.
CREATE TABLE IF NOT EXISTS checkpoints (
    job_id TEXT NOT NULL REFERENCES jobs(id),
    round INTEGER NOT NULL,
    tensors BLOB NOT NULL,
    PRIMARY KEY (job_id, round)
);
"""

@dataclass(frozen=True)
class JobRow:
    id: str
    name: str
    spec_json: str
    state: str
    error: str


class Store:
    def __init__(self, path: str | Path):
        self._db = sqlite3.connect(Path(path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(_SCHEMA)
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

    # --- nodes ---------------------------------------------------------------
    def register_node(self, name: str) -> int:
        now = time.time()
        with self._lock:
            self._exec(
                "INSERT INTO nodes (name, registered_at, last_seen) VALUES (?, ?, ?)"
                " ON CONFLICT(name) DO UPDATE SET last_seen = excluded.last_seen",
                (name, now, now),
            )
            (node_id,) = self._all("SELECT id FROM nodes WHERE name = ?", (name,))[0]
            # A (re)started node has lost offers it never answered: offer them again.
            self._exec("DELETE FROM job_nodes WHERE node_id = ? AND decision = 'offered'", (node_id,))
        return node_id

    def node_name(self, node_id: int) -> str | None:
        rows = self._all("SELECT name FROM nodes WHERE id = ?", (node_id,))
        return rows[0][0] if rows else None

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

    def fail_interrupted_jobs(self) -> None:
        self._exec(
            "UPDATE jobs SET state = 'failed', error = 'the coordinator stopped while the job was active'"
            " WHERE state IN ('waiting', 'running')"
        )

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
                " WHERE jn.job_id = ? AND jn.decision = 'accepted' AND n.last_seen >= ? ORDER BY n.id",
                (job_id, seen_since),
            )
        ]

    def undecided_nodes(self, job_id: str, seen_since: float) -> list[int]:
        """Connected nodes that have not answered the job's offer yet (a pending owner approval is an answer)."""
        return [
            r[0]
            for r in self._all(
                "SELECT n.id FROM nodes n LEFT JOIN job_nodes jn ON jn.node_id = n.id AND jn.job_id = ?"
                " WHERE n.last_seen >= ? AND (jn.decision IS NULL OR jn.decision = 'offered') ORDER BY n.id",
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
                     arrays: dict[str, np.ndarray]) -> None:
        """Checkpoint a round: its metrics and the global model after it, in one transaction."""
        blob = pb.TensorSet(tensors=list(encode_arrays(arrays))).SerializeToString()
        with self._lock:
            self._db.execute("BEGIN")
            try:
                self._db.execute(
                    "INSERT OR REPLACE INTO rounds (job_id, round, metrics_json, wall_seconds) VALUES (?, ?, ?, ?)",
                    (job_id, round, json.dumps(metrics), wall_seconds),
                )
                self._db.execute(
                    "INSERT OR REPLACE INTO checkpoints (job_id, round, tensors) VALUES (?, ?, ?)",
                    (job_id, round, blob),
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

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
        return round, decode_arrays(pb.TensorSet.FromString(blob).tensors)
