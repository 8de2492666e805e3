"""Preprocessing that DP-SGD cannot see must not depend on the data: a distinguishing test on
neighbouring datasets, run through the node's own loading and training code.

D is a node's table; D' is D plus one outlier row. Each is trained many times from the same
start with fresh DP noise; an attacker thresholds the released model's score on the outlier.
For an (ε, δ)-DP release every threshold must satisfy TPR <= e^ε FPR + δ. We compute, with
95 % Clopper-Pearson bounds, the largest ε that the runs prove, and require it to stay below
the job's ε. The same test on per-node standardisation (what `data.standardize` did) proves
an ε far above the claim: the test has the power to catch the leak it guards against.
"""

import math

import numpy as np
import pytest
import torch
from scipy.stats import beta

from fedtrain.data import DataCheck, write_table
from fedtrain.errors import SpecError
from fedtrain.models import build_model, evaluate, initial_state, load_dataset, loss_fn
from fedtrain.privacy.accounting import expected_batch_size, plan_round
from fedtrain.node.dp_sgd import train_round
from fedtrain.node.training import train_plain
from torch.utils.data import TensorDataset

from conftest import FEATURES, make_spec

EPSILON, RUNS, ROWS = 1.0, 60, 300


def proven_epsilon(scores_d, scores_d1, delta=1e-5, confidence=0.95):
    """The largest ε that a threshold test on these scores proves at ``confidence``."""
    a, b = np.sort(scores_d), np.sort(scores_d1)
    best = 0.0
    for t in np.concatenate([a, b]):
        for x, y in ((b, a), (a, b)):  # either side of the threshold may be the tell
            hits, false = int((x >= t).sum()), int((y >= t).sum())
            tpr_low = beta.ppf(1 - confidence, hits, len(x) - hits + 1) if hits else 0.0
            fpr_high = beta.ppf(confidence, false + 1, len(y) - false) if false < len(y) else 1.0
            if tpr_low > delta:
                best = max(best, math.log((tpr_low - delta) / fpr_high))
    return best


def releases(spec, datasets, probe):
    """The released model's score at ``probe`` (class-1 logit minus class-0, bias left out),
    RUNS times per dataset. The attacker knows D (DP's worst case) and probes along the
    direction D's rows teach the model: how far the model learned from them."""
    start = initial_state(spec)
    plan = plan_round(spec, ROWS + 1)  # the size every owner declares: public, the same for D and D'
    batch = expected_batch_size(plan, ROWS + 1)
    out = []
    for data in datasets:
        scores = []
        for _ in range(RUNS):
            w = train_round(spec, data, start, plan, batch).arrays
            scores.append(float((w["0.weight"][1] - w["0.weight"][0]) @ probe))
        out.append(scores)
    return out


def taught(data):
    """The direction D's rows push the model: class-1 mean minus class-0 mean of its features."""
    x, y = data.tensors[0].numpy(), data.tensors[1].numpy()
    return x[y == 1].mean(0) - x[y == 0].mean(0)


@pytest.fixture
def neighbours(tmp_path, cancer):
    x, y = cancer
    d = tmp_path / "d.csv"
    d1 = tmp_path / "d1.csv"
    write_table(d, FEATURES, x[:ROWS], "malignant", y[:ROWS])
    outlier = x.mean(0) + 100 * x.std(0)
    write_table(d1, FEATURES, np.vstack([x[:ROWS], outlier]), "malignant", np.append(y[:ROWS], 0))
    return d, d1, outlier, x


def spec_with(scaling):
    return make_spec(data={"features": FEATURES, "label": "malignant", "scaling": scaling},
                     training={"rounds": 1, "local_epochs": 3, "batch_size": 64, "learning_rate": 0.2},
                     privacy={"epsilon": EPSILON, "delta": 1e-5, "max_grad_norm": 1.0})


@pytest.mark.slow
def test_public_scaling_keeps_neighbouring_datasets_within_epsilon(neighbours):
    d, d1, outlier, x = neighbours
    # Public constants: the published data set's statistics, the same for every node.
    spec = spec_with({"mean": x.mean(0).tolist(), "std": x.std(0).tolist()})
    datasets = [load_dataset(p, spec, DataCheck()) for p in (d, d1)]
    proven = proven_epsilon(*releases(spec, datasets, taught(datasets[0])))
    print(f"public scaling: the runs prove epsilon >= {proven:.2f}")
    assert proven <= EPSILON, f"the runs prove epsilon >= {proven:.2f} against a claimed {EPSILON}"


@pytest.mark.slow
def test_per_node_standardisation_is_caught_by_the_same_test(neighbours):
    """What `data.standardize: true` did: each node scaled by its own rows' mean and std."""
    d, d1, outlier, _ = neighbours
    spec = spec_with(None)
    datasets = []
    for path in (d, d1):
        raw = load_dataset(path, spec, DataCheck()).tensors
        own = raw[0].numpy()
        mean, std = own.mean(0), own.std(0)
        datasets.append(TensorDataset(torch.from_numpy(((own - mean) / std).astype(np.float32)), raw[1]))
    proven = proven_epsilon(*releases(spec, datasets, taught(datasets[0])))
    print(f"per-node standardisation: the runs prove epsilon >= {proven:.2f}")
    assert proven > 2 * EPSILON, f"per-node standardisation proved only epsilon >= {proven:.2f}"


def test_a_spec_asking_for_per_node_standardisation_is_refused_with_what_to_do_instead():
    with pytest.raises(SpecError, match="breaks DP; give public constants instead: scaling"):
        make_spec(data={"features": FEATURES, "label": "malignant", "standardize": True})
    with pytest.raises(SpecError, match="one mean and one std per feature"):
        make_spec(data={"features": FEATURES, "label": "malignant", "scaling": {"mean": [0.0], "std": [1.0]}})


def test_the_model_scores_a_row_the_same_in_any_file(tmp_path, cancer):
    """Scaling lives in the spec, so `job eval` of a one-row or one-class file scores each row as
    the full file does (per-file standardisation gave 0.0 on one row and 0.40 on one class)."""
    x, y = cancer
    spec = spec_with({"mean": x.mean(0).tolist(), "std": x.std(0).tolist()})
    model = build_model(spec)
    train_plain(model, load_table_dataset(tmp_path / "train.csv", spec, x[:400], y[:400]), spec.training, 5,
                loss_fn(spec))
    full = load_table_dataset(tmp_path / "test.csv", spec, x[400:], y[400:])
    with torch.no_grad():
        right = (model(full.tensors[0]).argmax(1) == full.tensors[1]).numpy()
    assert evaluate(model, full, spec)["accuracy"] == pytest.approx(right.mean()) and right.mean() > 0.85
    one_row = load_table_dataset(tmp_path / "one.csv", spec, x[400:401], y[400:401])
    assert evaluate(model, one_row, spec)["accuracy"] == float(right[0])
    malignant = y[400:] == 1
    one_class = load_table_dataset(tmp_path / "class.csv", spec, x[400:][malignant], y[400:][malignant])
    assert evaluate(model, one_class, spec)["accuracy"] == pytest.approx(right[malignant].mean())


def load_table_dataset(path, spec, x, y):
    write_table(path, FEATURES, x, "malignant", y)
    return load_dataset(path, spec)
