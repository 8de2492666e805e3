"""A job's rounds: the loop that runs its strategy (``fedtrain.server.strategy``) over a grid.

The coordinator runs this loop over its network of real nodes, ``fedtrain simulate``
over Flower's simulation grid of virtual ones: a rehearsal aggregates as the deployed
job will (secure aggregation aside, whose sum is the same up to quantization).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from flwr.app import ConfigRecord
from flwr.serverapp import Grid

from fedtrain.protocol.records import arrays_to_numpy, numpy_to_arrays
from fedtrain.server.strategy import MinNodes
from fedtrain.spec import JobSpec


def run_rounds(
    strategy: MinNodes, grid: Grid, spec: JobSpec, weights: dict[str, np.ndarray], first_round: int,
    on_round: Callable[[int, dict[str, np.ndarray], str], None],
    on_retry: Callable[[int, str], None] = lambda server_round, note: None,
    config: ConfigRecord | None = None,
) -> None:
    """Rounds ``first_round`` .. ``spec.training.rounds`` of ``strategy`` (``build_strategy``'s).

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
