"""Running one job: a Flower strategy's rounds over a ``NetworkGrid``, checkpointed and resumable."""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections.abc import Callable

from flwr.serverapp.strategy import Strategy

import numpy as np
from torch import nn
from torch.utils.data import TensorDataset

from fedtrain.models import build_model, evaluate, load_trainable_state
from fedtrain.rounds import build_strategy, restore_strategy_state, run_rounds, strategy_state
from fedtrain.spec import JobSpec
from coordinator.grid import JobCancelled, Mailbox, NetworkGrid
from coordinator.secure_round import secure_round
from coordinator.store import Store

log = logging.getLogger("fedtrain.coordinator")

# Makes the coordinator hold a job just before it checkpoints round N ("before-checkpoint:N"),
# with every result of the round in: the point at which the tests of crashes kill it.
HOLD_ENV = "FEDTRAIN_COORDINATOR_HOLD"


class JobRunner(threading.Thread):
    """Runs one job's rounds (``fedtrain.rounds.run_rounds``) over a ``NetworkGrid``; every
    round ends in a checkpoint, after which a restarted coordinator resumes the job with the
    strategy's state."""

    def __init__(
        self, job_id: str, spec: JobSpec, store: Store, mailbox: Mailbox, run_id: int,
        eval_data: TensorDataset | None, initial: dict[str, np.ndarray] | None = None,
        on_end: Callable[[str, str, str], None] = lambda job_id, state, error: None,
    ):
        """``initial``: a new job's starting model; None resumes the job from its last checkpoint.
        ``on_end(job_id, state, error)`` is called when the job has finished or failed, just
        before that state is stored."""
        super().__init__(name=f"job-{job_id}", daemon=True)
        self.job_id = job_id
        self.spec = spec
        self.store = store
        self.cancelled = threading.Event()
        self.grid = NetworkGrid(job_id, store, mailbox, run_id, self.cancelled)
        if spec.secagg is not None:
            self.grid.secure = functools.partial(secure_round, self.grid, spec)
        self.initial = initial
        self.eval_data = eval_data
        self._eval_model: nn.Module | None = None  # built once: a transformer base is large
        self._round_started = time.monotonic()
        self._short_rounds = store.skipped_rounds(job_id)
        self.on_end = on_end

    def _summary(self, live: dict[int, str] | None = None) -> str:
        rounds = {**self._short_rounds, **(live or {})}
        return "; ".join(f"round {r}: {m}" for r, m in sorted(rounds.items()))

    def _checkpoint(self, server_round: int, weights: dict[str, np.ndarray], skipped: str = "", *,
                    strategy: Strategy) -> None:
        """Evaluate the global model after a round (and for round 0) and persist it with the strategy's state."""
        if skipped:
            log.warning("job %s round %d: %s", self.job_id, server_round, skipped)
            self._short_rounds[server_round] = skipped
            self.store.set_job_state(self.job_id, "running", self._summary())  # shown by `job status` at once
        if os.environ.get(HOLD_ENV) == f"before-checkpoint:{server_round}":
            log.warning("job %s holds before checkpointing round %d (%s)", self.job_id, server_round, HOLD_ENV)
            self.cancelled.wait()
            raise JobCancelled("stopped while held")
        metrics: dict[str, float] = {}
        if self.eval_data is not None:
            if self._eval_model is None:
                self._eval_model = build_model(self.spec)
            load_trainable_state(self._eval_model, weights)
            metrics = evaluate(self._eval_model, self.eval_data, self.spec)
        wall = time.monotonic() - self._round_started
        self.store.finish_round(self.job_id, server_round, metrics, wall if server_round else 0.0, weights,
                                strategy_state(strategy), skipped)
        self._round_started = time.monotonic()
        log.info("job %s round %d done: %s", self.job_id, server_round, metrics or "(no evaluation data)")

    def _retry(self, server_round: int, note: str) -> None:
        log.warning("job %s round %d: %s", self.job_id, server_round, note)
        # Shown by `job status` at once, not only when the job ends.
        self.store.set_job_state(self.job_id, "running", self._summary({server_round: note}))

    def run(self) -> None:
        try:
            strategy = build_strategy(self.spec)
            if self.initial is not None:
                done, weights = 0, self.initial
                self._checkpoint(0, weights, strategy=strategy)
            else:
                done, weights, state = self.store.checkpoint(self.job_id)
                restore_strategy_state(strategy, state)
                log.info("job %s resumes after round %d", self.job_id, done)
            run_rounds(strategy, self.grid, self.spec, weights, done + 1,
                       functools.partial(self._checkpoint, strategy=strategy), self._retry)
            failed = len(self._short_rounds) == self.spec.training.rounds
            state, error = "failed" if failed else "finished", self._summary()
        except JobCancelled as err:  # the coordinator is stopping: the job resumes when it is back
            log.info("job %s paused: %s", self.job_id, err)
            return
        except Exception as err:  # the job fails, the coordinator keeps serving
            log.exception("job %s failed", self.job_id)
            state, error = "failed", f"{type(err).__name__}: {err}"
        # The report first: whoever sees the job ended finds its report.
        self.on_end(self.job_id, state, error)
        self.store.set_job_state(self.job_id, state, error)
