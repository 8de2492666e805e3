"""`fedtrain node ...` commands: the data owner's side."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import threading
from datetime import datetime
from pathlib import Path

import typer
from rich.table import Table

from fedtrain.audit import AuditLog
from fedtrain.console import console
from fedtrain.policy import Decision, load_policy
from fedtrain.privacy.ledger import PrivacyLedger
from nodes.agent import FAILPOINT_ENV, Failpoint, NodeAgent, StatePaths
from nodes.jobs import JobBook

app = typer.Typer(help="Run and inspect a data owner's node agent.", no_args_is_help=True)
STATE_DIR = typer.Option(..., "--state-dir", help="The node's state directory (ledger, jobs, audit log, policy).")
POLICY_COPY = "policy.yaml"


@app.command()
def start(
    coordinator: str = typer.Option(..., help="HOST:PORT of the coordinator; the node dials out, it opens no port."),
    data: Path = typer.Option(..., exists=True, dir_okay=False, help="The local CSV table; it never leaves this machine."),
    policy: Path = typer.Option(..., exists=True, dir_okay=False, help="The owner's privacy policy (YAML)."),
    state_dir: Path = STATE_DIR,
    name: str = typer.Option(socket.gethostname(), help="Stable name this node registers under."),
    poll_seconds: float = typer.Option(10.0, help="Long-poll wait per request to the coordinator."),
) -> None:
    """Start the node agent and serve until SIGINT/SIGTERM."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s node:{name} %(levelname)s %(message)s", force=True)
    owner_policy = load_policy(policy)
    state_dir.mkdir(parents=True, exist_ok=True)
    # The owner's CLI reads the policy in force from the state dir.
    shutil.copyfile(policy, state_dir / POLICY_COPY)
    agent = NodeAgent(coordinator=coordinator, data=data, policy=owner_policy, state_dir=state_dir, name=name,
                      poll_seconds=poll_seconds, failpoint=os.environ.get(FAILPOINT_ENV, ""))
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        agent.run(stop)
    except Failpoint:
        os._exit(70)  # like a kill: no cleanup, nothing flushed that was not already
    finally:
        agent.close()


def _ledger(state_dir: Path) -> PrivacyLedger:
    policy_path = state_dir / POLICY_COPY
    if not policy_path.exists():
        raise typer.BadParameter(f"{state_dir} holds no node state; start a node with --state-dir {state_dir} first")
    policy = load_policy(policy_path)
    return PrivacyLedger(StatePaths(state_dir).ledger, max_epsilon=policy.max_epsilon, delta=policy.delta)


@app.command()
def budget(state_dir: Path = STATE_DIR, as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """What the privacy-budget ledger says: lifetime spend, and every charged round."""
    ledger = _ledger(state_dir)
    rows = ledger.rows()
    spent = ledger.spent()
    if as_json:
        console.print_json(json.dumps({
            "max_epsilon": ledger.max_epsilon, "delta": ledger.delta, "spent": spent,
            "remaining": max(0.0, ledger.max_epsilon - spent),
            "rounds": [r.__dict__ for r in rows],
        }))
        return
    table = Table(title=f"privacy ledger: {spent:.4f} of {ledger.max_epsilon:g} spent (delta {ledger.delta:g})")
    for col in ("job", "round", "noise", "sample rate", "steps", "job delta", "job epsilon", "lifetime +eps", "sent"):
        table.add_column(col)
    for r in rows:
        table.add_row(r.job_id, str(r.round), f"{r.noise_multiplier:.3f}", f"{r.sample_rate:.4f}", str(r.steps),
                      f"{r.delta:g}", f"{r.job_epsilon:.4f}", f"{r.epsilon:.4f}", "yes" if r.sent else "pending")
    console.print(table)


@app.command()
def jobs(state_dir: Path = STATE_DIR) -> None:
    """Jobs offered to this node and the policy's decision on each; pending ones await `approve`."""
    table = Table(title="jobs")
    for col in ("job", "name", "rounds", "epsilon", "delta", "decision", "reason"):
        table.add_column(col)
    for job in JobBook(StatePaths(state_dir).jobs).all():
        spec = job.spec
        table.add_row(job.job_id, spec.name, str(spec.training.rounds), f"{spec.privacy.epsilon:g}",
                      f"{spec.privacy.delta:g}", job.decision.value, job.reason)
    console.print(table)


def _decide(state_dir: Path, job_id: str, decision: Decision, reason: str) -> None:
    try:
        job = JobBook(StatePaths(state_dir).jobs).decide(job_id, decision, reason)
    except (KeyError, ValueError) as err:
        console.print(f"[red]error:[/red] {err.args[0]}")
        raise typer.Exit(1) from None
    console.print(f"job {job.job_id} {job.decision.value}; the running agent tells the coordinator")


@app.command()
def approve(job_id: str, state_dir: Path = STATE_DIR) -> None:
    """Approve a job that is pending the owner's approval."""
    _decide(state_dir, job_id, Decision.ACCEPTED, "approved by the data owner")


@app.command()
def refuse(job_id: str, state_dir: Path = STATE_DIR, reason: str = typer.Option("refused by the data owner")) -> None:
    """Refuse a job that is pending the owner's approval."""
    _decide(state_dir, job_id, Decision.REFUSED, reason)


@app.command()
def audit(state_dir: Path = STATE_DIR, as_json: bool = typer.Option(False, "--json", help="Print JSON lines.")) -> None:
    """Every message this node has sent out: type, job, round, tensors, payload hash, epsilon."""
    entries = list(AuditLog(StatePaths(state_dir).audit).entries())
    if as_json:
        for e in entries:
            print(json.dumps(e))
        return
    table = Table(title=f"audit log ({len(entries)} outbound messages)")
    for col in ("time", "type", "job", "round", "tensors", "payload sha256", "epsilon", "detail"):
        table.add_column(col)
    for e in entries:
        tensors = ", ".join(f"{t['name']}{t['shape']}" for t in e["tensors"])
        table.add_row(datetime.fromtimestamp(e["time"]).strftime("%H:%M:%S"), e["type"], e["job_id"],
                      "" if e["round"] is None else str(e["round"]), tensors, e["payload_sha256"][:16],
                      "" if e["epsilon"] is None else f"{e['epsilon']:.4f}", e["detail"])
    console.print(table)
