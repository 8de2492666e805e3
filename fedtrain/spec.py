"""Job specifications: the only thing a consortium sends to a data owner.

A job is data, never code. It is validated here on both sides of the wire: the
coordinator validates what an operator submits, and every node validates what it
receives before its policy looks at it.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import numpy as np
import yaml
from pydantic import (
    BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator, model_validator,
)

from fedtrain.errors import SpecError

PositiveFloat = Annotated[float, Field(gt=0)]
# The largest tabular model a job may exchange: 50M parameters, 200 MB per float32 update.
# Checked on the spec, before the coordinator or a node allocates anything.
MAX_TABULAR_PARAMETERS = 50_000_000


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


class TransformerSpec(_Strict):
    """An open transformer checkpoint in Hugging Face format, fine-tuned through an adapter.

    ``base`` is where each party finds the weights on its *own* disk: a local
    directory (config, safetensors weights, tokenizer) or ``package:NAME`` for an
    installed model package (see ``fedtrain.models.transformer.MODEL_PACKAGES``).
    ``sha256`` pins the weights, so that every node trains the same base.
    """

    kind: Literal["transformer"]
    base: Annotated[str, Field(min_length=1, max_length=4096)]
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    # Texts are truncated (and padded) to this many tokens, on the node.
    max_length: Annotated[int, Field(ge=2, le=4096)] = 64


class LoraSpec(_Strict):
    """A LoRA adapter (peft): the base stays frozen; only the adapter (and a task head) trains."""

    kind: Literal["lora"] = "lora"
    r: Annotated[int, Field(ge=1, le=256)] = 8
    alpha: PositiveFloat = 16.0
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    target_modules: list[Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_.]+$")]] = Field(min_length=1)


class ScalingSpec(_Strict):
    """Public constants each feature is scaled with: ``(x - mean) / std``.

    They come from public knowledge or reference data (never from a node's rows): every
    node, the coordinator's evaluation and every exported model scale alike, and scaling
    costs no privacy. Per-node statistics would: one row would move every other row.
    """

    mean: list[float]
    std: list[Annotated[float, Field(gt=0)]]


class DataSpec(_Strict):
    """Which columns of each node's local table the job reads, and how they are scaled."""

    features: list[str] = Field(min_length=1)
    label: str
    # None: features are used as they are.
    scaling: ScalingSpec | None = None

    @model_validator(mode="before")
    @classmethod
    def _no_local_statistics(cls, data: Any) -> Any:
        if isinstance(data, dict) and "standardize" in data:
            raise ValueError(
                "standardize (scaling by each node's own mean and std) is data-dependent and breaks DP;"
                " give public constants instead: scaling: {mean: [...], std: [...]}, one per feature"
            )
        return data

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
        if self.scaling and not len(self.scaling.mean) == len(self.scaling.std) == len(self.features):
            raise ValueError(f"scaling needs one mean and one std per feature ({len(self.features)})")
        return self


class TextDataSpec(_Strict):
    """Which columns of each node's local text file (CSV, JSONL or Parquet) the job reads.

    Tokenisation happens on the node; token ids never leave it.
    """

    text: Annotated[str, Field(min_length=1)]
    # text-classification: the label column and its values in class-index order.
    label: str | None = None
    classes: list[Annotated[str, Field(min_length=1)]] | None = None

    @model_validator(mode="after")
    def _classes_with_label(self) -> TextDataSpec:
        if (self.label is None) != (self.classes is None):
            raise ValueError("label and classes go together: name the label column and list its values")
        if self.classes is not None and (len(self.classes) < 2 or len(set(self.classes)) != len(self.classes)):
            raise ValueError("classes must list at least two distinct label values")
        if self.label is not None and self.label == self.text:
            raise ValueError(f"column {self.text!r} cannot be both the text and the label")
        return self


class InstructionDataSpec(_Strict):
    """Prompt/response pairs for instruction tuning (supervised fine-tuning of a causal LM).

    The node renders each pair with the tokenizer's chat template; only the response's
    tokens count in the loss. ``system`` is a public system prompt put before every prompt.
    ``answers`` is the closed set of responses (e.g. ["negative", "positive"]) when there is
    one: evaluation then also greedy-generates an answer and scores it as right or wrong.
    """

    prompt: Annotated[str, Field(min_length=1)]
    response: Annotated[str, Field(min_length=1)]
    system: Annotated[str, Field(max_length=4096)] | None = None
    answers: list[Annotated[str, Field(min_length=1, max_length=256)]] | None = None

    @model_validator(mode="after")
    def _distinct(self) -> InstructionDataSpec:
        if self.prompt == self.response:
            raise ValueError(f"column {self.prompt!r} cannot be both the prompt and the response")
        if self.answers is not None and (len(self.answers) < 2 or len(set(self.answers)) != len(self.answers)):
            raise ValueError("answers must list at least two distinct responses")
        return self


def _data_kind(v: Any) -> str:
    if isinstance(v, dict):
        return "instruction" if "prompt" in v else "text" if "text" in v else "table"
    return {InstructionDataSpec: "instruction", TextDataSpec: "text"}.get(type(v), "table")


TASK_KINDS = {
    "tabular-classification": ("logistic", "mlp"),
    "text-classification": ("transformer",),
    "causal-lm": ("transformer",),
    "instruction-tuning": ("transformer",),
}
# What each task reads in data: the data spec's class and how a spec writes it.
TASK_DATA = {
    "tabular-classification": ("table", "features: [...] and label: COLUMN"),
    "text-classification": ("text", "text: COLUMN, label: COLUMN and classes: [...]"),
    "causal-lm": ("text", "text: COLUMN"),
    "instruction-tuning": ("instruction", "prompt: COLUMN and response: COLUMN"),
}
Task = Literal["tabular-classification", "text-classification", "causal-lm", "instruction-tuning"]


class TrainingSpec(_Strict):
    rounds: Annotated[int, Field(ge=1, le=10_000)]
    local_epochs: Annotated[int, Field(ge=1, le=1000)] = 1
    batch_size: Annotated[int, Field(ge=1, le=65_536)] = 32
    learning_rate: PositiveFloat = 0.1
    # The node's optimizer. It steps on Opacus's privatised gradient (clipped, summed,
    # noised), so its choice is post-processing and costs no privacy. It starts afresh each
    # round: the global model it steps from has moved since, and no state outlives a round
    # on the node (see README, "Tuning DP jobs").
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.0  # sgd only
    # adam and adamw: the moments' decay rates. beta1² < beta2 bounds each step (robust.py).
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.9, 0.999)
    # adamw only: decoupled weight decay, each step shrinks the weights by learning_rate * weight_decay.
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    # A node's DP plan takes at most this many steps a round: bounds its compute and its update.
    max_steps_per_round: Annotated[int, Field(ge=1, le=1_000_000)] = 10_000
    # batch_size is the logical (Poisson) batch that privacy is accounted for; a node splits
    # it into physical batches of at most this many rows (Opacus's BatchMemoryManager), so a
    # logical batch of thousands fits memory. Changes memory and time, never the result's law.
    physical_batch_size: Annotated[int, Field(ge=1, le=65_536)] | None = None
    # How per-example gradient norms are found: hooks (per-example gradients; cheapest for
    # LoRA on a frozen base) or ghost (Opacus's ghost clipping: norms without materialising
    # per-example gradients, at the cost of a second backward; cheapest for wide dense layers).
    # auto: ghost for the tabular models (dense layers), hooks for transformers with adapters.
    grad_sample_mode: Literal["auto", "hooks", "ghost"] = "auto"
    # Where a node trains: auto takes CUDA when the node has it and its policy allows it.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # bf16 runs the forward pass under autocast (CUDA, or CPUs with bf16 support); the
    # trainable weights, the clipping and the noise stay in float32.
    precision: Literal["fp32", "bf16"] = "fp32"

    @model_validator(mode="after")
    def _physical_within_logical(self) -> TrainingSpec:
        if self.physical_batch_size is not None and self.physical_batch_size > self.batch_size:
            raise ValueError(f"physical_batch_size ({self.physical_batch_size}) is larger than the logical"
                             f" batch_size ({self.batch_size}); leave it out to train whole batches")
        return self

    @model_validator(mode="after")
    def _optimizer_settings(self) -> TrainingSpec:
        if self.momentum and self.optimizer != "sgd":
            raise ValueError(f"momentum is sgd's; {self.optimizer} keeps its own moments (betas)")
        if self.weight_decay and self.optimizer != "adamw":
            raise ValueError("weight_decay is adamw's decoupled decay: set optimizer: adamw")
        if self.learning_rate * self.weight_decay > 1:
            raise ValueError("learning_rate * weight_decay must be at most 1: one step's decay would overshoot zero")
        beta1, beta2 = self.betas
        if beta1**2 >= beta2:
            raise ValueError(f"betas {list(self.betas)}: beta1² must be below beta2, which bounds an Adam step")
        return self

    def adam_move(self, steps: int) -> float:
        """The most ``steps`` Adam steps (fresh moments, ``betas``) move one coordinate, in units
        of ``learning_rate``, whatever the gradients, the noise among them.

        Step t moves a coordinate by lr·m̂_t/(√v̂_t + eps), with m̂_t = m_t/(1−β1^t) and
        v̂_t = v_t/(1−β2^t). By Cauchy–Schwarz over m_t = (1−β1)·Σ β1^(t−i)·g_i and
        v_t = (1−β2)·Σ β2^(t−i)·g_i², with γ = β1²/β2 < 1 (the spec's rule):
        |m_t|/√v_t ≤ (1−β1)·√((1−γ^t) / ((1−γ)(1−β2))). So step t moves it by at most
        lr·κ_t, κ_t = (1−β1)/(1−β1^t)·√((1−β2^t)(1−γ^t) / ((1−β2)(1−γ))) (κ_1 = 1), and
        the round by the sum of them.
        """
        beta1, beta2 = self.betas
        gamma = beta1**2 / beta2
        t = np.arange(1, steps + 1, dtype=np.float64)
        first = (1 - beta1) / (1 - beta1**t)
        return float(np.sum(first * np.sqrt((1 - beta2**t) * (1 - gamma**t) / ((1 - beta2) * (1 - gamma)))))


