"""Running one job: a Flower strategy's own ``start()`` loop over a ``NetworkGrid``."""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Iterable

from flwr.app import ArrayRecord, Message, MetricRecord
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


class JobRunner(threading.Thread):
    def __init__(
        self, job_id: str, spec: JobSpec, store: Store, mailbox: Mailbox, run_id: int,
        initial: dict[str, np.ndarray], eval_data: TensorDataset | None,
    ):
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
        self._short_rounds: dict[int, str] = {}

    def _too_few(self, server_round: int, ok: int, errors: list[str]) -> None:
        msg = f"only {ok} node result(s), fewer than min_nodes={self.spec.min_nodes}; global model unchanged"
        if errors:
            msg += f" ({'; '.join(errors)})"
        log.warning("job %s round %d: %s", self.job_id, server_round, msg)
        self._short_rounds[server_round] = msg
        # Shown by `job status` at once, not only when the job ends.
        self.store.set_job_state(self.job_id, "running", self._short_summary())

    def _short_summary(self) -> str:
        return "; ".join(f"round {r}: {m}" for r, m in sorted(self._short_rounds.items()))

    def _checkpoint(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Called by the strategy after every round (and for round 0): evaluate and persist."""
        weights = arrays_to_numpy(arrays)
        metrics: dict[str, float] = {}
        if self.eval_data is not None:
            if self._eval_model is None:
                self._eval_model = build_model(self.spec)
            load_trainable_state(self._eval_model, weights)
            metrics = evaluate(self._eval_model, self.eval_data, self.spec)
        wall = time.monotonic() - self._round_started
        self.store.finish_round(self.job_id, server_round, metrics, wall if server_round else 0.0, weights)
        self._round_started = time.monotonic()
        log.info("job %s round %d done: %s", self.job_id, server_round, metrics or "(no evaluation data)")
        return MetricRecord(metrics) if metrics else None

    def run(self) -> None:
        strategy = None
        try:
            strategy = build_strategy(self.spec, self._too_few)
            strategy.start(
                grid=self.grid,
                initial_arrays=numpy_to_arrays(self.initial),
                num_rounds=self.spec.training.rounds,
                timeout=self.spec.round_timeout,
                evaluate_fn=self._checkpoint,
            )
            failed = len(self._short_rounds) == self.spec.training.rounds
            self.store.set_job_state(self.job_id, "failed" if failed else "finished", self._short_summary())
        except JobCancelled as err:  # the coordinator is stopping
            log.info("job %s stopped: %s", self.job_id, err)
            self.store.set_job_state(self.job_id, "failed", str(err))
        except Exception as err:  # the job fails, the coordinator keeps serving
            log.exception("job %s failed", self.job_id)
            self.store.set_job_state(self.job_id, "failed", f"{type(err).__name__}: {err}")
