"""A job's Flower strategy: Flower's own aggregation rule, with fedtrain's rules around it.

``build_strategy`` makes the strategy a job spec names, one of ``STRATEGIES``: the Flower
strategy class under ``MinNodes``, which

* aggregates nothing from fewer than ``min_nodes`` results, and says why (``shortfall``),
* caps each node's weight (its ``num-examples``) to [1, ``secure_aggregation.max_weight``],
  as secure aggregation does: no node outweighs the others by claiming more examples,
* keeps the (source node, metrics) of the replies it counted (``accepted``) and the reasons
  of those that were errors (``errors``), for the coordinator's records and ``fedtrain simulate``,
* turns federated evaluation off: per-node metrics on local data would leave the node without
  DP, so the global model is evaluated centrally instead.

It refuses, as a ``SpecError``, params the Flower class does not take or that are not
numbers of its type: the coordinator builds the strategy before it stores a job.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import (
    Bulyan, FedAdagrad, FedAdam, FedAvg, FedMedian, FedProx, FedTrimmedAvg, FedYogi, Krum, MultiKrum, Strategy,
)

from fedtrain.errors import SpecError
from fedtrain.spec import JobSpec

# How many nodes' updates one reply stands for: a securely aggregated round is one reply.
AGGREGATED_NODES = "aggregated-nodes"

# Constructor arguments that fedtrain sets itself: a job's params may not.
_FIXED_PARAMS = ("fraction_train", "fraction_evaluate", "min_train_nodes", "min_evaluate_nodes",
                 "min_available_nodes")

# Strategy attributes that carry state from round to round: the server optimiser's moments
# of FedAdam, FedYogi and FedAdagrad. A resumed job needs them to take the same steps.
_STATE_ATTRIBUTES = ("m_t", "v_t")


class MinNodes(FedAvg):
    """Base of every job strategy, listed before the Flower strategy it extends
    (``class MinNodesKrum(MinNodes, Krum)``): see the module's docstring."""

    min_nodes: int
    max_weight: int
    # Why the last aggregate_train aggregated nothing ("" when it did).
    shortfall: str
    # (source node, metrics) of the replies the last aggregate_train counted.
    accepted: list[tuple[int, MetricRecord]]
    # The reasons of the replies to the last round that were errors.
    errors: list[str]

    def __init__(self, *, min_nodes: int, max_weight: int, **params: float | int) -> None:
        super().__init__(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=min_nodes,
                         min_available_nodes=min_nodes, **params)
        self.min_nodes = min_nodes
        self.max_weight = max_weight
        self.shortfall = ""
        self.accepted = []
        self.errors = []

    @classmethod
    def flower_class(cls) -> type[FedAvg]:
        """The Flower strategy this class extends."""
        return next(c for c in cls.__mro__ if not issubclass(c, MinNodes))

    @classmethod
    def tunable_params(cls) -> dict[str, type]:
        """The params a job may set (``strategy.params``): the Flower class's numeric constructor
        arguments apart from those fedtrain sets, with their types."""
        signature = inspect.signature(cls.flower_class().__init__)
        return {name: p.annotation for name, p in signature.parameters.items()
                if p.annotation in (int, float) and name not in _FIXED_PARAMS}

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        good = [r for r in replies if not r.has_error()]
        self.accepted = [(r.metadata.src_node_id, r.content["metrics"]) for r in good]
        self.errors = [r.error.reason for r in replies if r.has_error()]
        for _, m in self.accepted:
            if AGGREGATED_NODES not in m:  # one node's result
                m["num-examples"] = min(max(int(m["num-examples"]), 1), self.max_weight)
        ok = sum(int(m.get(AGGREGATED_NODES, 1)) for _, m in self.accepted)
        self.shortfall = ""
        if ok < self.min_nodes:
            self.shortfall = f"only {ok} node result(s), fewer than min_nodes={self.min_nodes}" + (
                f" ({'; '.join(sorted(set(self.errors)))})" if self.errors else "")
            return None, None
        return super().aggregate_train(server_round, good)