class PrivacySpec(_Strict):
    """DP-SGD target for each node over the whole job."""

    epsilon: Annotated[float, Field(gt=0, le=100)]
    delta: Annotated[float, Field(gt=0, lt=1e-2)] = 1e-5
    max_grad_norm: PositiveFloat = 1.0
    # RDP everywhere, so that a node composes every job's spends with one accountant.
    accountant: Literal["rdp"] = "rdp"


# Byzantine-robust rules: each needs the nodes' individual updates, so no secure aggregation.
ROBUST_STRATEGIES = ("fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan")


class StrategySpec(_Strict):
    name: Literal["fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad", "fedmedian", "fedtrimmedavg", "krum",
                  "multikrum", "bulyan"] = "fedavg"
    # Passed to the Flower strategy's constructor, e.g. {proximal_mu: 0.1}, {eta: 0.01},
    # {beta: 0.34} (fedtrimmedavg drops ⌊beta·n⌋ of n values at each end) or
    # {num_malicious_nodes: 1} (krum, multikrum, bulyan).
    params: dict[str, float] = Field(default_factory=dict)


class SecureAggregationSpec(_Strict):
    """SecAgg+ (Bell et al., CCS 2020): the coordinator learns only the sum of the updates.

    ``true``/``false`` is shorthand for ``{enabled: ...}``. Left out, it is on for
    jobs with ``min_nodes`` >= 3. See ``fedtrain.secagg`` for the protocol.
    """

    enabled: bool = True
    # Each coordinate of a node's update (its change to the global model) is clipped to
    # [-clip_range, clip_range], then weighted and quantized. Default: see
    # fedtrain.secagg.encoding.clip_range.
    clip_range: PositiveFloat | None = None
    # Caps a node's weight in the average, with or without secure aggregation: its example
    # count is clamped to [1, max_weight]. Under secure aggregation the weight
    # min(examples, max_weight) / max_weight travels inside the masked vector, so the
    # coordinator never sees a shard size.
    max_weight: Annotated[int, Field(ge=1, le=1 << 30)] = 10_000
    # Share holders per node, itself included (odd). Default: 2*ceil(log2 n) + 1, all
    # nodes when that is at least n.
    neighbours: Annotated[int, Field(ge=3, le=10_001)] | None = None
    # Reconstructing a node's secret needs more than this fraction of its share holders.
    # At least 1/2, so that no one can collect both of a node's secrets.
    threshold: Annotated[float, Field(ge=0.5, lt=1)] = 0.5
    # Seconds to wait for the answers to the stages that do not train.
    stage_timeout: PositiveFloat = 60.0

    @field_validator("neighbours")
    @classmethod
    def _odd(cls, v: int | None) -> int | None:
        if v is not None and v % 2 == 0:
            raise ValueError("neighbours must be odd: each node has as many share holders on either side of it")
        return v


