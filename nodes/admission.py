"""A node's decision on a job offer: parse the spec, apply the policy to the spec alone,
wait for the owner when the policy says so, and only then, at the first round, touch data.

Nothing here reads the node's data, so the decision that reaches the coordinator is a
function of the spec, the policy and the ledger (whose spends the coordinators already
saw) and tells nobody anything about the data. Each problem comes as a typed refusal
for the wire and a detail for the owner's log, which may name anything on this machine.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fedtrain.errors import FedtrainError
from fedtrain.policy import Decision, NodePolicy
from fedtrain.protocol.refusal import Reason, Refusal, parse_refusal
from fedtrain.spec import DataSpec, JobSpec, job_spec_from_json
from nodes.jobs import JobRecord

if TYPE_CHECKING:  # the ledger loads Opacus, which a node registers without (see NodeAgent.run)
    from fedtrain.node.ledger import PrivacyLedger

log = logging.getLogger("fedtrain.node")


@dataclass(frozen=True)
class Problem:
    refusal: Refusal  # what the coordinator is told
    detail: str       # what the owner's log says


def budget_problem(policy: NodePolicy, detail: str) -> Problem:
    """Work the ledger cannot pay for: the coordinator hears only the policy's limit."""
    return Problem(Refusal(Reason.BUDGET_EXCEEDED, {"policy.max_epsilon": policy.max_epsilon}), detail)


@dataclass(frozen=True)
class Verdict:
    decision: Decision
    refusal: Refusal  # the typed answer: a refusal's reason, or WITHIN_POLICY / PENDING_APPROVAL
    detail: str
    spec: JobSpec | None  # parsed, when it was
    repeat: bool = False  # the same offer again: the recorded answer stands


def _limit(problems: list[Problem], field: str, value: int, policy_field: str, limit: int) -> None:
    if value > limit:
        values = {f"policy.{policy_field}": limit} | ({field: value} if field else {})
        problems.append(Problem(Refusal(Reason.LIMIT_EXCEEDED, values),
                                f"{field or 'the job'} ({value:,}) exceeds the policy's {policy_field} {limit:,}"))


def _under(path: Path, roots: list[Path]) -> bool:
    return any(path == root or root in path.parents for root in roots)


def check_base(spec: JobSpec, policy: NodePolicy) -> list[Problem]:
    """The job's base model: under the owner's model roots (checked on the path before the disk
    is looked at, so a coordinator cannot probe it), allowed, and byte-for-byte the job's."""
    from fedtrain.models.transformer import PACKAGE_PREFIX, verified_base

    base = spec.model.base
    if not base.startswith(PACKAGE_PREFIX):
        path = Path(os.path.normpath(Path(base).expanduser()))
        roots = [Path(os.path.normpath(r.expanduser())) for r in policy.model_roots]
        resolved_ok = path.is_absolute() and _under(path, roots) and _under(
            path.resolve(), [r.resolve() for r in roots])
        if not resolved_ok:  # the second test follows symlinks, only inside the roots
            return [Problem(Refusal(Reason.BASE_NOT_ALLOWED, {"model.base": base}),
                            f"base model path {base!r} is not under the policy's model_roots")]
    if policy.allowed_base_models is not None and spec.model.sha256 not in policy.allowed_base_models:
        return [Problem(Refusal(Reason.BASE_NOT_ALLOWED, {"model.sha256": spec.model.sha256}),
                        f"base model sha256 {spec.model.sha256[:16]}… is not in allowed_base_models")]
    try:
        verified_base(spec)
    except FedtrainError as err:
        return [Problem(Refusal(Reason.BASE_UNAVAILABLE, {"model.sha256": spec.model.sha256}), str(err))]
    return []


def cuda_present() -> bool:
    import torch

    return torch.cuda.is_available()


