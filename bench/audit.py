"""Audit tightness: the one-run audit's ε lower bound / the claimed ε, at ε = 1, 4 and 8, and
the audit's own run time (``fedtrain audit``, white-box Dirac canaries, on the audit's
reference job: ``fedtrain.audit.reference``). Each audit is one training run, so its bound
varies from run to run: each ε is audited ``REPEATS`` times. A run without noise (the
audit's test-only switch) shows the most these canaries can show."""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

from fedtrain.audit import run_audit
from fedtrain.audit.reference import digits_job

EPSILONS = (1.0, 4.0, 8.0)
CANARIES = 200
REPEATS = 5


def run() -> dict:
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedtrain-bench-audit-") as tmp:
        for epsilon in (*EPSILONS, None):
            spec, table = digits_job(Path(tmp), epsilon or 1.0)
            results = [run_audit(spec, table, canaries=CANARIES, disable_noise=epsilon is None) for _ in range(REPEATS)]
            bounds = [r.epsilon_lower_bound for r in results]
            rows.append({
                "claimed_epsilon": epsilon, "noise_disabled": epsilon is None,
                "epsilon_lower_bound": {"median": statistics.median(bounds), "max": max(bounds)},
                "tightness_median": statistics.median(bounds) / epsilon if epsilon else None,
                "correct_guesses": [r.correct_guesses for r in results], "guesses": results[0].guesses,
                "violations": sum(r.verdict == "VIOLATION" for r in results),
                "seconds_median": statistics.median(r.seconds for r in results),
            })
    return {"job": f"digits, logistic, 3 nodes, 3 full-batch rounds, {CANARIES} white-box canaries,"
                   f" {REPEATS} audits each", "audits": rows,
            "not_measured": "the MiniLM LoRA job: the audit does not take transformer jobs yet"}
