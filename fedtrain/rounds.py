"""A job's rounds: its Flower strategy, and the loop that runs the strategy over a grid.

The coordinator runs this loop over its network of real nodes, ``fedtrain simulate``
over Flower's simulation grid of virtual ones: a rehearsal aggregates as the deployed
job will (secure aggregation aside, whose sum is the same up to quantization).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    Bulyan, FedAdam, FedAvg, FedMedian, FedProx, FedTrimmedAvg, Krum, MultiKrum, Strategy,
)

from fedtrain.protocol.records import arrays_to_numpy, numpy_to_arrays
from fedtrain.spec import JobSpec

STRATEGIES: dict[str, type[FedAvg]] = {
    "fedavg": FedAvg, "fedprox": FedProx, "fedadam": FedAdam, "fedmedian": FedMedian,
    "fedtrimmedavg": FedTrimmedAvg, "krum": Krum, "multikrum": MultiKrum, "bulyan": Bulyan,
}
# Strategy params that count nodes: the spec holds them as floats, Flower slices by them.
_COUNT_PARAMS = ("num_malicious_nodes", "num_nodes_to_select")

# How many nodes' updates one reply stands for: a securely aggregated round is one reply.
AGGREGATED_NODES = "aggregated-nodes"

# Strategy attributes that carry state from round to round: the server optimiser's moments
# of FedAdam, FedYogi and FedAdagrad. A resumed job needs them to take the same steps.
_STATE_ATTRIBUTES = ("m_t", "v_t")


def build_strategy(spec: JobSpec) -> Strategy:
    """The job's Flower strategy, made to aggregate nothing from fewer than ``min_nodes`` results.

    After each ``aggregate_train`` the strategy's ``shortfall`` says why it aggregated
    nothing ("" when it did), ``accepted`` holds the (source node, metrics) of the replies
    it counted, and ``errors`` the reasons of the replies that were errors. Federated evaluation is off: per-node metrics on local data would
    leave the node without DP, so the global model is evaluated centrally instead.
    A node's weight (its ``num-examples``) is clamped to [1, ``secure_aggregation.max_weight``],
    as secure aggregation caps it: no node outweighs the others by claiming more examples.
    """
    base = STRATEGIES[spec.strategy.name]
    max_weight = spec.secure_aggregation.max_weight
    params = dict(spec.strategy.params)
    for name in _COUNT_PARAMS:
        if name in params:
            if not params[name].is_integer():
                raise ValueError(f"strategy param {name} must be a whole number, not {params[name]:g}")
            params[name] = int(params[name])

    class MinNodes(base):  # type: ignore[misc, valid-type]
        shortfall = ""
        accepted: list[tuple[int, MetricRecord]] = []
        errors: list[str] = []

        def aggregate_train(self, server_round: int, replies: Iterable[Message]):
            replies = list(replies)
            good = [r for r in replies if not r.has_error()]
            self.accepted = [(r.metadata.src_node_id, r.content["metrics"]) for r in good]
            self.errors = [r.error.reason for r in replies if r.has_error()]
            for _, m in self.accepted:
                if AGGREGATED_NODES not in m:  # one node's result
                    m["num-examples"] = min(max(int(m["num-examples"]), 1), max_weight)
            ok = sum(int(m.get(AGGREGATED_NODES, 1)) for _, m in self.accepted)
            self.shortfall = ""
            if ok < spec.min_nodes:
                self.shortfall = f"only {ok} node result(s), fewer than min_nodes={spec.min_nodes}" + (
                    f" ({'; '.join(sorted(set(self.errors)))})" if self.errors else "")
                return None, None
            return super().aggregate_train(server_round, good)

    try:
        return MinNodes(
            fraction_train=1.0,
            fraction_evaluate=0.0,
            min_train_nodes=spec.min_nodes,
            min_available_nodes=spec.min_nodes,
            **params,
        )
    except TypeError as err:
        raise ValueError(f"strategy {spec.strategy.name!r} does not take these params: {err}") from None


def strategy_state(strategy: Strategy) -> dict[str, np.ndarray]:
    return {f"{attr}/{name}": value for attr in _STATE_ATTRIBUTES
            for name, value in (getattr(strategy, attr, None) or {}).items()}


def restore_strategy_state(strategy: Strategy, state: dict[str, np.ndarray]) -> None:
    for attr in _STATE_ATTRIBUTES:
        values = {k.split("/", 1)[1]: v for k, v in state.items() if k.split("/", 1)[0] == attr}
        if values:
            setattr(strategy, attr, values)


def run_rounds(
    strategy: Strategy, grid: Grid, spec: JobSpec, weights: dict[str, np.ndarray], first_round: int,
    on_round: Callable[[int, dict[str, np.ndarray], str], None],
    on_retry: Callable[[int, str], None] = lambda server_round, note: None,
    config: ConfigRecord | None = None,
) -> None:
    """Rounds ``first_round`` .. ``spec.training.rounds`` of ``strategy`` (from ``build_strategy``).

    This is Flower's ``Strategy.start()`` loop with two additions: it can start after
    round 1 (a job resumed from its checkpoint), and a round with too few results is run
    again ``round_retries`` times before it is given up, the global model then unchanged.
    A round whose aggregation raises (e.g. replies Flower finds inconsistent) is given up
    at once with the error: failing the job would waste the budget its honest nodes spent.
    ``on_round(round, weights, given_up)`` follows every round (``given_up`` says why the
    round was given up, "" if it was not); ``on_retry(round, note)`` precedes a retry.
    ``config`` goes to the nodes with every round's model.
    """
    # The model keeps its dtypes: FedAdam's float64 step would not be the job's tensors.
    dtypes = {k: v.dtype for k, v in weights.items()}
    for server_round in range(first_round, spec.training.rounds + 1):
        given_up = ""
        for attempt in range(spec.round_retries + 1):
            messages = strategy.configure_train(server_round, numpy_to_arrays(weights),
                                                config or ConfigRecord(), grid)
            replies = grid.send_and_receive(messages, timeout=spec.round_timeout)
            try:
                aggregated, _ = strategy.aggregate_train(server_round, replies)
            except Exception as err:  # whatever the strategy raises ends this round, not the job
                given_up = f"the strategy failed: {type(err).__name__}: {err}; global model unchanged"
                break
            if aggregated is not None:
                weights = {k: v.astype(dtypes[k]) for k, v in arrays_to_numpy(aggregated).items()}
                break
            shortfall = strategy.shortfall or "the strategy aggregated nothing"
            if attempt < spec.round_retries:
                on_retry(server_round, f"{shortfall}; running the round again"
                                       f" (retry {attempt + 1} of {spec.round_retries})")
            else:
                given_up = f"{shortfall}; global model unchanged"
        on_round(server_round, weights, given_up)
