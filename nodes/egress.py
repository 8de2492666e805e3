"""The node's one egress check: every message it sends passes here first (``NodeAgent._send``).

Free text a node sends is a typed refusal whose values are the spec's or the policy's
own (``fedtrain.protocol.refusal``); the metrics of a result are exactly the public
ones, with the values the spec, the policy and the ledger give. A message that breaks
the rule is not sent: it is a bug, and the node stops the call rather than leak.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

from fedtrain.errors import EgressViolation, FedtrainError
from fedtrain.policy import NodePolicy
from fedtrain.protocol import fedtrain_pb2 as pb
from fedtrain.protocol.codec import decode_values
from fedtrain.protocol.refusal import check_refusal, parse_refusal
from fedtrain.spec import JobSpec


def _documents(spec: JobSpec | None, policy: NodePolicy) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    # The JSON values of canonical_json, without its text.
    return (None if spec is None else spec.model_dump(mode="json")), policy.document()


def _check_text(text: str, spec: JobSpec | None, policy: NodePolicy) -> None:
    try:
        check_refusal(parse_refusal(text), *_documents(spec, policy))
    except FedtrainError as err:
        raise EgressViolation(f"refusing to send {text[:80]!r}: {err}") from None


def _check_header(header: pb.ResultHeader, spec: JobSpec | None, policy: NodePolicy) -> None:
    # Here, not at the top: they load Opacus and Flower (seconds), and a node registers
    # through this module before it sends any result.
    from fedtrain.privacy.accounting import plan_round
    from fedtrain.protocol.records import RESULT_METRICS

    if header.refusal:
        _check_text(header.refusal, spec, policy)
    metrics = decode_values(header.metrics)
    if not set(metrics) <= RESULT_METRICS.keys():
        raise EgressViolation(f"refusing to send metrics {sorted(set(metrics) - RESULT_METRICS.keys())}")
    if "num-examples" in metrics and metrics["num-examples"] != policy.dataset_size:
        raise EgressViolation("refusing to send an example count other than the policy's dataset_size")
    if "steps" in metrics:
        plan = plan_round(spec, policy.dataset_size) if spec is not None else None
        sent = (metrics.get("noise-multiplier"), metrics.get("sample-rate"), metrics.get("steps"))
        if plan is None or sent != plan.as_history():
            raise EgressViolation("refusing to send DP parameters other than the plan the spec and policy give")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in metrics.values()):
        raise EgressViolation("refusing to send a metric that is not a number")


def check(request: Any, spec: JobSpec | None, policy: NodePolicy) -> Any:
    """``request`` as it may be sent; raises EgressViolation, before anything is sent, if it
    may not. A result streams as parts whose first is its header: that is checked up front."""
    if isinstance(request, pb.OfferAnswer):
        _check_text(request.reason, spec, policy)
    elif isinstance(request, Iterator):
        first = next(request)
        if first.WhichOneof("part") != "header":
            raise EgressViolation("a result must start with its header")
        _check_header(first.header, spec, policy)
        return itertools.chain([first], request)
    return request