class EvaluationSpec(_Strict):
    """Centralized evaluation on a table on the coordinator's own disk (optional)."""

    data: str


class JobSpec(_Strict):
    name: Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.\-]+$")]
    task: Task = "tabular-classification"
    model: Annotated[ModelSpec | TransformerSpec, Field(discriminator="kind")] = ModelSpec()
    adapter: LoraSpec | None = None
    data: Annotated[
        Annotated[DataSpec, Tag("table")] | Annotated[TextDataSpec, Tag("text")]
        | Annotated[InstructionDataSpec, Tag("instruction")], Discriminator(_data_kind)
    ]
    training: TrainingSpec
    privacy: PrivacySpec
    min_nodes: Annotated[int, Field(ge=1, le=10_000)] = 2
    strategy: StrategySpec = StrategySpec()
    secure_aggregation: SecureAggregationSpec
    evaluation: EvaluationSpec | None = None
    # Seconds the coordinator waits for a round's results before going on without
    # the nodes that have not answered.
    round_timeout: PositiveFloat = 600.0
    # Seconds the coordinator waits for min_nodes nodes to accept a new job (owners' approvals
    # included) before the job fails, naming who refused and who never answered. It steers the
    # coordinator only; raise it for nodes whose owners approve jobs by hand.
    start_timeout: PositiveFloat = 3600.0
    # Times a round with fewer than min_nodes results is run again before it is given up
    # (the global model then stays as it was). Nodes that already sent the round send the
    # same update again: a retry costs them no budget.
    round_retries: int = Field(1, ge=0, le=10)

    @model_validator(mode="before")
    @classmethod
    def _secure_aggregation_default(cls, data: Any) -> Any:
        if isinstance(data, dict):
            value = data.get("secure_aggregation")
            if value is None:
                min_nodes = data.get("min_nodes", 2)
                value = isinstance(min_nodes, int) and min_nodes >= 3
            if isinstance(value, bool):
                data = {**data, "secure_aggregation": {"enabled": value}}
        return data

    @model_validator(mode="after")
    def _parts_fit_the_task(self) -> JobSpec:
        kinds = TASK_KINDS[self.task]
        if self.model.kind not in kinds:
            raise ValueError(f"task {self.task} needs model kind {' or '.join(kinds)}, not {self.model.kind!r}")
        kind, wanted = TASK_DATA[self.task]
        labelled = isinstance(self.data, TextDataSpec) and self.data.label is not None
        if _data_kind(self.data) != kind or (kind == "text" and labelled != (self.task == "text-classification")):
            raise ValueError(f"task {self.task} reads {wanted} in data")
        if (self.adapter is None) == (self.model.kind == "transformer"):
            raise ValueError(
                "a transformer is fine-tuned through an adapter: add adapter: {r: 8, target_modules: [...]}"
                if self.adapter is None else "adapters apply to transformer models only"
            )
        if isinstance(self.model, ModelSpec):
            params = self.tabular_parameters()
            if params > MAX_TABULAR_PARAMETERS:
                raise ValueError(f"the model has {params:,} parameters; a job may exchange at most"
                                 f" {MAX_TABULAR_PARAMETERS:,} (fewer or narrower hidden layers)")
        if self.secure_aggregation.enabled and self.min_nodes < 3:
            raise ValueError(
                "secure aggregation needs min_nodes >= 3: with two nodes, each can subtract its own update from"
                " the sum and learn the other's; raise min_nodes or set secure_aggregation: false"
            )
        return self

    def tabular_parameters(self) -> int:
        """Parameters of a tabular model (weights and biases of each linear layer)."""
        widths = [len(self.data.features), *self.model.hidden, self.model.num_classes]
        return sum(a * b + b for a, b in zip(widths, widths[1:]))

    @model_validator(mode="after")
    def _strategy_fits(self) -> JobSpec:
        name, params = self.strategy.name, self.strategy.params
        if name in ROBUST_STRATEGIES and self.secure_aggregation.enabled:
            raise ValueError(f"strategy {name} needs each node's update, which secure aggregation hides:"
                             " set secure_aggregation: false, or use fedavg, fedprox, fedadam, fedyogi or fedadagrad")
        pull = self.training.learning_rate * params.get("proximal_mu", 0.0)
        if name == "fedprox" and not 0 <= pull <= 1:
            raise ValueError(f"learning_rate * proximal_mu is {pull:g}: FedProx's pull towards the round's start"
                             " must be between 0 and 1 (more overshoots it)")
        if name == "bulyan" and self.min_nodes < 4 * params.get("num_malicious_nodes", 0) + 3:
            raise ValueError("bulyan needs min_nodes >= 4 * num_malicious_nodes + 3")
        return self

    @property
    def secagg(self) -> SecureAggregationSpec | None:
        """The secure aggregation settings, or None when the job aggregates in the clear."""
        return self.secure_aggregation if self.secure_aggregation.enabled else None

    @property
    def num_classes(self) -> int | None:
        """Output classes of a classification task (None for a generative one)."""
        if isinstance(self.data, DataSpec):
            return self.model.num_classes
        return len(self.data.classes) if self.task == "text-classification" else None

    @property
    def generative(self) -> bool:
        """A causal LM that trains on next-token loss (causal-lm, instruction-tuning)."""
        return self.task in ("causal-lm", "instruction-tuning")

    def with_training(self, **training: Any) -> JobSpec:
        """This spec with some ``training`` keys changed, validated again."""
        return JobSpec.model_validate({**self.model_dump(), "training": {**self.training.model_dump(), **training}})

    def canonical_json(self) -> str:
        """Stable JSON: the same spec always gives the same bytes, hence the same hash."""
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))

    def digest(self) -> str:
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()


