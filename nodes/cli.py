"""`fedtrain node ...` commands: the data owner's side."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.table import Table

from fedtrain.node import approval
from fedtrain.node.audit_log import AuditLog
from fedtrain.cli.options import INSECURE, LOG_FORMAT, TLS_DIR, identity_option
from fedtrain.console import console, err_console
from fedtrain.errors import DataSourceError, FaultInjected, FedtrainError
from fedtrain.faults import Faults
from fedtrain.logs import LogFormat, configure_logging
from fedtrain.policy import Decision, NodePolicy, load_policy
from fedtrain.sources import DataSource, parse_source
from nodes.agent import NodeAgent
from nodes.dialing import GIVE_UP_AFTER
from nodes.jobs import JobBook
from nodes.state import StatePaths

if TYPE_CHECKING:
    from fedtrain.node.ledger import PrivacyLedger

app = typer.Typer(help="Run and inspect a data owner's node agent.", no_args_is_help=True)
STATE_DIR = typer.Option(..., "--state-dir", help="The node's state directory (ledger, jobs, audit log, policy).")
JOIN_TOKEN_ENV = "FEDTRAIN_JOIN_TOKEN"
# A database's table or query is the owner's to set, here: a job names columns, never SQL.
DATA_TABLE = typer.Option(None, "--data-table", envvar="FEDTRAIN_DATA_TABLE",
                          help="With a database URL in --data: the table (NAME or SCHEMA.NAME) that holds your rows.")
DATA_QUERY = typer.Option(None, "--data-query", envvar="FEDTRAIN_DATA_QUERY",
                          help="With a database URL in --data, instead of --data-table: the SELECT that gives your"
                               " rows (run in a read-only transaction).")


def _data_source(data: str, table: str | None, query: str | None) -> DataSource:
    try:
        return parse_source(data, table, query)
    except DataSourceError as err:
        raise typer.BadParameter(str(err), param_hint="--data") from None


@app.command()
def start(
    coordinator: str = typer.Option(..., envvar="FEDTRAIN_COORDINATOR",
                                    help="HOST:PORT of the coordinator; the node dials out, it opens no port."),
    data: str = typer.Option(..., envvar="FEDTRAIN_DATA",
                             help="Your table, which never leaves this machine: a CSV, JSONL or Parquet file, or a"
                                  " database URL such as postgresql://reader@db/clinic (with --data-table or"
                                  " --data-query; a password goes in PGPASSWORD or FEDTRAIN_DATA, not in argv)."),
    data_table: str | None = DATA_TABLE,
    data_query: str | None = DATA_QUERY,
    policy: Path = typer.Option(..., exists=True, dir_okay=False, help="The owner's privacy policy (YAML)."),
    state_dir: Path = STATE_DIR,
    name: str = typer.Option(None, help="Name to register under: the certificate's, or with --insecure the host name."),
    poll_seconds: float = typer.Option(10.0, help="Long-poll wait per request to the coordinator."),
    tls_dir: Path = TLS_DIR,
    insecure: bool = INSECURE,
    join_token_file: Path | None = typer.Option(
        None, "--join-token-file", exists=True, dir_okay=False,
        help=f"File holding the one-time token from `fedtrain coordinator token` (or set {JOIN_TOKEN_ENV});"
             " needed at the first start only."),
    log_format: LogFormat = LOG_FORMAT,
    give_up_after: float = typer.Option(
        GIVE_UP_AFTER, "--give-up-after", min=0, metavar="SECONDS",
        help="Exit with status 1 once the TLS handshake has failed this long for a reason retrying cannot mend"
             " (a certificate that does not verify). An absent coordinator is waited for without limit."),
) -> None:
    """Start the node agent and serve until SIGINT/SIGTERM.

    It connects with mutual TLS using the node certificate in --tls-dir.
    """
    os.umask(0o077)  # all that this process writes (state, logs of its libraries) is its owner's only
    # The token comes from a file or the environment, not argv, which every user of the machine can read.
    join_token = join_token_file.read_text().strip() if join_token_file else os.environ.get(JOIN_TOKEN_ENV, "")
    source = _data_source(data, data_table, data_query)
    identity = identity_option(tls_dir, insecure, "node")
    if identity is not None and name not in (None, identity.name):
        raise typer.BadParameter(f"the certificate in {tls_dir} is {identity.name!r}'s", param_hint="--name")
    name = identity.name if identity else name or socket.gethostname()
    configure_logging(log_format, f"node:{name}")
    owner_policy = load_policy(policy)
    agent = NodeAgent(coordinator=coordinator, data=source, policy=owner_policy, state_dir=state_dir, name=name,
                      poll_seconds=poll_seconds, faults=Faults.from_env(), identity=identity, join_token=join_token,
                      give_up_after=give_up_after)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        agent.run(stop)  # registers first, then loads torch, Opacus and Flower
    except FaultInjected as err:
        logging.getLogger("fedtrain.node").warning("%s", err)
        os._exit(70)  # like a kill: no cleanup, nothing flushed that was not already
    finally:
        agent.close()


def _policy(state_dir: Path) -> NodePolicy:
    """The policy in force: the copy the running node keeps in its state dir."""
    policy_path = StatePaths(state_dir).policy
    if not policy_path.exists():
        raise typer.BadParameter(f"{state_dir} holds no node state; start a node with --state-dir {state_dir} first")
    return load_policy(policy_path)


def _ledger(state_dir: Path, policy: NodePolicy | None = None) -> PrivacyLedger:
    from fedtrain.node.ledger import PrivacyLedger

    policy = policy or _policy(state_dir)
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


def _show(job, data: DataSource | None, key, policy) -> Table:
    """Exactly what a job runs on this node and what leaves it, for the owner to approve."""
    from fedtrain.data import DataCheck
    from fedtrain.models import expected_manifest, load_dataset
    from fedtrain.privacy.accounting import epsilon, plan_round
    from fedtrain.secagg.encoding import clip_range, masked_manifest

    spec = job.spec
    signed = job.signature is not None and approval.verify(key.public_key(), job.job_id, spec.digest(), job.signature)
    table = Table(title=f"job {job.job_id} ({spec.name}): {job.decision.value}", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("spec sha256", spec.digest())
    table.add_row("approval", "signed by this node's key" if signed else "not approved")
    table.add_row("decision", f"{job.decision.value}: {job.reason} (the coordinator was told: {job.answer})")
    model = spec.model
    table.add_row("task, model", f"{spec.task}, {model.kind}" + (
        f" base {model.base} (sha256 {model.sha256[:16]}…)" if model.kind == "transformer" else ""))
    if spec.adapter is not None:
        table.add_row("adapter", f"LoRA r={spec.adapter.r} alpha={spec.adapter.alpha:g} on {spec.adapter.target_modules}")
    table.add_row("reads columns", ", ".join(str(v) for v in spec.data.model_dump().values() if v))
    t = spec.training
    table.add_row("training", f"{t.rounds} rounds x {t.local_epochs} local epoch(s), batch {t.batch_size}, "
                              f"lr {t.learning_rate:g}, strategy {spec.strategy.name}")
    table.add_row("DP-SGD", f"epsilon {spec.privacy.epsilon:g} for the whole job at delta {spec.privacy.delta:g}, "
                            f"clipping {spec.privacy.max_grad_norm:g}")
    if spec.task == "tabular-classification":
        scaling = spec.data.scaling
        table.add_row("scaling", "none (features as they are)" if scaling is None else
                      "public constants: " + ", ".join(f"({f} - {m:g}) / {s:g}" for f, m, s in
                                                       zip(spec.data.features, scaling.mean, scaling.std)))
    plan = plan_round(spec, policy.dataset_size)
    per_round = [epsilon([plan.as_history()] * r, spec.privacy.delta) for r in range(1, t.rounds + 1)]
    table.add_row("epsilon", f"noise {plan.noise_multiplier:.3f} at sample rate {plan.sample_rate:.4g} (from the"
                  f" policy's dataset_size {policy.dataset_size}); after each round: "
                  + ", ".join(f"{e:.3f}" for e in per_round))
    if data is not None:
        check = DataCheck()
        try:
            rows = len(load_dataset(data, spec, check))
        except (FedtrainError, OSError, ValueError) as err:  # e.g. no base model to tokenise with
            rows, check = 0, None
            table.add_row("your data", f"cannot be read for this job: {err}")
        if check is not None:
            table.add_row("your data", f"{rows} usable row(s) (dataset_size declares {policy.dataset_size})" + (
                f"; {check.count} row(s) would be skipped: {check.summary()}" if check.count else ""))
    else:
        table.add_row("your data", "pass --data (as to `node start`) to check it against the job (nothing is sent)")
    try:
        manifest = expected_manifest(spec)
        tensors = ", ".join(f"{k} {v.dtype}{list(v.shape)}" for k, v in manifest.items())
    except (FedtrainError, OSError, ValueError) as err:  # e.g. the base model is not on this machine
        manifest, tensors = None, f"(cannot build the model here: {err})"
    if spec.secagg is not None:
        table.add_row("secure aggregation", f"on: the coordinator sees only the sum; updates clipped to "
                                            f"+-{clip_range(spec):g} per element")
        if manifest is not None:
            (name, info), = masked_manifest(manifest).items()
            tensors = f"{name} {info.dtype}{list(info.shape)}, masking: {tensors}"
    else:
        table.add_row("secure aggregation", "off: the coordinator sees this node's update")
    table.add_row("leaves this node per round", f"{tensors}; the DP parameters and epsilon of the round"
                  + ("" if spec.secagg is not None else "; the number of examples"))
    return table


@app.command()
def jobs(state_dir: Path = STATE_DIR,
         show: str = typer.Option("", "--show", metavar="JOB_ID", help="Everything about one job, to approve it."),
         data: str | None = typer.Option(None, "--data", help="With --show: your table, as for `node start`,"
                                                                " to check it against the job."),
         data_table: str | None = DATA_TABLE, data_query: str | None = DATA_QUERY) -> None:
    """Jobs offered to this node and the policy's decision on each; pending ones await `approve`."""
    paths = StatePaths(state_dir)
    if show:
        job = JobBook(paths.jobs).get(show)
        if job is None:
            raise typer.BadParameter(f"no job {show!r} on this node; `fedtrain node jobs` lists them")
        source = None if data is None else _data_source(data, data_table, data_query)
        console.print(_show(job, source, approval.load_or_create_key(paths.key), _policy(state_dir)))
        return
    table = Table(title="jobs")
    for col in ("job", "name", "rounds", "epsilon", "delta", "decision", "reason", "ended"):
        table.add_column(col)
    for job in JobBook(paths.jobs).all():
        spec = job.spec
        table.add_row(job.job_id, spec.name, str(spec.training.rounds), f"{spec.privacy.epsilon:g}",
                      f"{spec.privacy.delta:g}", job.decision.value, job.reason, job.ended or "-")
    console.print(table)


