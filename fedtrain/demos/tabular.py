"""`make demo`: breast-cancer data split over 3 nodes, FedAvg under DP-SGD, and a report.

Everything runs on 127.0.0.1 as real processes; nothing is downloaded (scikit-learn
ships the data set).
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import torch
import yaml
from rich.table import Table
from sklearn.datasets import load_breast_cancer
from sklearn.model_selection import train_test_split
from torch.utils.data import TensorDataset

from fedtrain.cli.views import follow, status_table
from fedtrain.console import console
from fedtrain.data import load_table, read_arrow, write_table
from fedtrain.errors import FedtrainError
from fedtrain.protocol import fedtrain_pb2 as pb
from fedtrain.demos.launch import LocalConsortium
from fedtrain.models import build_model, evaluate, initial_state, load_dataset, load_trainable_state, loss_fn
from fedtrain.policy import load_policy
from fedtrain.node.ledger import PrivacyLedger
from fedtrain.spec import JobSpec, parse_job_spec
from fedtrain.node.training import train_plain

NODES = ("hospital-a", "hospital-b", "hospital-c")
LABEL = "malignant"


def write_shards(out: Path, num_nodes: int, seed: int = 0) -> tuple[list[str], list[Path], Path]:
    """Disjoint node shards plus a held-out test set, as CSV files; ``train.csv`` holds the
    shards' rows together, for ``fedtrain simulate`` to partition its own way."""
    data = load_breast_cancer()
    # Recode so that 1 means malignant, the class clinicians look for.
    x, y = data.data, 1 - data.target
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, random_state=seed, stratify=y)
    columns = [str(c) for c in data.feature_names]
    order = np.random.default_rng(seed).permutation(len(y_train))
    shards = []
    for i, idx in enumerate(np.array_split(order, num_nodes)):
        path = out / f"shard-{i}.csv"
        write_table(path, columns, x_train[idx], LABEL, y_train[idx])
        shards.append(path)
    write_table(out / "train.csv", columns, x_train, LABEL, y_train)
    test = out / "test.csv"
    write_table(test, columns, x_test, LABEL, y_test)
    return columns, shards, test


def public_scaling(reference: Path, columns: list[str]) -> dict[str, list[float]]:
    """Scaling constants from the consortium's own reference table (here its evaluation set),
    never from a node's rows: they go into the spec, where every node and the owner see them."""
    with reference.open(newline="") as f:
        rows = list(csv.DictReader(f))
    x = np.array([[float(r[c]) for c in columns] for r in rows])
    std = x.std(axis=0)
    return {"mean": [round(float(v), 6) for v in x.mean(axis=0)],
            "std": [round(float(v), 6) if v > 0 else 1.0 for v in std]}


def demo_spec(columns: list[str], test: Path, rounds: int, epsilon: float) -> JobSpec:
    return parse_job_spec({
        "name": "breast-cancer-fedavg",
        "model": {"kind": "logistic", "num_classes": 2},
        "data": {"features": columns, "label": LABEL, "scaling": public_scaling(test, columns)},
        "training": {"rounds": rounds, "local_epochs": 2, "batch_size": 64, "learning_rate": 0.5},
        "privacy": {"epsilon": epsilon, "delta": 1e-5, "max_grad_norm": 1.0},
        "min_nodes": len(NODES),
        "strategy": {"name": "fedavg"},
        "evaluation": {"data": str(test.resolve())},
        "round_timeout": 300,
    })


def centralized_baseline(spec: JobSpec, shards: list[Path], test: Path) -> dict[str, float]:
    """The same model trained without DP on the union of the shards, for as many epochs."""
    tables = [load_table(p, spec.data, spec.model.num_classes) for p in shards]
    union = TensorDataset(torch.from_numpy(np.concatenate([t.features for t in tables])),
                          torch.from_numpy(np.concatenate([t.labels for t in tables])))
    return train_centrally(spec, union, test)


def train_centrally(spec: JobSpec, union: TensorDataset, test: Path) -> dict[str, float]:
    """Train the job's starting model without DP on pooled data, for as many epochs as the
    job's rounds x local epochs, and evaluate it on the test file."""
    model = build_model(spec)
    load_trainable_state(model, initial_state(spec))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # a reproducible baseline: it is not private and needs no secret randomness
        train_plain(model, union, spec.training, spec.training.rounds * spec.training.local_epochs, loss_fn(spec))
    return evaluate(model, load_dataset(test, spec), spec)


