"""Exporting a job's global model with a model card that records how it was trained.

A transformer job exports a peft adapter directory (optionally also the merged
model), both in Hugging Face format; a tabular job exports its tensors as
safetensors. The card records the base model's hash, the rounds, and each node's
ε and δ, as the nodes reported them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fedtrain.errors import FedtrainError
from fedtrain.models import build_model, load_trainable_state
from fedtrain.models.transformer import save_adapter
from fedtrain.protocol import fedtrain_pb2 as pb
from fedtrain.protocol.codec import decode_values
from fedtrain.spec import JobSpec, job_spec_from_json

CARD_JSON = "fedtrain_job.json"


def training_record(status: pb.JobStatus, round: int) -> dict:
    """Machine-readable provenance of a job's model after ``round``."""
    spec = job_spec_from_json(status.spec_json)
    nodes: dict[str, dict] = {}
    for r in status.rounds:
        if 0 < r.round <= round:
            for n in r.nodes:
                if not n.refusal:
                    m = decode_values(n.metrics)
                    node = nodes.setdefault(n.name, {"rounds": 0})
                    node.update(rounds=node["rounds"] + 1, epsilon=m.get("epsilon"), delta=m.get("delta"))
    return {
        "job_id": status.job_id, "name": status.name, "state": status.state, "round": round,
        "rounds_total": status.rounds_total, "task": spec.task,
        "base_model": (
            {"base": spec.model.base, "sha256": spec.model.sha256} if spec.model.kind == "transformer" else None
        ),
        "nodes": nodes,
        "metrics": next((dict(r.metrics) for r in status.rounds if r.round == round), {}),
        "spec": json.loads(status.spec_json),
    }


def model_card(record: dict) -> str:
    base = record["base_model"]
    lines = ["---", "library_name: " + ("peft" if base else "fedtrain")]
    if base:
        lines.append(f"base_model: {base['base']}")
    lines += ["tags: [fedtrain, federated-learning, differential-privacy" + (", lora]" if base else "]"), "---", "",
              f"# {record['name']}", "",
              f"Trained by fedtrain job `{record['job_id']}` ({record['task']}): federated learning with DP-SGD on "
              "every node; only DP-protected trainable tensors left the nodes.", "",
              "| | |", "| --- | --- |"]
    if base:
        lines += [f"| base model | `{base['base']}` |", f"| base weights sha256 | `{base['sha256']}` |"]
    lines += [f"| rounds | {record['round']} of {record['rounds_total']} (job {record['state']}) |"]
    lines += [f"| {k} after round {record['round']} | {v:.4f} |" for k, v in sorted(record["metrics"].items())]
    lines += ["", "## Privacy, per node", "", "| node | rounds | ε (job) | δ |", "| --- | --- | --- | --- |"]
    for name, n in sorted(record["nodes"].items()):
        lines.append(f"| {name} | {n['rounds']} | {n['epsilon']:.4f} | {n['delta']:g} |")
    lines += ["", f"The job spec is in `{CARD_JSON}`.", ""]
    return "\n".join(lines)


def export_model(status: pb.JobStatus, arrays: dict[str, np.ndarray], round: int, out: Path,
                 merged: bool = False) -> list[Path]:
    """Write the model after ``round`` to ``out`` with its card; returns the directories written."""
    spec: JobSpec = job_spec_from_json(status.spec_json)
    out.mkdir(parents=True, exist_ok=True)
    model = build_model(spec)
    load_trainable_state(model, arrays)
    if spec.model.kind == "transformer":
        written = save_adapter(model, spec, out, merged)
    elif merged:
        raise FedtrainError("--merged applies to transformer jobs; a tabular model is exported whole")
    else:
        from safetensors.numpy import save_file

        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(out / "model.safetensors"))
        written = [out]
    record = training_record(status, round)
    for directory in written:
        (directory / "README.md").write_text(model_card(record))
        (directory / CARD_JSON).write_text(json.dumps(record, indent=2))
    return written
