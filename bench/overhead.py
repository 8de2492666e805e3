"""Issue 15, "a round with no wasted seconds": what a round spends on anything but training.

The demo's job (breast cancer, logistic model, DP-SGD, 3 nodes, 5 rounds) on a fresh local
consortium of real processes with mutual TLS, as the demo runs it, twice: secure aggregation
off, then on. Nodes start, and the job is submitted at once, as in the demo.

- Overhead of a round: its wall time (the coordinator's, checkpoint to checkpoint, evaluation
  included) minus the slowest node's local DP-SGD training, which each node logs. Round 1 also
  waits for the nodes to start and accept the job; rounds 2+ are the steady state.
- Registration: from spawning a node's process to the coordinator logging its registration,
  both on this machine's clock (the log's to the millisecond); it includes the interpreter's
  start and what the node imports before it registers.
"""

from __future__ import annotations

import re
import statistics
import tempfile
from datetime import datetime
from pathlib import Path

from bench.consortium import NODES, LocalJob, run_job
from fedtrain.demos.tabular import demo_spec, write_shards
from fedtrain.spec import parse_job_spec

GOALS = {"steady_overhead_s": 0.3, "registration_s": 1.0}
# The coordinator's log line, after logging's %(asctime)s.
REGISTERED = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .* node (\S+) registered as \d+$")


def registration_seconds(job: LocalJob) -> dict[str, float | None]:
    """Per node: seconds from its spawn to the coordinator's first log of its registration."""
    registered: dict[str, float] = {}
    for line in (job.logs / "coordinator.log").read_text(errors="replace").splitlines():
        if (m := REGISTERED.match(line)) and m[2] not in registered:
            registered[m[2]] = datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    return {name: registered[name] - spawned if name in registered else None for name, spawned in job.spawned.items()}


def round_overheads(job: LocalJob) -> list[dict]:
    # Each node agent logs this (logger "fedtrain.node") once it has trained for a round.
    pattern = re.compile(rf"job {re.escape(job.job_id)} round (\d+): local DP-SGD training took (\d+\.\d+) s$")
    training: dict[int, dict[str, float]] = {}  # round -> node -> seconds
    for name in NODES:
        for line in (job.logs / f"node-{name}.log").read_text(errors="replace").splitlines():
            if m := pattern.search(line):
                training.setdefault(int(m[1]), {})[name] = float(m[2])
    rows = []
    for r in job.status.rounds[1:]:  # round 0 is the initial checkpoint
        nodes = training.get(r.round, {})
        slowest = max(nodes.values()) if len(nodes) == len(NODES) else None
        rows.append({"round": r.round, "wall_s": r.wall_seconds, "slowest_training_s": slowest,
                     "overhead_s": None if slowest is None else r.wall_seconds - slowest})
    return rows


def summary(values: list[float | None]) -> dict | None:
    if not values or None in values:
        return None
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def run() -> dict:
    jobs = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        columns, shards, test = write_shards(tmp, len(NODES))
        demo = demo_spec(columns, test, rounds=5, epsilon=3.0)
        for secure in (False, True):
            spec = parse_job_spec({**demo.model_dump(mode="json"), "secure_aggregation": secure})
            job = run_job(tmp / f"secagg-{'on' if secure else 'off'}", spec, shards)
            rounds = round_overheads(job)
            registration = registration_seconds(job)
            missing = [r["round"] for r in rounds if r["overhead_s"] is None]
            unregistered = [name for name, seconds in registration.items() if seconds is None]
            notes = []
            if missing:
                notes.append(f"rounds {missing}: not every node logged its local training time, overhead not measured")
            if unregistered:
                notes.append(f"nodes {unregistered}: no registration in the coordinator's log")
            jobs.append({
                "secure_aggregation": secure, "rounds": rounds,
                "round_1_overhead_s": rounds[0]["overhead_s"],
                "steady_overhead_s": summary([r["overhead_s"] for r in rounds[1:]]),
                "registration_s": registration, "registration_summary_s": summary(list(registration.values())),
                "note": "; ".join(notes),
            })
    return {"job": "demo: breast cancer, logistic, 3 nodes, 5 rounds, mutual TLS", "goals": GOALS, "jobs": jobs}
