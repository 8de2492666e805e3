"""A reference job for measuring the audit itself (its tests and ``python -m bench --only audit``).

sklearn's bundled 8x8 digits (1,797 rows, 64 features, 10 classes; offline): wide enough
for hundreds of canary directions. A logistic model, 3 rounds, and two choices that make
the one-run audit as sharp as it can be:

- full batches (``batch_size`` above any node's rows, so every step samples every row):
  the auditor sees only the round's sum, not which steps drew a canary, so subsampling's
  amplification, which the accountant counts, would only blunt the audit;
- a clipping norm above every real row's gradient norm (≈ |x|·√2 ≤ 20), so only the
  canaries (gradient ≈ 100·√2) are clipped, and a small learning rate, so a canary is not
  fitted (and its gradient gone) after one step.
"""

from __future__ import annotations

from pathlib import Path

from fedtrain.data import write_table
from fedtrain.spec import JobSpec, parse_job_spec

FEATURES = [f"pixel{i}" for i in range(64)]


def digits_job(directory: Path, epsilon: float, *, evaluate: bool = False) -> tuple[JobSpec, Path]:
    """The job at ``epsilon`` and its table, written to ``directory``; with ``evaluate`` the
    job also evaluates on that table (named relative to ``directory``, a coordinator's
    evaluation directory)."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    table = directory / "digits.csv"
    if not table.exists():
        write_table(table, FEATURES, x, "digit", y)
    std = x.std(axis=0)
    std[std == 0] = 1.0  # a constant pixel: any public constant scales it
    spec = parse_job_spec({
        "name": f"digits-audit-eps{epsilon:g}", "model": {"kind": "logistic", "num_classes": 10},
        "data": {"features": FEATURES, "label": "digit",
                 "scaling": {"mean": x.mean(axis=0).tolist(), "std": std.tolist()}},
        "training": {"rounds": 3, "batch_size": 2048, "learning_rate": 0.002},
        "privacy": {"epsilon": epsilon, "delta": 1e-5, "max_grad_norm": 100.0},
        "min_nodes": 3, "secure_aggregation": {"enabled": False},
        **({"evaluation": {"data": table.name}} if evaluate else {}),
    })
    return spec, table
