"""Job specifications: the only thing a consortium sends to a data owner.

A job is data, never code. It is validated here on both sides of the wire: the
coordinator validates what an operator submits, and every node validates what it
receives before its policy looks at it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fedtrain.errors import SpecError

PositiveFloat = Annotated[float, Field(gt=0)]


class _Strict(BaseModel):
    # Unknown keys are typos more often than not: refuse them instead of ignoring.
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Strict):
    """A small PyTorch model over tabular features."""

    kind: Literal["logistic", "mlp"] = "logistic"
    hidden: list[Annotated[int, Field(gt=0, le=4096)]] = Field(default_factory=list)
    num_classes: Annotated[int, Field(ge=2, le=1000)] = 2

    @model_validator(mode="after")
    def _hidden_matches_kind(self) -> ModelSpec:
        if self.kind == "logistic" and self.hidden:
            raise ValueError("a logistic model has no hidden layers; use kind: mlp")
        if self.kind == "mlp" and not self.hidden:
            raise ValueError("an mlp needs at least one hidden layer size, e.g. hidden: [32]")
        return self


class DataSpec(_Strict):
    """Which columns of each node's local table the job reads."""

    features: list[str] = Field(min_length=1)
    label: str
    # Each node standardises features with its own mean and std: no statistic leaves it.
    standardize: bool = True

    @field_validator("features")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("feature names must be unique")
        return v

    @model_validator(mode="after")
    def _label_not_feature(self) -> DataSpec:
        if self.label in self.features:
            raise ValueError(f"label column {self.label!r} is also listed as a feature")
        return self


class TrainingSpec(_Strict):
    rounds: Annotated[int, Field(ge=1, le=10_000)]
    local_epochs: Annotated[int, Field(ge=1, le=1000)] = 1
    batch_size: Annotated[int, Field(ge=1, le=65_536)] = 32
    learning_rate: PositiveFloat = 0.1
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.0


class PrivacySpec(_Strict):
    """DP-SGD target for each node over the whole job."""

    epsilon: Annotated[float, Field(gt=0, le=100)]
    delta: Annotated[float, Field(gt=0, lt=1e-2)] = 1e-5
    max_grad_norm: PositiveFloat = 1.0
    # RDP everywhere, so that a node composes every job's spends with one accountant.
    accountant: Literal["rdp"] = "rdp"


class StrategySpec(_Strict):
    name: Literal["fedavg", "fedprox", "fedadam"] = "fedavg"
    # Passed to the Flower strategy's constructor, e.g. {proximal_mu: 0.1} or {eta: 0.01}.
    params: dict[str, float] = Field(default_factory=dict)


class EvaluationSpec(_Strict):
    """Centralized evaluation on a table on the coordinator's own disk (optional)."""

    data: str


class JobSpec(_Strict):
    name: Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.\-]+$")]
    task: Literal["tabular-classification"] = "tabular-classification"
    model: ModelSpec = ModelSpec()
    data: DataSpec
    training: TrainingSpec
    privacy: PrivacySpec
    min_nodes: Annotated[int, Field(ge=1, le=10_000)] = 2
    strategy: StrategySpec = StrategySpec()
    evaluation: EvaluationSpec | None = None
    # Seconds the coordinator waits for a round's results before going on without
    # the nodes that have not answered.
    round_timeout: PositiveFloat = 600.0

    def canonical_json(self) -> str:
        """Stable JSON: the same spec always gives the same bytes, hence the same hash."""
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))

    def digest(self) -> str:
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()


def _explain(err: ValidationError, source: str) -> SpecError:
    lines = [f"{source} is not a valid job spec:"]
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        lines.append(f"  - {where}: {e['msg']}")
    return SpecError("\n".join(lines))


def parse_job_spec(data: Any, source: str = "job spec") -> JobSpec:
    try:
        return JobSpec.model_validate(data)
    except ValidationError as err:
        raise _explain(err, source) from None


def job_spec_from_json(text: str | bytes, source: str = "job spec") -> JobSpec:
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SpecError(f"{source} is not valid JSON: {err}") from None
    return parse_job_spec(data, source)


def load_yaml(path: str | Path, what: str) -> Any:
    p = Path(path)
    try:
        return yaml.safe_load(p.read_text())
    except FileNotFoundError:
        raise SpecError(f"{what} file {p} does not exist") from None
    except yaml.YAMLError as err:
        raise SpecError(f"{what} file {p} is not valid YAML: {err}") from None


def load_job_spec(path: str | Path) -> JobSpec:
    return parse_job_spec(load_yaml(path, "job spec"), source=str(path))
