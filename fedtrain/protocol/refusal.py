"""Typed refusals: the only words a node sends about why it will not do something.

A refusal on the wire is a reason code from a fixed list plus values that the
coordinator already knows: fields of the job spec it sent, or of the node's policy
(``policy.NAME``), each with exactly the value it has there. Nothing read from the
node's data or disk goes into one; the node keeps its detailed reasons (file, line,
cell) in its own log. The text form, e.g. ``limit-exceeded: training.rounds=5,
policy.max_rounds_per_job=3``, is what travels in ``OfferAnswer.reason`` and
``ResultHeader.refusal``; :func:`parse_refusal` reads it back, and the node's egress
check (``nodes/egress.py``) holds every outbound refusal to these rules.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from fedtrain.errors import WireError

POLICY_PREFIX = "policy."
_KEY = re.compile(r"^[a-z_][a-z0-9_]*(\.[a-z_][a-z0-9_]*)*$")
Scalar = str | int | float | bool | None


class Reason(str, Enum):
    """Why a node refuses a job offer or a task. Each value is a stable wire code."""

    SPEC_INVALID = "spec-invalid"              # the offered spec does not validate on this node
    SPEC_CHANGED = "spec-changed"              # the job was offered before with another spec
    TASK_NOT_ALLOWED = "task-not-allowed"
    MODEL_NOT_ALLOWED = "model-not-allowed"
    BASE_NOT_ALLOWED = "base-not-allowed"      # outside the policy's model_roots or allowed_base_models
    BASE_UNAVAILABLE = "base-unavailable"      # no base with the job's sha256 under the model roots
    LIMIT_EXCEEDED = "limit-exceeded"          # a size or compute limit of the policy
    DEVICE_NOT_ALLOWED = "device-not-allowed"  # training.device is not in the policy's allowed_devices
    DEVICE_UNAVAILABLE = "device-unavailable"  # training.device: cuda on a node without CUDA
    DELTA_TOO_LARGE = "delta-too-large"
    SECURE_AGGREGATION_REQUIRED = "secure-aggregation-required"
    BUDGET_EXCEEDED = "budget-exceeded"        # the ledger cannot pay for the job or round
    OWNER_REFUSED = "owner-refused"
    NOT_ACCEPTED = "not-accepted"              # a task for a job this node has not accepted
    APPROVAL_INVALID = "approval-invalid"      # the approval on record does not verify
    SPEC_MISMATCH = "spec-mismatch"            # the task is for another spec than the approved one
    STAGE_NOT_SERVED = "stage-not-served"
    ROUND_OUT_OF_RANGE = "round-out-of-range"
    ALREADY_RELEASED = "already-released"      # a round is never trained twice
    BAD_GLOBAL_MODEL = "bad-global-model"      # the fetched model does not fit the job
    SECURE_AGGREGATION_FAILED = "secure-aggregation-failed"
    SECURE_AGGREGATION_UNAUTHENTICATED = "secure-aggregation-unauthenticated"  # no TLS identity (--insecure)
    TRAINING_FAILED = "training-failed"        # details in the node's log only
    # Pending approval and acceptance are decisions, not refusals, but travel the same way.
    PENDING_APPROVAL = "pending-approval"
    WITHIN_POLICY = "within-policy"


@dataclass(frozen=True)
class Refusal:
    """A reason code and the spec or policy fields it is about, with their values there."""

    reason: Reason
    values: dict[str, Any] = field(default_factory=dict)

    def text(self) -> str:
        if not self.values:
            return self.reason.value
        parts = [f"{k}={json.dumps(v, sort_keys=True, separators=(',', ':'))}" for k, v in sorted(self.values.items())]
        return f"{self.reason.value}: {', '.join(parts)}"

    __str__ = text


def parse_refusal(text: str) -> Refusal:
    """The typed refusal a wire text holds; WireError if it is not one."""
    code, _, rest = text.partition(": ")
    try:
        reason = Reason(code)
    except ValueError:
        raise WireError(f"{code[:40]!r} is not a refusal code") from None
    values: dict[str, Any] = {}
    for item in _split(rest) if rest else []:
        key, sep, raw = item.partition("=")
        if not sep or not _KEY.match(key) or key in values:
            raise WireError(f"refusal item {item[:40]!r} is not KEY=JSON")
        try:
            values[key] = json.loads(raw)
        except json.JSONDecodeError:
            raise WireError(f"refusal value of {key} is not JSON") from None
    refusal = Refusal(reason, values)
    if refusal.text() != text:
        raise WireError("the refusal is not in its canonical form")
    return refusal


def _split(rest: str) -> list[str]:
    """Split ``k=v, k=v`` at the separators outside JSON strings and lists."""
    items, depth, quoted, escaped, start = [], 0, False, False, 0
    for i, ch in enumerate(rest):
        if quoted:
            escaped, quoted = (False, True) if escaped else (ch == "\\", ch != '"')
        elif ch == '"':
            quoted = True
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif depth == 0 and rest.startswith(", ", i):
            items.append(rest[start:i])
            start = i + 2
    items.append(rest[start:])
    return items


def field_value(document: dict[str, Any], path: str) -> tuple[bool, Any]:
    """(found, value) of a dotted field path in a JSON-like document."""
    value: Any = document
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return False, None
        value = value[part]
    return True, value


def check_refusal(refusal: Refusal, spec: dict[str, Any] | None, policy: dict[str, Any]) -> None:
    """Raise WireError unless every value of ``refusal`` is the value of its field in the
    spec (``spec``'s JSON, None when it did not parse) or in the policy (``policy.`` keys)."""
    for key, value in refusal.values.items():
        if key.startswith(POLICY_PREFIX):
            found, expected = field_value(policy, key[len(POLICY_PREFIX):])
        else:
            found, expected = field_value(spec, key) if spec is not None else (False, None)
        if not found or expected != value or isinstance(expected, dict):
            raise WireError(f"refusal value {key} is not that field's value in the spec or the policy")
