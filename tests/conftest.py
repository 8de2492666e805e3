import numpy as np
import pytest
from sklearn.datasets import load_breast_cancer

from fedtrain.data import write_table
from fedtrain.spec import parse_job_spec

FEATURES = ["mean radius", "mean texture", "mean smoothness", "worst area"]


@pytest.fixture(scope="session")
def cancer():
    d = load_breast_cancer()
    cols = [list(d.feature_names).index(f) for f in FEATURES]
    return d.data[:, cols], 1 - d.target


@pytest.fixture
def shards(tmp_path, cancer):
    """Three disjoint node shards and a test set of real breast-cancer rows."""
    x, y = cancer
    order = np.random.default_rng(0).permutation(len(y))
    test_idx, train_idx = order[:100], order[100:]
    paths = []
    for i, idx in enumerate(np.array_split(train_idx, 3)):
        p = tmp_path / f"shard-{i}.csv"
        write_table(p, FEATURES, x[idx], "malignant", y[idx])
        paths.append(p)
    test = tmp_path / "test.csv"
    write_table(test, FEATURES, x[test_idx], "malignant", y[test_idx])
    return paths, test


def make_spec(**over):
    base = {
        "name": "test-job",
        "data": {"features": FEATURES, "label": "malignant"},
        "training": {"rounds": 2, "batch_size": 32, "learning_rate": 0.5},
        "privacy": {"epsilon": 1.0, "delta": 1e-5, "max_grad_norm": 1.0},
        "min_nodes": 1,
    }
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return parse_job_spec(base)
