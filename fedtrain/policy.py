"""A data owner's privacy policy (the node's own file; nothing the coordinator sends
can change it) and the decisions a node records on job offers. The review of an offer
against the policy is the node's admission pipeline, ``nodes/admission.py``."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fedtrain.spec import Task, explain, load_yaml


class NodePolicy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # Lifetime budget for this node's dataset, composed over every job it ever joins.
    max_epsilon: Annotated[float, Field(gt=0, le=100)]
    delta: Annotated[float, Field(gt=0, lt=1e-2)] = 1e-5
    # How many examples this node declares. Public: it sets every job's sampling rate
    # (batch_size / dataset_size) and the node's weight in the average, so that neither
    # the node's decisions nor what it sends depend on how many rows its data really has.
    dataset_size: Annotated[int, Field(ge=1, le=1 << 40)]
    allowed_tasks: list[Task] = list(get_args(Task))
    allowed_models: list[Literal["logistic", "mlp", "transformer"]] = ["logistic", "mlp", "transformer"]
    # sha256 digests of the base models this node will fine-tune; unset allows any base
    # under model_roots that matches the job's digest.
    allowed_base_models: list[Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]] | None = None
    # Directories where a job's base model may live (a job's ``model.base`` outside them is
    # refused without looking at the disk); installed model packages (``package:NAME``) are
    # always allowed.
    model_roots: list[Path] = Field(default_factory=list)
    max_rounds_per_job: Annotated[int, Field(ge=1)] = 100
    # Compute limits, checked on the spec before anything is loaded.
    max_steps_per_round: Annotated[int, Field(ge=1)] = 10_000
    max_trainable_parameters: Annotated[int, Field(ge=1)] = 50_000_000
    max_total_parameters: Annotated[int, Field(ge=1)] = 2_000_000_000
    max_length: Annotated[int, Field(ge=2)] = 2048
    max_classes: Annotated[int, Field(ge=2)] = 1000
    # Devices jobs may train on here; a job asking for another is refused, and device: auto
    # picks CUDA only when it is listed (and present).
    allowed_devices: list[Literal["cpu", "cuda"]] = Field(default=["cpu", "cuda"], min_length=1)
    # When true, a job waits until the owner runs `fedtrain node approve JOB_ID`.
    require_approval: bool = False
    # When true, only jobs whose updates are securely aggregated are accepted.
    require_secure_aggregation: bool = False

    def document(self) -> dict:
        """The policy as JSON values: what a refusal may quote (``policy.FIELD``)."""
        return self.model_dump(mode="json")


def load_policy(path: str | Path) -> NodePolicy:
    try:
        return NodePolicy.model_validate(load_yaml(path, "policy"))
    except ValidationError as err:
        raise explain(err, NodePolicy, f"{path} is not a valid node policy:") from None


class Decision(str, Enum):
    ACCEPTED = "accepted"
    REFUSED = "refused"
    PENDING_APPROVAL = "pending_approval"
