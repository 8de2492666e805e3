"""Audit tightness: the one-run audit's ε lower bound / the claimed ε, at ε = 1, 4 and 8, and
the audit's own run time (``fedtrain audit``, white-box canaries), for the audit's two
reference jobs (``fedtrain.audit.reference``): the tabular one (digits, logistic) and the
MiniLM LoRA one (tweets). Each audit is one training run, so its bound varies from run to
run: each ε is audited several times. A run without noise (the audit's test-only switch)
shows the most these canaries can show."""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

from fedtrain.audit import run_audit
from fedtrain.audit.reference import digits_job, tweets_job

EPSILONS = (1.0, 4.0, 8.0)
# (name, job, canaries, audits per ε): the LoRA job's audits take about 2 minutes each on 2 cores.
JOBS = (
    ("tabular", "digits, logistic, 3 nodes x 599 rows, 3 full-batch rounds", digits_job, 200, 5),
    ("lora", "tweets, MiniLM + LoRA r=4, 3 nodes x 60 rows, 3 full-batch rounds", tweets_job, 200, 2),
)


def run() -> dict:
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedtrain-bench-audit-") as tmp:
        for name, description, job, canaries, repeats in JOBS:
            for epsilon in (*EPSILONS, None):
                spec, table = job(Path(tmp), epsilon or 1.0)
                results = [run_audit(spec, table, canaries=canaries, disable_noise=epsilon is None)
                           for _ in range(repeats if epsilon else 1)]
                bounds = [r.epsilon_lower_bound for r in results]
                rows.append({
                    "job": name, "description": description, "canaries": canaries,
                    "claimed_epsilon": epsilon, "noise_disabled": epsilon is None,
                    "epsilon_lower_bound": {"median": statistics.median(bounds), "max": max(bounds)},
                    "tightness_median": statistics.median(bounds) / epsilon if epsilon else None,
                    "correct_guesses": [r.correct_guesses for r in results], "guesses": results[0].guesses,
                    "violations": sum(r.verdict == "VIOLATION" for r in results),
                    "seconds_median": statistics.median(r.seconds for r in results),
                })
    return {"audits": rows}
