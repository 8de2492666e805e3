"""The node's durable privacy-budget ledger (SQLite).

One row per released round. A row is written, together with the DP-protected
payload it pays for, in one transaction *before* the payload is sent: a crash
after the commit loses no spend, and on restart the node re-sends the stored
payload instead of training (and spending) again. The payload of a job's latest
round stays after delivery, so that a round the coordinator runs again (after its
own restart, or a retry) gets the same release, not a second one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from fedtrain.errors import BudgetExceeded
from fedtrain.privacy.accounting import RoundPlan, epsilon
from fedtrain.storage import open_db

_SCHEMA = """
CREATE TABLE IF NOT EXISTS ledger (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    round INTEGER NOT NULL,
    noise_multiplier REAL NOT NULL,
    sample_rate REAL NOT NULL,
    steps INTEGER NOT NULL,
    delta REAL NOT NULL,          -- the job's delta
    epsilon REAL NOT NULL,        -- increase of lifetime epsilon (at the policy's delta)
    job_epsilon REAL NOT NULL,    -- the job's epsilon so far (at the job's delta)
    created_at REAL NOT NULL,
    task_id TEXT NOT NULL,
    payload BLOB,                 -- the update; NULL once a later round of the job is charged
    sent_at REAL,
    basis TEXT,                   -- sha256 of the global model the update was trained from
    UNIQUE (job_id, round)
);
"""


@dataclass(frozen=True)
class LedgerRow:
    job_id: str
    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    delta: float
    epsilon: float
    job_epsilon: float
    created_at: float
    task_id: str
    sent: bool


@dataclass(frozen=True)
class Quote:
    """What a planned round would do to the lifetime budget."""

    spent: float
    after: float
    limit: float

    @property
    def allowed(self) -> bool:
        return self.after <= self.limit + 1e-9

    @property
    def remaining(self) -> float:
        return max(0.0, self.limit - self.spent)

    def refusal(self) -> str:
        return (
            f"privacy budget exceeded: this round would raise lifetime epsilon from "
            f"{self.spent:.4f} to {self.after:.4f}, above the policy's max_epsilon "
            f"{self.limit:.4f} (remaining {self.remaining:.4f}, requested "
            f"{self.after - self.spent:.4f})"
        )


class PrivacyLedger:
    """Lifetime spend of one dataset, composed with Opacus's RDP accountant."""

    def __init__(self, path: str | Path, *, max_epsilon: float, delta: float):
        self.path = Path(path)
        self.max_epsilon = max_epsilon
        self.delta = delta
        # A committed spend must survive power loss, not just a process crash.
        self._db = open_db(self.path, _SCHEMA, (("ledger", "basis", "TEXT"),), full_sync=True)

    def close(self) -> None:
        self._db.close()

    def _history(self, job_id: str | None = None) -> list[tuple[float, float, int]]:
        sql = "SELECT noise_multiplier, sample_rate, steps FROM ledger"
        args: tuple = ()
        if job_id is not None:
            sql += " WHERE job_id = ?"
            args = (job_id,)
        return [tuple(r) for r in self._db.execute(sql + " ORDER BY id", args)]

    def spent(self) -> float:
        """Lifetime ε at the policy's δ."""
        return epsilon(self._history(), self.delta)

    def quote(self, plans: list[RoundPlan]) -> Quote:
        history = self._history()
        return Quote(
            spent=epsilon(history, self.delta),
            after=epsilon(history + [p.as_history() for p in plans], self.delta),
            limit=self.max_epsilon,
        )

    def charge(
        self, *, job_id: str, round: int, plan: RoundPlan, job_delta: float, task_id: str, payload: bytes,
        basis: str = "",
    ) -> LedgerRow:
        """Record a release and its payload atomically, or raise BudgetExceeded.

        ``basis`` names the global model the update was trained from (see ``release``)."""
        # IMMEDIATE takes the write lock first, so two writers cannot both pass the check.
        self._db.execute("BEGIN IMMEDIATE")
        try:
            if self._db.execute(
                "SELECT 1 FROM ledger WHERE job_id = ? AND round = ?", (job_id, round)
            ).fetchone():
                raise BudgetExceeded(f"round {round} of job {job_id} was already released once")
            quote = self.quote([plan])
            if not quote.allowed:
                raise BudgetExceeded(quote.refusal())
            job_eps = epsilon(self._history(job_id) + [plan.as_history()], job_delta)
            now = time.time()
            self._db.execute(
                "INSERT INTO ledger (job_id, round, noise_multiplier, sample_rate, steps, delta,"
                " epsilon, job_epsilon, created_at, task_id, payload, basis) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (job_id, round, plan.noise_multiplier, plan.sample_rate, plan.steps, job_delta,
                 quote.after - quote.spent, job_eps, now, task_id, payload, basis),
            )
            self._db.execute("UPDATE ledger SET payload = NULL WHERE job_id = ? AND round < ? AND sent_at IS NOT NULL",
                             (job_id, round))
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        return self.row(job_id, round)

    def row(self, job_id: str, round: int) -> LedgerRow | None:
        rows = self._rows("WHERE job_id = ? AND round = ?", (job_id, round))
        return rows[0] if rows else None

    def rows(self, job_id: str | None = None) -> list[LedgerRow]:
        if job_id is None:
            return self._rows("", ())
        return self._rows("WHERE job_id = ?", (job_id,))

    def _rows(self, where: str, args: tuple) -> list[LedgerRow]:
        cur = self._db.execute(
            "SELECT job_id, round, noise_multiplier, sample_rate, steps, delta, epsilon, job_epsilon,"
            f" created_at, task_id, sent_at IS NOT NULL FROM ledger {where} ORDER BY id",
            args,
        )
        return [LedgerRow(*r[:10], sent=bool(r[10])) for r in cur]

    def undelivered(self) -> list[tuple[LedgerRow, bytes]]:
        """Releases that were charged but not confirmed delivered (e.g. after a crash)."""
        cur = self._db.execute("SELECT job_id, round, payload FROM ledger WHERE sent_at IS NULL ORDER BY id")
        return [(self.row(j, r), p) for j, r, p in cur.fetchall()]

    def release(self, job_id: str, round: int) -> tuple[LedgerRow, str, bytes | None] | None:
        """(row, basis, payload) of a charged round; the payload is None once a later round replaced it."""
        found = self._db.execute("SELECT basis, payload FROM ledger WHERE job_id = ? AND round = ?",
                                 (job_id, round)).fetchone()
        return None if found is None else (self.row(job_id, round), found[0] or "", found[1])

    def mark_sent(self, job_id: str, round: int) -> None:
        self._db.execute("UPDATE ledger SET sent_at = ? WHERE job_id = ? AND round = ?", (time.time(), job_id, round))