def _decide(state_dir: Path, job_id: str, decision: Decision, reason: str) -> None:
    from fedtrain.protocol.refusal import Reason, Refusal

    paths = StatePaths(state_dir)
    book = JobBook(paths.jobs)
    job = book.get(job_id)
    signature = None
    answer = Refusal(Reason.OWNER_REFUSED).text()
    try:
        if decision is Decision.ACCEPTED and job is not None:
            from nodes.admission import review

            # The policy is applied again to exactly the bytes that are signed: an approval
            # never covers a spec the policy refuses, whatever the job book says.
            policy = _policy(state_dir)
            problems = review(job.spec, policy, _ledger(state_dir, policy))
            if problems:
                raise ValueError(f"job {job_id} breaks this node's policy; it cannot be approved: "
                                 + "; ".join(p.detail for p in problems))
            signature = approval.sign(approval.load_or_create_key(paths.key), job_id, job.spec.digest())
            answer = Refusal(Reason.WITHIN_POLICY).text()
        job = book.decide(job_id, decision, answer, reason, signature,
                          spec_json=None if job is None else job.spec_json)
    except (KeyError, ValueError) as err:
        err_console.print(f"[red]error:[/red] {err.args[0]}")
        raise typer.Exit(1) from None
    console.print(f"job {job.job_id} {job.decision.value}; the running agent tells the coordinator")