def _members(annotation: Any) -> list[tuple[str | None, Any]]:
    """The types a field may hold, each with its ``Tag`` (None without one)."""
    origin = get_origin(annotation)
    if origin is Annotated:
        inner, *meta = get_args(annotation)
        tag = next((m.tag for m in meta if isinstance(m, Tag)), None)
        return [(tag or t, member) for t, member in _members(inner)]
    if origin in (Union, UnionType):
        return [m for arg in get_args(annotation) if arg is not type(None) for m in _members(arg)]
    return [(None, annotation)]


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _is_tag(tag: str | None, member: Any, part: Any) -> bool:
    """Whether ``part`` of an error's location is the tag pydantic gave this member of a union:
    its ``Tag``, or a value of a ``Literal`` field it is discriminated by (``kind``)."""
    if tag is not None or not _is_model(member):
        return tag == part
    return any(part in get_args(f.annotation) for f in member.model_fields.values()
               if get_origin(f.annotation) is Literal)


def _locate(model: type[BaseModel], loc: tuple) -> tuple[list[str], Any]:
    """An error's location as the user wrote it (without pydantic's union tags), and the type there."""
    path: list[str] = []
    here: Any = model
    for part in loc:
        members = _members(here)
        tagged = [m for tag, m in members if len(members) > 1 and _is_tag(tag, m, part)]
        if tagged:
            here = tagged[0]
            continue
        here = members[0][1]
        path.append(str(part))
        if _is_model(here):
            field = here.model_fields.get(part)
            here = field.annotation if field else None
        else:  # list[X], tuple[X, X] and dict[str, X] hold X
            here = (get_args(here) or (None,))[-1]
    return path, here


