"""The coordinator's jobs: their specs and states, the nodes' decisions on them, their rounds
and what each node sent in them, and their checkpoints (tables ``jobs``, ``job_nodes``,
``rounds``, ``node_rounds`` and ``checkpoints`` of ``coordinator.db``)."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass

import numpy as np

from fedtrain.protocol import fedtrain_pb2 as pb
from fedtrain.protocol.codec import decode_arrays, encode_arrays
from coordinator.db import Database

_JOB_COLUMNS = "id, name, spec_json, state, error, approval_wait_seconds"
# A job waits for its nodes, runs, and ends finished, failed or cancelled (by an operator).
JOB_STATES = ("waiting", "running", "finished", "failed", "cancelled")


@dataclass(frozen=True)
class JobRow:
    id: str
    name: str
    spec_json: str
    state: str
    error: str
    approval_wait_seconds: float  # see JobStore.mark_running


class JobStore:
    def __init__(self, db: Database):
        self.db = db

    # --- jobs ----------------------------------------------------------------
    def create_job(self, name: str, spec_json: str) -> str:
        job_id = uuid.uuid4().hex[:12]
        self.db.execute(
            "INSERT INTO jobs (id, name, spec_json, state, created_at) VALUES (?, ?, ?, 'waiting', ?)",
            (job_id, name, spec_json, time.time()),
        )
        return job_id

    def job(self, job_id: str) -> JobRow | None:
        rows = self.db.rows(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,))
        return JobRow(*rows[0]) if rows else None

    def jobs(self) -> list[JobRow]:
        return [JobRow(*r) for r in self.db.rows(f"SELECT {_JOB_COLUMNS} FROM jobs ORDER BY created_at")]

    def count_by_state(self) -> dict[str, int]:
        return dict(self.db.rows("SELECT state, COUNT(*) FROM jobs GROUP BY state"))

    def set_job_state(self, job_id: str, state: str, error: str = "") -> None:
        self.db.execute("UPDATE jobs SET state = ?, error = ? WHERE id = ?", (state, error, job_id))

    def mark_running(self, job_id: str) -> None:
        """A waiting job has sent its first task; the error text (of skipped rounds) stays. The time
        since its submission is its wait for nodes to accept it (owners' approvals included)."""
        self.db.execute("UPDATE jobs SET state = 'running', approval_wait_seconds = ? - created_at"
                        " WHERE id = ? AND state = 'waiting'", (time.time(), job_id))

    def active_jobs(self) -> list[JobRow]:
        """Jobs that were waiting or running when the coordinator last stopped."""
        return [JobRow(*r) for r in self.db.rows(f"SELECT {_JOB_COLUMNS} FROM jobs"
                                                 " WHERE state IN ('waiting', 'running') ORDER BY created_at")]

    # --- offers and decisions ----------------------------------------------------
    def next_offer(self, node_id: int) -> JobRow | None:
        """An active job this node has not been offered yet; marks it offered."""
        with self.db.lock:
            rows = self.db.rows(
                f"SELECT {_JOB_COLUMNS} FROM jobs WHERE state IN ('waiting', 'running')"
                " AND id NOT IN (SELECT job_id FROM job_nodes WHERE node_id = ?) ORDER BY created_at LIMIT 1",
                (node_id,),
            )
            if not rows:
                return None
            job = JobRow(*rows[0])
            self.db.execute("INSERT INTO job_nodes (job_id, node_id, decision) VALUES (?, ?, 'offered')",
                            (job.id, node_id))
            return job

    def next_ended(self, node_id: int) -> JobRow | None:
        """An ended job this node was offered and has not been told about yet; marks it told."""
        with self.db.lock:
            rows = self.db.rows(
                f"SELECT {_JOB_COLUMNS} FROM jobs WHERE state IN ('finished', 'failed', 'cancelled') AND id IN"
                " (SELECT job_id FROM job_nodes WHERE node_id = ? AND told_ended = 0) ORDER BY created_at LIMIT 1",
                (node_id,),
            )
            if not rows:
                return None
            job = JobRow(*rows[0])
            self.db.execute("UPDATE job_nodes SET told_ended = 1 WHERE job_id = ? AND node_id = ?", (job.id, node_id))
            return job

    def forget_unanswered_offers(self, node_id: int) -> None:
        """A (re)started node has lost the offers it never answered: they are offered again."""
        self.db.execute("DELETE FROM job_nodes WHERE node_id = ? AND decision = 'offered'", (node_id,))

    def set_decision(self, job_id: str, node_id: int, decision: str, reason: str) -> None:
        self.db.execute(
            "INSERT INTO job_nodes (job_id, node_id, decision, reason) VALUES (?, ?, ?, ?)"
            " ON CONFLICT(job_id, node_id) DO UPDATE SET decision = excluded.decision, reason = excluded.reason",
            (job_id, node_id, decision, reason),
        )

    def decisions(self, job_id: str) -> list[tuple[int, str, str, str]]:
        """(node_id, node name, decision, reason) for every node offered the job."""
        return self.db.rows(
            "SELECT n.id, n.name, jn.decision, jn.reason FROM job_nodes jn JOIN nodes n ON n.id = jn.node_id"
            " WHERE jn.job_id = ? ORDER BY n.id",
            (job_id,),
        )

    def node_standing(self, job_id: str, seen_since: float) -> list[tuple[str, str, str, bool]]:
        """(name, decision, reason, connected) of every unrevoked node on the job's offer;
        decision "" for a node that was never offered it."""
        return [
            (name, decision or "", reason or "", bool(connected))
            for name, decision, reason, connected in self.db.rows(
                "SELECT n.name, jn.decision, jn.reason, n.last_seen >= ? FROM nodes n"
                " LEFT JOIN job_nodes jn ON jn.node_id = n.id AND jn.job_id = ? WHERE n.revoked_at IS NULL"
                " ORDER BY n.id",
                (seen_since, job_id),
            )
        ]

    def accepted_nodes(self, job_id: str, seen_since: float) -> list[int]:
        """Connected, unrevoked nodes that accepted the job."""
        return [
            r[0]
            for r in self.db.rows(
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
            for r in self.db.rows(
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
        self.db.execute(
            "INSERT INTO node_rounds (job_id, round, node_id, metrics_json, refusal, bytes_received)"
            " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (job_id, round, node_id) DO UPDATE SET"
            " metrics_json = CASE WHEN excluded.metrics_json = '{}' THEN metrics_json ELSE excluded.metrics_json END,"
            " refusal = CASE WHEN excluded.refusal = '' THEN refusal ELSE excluded.refusal END,"
            " bytes_received = bytes_received + excluded.bytes_received",
            (job_id, round, node_id, json.dumps(metrics), refusal, bytes_received),
        )

    def node_rounds(self, job_id: str) -> dict[int, list[tuple[int, str, dict, str, int]]]:
        """Per round, (node_id, node name, metrics, refusal, bytes received) of every node that sent something."""
        out: dict[int, list[tuple[int, str, dict, str, int]]] = {}
        for round, nid, name, m, refusal, nbytes in self.db.rows(
            "SELECT nr.round, nr.node_id, n.name, nr.metrics_json, nr.refusal, nr.bytes_received FROM node_rounds nr"
            " JOIN nodes n ON n.id = nr.node_id WHERE nr.job_id = ? ORDER BY nr.round, nr.node_id",
            (job_id,),
        ):
            out.setdefault(round, []).append((nid, name, json.loads(m), refusal, nbytes))
        return out

    def finish_round(self, job_id: str, round: int, metrics: dict[str, float], wall_seconds: float,
                     arrays: dict[str, np.ndarray], strategy_state: dict[str, np.ndarray] | None = None,
                     skipped: str = "") -> None:
        """Checkpoint a round: its metrics, the global model after it and the strategy's state,
        in one transaction (a round is either wholly done or not at all)."""
        blob = _tensor_blob(arrays)
        state = _tensor_blob(strategy_state or {})
        with self.db.transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO rounds (job_id, round, metrics_json, wall_seconds, skipped)"
                " VALUES (?, ?, ?, ?, ?)", (job_id, round, json.dumps(metrics), wall_seconds, skipped),
            )
            db.execute(
                "INSERT OR REPLACE INTO checkpoints (job_id, round, tensors, strategy_state) VALUES (?, ?, ?, ?)",
                (job_id, round, blob, state),
            )

    def checkpoint(self, job_id: str) -> tuple[int, dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(round, global model, strategy state) of the job's latest checkpoint."""
        round, blob, state = self.db.rows(
            "SELECT round, tensors, strategy_state FROM checkpoints WHERE job_id = ? ORDER BY round DESC LIMIT 1",
            (job_id,))[0]
        return round, _tensors(blob), _tensors(state) if state else {}

    def skipped_rounds(self, job_id: str) -> dict[int, str]:
        return dict(self.db.rows("SELECT round, skipped FROM rounds WHERE job_id = ? AND skipped != ''", (job_id,)))

    def rounds(self, job_id: str) -> list[tuple[int, dict, float]]:
        return [
            (r, json.loads(m), w)
            for r, m, w in self.db.rows(
                "SELECT round, metrics_json, wall_seconds FROM rounds WHERE job_id = ? ORDER BY round", (job_id,)
            )
        ]

    def has_model(self, job_id: str) -> bool:
        return bool(self.db.rows("SELECT 1 FROM checkpoints WHERE job_id = ? LIMIT 1", (job_id,)))

    def model(self, job_id: str, round: int | None = None) -> tuple[int, dict[str, np.ndarray]] | None:
        """(round, tensors) of the global model after ``round``, or after the latest round."""
        if round is None:
            rows = self.db.rows("SELECT round, tensors FROM checkpoints WHERE job_id = ? ORDER BY round DESC LIMIT 1",
                                (job_id,))
        else:
            rows = self.db.rows("SELECT round, tensors FROM checkpoints WHERE job_id = ? AND round = ?",
                                (job_id, round))
        if not rows:
            return None
        round, blob = rows[0]
        return round, _tensors(blob)


def _tensor_blob(arrays: dict[str, np.ndarray]) -> bytes:
    return pb.TensorSet(tensors=list(encode_arrays(arrays))).SerializeToString()


def _tensors(blob: bytes) -> dict[str, np.ndarray]:
    return decode_arrays(pb.TensorSet.FromString(blob).tensors)
