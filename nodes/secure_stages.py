"""A node's side of secure aggregation (SecAgg+): its answers to a round's stages, the
counterpart of the coordinator's ``coordinator/secure_round.py``.

A round runs four stages: ``setup`` (advertise keys), ``share_keys`` (encrypted shares for
the neighbours), ``collect`` (receive the neighbours' shares, then train and send the
masked update: a charged round, ``nodes/tasks.py``) and ``unmask`` (reveal the shares the
coordinator needs to remove the masks of the nodes that sent). Each round's secrets live
in a ``SecAggNode`` in memory only: a restarted node has forgotten them, and the
coordinator treats it as dropped. Nothing here sends: each stage comes back as a reply
for the agent to send, or as a typed refusal.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from fedtrain.errors import FedtrainError
from fedtrain.node.ledger import PrivacyLedger
from fedtrain.node.round import PrivateRound
from fedtrain.policy import NodePolicy
from fedtrain.protocol import fedtrain_pb2 as pb
from fedtrain.protocol.refusal import Reason, Refusal
from fedtrain.secagg.encoding import clip_range, encode, node_weight
from fedtrain.secagg.node import SecAggNode
from fedtrain.secagg.peers import PeerAuth
from fedtrain.spec import JobSpec
from nodes.admission import Problem, budget_problem

log = logging.getLogger("fedtrain.node")


@dataclass(frozen=True)
class StageReply:
    reply: pb.SecAggReply
    detail: str  # what the audit log says was sent


def _failed(err: Exception) -> Problem:
    return Problem(Refusal(Reason.SECURE_AGGREGATION_FAILED), f"secure aggregation: {err}")


class SecureStages:
    """The secure aggregation rounds under way on this node."""

    def __init__(self, peer_auth: PeerAuth | None, policy: NodePolicy, ledger: PrivacyLedger):
        """``peer_auth``: this node's certificate, which signs its keys and checks its peers'
        (None without TLS: the node takes no part in secure aggregation)."""
        self._auth = peer_auth
        self._policy = policy
        self._ledger = ledger
        self._rounds: dict[tuple[str, int], SecAggNode] = {}

    def answer(self, task: pb.TaskHeader, spec: JobSpec, node_id: int) -> StageReply | Problem:
        """This node's answer to a setup, share_keys or unmask task; a round that fails here is over."""
        key = (task.job_id, task.round)
        try:
            stage = task.secagg.WhichOneof("stage")
            if stage == "setup":
                return self._setup(task, spec, node_id)
            if stage == "share_keys":
                shares = self._state(task).share_keys(task.secagg.share_keys)
                return StageReply(pb.SecAggReply(shares=shares),
                                  f"secagg share keys: encrypted shares for nodes {[s.dst for s in shares.shares]}")
            # unmask, the one stage left: answered once, whatever the answer
            state = self._state(task)
            del self._rounds[key]
            reveal = state.unmask(task.secagg.unmask)
            return StageReply(pb.SecAggReply(reveal=reveal),
                              f"secagg unmask: seed shares of nodes {[s.owner for s in reveal.seed_shares]},"
                              f" key shares of nodes {[s.owner for s in reveal.key_shares]}")
        except (FedtrainError, ValueError) as err:
            self._rounds.pop(key, None)
            return _failed(err)

    def _setup(self, task: pb.TaskHeader, spec: JobSpec, node_id: int) -> StageReply | Problem:
        if self._auth is None:
            # Peers nobody can authenticate could be the coordinator itself, holding every share.
            return Problem(Refusal(Reason.SECURE_AGGREGATION_UNAUTHENTICATED),
                           "secure aggregation needs this node's TLS identity to authenticate its peers; a node"
                           " started with --insecure takes no part in it")
        # Refused early, before any key exists, when the round would exceed the budget.
        quote = PrivateRound(spec, self._policy.dataset_size).quote(self._ledger)
        if not quote.allowed:
            return budget_problem(self._policy, quote.refusal())
        # Earlier rounds of the job that never reached their unmask stage are over.
        for old in [k for k in self._rounds if k[0] == task.job_id and k[1] <= task.round]:
            del self._rounds[old]
        state = self._rounds[task.job_id, task.round] = SecAggNode(task.job_id, task.round, node_id, self._auth)
        return StageReply(pb.SecAggReply(keys=state.setup(task.secagg.setup)),
                          "secagg setup: two public keys and a seed commitment")

    def collect(self, task: pb.TaskHeader) -> SecAggNode | Problem:
        """The round's state with its neighbours' shares received, ready to mask an update.
        Checked before training, so that a bad share costs no budget."""
        try:
            state = self._state(task)
            state.receive_shares(task.secagg.collect)
            return state
        except FedtrainError as err:
            self._rounds.pop((task.job_id, task.round), None)
            return _failed(err)

    def _state(self, task: pb.TaskHeader) -> SecAggNode:
        state = self._rounds.get((task.job_id, task.round))
        if state is None:
            raise FedtrainError(f"no secure aggregation under way for job {task.job_id} round {task.round}"
                                " (this node restarted, or the setup stage never reached it)")
        return state

    @staticmethod
    def mask(spec: JobSpec, secagg: SecAggNode, update: dict[str, np.ndarray], start: dict[str, np.ndarray],
             num_examples: int) -> np.ndarray:
        """The masked field vector of this node's weighted change to the global model."""
        change = {k: update[k].astype(np.float64) - start[k] for k in update}
        if not all(np.isfinite(v).all() for v in change.values()):
            raise FedtrainError("the trained update is not finite; nothing is sent")
        clip = clip_range(spec)
        weight = node_weight(num_examples, spec.secure_aggregation.max_weight)
        vector, clipped = encode(change, weight, clip, secagg.quant_bits)
        if clipped:
            log.warning("%d update elements exceeded secure_aggregation.clip_range %.4g and were clipped",
                        clipped, clip)
        return secagg.mask(vector)