def plot(report: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r["round"] for r in report["rounds"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(rounds, [r["accuracy"] for r in report["rounds"]], marker="o",
            label=f"federated, DP-SGD (ε={report['job']['epsilon']:g} per node)")
    ax.axhline(report["centralized"]["accuracy"], color="gray", linestyle="--", label="centralized, no DP")
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_local_job(out: Path, spec: JobSpec, shards: dict[str, Path],
                  policy: dict) -> tuple[str, pb.JobStatus, dict, dict[str, np.ndarray]]:
    """Run ``spec`` on a local coordinator and one node process per shard; show progress.

    Returns the job id, its final status, each node's ledger rows and lifetime spend, and
    the final global model (its trainable tensors).
    """
    out.mkdir(parents=True, exist_ok=True)
    policies = {}
    for name, shard in shards.items():
        # Each owner declares its dataset size, which is public: here its shard's row count.
        policies[name] = out / f"policy-{name}.yaml"
        policies[name].write_text(yaml.safe_dump({**policy, "dataset_size": read_arrow(shard).num_rows}))
    (out / "job.yaml").write_text(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))
    node_policy = load_policy(policies[next(iter(shards))])
    # Every demo run is a fresh consortium: an earlier run's ledgers would spend the same
    # nodes' budget again, and after a few runs they would refuse the job.
    shutil.rmtree(out / "run", ignore_errors=True)
    # The coordinator reads the job's evaluation table from its directory, and from nowhere else.
    eval_dir = Path(spec.evaluation.data).parent if spec.evaluation else None
    with LocalConsortium(out / "run", eval_dir=eval_dir) as consortium:
        address = consortium.start_coordinator()
        console.print(f"coordinator on {address} (mutual TLS); enrolling and starting {len(shards)} nodes")
        consortium.enroll(list(shards))
        for name, shard in shards.items():
            consortium.start_node(name, shard, policies[name])
        with consortium.client() as client:
            job_id = client.submit(spec)
            status = follow(client, job_id)
            model = client.model(job_id) if status.state == "finished" else {}
        ledgers = {}
        for name in shards:
            ledger = PrivacyLedger(consortium.node_state(name) / "ledger.db",
                                   max_epsilon=node_policy.max_epsilon, delta=node_policy.delta)
            ledgers[name] = (ledger.rows(job_id), ledger.spent())
            ledger.close()
    if status.state != "finished":
        raise FedtrainError(f"the demo job {status.state}: {status.error}; logs in {out / 'run' / 'logs'}")
    return job_id, status, {
        name: {
            "noise_multiplier": rows[-1].noise_multiplier if rows else None,
            "sample_rate": rows[-1].sample_rate if rows else None,
            "steps": sum(r.steps for r in rows),
            "delta": spec.privacy.delta,
            "epsilon": rows[-1].job_epsilon if rows else 0.0,
            "lifetime_epsilon": spent,
            "max_epsilon": node_policy.max_epsilon,
        }
        for name, (rows, spent) in ledgers.items()
    }, model


def standard_error(accuracy: float, examples: int) -> float:
    """The binomial standard error of an accuracy measured on ``examples`` held-out rows."""
    return math.sqrt(accuracy * (1 - accuracy) / examples)


def write_demo_report(out: Path, spec: JobSpec, job_id: str, status: pb.JobStatus, nodes: dict,
                      baselines: dict[str, dict], title: str, test_size: int, extra: dict | None = None) -> dict:
    """report.json and report.png, and the tables on the console; ``extra`` goes into report.json.
    ``test_size``: the held-out rows each accuracy was measured on, for its standard error."""
    report = {
        "job": {"id": job_id, "epsilon": spec.privacy.epsilon, "delta": spec.privacy.delta,
                "rounds": spec.training.rounds, "nodes": list(nodes)},
        "nodes": nodes,
        "rounds": [
            {"round": r.round, "accuracy": r.metrics["accuracy"], "loss": r.metrics["loss"],
             "wall_seconds": r.wall_seconds, "nodes_ok": sum(not n.refusal for n in r.nodes)}
            for r in status.rounds
        ],
        **baselines,
        **(extra or {}),
    }
    final = report["rounds"][-1]["accuracy"]
    central = report["centralized"]["accuracy"]
    report["accuracy_ratio"] = final / central if central else None  # a toy run's baseline may get none right
    report["test_size"] = test_size
    report["standard_error"] = standard_error(final, test_size)  # of the final accuracy
    (out / "report.json").write_text(json.dumps(report, indent=2))
    plot(report, out / "report.png", title)

    console.print(status_table(status))
    budget = Table(title="privacy budget per node")
    for col in ("node", "noise multiplier", "sample rate", "steps", "job epsilon", "lifetime spent / budget"):
        budget.add_column(col)
    for name, n in nodes.items():
        budget.add_row(name, f"{n['noise_multiplier']:.3f}", f"{n['sample_rate']:.3f}", str(n["steps"]),
                       f"{n['epsilon']:.3f} (δ={n['delta']:g})", f"{n['lifetime_epsilon']:.3f} / {n['max_epsilon']:g}")
    console.print(budget)
    others = "".join(f", {name} {b['accuracy']:.4f}" for name, b in baselines.items() if name != "centralized")
    console.print(
        f"federated DP accuracy {final:.4f} ± {report['standard_error']:.4f} (standard error, {test_size} held-out"
        f" rows) vs centralized non-private {report['centralized']['accuracy']:.4f}"
        f" (ratio {report['accuracy_ratio'] or float('nan'):.3f}){others}"
        f"\nreport: {out / 'report.json'}, {out / 'report.png'}"
    )
    return report


def run_demo(out: Path, rounds: int = 5, epsilon: float = 3.0) -> dict:
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    columns, shards, test = write_shards(out, len(NODES))
    spec = demo_spec(columns, test, rounds, epsilon)
    job_id, status, nodes, _ = run_local_job(
        out, spec, dict(zip(NODES, shards)), {"max_epsilon": 10.0, "delta": 1e-5, "max_rounds_per_job": 50})
    central = centralized_baseline(spec, shards, test)
    return write_demo_report(out, spec, job_id, status, nodes, {"centralized": central}, "breast cancer, 3 nodes",
                             len(load_dataset(test, spec)))
