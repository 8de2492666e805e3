"""Running one job: a Flower strategy's rounds over a ``NetworkGrid``, checkpointed and resumable."""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, Strategy

import numpy as np
from torch import nn
from torch.utils.data import TensorDataset

from fedtrain.client_app import arrays_to_numpy, numpy_to_arrays
from fedtrain.models import build_model, evaluate, load_trainable_state
from fedtrain.spec import JobSpec
from coordinator.grid import JobCancelled, Mailbox, NetworkGrid
from coordinator.secure_round import AGGREGATED_NODES, secure_round
from coordinator.store import Store

log = logging.getLogger("fedtrain.coordinator")

# Makes the coordinator hold a job just before it checkpoints round N ("before-checkpoint:N"),
# with every result of the round in: the point at which the tests of crashes kill it.
HOLD_ENV = "FEDTRAIN_COORDINATOR_HOLD"

STRATEGIES: dict[str, type[FedAvg]] = {"fedavg": FedAvg, "fedprox": FedProx, "fedadam": FedAdam}


def build_strategy(spec: JobSpec, on_too_few: Callable[[int, int, list[str]], None]) -> Strategy:
    """The job's Flower strategy, made to skip rounds with fewer than ``min_nodes`` results.

    Federated evaluation is off: per-node metrics on local data would leave the
    node without DP. The global model is evaluated centrally instead.
    """
    base = STRATEGIES[spec.strategy.name]

    class MinNodes(base):  # type: ignore[misc, valid-type]
        def aggregate_train(self, server_round: int, replies: Iterable[Message]):
            replies = list(replies)
            # A securely aggregated round is one reply that stands for several nodes.
            ok = sum(int(r.content["metrics"].get(AGGREGATED_NODES, 1)) for r in replies if not r.has_error())
            if ok < spec.min_nodes:
                on_too_few(server_round, ok, sorted({r.error.reason for r in replies if r.has_error()}))
                return None, None
            return super().aggregate_train(server_round, replies)

    try:
        return MinNodes(
            fraction_train=1.0,
            fraction_evaluate=0.0,
            min_train_nodes=spec.min_nodes,
            min_available_nodes=spec.min_nodes,
            **spec.strategy.params,
        )
    except TypeError as err:
        raise ValueError(f"strategy {spec.strategy.name!r} does not take these params: {err}") from None


# Strategy attributes that carry state from round to round: the server optimiser's moments
# of FedAdam, FedYogi and FedAdagrad. A resumed job needs them to take the same steps.
_STATE_ATTRIBUTES = ("m_t", "v_t")


def strategy_state(strategy: Strategy) -> dict[str, np.ndarray]:
    return {f"{attr}/{name}": value for attr in _STATE_ATTRIBUTES
            for name, value in (getattr(strategy, attr, None) or {}).items()}


def restore_strategy_state(strategy: Strategy, state: dict[str, np.ndarray]) -> None:
    for attr in _STATE_ATTRIBUTES:
        values = {k.split("/", 1)[1]: v for k, v in state.items() if k.split("/", 1)[0] == attr}
        if values:
            setattr(strategy, attr, values)


class JobRunner(threading.Thread):
    """Runs one job's rounds: the Flower strategy configures and aggregates each round over a
    ``NetworkGrid``, and every round ends in a checkpoint.

    The loop is Flower's ``Strategy.start()`` loop with two additions, which is why it is ours:
    it starts after the job's last checkpoint (a restarted coordinator resumes a job there,
    with the strategy's state), and it runs a round with too few results again
    (``round_retries``) before giving it up.
    """

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
        self._shortfall = ""
        self.on_end = on_end

    def _too_few(self, server_round: int, ok: int, errors: list[str]) -> None:
        msg = f"only {ok} node result(s), fewer than min_nodes={self.spec.min_nodes}"
        if errors:
            msg += f" ({'; '.join(errors)})"
        self._shortfall = msg

    def _summary(self, live: dict[int, str] | None = None) -> str:
        rounds = {**self._short_rounds, **(live or {})}
        return "; ".join(f"round {r}: {m}" for r, m in sorted(rounds.items()))

    def _checkpoint(self, server_round: int, weights: dict[str, np.ndarray], strategy: Strategy,
                    skipped: str = "") -> None:
        """Evaluate the global model after a round (and for round 0) and persist it with the strategy's state."""
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

    def _round(self, strategy: Strategy, server_round: int, arrays: ArrayRecord) -> ArrayRecord | None:
        """One round, run again while it has too few results and retries are left; None if given up."""
        for attempt in range(self.spec.round_retries + 1):
            self._shortfall = ""
            messages = strategy.configure_train(server_round, arrays, ConfigRecord(), self.grid)
            replies = self.grid.send_and_receive(messages, timeout=self.spec.round_timeout)
            aggregated, _ = strategy.aggregate_train(server_round, replies)
            if aggregated is not None:
                return aggregated
            shortfall = self._shortfall or "the strategy aggregated nothing"
            retry = attempt < self.spec.round_retries
            note = (f"{shortfall}; running the round again (retry {attempt + 1} of {self.spec.round_retries})"
                    if retry else f"{shortfall}; global model unchanged")
            log.warning("job %s round %d: %s", self.job_id, server_round, note)
            # Shown by `job status` at once, not only when the job ends.
            self.store.set_job_state(self.job_id, "running", self._summary({server_round: note}))
        self._short_rounds[server_round] = note
        return None

    def run(self) -> None:
        try:
            strategy = build_strategy(self.spec, self._too_few)
            if self.initial is not None:
                done, weights = 0, self.initial
                self._checkpoint(0, weights, strategy)
            else:
                done, weights, state = self.store.checkpoint(self.job_id)
                restore_strategy_state(strategy, state)
                log.info("job %s resumes after round %d", self.job_id, done)
            dtypes = {k: v.dtype for k, v in weights.items()}
            for server_round in range(done + 1, self.spec.training.rounds + 1):
                aggregated = self._round(strategy, server_round, numpy_to_arrays(weights))
                if aggregated is not None:
                    # The model keeps its dtypes: FedAdam's float64 step would not be the job's tensors.
                    weights = {k: v.astype(dtypes[k]) for k, v in arrays_to_numpy(aggregated).items()}
                self._checkpoint(server_round, weights, strategy, self._short_rounds.get(server_round, ""))
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
