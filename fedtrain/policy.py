"""A data owner's privacy policy, and the decision it makes on a job offer.

The policy is decided on the node, from the node's own file; nothing the
coordinator sends can change it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fedtrain.errors import FedtrainError, SpecError
from fedtrain.spec import JobSpec, load_yaml

if TYPE_CHECKING:
    from fedtrain.privacy.ledger import PrivacyLedger


class NodePolicy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # Lifetime budget for this node's dataset, composed over every job it ever joins.
    max_epsilon: Annotated[float, Field(gt=0, le=100)]
    delta: Annotated[float, Field(gt=0, lt=1e-2)] = 1e-5
    allowed_tasks: list[Literal["tabular-classification", "text-classification", "causal-lm"]] = [
        "tabular-classification", "text-classification", "causal-lm"]
    allowed_models: list[Literal["logistic", "mlp", "transformer"]] = ["logistic", "mlp", "transformer"]
    # sha256 digests of the base models this node will fine-tune; unset allows any base
    # that is on this node's disk and matches the job's digest.
    allowed_base_models: list[Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]] | None = None
    max_rounds_per_job: Annotated[int, Field(ge=1)] = 100
    # When true, a job waits until the owner runs `fedtrain node approve JOB_ID`.
    require_approval: bool = False
    # When true, only jobs whose updates are securely aggregated are accepted.
    require_secure_aggregation: bool = False


def load_policy(path: str | Path) -> NodePolicy:
    try:
        return NodePolicy.model_validate(load_yaml(path, "policy"))
    except ValidationError as err:
        lines = [f"{path} is not a valid node policy:"]
        lines += [f"  - {'.'.join(map(str, e['loc'])) or '(top level)'}: {e['msg']}" for e in err.errors()]
        raise SpecError("\n".join(lines)) from None


class Decision(str, Enum):
    ACCEPTED = "accepted"
    REFUSED = "refused"
    PENDING_APPROVAL = "pending_approval"


@dataclass(frozen=True)
class Review:
    decision: Decision
    reason: str


def review_job(spec: JobSpec, policy: NodePolicy, ledger: PrivacyLedger, num_examples: int) -> Review:
    """Decide on a job before any training: every rule is checked, every failure named."""
    # Imported here: the owner's CLI reads policies without loading torch and Opacus.
    from fedtrain.models.transformer import verified_base
    from fedtrain.privacy.accounting import plan_round

    problems = []
    if spec.task not in policy.allowed_tasks:
        problems.append(f"task {spec.task!r} is not in allowed_tasks {policy.allowed_tasks}")
    if spec.model.kind not in policy.allowed_models:
        problems.append(f"model {spec.model.kind!r} is not in allowed_models {policy.allowed_models}")
    if spec.training.rounds > policy.max_rounds_per_job:
        problems.append(f"{spec.training.rounds} rounds exceed max_rounds_per_job {policy.max_rounds_per_job}")
    if spec.privacy.delta > policy.delta:
        problems.append(f"job delta {spec.privacy.delta:g} is larger than the policy's delta {policy.delta:g}")
    if policy.require_secure_aggregation and spec.secagg is None:
        problems.append("the policy requires secure aggregation and the job turns it off")
    if spec.model.kind == "transformer":
        if policy.allowed_base_models is not None and spec.model.sha256 not in policy.allowed_base_models:
            problems.append(f"base model sha256 {spec.model.sha256[:16]}… is not in allowed_base_models")
        try:
            verified_base(spec)  # the node's own copy must be the job's base, byte for byte
        except FedtrainError as err:
            problems.append(str(err))
    if not problems:
        quote = ledger.quote([plan_round(spec, num_examples)] * spec.training.rounds)
        if not quote.allowed:
            problems.append("the whole job does not fit: " + quote.refusal())
    if problems:
        return Review(Decision.REFUSED, "; ".join(problems))
    if policy.require_approval:
        return Review(Decision.PENDING_APPROVAL, "waiting for the data owner's approval")
    return Review(Decision.ACCEPTED, "within policy")
