"""Running one job: a Flower strategy's rounds over a ``NetworkGrid``, checkpointed and resumable."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import numpy as np
from torch import nn
from torch.utils.data import TensorDataset

from fedtrain.errors import JobCancelled
from fedtrain.faults import Faults
from fedtrain.models import build_model, evaluate, load_trainable_state
from fedtrain.models.transformer import answer_examples
from fedtrain.server.rounds import run_rounds
from fedtrain.server.strategy import MinNodes, restore_strategy_state, strategy_state
from fedtrain.spec import JobSpec
from coordinator.grid import NetworkGrid
from coordinator.job_store import JobStore
from coordinator.mailbox import Mailbox
from coordinator.metrics import Metrics
from coordinator.registry import Registry
from coordinator.secure_round import SecureGrid

log = logging.getLogger("fedtrain.coordinator")


class JobRunner(threading.Thread):
    """Runs one job's rounds (``fedtrain.server.rounds.run_rounds``) over a ``NetworkGrid``; every
    round ends in a checkpoint, after which a restarted coordinator resumes the job with the
    strategy's state."""

    def __init__(
        self, job_id: str, spec: JobSpec, strategy: MinNodes, jobs: JobStore, registry: Registry,
        mailbox: Mailbox, run_id: int, eval_data: TensorDataset | None, metrics: Metrics,
        initial: dict[str, np.ndarray] | None = None,
        on_end: Callable[[str, str, str, list[dict[str, str]]], None] = lambda job_id, state, error, examples: None,
        faults: Faults = Faults(),
    ):
        """``strategy``: ``build_strategy(spec)``, which the coordinator built before storing the job.
        ``initial``: a new job's starting model; None resumes the job from its last checkpoint.
        ``on_end(job_id, state, error, examples)`` is called when the job has finished, failed or
        been cancelled (``cancel``), just before that state is stored; ``examples``: for a finished
        instruction-tuning job with evaluation data, what its model answers to the first evaluation prompts.
        ``metrics``: the coordinator's, which count its rounds. ``faults``: where to hold (the tests of crashes)."""
        super().__init__(name=f"job-{job_id}", daemon=True)
        self.job_id = job_id
        self.spec = spec
        self.strategy = strategy
        self.jobs = jobs
        # Set when the job must stop: an operator cancelled it, or the coordinator stops (it pauses).
        self.cancelled = threading.Event()
        self._cancelled_by = ""  # the operator who cancelled the job, if one did
        self._ending = threading.Lock()
        self._ended = False  # its end state is decided: too late to cancel
        self._rounds_done = 0
        # Secure aggregation or not is the grid's business: the strategy loop is the same.
        self.grid: NetworkGrid
        if spec.secagg is not None:
            self.grid = SecureGrid(job_id, spec, jobs, mailbox, run_id, self.cancelled, registry)
        else:
            self.grid = NetworkGrid(job_id, spec, jobs, mailbox, run_id, self.cancelled)
        self.initial = initial
        self.eval_data = eval_data
        self.faults = faults
        self.metrics = metrics
        self._eval_model: nn.Module | None = None  # built once: a transformer base is large
        self._round_started = time.monotonic()
        self._short_rounds = jobs.skipped_rounds(job_id)
        self.on_end = on_end

    def _summary(self, live: dict[int, str] | None = None) -> str:
        rounds = {**self._short_rounds, **(live or {})}
        return "; ".join(f"round {r}: {m}" for r, m in sorted(rounds.items()))

    def _checkpoint(self, server_round: int, weights: dict[str, np.ndarray], skipped: str = "") -> None:
        """Evaluate the global model after a round (and for round 0) and persist it with the strategy's state."""
        if skipped:
            log.warning("job %s round %d: %s", self.job_id, server_round, skipped)
            self._short_rounds[server_round] = skipped
            self.jobs.set_job_state(self.job_id, "running", self._summary())  # shown by `job status` at once
        if self.faults.holds_before_checkpoint(server_round):
            log.warning("job %s holds before checkpointing round %d (fault point %s)", self.job_id, server_round,
                        self.faults.point)
            self.cancelled.wait()
            raise JobCancelled("stopped while held")
        metrics: dict[str, float] = {}
        if self.eval_data is not None:
            if self._eval_model is None:
                self._eval_model = build_model(self.spec)
            load_trainable_state(self._eval_model, weights)
            metrics = evaluate(self._eval_model, self.eval_data, self.spec)
        # A round's time runs from its start, and round 1's (or a resumed job's first) from its
        # first task: not the wait for nodes to accept the job (``JobStatus.approval_wait_seconds``).
        wall = time.monotonic() - max(self._round_started, self.grid.started_at) if server_round else 0.0
        self.jobs.finish_round(self.job_id, server_round, metrics, wall, weights, strategy_state(self.strategy),
                               skipped)
        if server_round:  # round 0 is the starting model's checkpoint
            self.metrics.round_ended(self.job_id, wall, skipped)
        self._round_started = time.monotonic()
        self._rounds_done = server_round
        log.info("job %s round %d done: %s", self.job_id, server_round, metrics or "(no evaluation data)")

    def _retry(self, server_round: int, note: str) -> None:
        log.warning("job %s round %d: %s", self.job_id, server_round, note)
        # Shown by `job status` at once, not only when the job ends.
        self.jobs.set_job_state(self.job_id, "running", self._summary({server_round: note}))

    def cancel(self, operator: str) -> bool:
        """Stop the job at its next safe point: between rounds, or abandoning the round in progress
        (its tasks close, see ``NetworkGrid.exchange``; the caller wakes the mailbox). Its rounds
        stay, and its report is written. False if the job has already ended or is ending."""
        with self._ending:
            if self._ended:
                return False
            self._cancelled_by = operator
            self.cancelled.set()
            return True

    def run(self) -> None:
        try:
            if self.initial is not None:
                done, weights = 0, self.initial
                self._checkpoint(0, weights)
            else:
                done, weights, state = self.jobs.checkpoint(self.job_id)
                self._rounds_done = done
                restore_strategy_state(self.strategy, state)
                log.info("job %s resumes after round %d", self.job_id, done)
            run_rounds(self.strategy, self.grid, self.spec, weights, done + 1, self._checkpoint, self._retry)
            failed = len(self._short_rounds) == self.spec.training.rounds
            state, error = "failed" if failed else "finished", self._summary()
        except JobCancelled as err:
            if not self._cancelled_by:  # the coordinator is stopping: the job resumes when it is back
                log.info("job %s paused: %s", self.job_id, err)
                return
            log.info("job %s cancelled by %s after round %d", self.job_id, self._cancelled_by, self._rounds_done)
            state = "cancelled"
            error = f"cancelled by {self._cancelled_by} after round {self._rounds_done} of {self.spec.training.rounds}"
            if skipped := self._summary():
                error += f"; {skipped}"
        except Exception as err:  # the job fails, the coordinator keeps serving
            log.exception("job %s failed", self.job_id)
            state, error = "failed", f"{type(err).__name__}: {err}"
        with self._ending:
            self._ended = True
        examples = []
        if state == "finished" and self.spec.task == "instruction-tuning" and self._eval_model is not None:
            try:
                examples = answer_examples(self._eval_model, self.spec, self.eval_data)
            except Exception:  # examples that cannot be made cost the examples, not the job
                log.exception("job %s: cannot generate the report's examples", self.job_id)
        # The report first: whoever sees the job ended finds its report.
        self.on_end(self.job_id, state, error, examples)
        self.jobs.set_job_state(self.job_id, state, error)
