"""How `fedtrain simulate` scales with the number of virtual nodes.

Each configuration is one `fedtrain simulate` command in a fresh process (Ray starts and
stops with it), on the demo's job (logistic model, DP-SGD, FedAvg) over a synthetic table
of 30 features with 50 rows per virtual node (scikit-learn's ``make_classification``:
the breast-cancer set has too few rows for 1,000 nodes), IID partitions, 3 rounds.
Round 1 includes starting Ray's workers; rounds 2-3 are the steady state. Peak memory is
the largest total resident memory of the command's process tree (driver, Ray, workers).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml
from sklearn.datasets import make_classification

from fedtrain.data import write_table
from fedtrain.spec import parse_job_spec

ROWS_PER_NODE = 50
FEATURES = [f"f{i}" for i in range(30)]


def job(root: Path, nodes: int) -> tuple[Path, Path]:
    x, y = make_classification(n_samples=ROWS_PER_NODE * nodes + 1000, n_features=len(FEATURES), n_informative=10,
                               random_state=0)
    data, test = root / f"train-{nodes}.csv", root / f"test-{nodes}.csv"
    write_table(data, FEATURES, x[1000:], "y", y[1000:])
    write_table(test, FEATURES, x[:1000], "y", y[:1000])
    spec = parse_job_spec({
        "name": f"simulate-{nodes}", "model": {"kind": "logistic"},
        # make_classification's features are already centred with unit variance
        "data": {"features": FEATURES, "label": "y"},
        "training": {"rounds": 3, "local_epochs": 2, "batch_size": 64, "learning_rate": 0.5},
        "privacy": {"epsilon": 3.0}, "min_nodes": 3, "evaluation": {"data": str(test)},
    })
    path = root / f"job-{nodes}.yaml"
    path.write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    return path, data


def simulate(root: Path, nodes: int, cpus_per_node: float) -> dict:
    spec, data = job(root, nodes)
    out = root / f"out-{nodes}-{cpus_per_node}"
    subprocess.run([sys.executable, "-m", "fedtrain", "simulate", str(spec), "--nodes", str(nodes), "--data", str(data),
                    "--cpus-per-node", str(cpus_per_node), "--out", str(out)], check=True, capture_output=True)
    result = json.loads((out / "simulation.json").read_text())
    first, *steady = result["rounds"]
    assert all(r["nodes"] == nodes for r in result["rounds"]), "a round left virtual nodes out"
    return {"nodes": nodes, "cpus_per_node": cpus_per_node, "first_round_s": first["wall_seconds"],
            "steady_round_s": statistics.mean(r["wall_seconds"] for r in steady),
            "nodes_per_minute": statistics.mean(60 * nodes / r["wall_seconds"] for r in steady),
            "peak_rss_bytes": result["peak_rss_bytes"], "accuracy": result["rounds"][-1]["metrics"]["accuracy"]}


def run() -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        rows = [simulate(Path(tmp), n, 1.0) for n in (10, 100, 1000)]
        # Flower's default reservation (2 CPUs per virtual node), and half a CPU.
        rows += [simulate(Path(tmp), 100, cpus) for cpus in (2.0, 0.5)]
    return rows