def _problem(model: type[BaseModel], e: Any) -> str:
    path, _ = _locate(model, e["loc"])
    if e["type"] != "extra_forbidden":
        return f"{'.'.join(path) or '(top level)'}: {e['msg']}"
    # An unknown key is a typo more often than not: name the keys that level takes, and the closest.
    # A value written as a key (``strategy: {fedprox: ...}``) gets the key it is a value of.
    _, parent = _locate(model, e["loc"][:-1])
    fields = next((m.model_fields for _, m in _members(parent) if _is_model(m)), {})
    key = path[-1]
    owner = [k for k, f in fields.items() if get_origin(f.annotation) is Literal and key in get_args(f.annotation)]
    close = difflib.get_close_matches(key, list(fields), n=1)
    hint = f" ({key} is a value: write {owner[0]}: {key})" if owner else f" (did you mean {close[0]}?)" if close else ""
    return f"{'.'.join(path)}: unknown key{hint}; the keys here are {', '.join(fields)}"


def explain(err: ValidationError, model: type[BaseModel], heading: str) -> SpecError:
    """A file's validation errors, one line each, under ``heading``: what a user reads."""
    return SpecError("\n".join([heading, *(f"  - {_problem(model, e)}" for e in err.errors())]))


def parse_job_spec(data: Any, source: str = "job spec") -> JobSpec:
    try:
        return JobSpec.model_validate(data)
    except ValidationError as err:
        raise explain(err, JobSpec, f"{source} is not a valid job spec:") from None


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