class MinNodesFedAvg(MinNodes, FedAvg):
    """FedAvg (McMahan et al., 2017) under fedtrain's rules."""


class MinNodesFedProx(MinNodes, FedProx):
    """FedProx (Li et al., 2020): ``proximal_mu`` pulls each node's training towards the round's start."""


class MinNodesFedAdam(MinNodes, FedAdam):
    """FedAdam (Reddi et al., 2021): Adam on the server over the averaged update (``eta``, ``beta_1``...)."""


class MinNodesFedYogi(MinNodes, FedYogi):
    """FedYogi (Reddi et al., 2021): Adam's server step with Yogi's additive second moment."""


class MinNodesFedAdagrad(MinNodes, FedAdagrad):
    """FedAdagrad (Reddi et al., 2021): Adagrad on the server over the averaged update."""


class MinNodesFedMedian(MinNodes, FedMedian):
    """The coordinate-wise median of the updates."""


class MinNodesFedTrimmedAvg(MinNodes, FedTrimmedAvg):
    """The coordinate-wise mean without the ⌊``beta``·n⌋ largest and smallest values."""


class MinNodesKrum(MinNodes, Krum):
    """Krum (Blanchard et al., 2017), robust to ``num_malicious_nodes``."""


class MinNodesMultiKrum(MinNodes, MultiKrum):
    """Multi-Krum: the average of the ``num_nodes_to_select`` updates Krum scores best."""


class MinNodesBulyan(MinNodes, Bulyan):
    """Bulyan (El Mhamdi et al., 2018): Multi-Krum, then a trimmed mean; robust to ``num_malicious_nodes``."""


STRATEGIES: dict[str, type[MinNodes]] = {
    "fedavg": MinNodesFedAvg, "fedprox": MinNodesFedProx, "fedadam": MinNodesFedAdam, "fedyogi": MinNodesFedYogi,
    "fedadagrad": MinNodesFedAdagrad,
    "fedmedian": MinNodesFedMedian, "fedtrimmedavg": MinNodesFedTrimmedAvg, "krum": MinNodesKrum,
    "multikrum": MinNodesMultiKrum, "bulyan": MinNodesBulyan,
}


def build_strategy(spec: JobSpec) -> MinNodes:
    """The job's strategy; a ``SpecError`` names the param that it cannot take."""
    name = spec.strategy.name
    cls = STRATEGIES[name]
    takes = cls.tunable_params()
    params: dict[str, float | int] = {}
    for param, value in spec.strategy.params.items():
        kind = takes.get(param)
        if kind is None:
            raise SpecError(f"strategy {name} takes no param {param!r}; it takes "
                            + (", ".join(sorted(takes)) if takes else "none"))
        if kind is int:
            if not float(value).is_integer():
                raise SpecError(f"strategy param {param} must be a whole number, not {value:g}")
            value = int(value)
        params[param] = value
    try:
        return cls(min_nodes=spec.min_nodes, max_weight=spec.secure_aggregation.max_weight, **params)
    except (TypeError, ValueError) as err:  # Flower's own checks of the values
        raise SpecError(f"strategy {name} refuses its params {params}: {err}") from None


def strategy_state(strategy: Strategy) -> dict[str, np.ndarray]:
    """What a checkpoint keeps of the strategy: its state from round to round."""
    return {f"{attr}/{name}": value for attr in _STATE_ATTRIBUTES
            for name, value in (getattr(strategy, attr, None) or {}).items()}


def restore_strategy_state(strategy: Strategy, state: dict[str, np.ndarray]) -> None:
    for attr in _STATE_ATTRIBUTES:
        values = {k.split("/", 1)[1]: v for k, v in state.items() if k.split("/", 1)[0] == attr}
        if values:
            setattr(strategy, attr, values)