@app.command()
def approve(job_id: str, state_dir: Path = STATE_DIR) -> None:
    """Approve a job that is pending the owner's approval (after checking it against the policy again)."""
    _decide(state_dir, job_id, Decision.ACCEPTED, "approved by the data owner")


@app.command()
def refuse(job_id: str, state_dir: Path = STATE_DIR, reason: str = typer.Option(
        "refused by the data owner", help="Kept on this node; the coordinator is told only that the owner refused.")) -> None:
    """Refuse a job that is pending the owner's approval."""
    _decide(state_dir, job_id, Decision.REFUSED, reason)


audit_app = typer.Typer(help="The node's audit log of outbound messages.")
app.add_typer(audit_app, name="audit")


@audit_app.callback(invoke_without_command=True)
def audit(ctx: typer.Context, state_dir: Path | None = typer.Option(None, "--state-dir", help=STATE_DIR.help),
          as_json: bool = typer.Option(False, "--json", help="Print JSON lines.")) -> None:
    """Every message this node has sent out: type, job, round, tensors, payload hash, epsilon."""
    if ctx.invoked_subcommand is not None:
        return
    if state_dir is None:
        raise typer.BadParameter("give the node's --state-dir", param_hint="--state-dir")
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


@audit_app.command("verify")
def audit_verify(state_dir: Path = STATE_DIR) -> None:
    """Check the log's hash chain: an edited, removed, inserted or reordered entry is named. Exits 1 if any."""
    result = AuditLog(StatePaths(state_dir).audit).verify()
    for problem in result.problems:
        console.print(f"[red]{problem}[/red]")
    if not result.ok:
        raise typer.Exit(1)
    console.print(f"audit log intact: {result.entries} entries, head {result.head}")
