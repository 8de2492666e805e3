"""The node's record of job offers and its decisions on them (SQLite in the state dir).

The agent and the owner's CLI (`fedtrain node approve`) share this file.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path

from fedtrain.policy import Decision
from fedtrain.spec import JobSpec, job_spec_from_json
from fedtrain.storage import open_db

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    spec_json TEXT NOT NULL,
    decision TEXT NOT NULL,
    reason TEXT NOT NULL,                  -- the decision's detail, for the owner only
    answer TEXT NOT NULL DEFAULT '',       -- the typed answer the coordinator is sent
    answered INTEGER NOT NULL DEFAULT 0,   -- has the coordinator been told the decision?
    received_at REAL NOT NULL,
    signature BLOB,                         -- the node's Ed25519 approval of (job id, spec sha256)
    ended TEXT NOT NULL DEFAULT ''          -- finished, failed or cancelled, once the coordinator says so
);
"""


@functools.lru_cache(maxsize=64)
def parse_spec(spec_json: str) -> JobSpec:
    """``spec_json`` as a JobSpec, parsed once per text: a JobSpec is immutable, so the job
    book's record of a job and every task of it share one (SpecError if it is not valid)."""
    return job_spec_from_json(spec_json)


@dataclass(frozen=True)
class JobRecord:
    job_id: str
    spec_json: str
    decision: Decision
    reason: str
    answer: str
    answered: bool
    signature: bytes | None
    ended: str

    @property
    def spec(self) -> JobSpec:
        return parse_spec(self.spec_json)


class JobBook:
    def __init__(self, path: str | Path):
        # A job book from before approvals (or typed answers, or ended jobs) gains their column.
        added = (("jobs", "signature", "BLOB"), ("jobs", "answer", "TEXT NOT NULL DEFAULT ''"),
                 ("jobs", "ended", "TEXT NOT NULL DEFAULT ''"))
        self._db = open_db(path, _SCHEMA, added)

    def close(self) -> None:
        self._db.close()

    def record(self, job_id: str, spec_json: str, decision: Decision, answer: str, reason: str,
               signature: bytes | None = None) -> None:
        """Record (or replace) the node's decision on an offer, with exactly the spec it was on."""
        self._db.execute(
            "INSERT INTO jobs (job_id, spec_json, decision, answer, reason, received_at, signature)"
            " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(job_id) DO UPDATE SET spec_json = excluded.spec_json,"
            " decision = excluded.decision, answer = excluded.answer, reason = excluded.reason, answered = 0,"
            " signature = excluded.signature",
            (job_id, spec_json, decision.value, answer, reason, time.time(), signature),
        )

    def get(self, job_id: str) -> JobRecord | None:
        rows = self._select("WHERE job_id = ?", (job_id,))
        return rows[0] if rows else None

    def all(self) -> list[JobRecord]:
        return self._select("", ())

    def unanswered(self) -> list[JobRecord]:
        return self._select("WHERE answered = 0", ())

    def end(self, job_id: str, state: str) -> bool:
        """Record that the coordinator ended the job in ``state``; False if the job is not in the book."""
        return self._db.execute("UPDATE jobs SET ended = ? WHERE job_id = ?", (state, job_id)).rowcount == 1

    def mark_unanswered(self, job_id: str) -> None:
        self._db.execute("UPDATE jobs SET answered = 0 WHERE job_id = ?", (job_id,))

    def mark_answered(self, job_id: str, decision: Decision) -> None:
        # Only if unchanged since read: an approval that lands meanwhile must still be sent.
        self._db.execute("UPDATE jobs SET answered = 1 WHERE job_id = ? AND decision = ?", (job_id, decision.value))

    def decide(self, job_id: str, decision: Decision, answer: str, reason: str,
               signature: bytes | None = None, spec_json: str | None = None) -> JobRecord:
        """The owner's decision on a pending job; an approval comes with its signature over
        ``spec_json``, which must still be the spec on record."""
        job = self.get(job_id)
        if job is None:
            known = ", ".join(j.job_id for j in self.all()) or "none"
            raise KeyError(f"no job {job_id!r} on this node (known: {known})")
        if job.decision is not Decision.PENDING_APPROVAL:
            raise ValueError(f"job {job_id} is not pending approval; it is {job.decision.value}")
        if job.ended:
            raise ValueError(f"job {job_id} has ended on the coordinator ({job.ended}); there is nothing to decide")
        cur = self._db.execute(
            "UPDATE jobs SET decision = ?, answer = ?, reason = ?, answered = 0, signature = ?"
            " WHERE job_id = ? AND decision = ? AND spec_json = ?",
            (decision.value, answer, reason, signature, job_id, Decision.PENDING_APPROVAL.value,
             job.spec_json if spec_json is None else spec_json),
        )
        if cur.rowcount != 1:
            raise ValueError(f"job {job_id} changed while it was being decided; review it again")
        return self.get(job_id)

    def _select(self, where: str, args: tuple) -> list[JobRecord]:
        cur = self._db.execute(
            f"SELECT job_id, spec_json, decision, reason, answer, answered, signature, ended FROM jobs {where}"
            " ORDER BY received_at", args,
        )
        return [JobRecord(j, s, Decision(d), r, ans, bool(a), sig, e) for j, s, d, r, ans, a, sig, e in cur]