def review(spec: JobSpec, policy: NodePolicy, ledger: PrivacyLedger) -> list[Problem]:
    """Every rule of the policy that ``spec`` breaks; none touches the node's data."""
    from fedtrain.models import parameter_counts
    from fedtrain.privacy.accounting import batches_per_epoch, plan_round

    problems: list[Problem] = []
    if spec.task not in policy.allowed_tasks:
        problems.append(Problem(Refusal(Reason.TASK_NOT_ALLOWED, {"task": spec.task}),
                                f"task {spec.task!r} is not in allowed_tasks {policy.allowed_tasks}"))
    if spec.model.kind not in policy.allowed_models:
        problems.append(Problem(Refusal(Reason.MODEL_NOT_ALLOWED, {"model.kind": spec.model.kind}),
                                f"model {spec.model.kind!r} is not in allowed_models {policy.allowed_models}"))
    if spec.privacy.delta > policy.delta:
        problems.append(Problem(
            Refusal(Reason.DELTA_TOO_LARGE, {"privacy.delta": spec.privacy.delta, "policy.delta": policy.delta}),
            f"job delta {spec.privacy.delta:g} is larger than the policy's delta {policy.delta:g}"))
    device = spec.training.device
    if device != "auto" and device not in policy.allowed_devices:
        problems.append(Problem(Refusal(Reason.DEVICE_NOT_ALLOWED, {"training.device": device}),
                                f"device {device!r} is not in allowed_devices {policy.allowed_devices}"))
    elif device == "cuda" and not cuda_present():
        # Says what hardware the node has, never anything about its data.
        problems.append(Problem(Refusal(Reason.DEVICE_UNAVAILABLE, {"training.device": device}),
                                "the job asks for device cuda and this machine has no CUDA device"))
    if policy.require_secure_aggregation and spec.secagg is None:
        problems.append(Problem(Refusal(Reason.SECURE_AGGREGATION_REQUIRED,
                                        {"policy.require_secure_aggregation": True}),
                                "the policy requires secure aggregation and the job turns it off"))
    _limit(problems, "training.rounds", spec.training.rounds, "max_rounds_per_job", policy.max_rounds_per_job)
    steps = spec.training.local_epochs * batches_per_epoch(policy.dataset_size, spec.training.batch_size)
    _limit(problems, "", steps, "max_steps_per_round", min(policy.max_steps_per_round,
                                                              spec.training.max_steps_per_round))
    if isinstance(spec.data, DataSpec):
        _limit(problems, "model.num_classes", spec.model.num_classes, "max_classes", policy.max_classes)
    else:
        _limit(problems, "", spec.num_classes or 0, "max_classes", policy.max_classes)
        _limit(problems, "model.max_length", spec.model.max_length, "max_length", policy.max_length)
    if problems:  # the cheap rules first: a refused job loads no model
        return problems
    if spec.model.kind == "transformer":
        problems += check_base(spec, policy)
    if not problems:
        try:
            total, trainable = parameter_counts(spec)
        except (FedtrainError, OSError, ValueError) as err:  # e.g. an adapter the base has no modules for
            return [Problem(Refusal(Reason.SPEC_INVALID), f"the job's model cannot be built here: {err}")]
        _limit(problems, "", trainable, "max_trainable_parameters", policy.max_trainable_parameters)
        _limit(problems, "", total, "max_total_parameters", policy.max_total_parameters)
    if not problems:
        quote = ledger.quote([plan_round(spec, policy.dataset_size)] * spec.training.rounds)
        if not quote.allowed:
            problems.append(budget_problem(policy, "the whole job does not fit: " + quote.refusal()))
    return problems


def admit(job_id: str, spec_json: str, policy: NodePolicy, ledger: PrivacyLedger,
          on_record: JobRecord | None, authenticated: bool = True) -> Verdict:
    """The node's answer to an offer of ``job_id``; ``on_record`` is its earlier record of the job,
    ``authenticated`` whether it has a certificate to authenticate secure-aggregation peers with."""
    if on_record is not None:
        if on_record.spec_json == spec_json:  # the same offer again: the same answer
            answer = parse_refusal(on_record.answer) if on_record.answer else Refusal(Reason.WITHIN_POLICY)
            return Verdict(on_record.decision, answer, on_record.reason, None, repeat=True)
        # A job's spec never changes under its id: a re-offer must not inherit a review or an
        # approval of other bytes.
        return Verdict(Decision.REFUSED, Refusal(Reason.SPEC_CHANGED),
                       f"job {job_id} was offered before with another spec; refused for good", None)
    try:
        spec = job_spec_from_json(spec_json, source=f"job {job_id}")
    except FedtrainError as err:
        return Verdict(Decision.REFUSED, Refusal(Reason.SPEC_INVALID), str(err), None)
    problems = review(spec, policy, ledger)
    if spec.secagg is not None and not authenticated:
        problems.insert(0, Problem(Refusal(Reason.SECURE_AGGREGATION_UNAUTHENTICATED),
                                   "the job is securely aggregated and this node, started without a TLS"
                                   " identity, cannot authenticate its peers"))
    if problems:
        first = problems[0].refusal
        return Verdict(Decision.REFUSED, first, "; ".join(p.detail for p in problems), spec)
    if policy.require_approval:
        return Verdict(Decision.PENDING_APPROVAL, Refusal(Reason.PENDING_APPROVAL),
                       "waiting for the data owner's approval", spec)
    return Verdict(Decision.ACCEPTED, Refusal(Reason.WITHIN_POLICY), "within policy", spec)
