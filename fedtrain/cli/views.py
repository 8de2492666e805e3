"""How a job looks on the operator's terminal: its rounds, its nodes' decisions, its progress."""

from __future__ import annotations

import time

from rich.table import Table

from fedtrain.cli.client import CoordinatorClient
from fedtrain.console import console
from fedtrain.protocol import fedtrain_pb2 as pb
from fedtrain.protocol.codec import decode_values
from fedtrain.spec import job_spec_from_json

DONE_STATES = ("finished", "failed", "cancelled")


def status_table(status: pb.JobStatus) -> Table:
    """Rounds of a job: global evaluation, per-node epsilon and refusals."""
    secure = job_spec_from_json(status.spec_json).secagg is not None if status.spec_json else False
    aggregation = "secure aggregation (SecAgg+)" if secure else "aggregated in the clear"
    table = Table(title=f"job {status.job_id} ({status.name}): {status.state}, {aggregation}")
    if status.approval_wait_seconds:
        table.caption = (f"before round 1, {status.approval_wait_seconds:.1f} s waiting for nodes to accept the job"
                         " (owners' approvals included)")
    # accuracy and loss for classification, loss and perplexity for causal-lm
    keys = sorted({k for r in status.rounds for k in r.metrics})
    for col in ("round", *keys, "nodes ok", "seconds", "epsilon per node"):
        table.add_column(col)
    for r in status.rounds:
        ok = [n for n in r.nodes if not n.refusal]
        eps = ", ".join(f"{n.name}={decode_values(n.metrics).get('epsilon', 0.0):.3f}" for n in ok)
        table.add_row(str(r.round), *(f"{r.metrics.get(k, float('nan')):.4f}" for k in keys),
                      f"{len(ok)}/{len(r.nodes)}" if r.round else "-", f"{r.wall_seconds:.1f}", eps)
    return table


def decisions_table(status: pb.JobStatus) -> Table:
    table = Table(title="node decisions")
    for col in ("node", "decision", "reason"):
        table.add_column(col)
    for n in status.nodes:
        table.add_row(n.name, n.decision, n.reason)
    for r in status.rounds:
        for n in r.nodes:
            if n.refusal:
                table.add_row(n.name, f"refused round {r.round}", n.refusal)
    return table


def follow(client: CoordinatorClient, job_id: str, poll: float = 0.5) -> pb.JobStatus:
    """Show a progress bar until the job finishes or fails; returns the final status."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    status = client.status(job_id)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as progress:
        bar = progress.add_task(f"job {job_id}", total=status.rounds_total)
        while True:
            status = client.status(job_id)
            done = max((r.round for r in status.rounds), default=0)
            last = status.rounds[-1].metrics.get("accuracy") if status.rounds else None
            accepted = sum(n.decision == "accepted" for n in status.nodes)
            detail = f"{status.state}, {accepted} node(s) accepted" + (f", accuracy {last:.3f}" if last else "")
            progress.update(bar, completed=done, description=f"job {job_id} ({detail})")
            if status.state in DONE_STATES:
                return status
            time.sleep(poll)
