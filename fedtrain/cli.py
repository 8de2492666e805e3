"""The `fedtrain` command line.

`coordinator` and `node` command groups come from the services installed next to
the library (entry point group ``fedtrain.commands``); the library itself holds the
operator's `job` commands and the `demo`.
"""

from __future__ import annotations

import json
import time
from importlib.metadata import entry_points
from pathlib import Path

import typer
from rich.table import Table

from fedtrain.client import CoordinatorClient
from fedtrain.console import console
from fedtrain.errors import FedtrainError
from fedtrain.protocol import fedtrain_pb2 as pb
from fedtrain.protocol.codec import decode_values
from fedtrain.spec import job_spec_from_json
from fedtrain.tls import ROLES, Identity, TLSError, init_ca, issue, load_identity

app = typer.Typer(help="fedtrain: federated training with DP-SGD on data that never leaves its owner.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
job_app = typer.Typer(help="Submit and follow jobs on a coordinator.", no_args_is_help=True)
app.add_typer(job_app, name="job")
certs_app = typer.Typer(help="The consortium's CA and the certificates of mutual TLS.", no_args_is_help=True)
app.add_typer(certs_app, name="certs")

COORDINATOR = typer.Option("127.0.0.1:7443", "--coordinator", "-c", envvar="FEDTRAIN_COORDINATOR",
                           help="HOST:PORT of the coordinator.")
TLS_DIR = typer.Option(None, "--tls-dir", envvar="FEDTRAIN_TLS_DIR",
                       help="Directory with ca.pem, cert.pem and key.pem (from `fedtrain certs issue`).")
INSECURE = typer.Option(False, "--insecure", help="Plaintext gRPC with no authentication: tests on one machine only.")
DONE_STATES = ("finished", "failed")


def identity_option(tls_dir: Path | None, insecure: bool, role: str) -> Identity | None:
    """The TLS identity a command connects or serves with; plaintext only when asked for by name."""
    if insecure:
        if tls_dir is not None:
            raise TLSError("give --tls-dir or --insecure, not both")
        console.print("[bold yellow]warning:[/bold yellow] --insecure: plaintext gRPC; nothing is encrypted and"
                      " nobody is authenticated. Use it for tests on one machine only.", highlight=False)
        return None
    if tls_dir is None:
        raise TLSError(f"mutual TLS needs --tls-dir DIR holding this {role}'s certificate (`fedtrain certs issue"
                       f" --{role} NAME`), or FEDTRAIN_TLS_DIR; --insecure runs plaintext")
    return load_identity(tls_dir, role)


def _client(coordinator: str, tls_dir: Path | None, insecure: bool) -> CoordinatorClient:
    return CoordinatorClient(coordinator, identity_option(tls_dir, insecure, "operator"))


@certs_app.command("init")
def certs_init(ca_dir: Path = typer.Option(..., "--ca-dir", help="Directory for ca.pem and ca.key (the CA's key)."),
               name: str = typer.Option("fedtrain consortium CA", help="The CA's common name."),
               days: int = typer.Option(3650, help="Validity in days.")) -> None:
    """Create the consortium's certificate authority. Keep ca.key offline; share ca.pem."""
    cert = init_ca(ca_dir, name, days)
    console.print(f"CA written: {cert} (and {ca_dir / 'ca.key'}, readable by you only)")


@certs_app.command("issue")
def certs_issue(
    ca_dir: Path = typer.Option(..., "--ca-dir", help="The CA directory of `fedtrain certs init`."),
    out: Path = typer.Option(..., "--out", help="Directory to write ca.pem, cert.pem and key.pem to."),
    node: str = typer.Option(None, "--node", metavar="NAME", help="Issue a node certificate."),
    coordinator: str = typer.Option(None, "--coordinator", metavar="NAME", help="Issue the coordinator's certificate."),
    operator: str = typer.Option(None, "--operator", metavar="NAME", help="Issue an operator's (job CLI) certificate."),
    host: list[str] = typer.Option(["localhost", "127.0.0.1"], "--host",
                                   help="With --coordinator: a DNS name or IP address nodes dial (repeatable)."),
    days: int = typer.Option(365, help="Validity in days."),
) -> None:
    """Issue a certificate for exactly one of --node, --coordinator or --operator."""
    chosen = [(role, name) for role, name in zip(ROLES, (coordinator, node, operator)) if name]
    if len(chosen) != 1:
        raise typer.BadParameter("give exactly one of --node, --coordinator or --operator")
    (role, name), = chosen
    identity = issue(ca_dir, role, name, out, days=days, hosts=tuple(host))
    console.print(f"{role} certificate for {name} in {out}: fingerprint {identity.fingerprint},"
                  f" valid until {identity.not_after:%Y-%m-%d} UTC")


def status_table(status: pb.JobStatus) -> Table:
    """Rounds of a job: global evaluation, per-node epsilon and refusals."""
    secure = job_spec_from_json(status.spec_json).secagg is not None if status.spec_json else False
    aggregation = "secure aggregation (SecAgg+)" if secure else "aggregated in the clear"
    table = Table(title=f"job {status.job_id} ({status.name}): {status.state}, {aggregation}")
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


@job_app.command("submit")
def job_submit(
    spec: Path = typer.Argument(..., exists=True, dir_okay=False, help="The job spec (YAML)."),
    coordinator: str = COORDINATOR,
    wait: bool = typer.Option(False, help="Follow the job until it finishes."),
    tls_dir: Path = TLS_DIR,
    insecure: bool = INSECURE,
) -> None:
    """Validate a job spec and submit it; prints the job id."""
    with _client(coordinator, tls_dir, insecure) as client:
        job_id = client.submit(spec)
        console.print(job_id)
        if wait:
            status = follow(client, job_id)
            if status.state != "finished":
                raise typer.Exit(1)


@job_app.command("status")
def job_status(
    job_id: str = typer.Argument(None, help="A job id; without it, every job is listed."),
    coordinator: str = COORDINATOR,
    tls_dir: Path = TLS_DIR,
    insecure: bool = INSECURE,
) -> None:
    """Show a job's rounds, accuracy, per-node epsilon and any refusals (or list all jobs)."""
    with _client(coordinator, tls_dir, insecure) as client:
        if job_id is None:
            table = Table(title="jobs")
            for col in ("job", "name", "state", "rounds", "error"):
                table.add_column(col)
            for s in client.jobs():
                done = max((r.round for r in s.rounds), default=0)
                table.add_row(s.job_id, s.name, s.state, f"{done}/{s.rounds_total}", s.error)
            console.print(table)
            return
        status = client.status(job_id)
        console.print(status_table(status))
        console.print(decisions_table(status))
        if status.error:
            console.print(f"[yellow]{status.error}[/yellow]")


@job_app.command("report")
def job_report(
    job_id: str,
    open_: bool = typer.Option(False, "--open", help="Also open it in a web browser (on this machine)."),
    coordinator: str = COORDINATOR,
    tls_dir: Path = TLS_DIR,
    insecure: bool = INSECURE,
) -> None:
    """Print the path of a job's report (report.html, next to report.json), on the coordinator's disk.

    The coordinator writes it when the job ends: evaluation per round, ε per node against
    the job's ε, participation and bytes per round.
    """
    with _client(coordinator, tls_dir, insecure) as client:
        status = client.status(job_id)
    if not status.report_path:
        raise FedtrainError(f"job {job_id} has no report yet ({status.state}); the coordinator writes it when"
                            " the job ends")
    print(status.report_path)
    if open_:
        import webbrowser

        webbrowser.open(Path(status.report_path).as_uri())


def _checkpoint(client: CoordinatorClient, job_id: str, round: int) -> tuple[pb.JobStatus, int, dict]:
    status = client.status(job_id)
    round = round or max((r.round for r in status.rounds), default=0)
    return status, round, client.model(job_id, round)


ROUND = typer.Option(0, "--round", help="The global model after this round; 0 means the latest.")


@job_app.command("export")
def job_export(
    job_id: str,
    out: Path = typer.Option(..., "--out", help="Directory to write (created if missing)."),
    merged: bool = typer.Option(False, "--merged", help="Also write the merged full model to OUT/merged."),
    round: int = ROUND,
    coordinator: str = COORDINATOR,
    tls_dir: Path = TLS_DIR,
    insecure: bool = INSECURE,
) -> None:
    """Write a job's model: a peft adapter directory (PeftModel.from_pretrained loads it) or,
    for tabular jobs, safetensors; each with a model card (base hash, rounds, each node's ε and δ).

    The base model is loaded from this machine's disk and checked against the job's hash.
    """
    from fedtrain.export import export_model

    with _client(coordinator, tls_dir, insecure) as client:
        status, round, arrays = _checkpoint(client, job_id, round)
    for path in export_model(status, arrays, round, out, merged=merged):
        console.print(f"wrote {path} (after round {round})")


@job_app.command("eval")
def job_eval(
    job_id: str,
    data: Path = typer.Option(..., "--data", exists=True, dir_okay=False, help="Held-out CSV, JSONL or Parquet file."),
    round: int = ROUND,
    coordinator: str = COORDINATOR,
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    tls_dir: Path = TLS_DIR,
    insecure: bool = INSECURE,
) -> None:
    """Evaluate a job's global model on a held-out file on this machine."""
    from fedtrain.models import build_model, evaluate, load_dataset, load_trainable_state

    with _client(coordinator, tls_dir, insecure) as client:
        status, round, arrays = _checkpoint(client, job_id, round)
    spec = job_spec_from_json(status.spec_json)
    model = build_model(spec)
    load_trainable_state(model, arrays)
    metrics = evaluate(model, load_dataset(data, spec), spec)
    if as_json:
        console.print_json(json.dumps({"job_id": job_id, "round": round, **metrics}))
        return
    table = Table(title=f"job {job_id} after round {round} on {data}")
    for key in metrics:
        table.add_column(key)
    table.add_row(*(f"{v:.4f}" for v in metrics.values()))
    console.print(table)


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


def _demo(out: Path = typer.Option(None, help="Directory for report.json, report.png and all state."),
          text: bool = typer.Option(False, "--text", help="LoRA fine-tuning of MiniLM on tweets instead."),
          rounds: int = typer.Option(None, help="Federated rounds (5 tabular, 4 text)."),
          epsilon: float = typer.Option(None, help="Total epsilon per node for the job (3 tabular, 8 text).")) -> None:
    """Run a demo on 127.0.0.1: a coordinator and 3 node processes, FedAvg under DP-SGD.

    By default breast-cancer data and a logistic model; with --text, sentiment of
    tweets with the shipped MiniLM encoder and a LoRA adapter.
    """
    if text:
        from fedtrain.demo_text import run_text_demo

        run_text_demo(out or Path("out/demo-text"), rounds=rounds or 4, epsilon=epsilon or 8.0)
    else:
        from fedtrain.demo import run_demo

        run_demo(out or Path("out/demo"), rounds=rounds or 5, epsilon=epsilon or 3.0)


app.command("demo")(_demo)


@app.command("simulate")
def simulate_command(
    spec_path: Path = typer.Argument(..., metavar="JOB.yaml", help="The job spec to rehearse."),
    nodes: int = typer.Option(..., "--nodes", "-n", min=1, help="Number of virtual nodes."),
    data: Path = typer.Option(..., "--data", help="Table to partition over the nodes (the format the job reads)."),
    partition: str = typer.Option("iid", help="iid, or dirichlet: non-IID label skew drawn with --alpha."),
    alpha: float = typer.Option(0.5, min=1e-3, help="Dirichlet concentration: smaller, more skewed."),
    seed: int = typer.Option(0, help="Seed of the partition."),
    cpus_per_node: float = typer.Option(1.0, min=0.01, help="CPUs Ray reserves per virtual node in training (Flower's"
                                        " default is 2: one node at a time on 2 cores)."),
    out: Path = typer.Option(None, help="Directory for the partitions and simulation.json (default: temporary)."),
) -> None:
    """Rehearse a job with N virtual nodes on this machine (Flower's simulation engine).

    Each virtual node runs the node agent's own DP-SGD training on its partition, and the
    rounds aggregate with the coordinator's own strategy and loop.
    """
    import shutil
    import tempfile

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from fedtrain.simulation import simulate
    from fedtrain.spec import load_job_spec

    spec = load_job_spec(spec_path)
    if spec.secagg is not None:
        console.print("note: the rehearsal aggregates in the clear; secure aggregation gives the same sum up to"
                      " its quantization")
    # Without --out, the partitions and Flower's log go to a scratch dir, kept only if something failed.
    work = out or Path(tempfile.mkdtemp(prefix="fedtrain-simulate-"))
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as progress:
        bar = progress.add_task(f"{spec.name}: {nodes} virtual nodes (starting Ray)", total=spec.training.rounds)

        def advance(r) -> None:
            detail = f", accuracy {r.metrics['accuracy']:.3f}" if "accuracy" in r.metrics else ""
            progress.update(bar, advance=1, description=f"{spec.name}: {nodes} virtual nodes{detail}")

        result = simulate(spec, data, nodes, work, partition, alpha, seed, cpus_per_node, advance)
    table = Table(title=f"{spec.name}: {nodes} virtual nodes, {partition} partitions")
    metric_names = sorted({k for r in result.rounds for k in r.metrics})
    for column in ["round", "nodes", "failed", "seconds", "nodes/min", *metric_names]:
        table.add_column(column, justify="right")
    for r in result.rounds:
        rate = f"{60 * r.nodes / r.wall_seconds:,.0f}" if r.wall_seconds else "-"
        table.add_row(str(r.round), str(r.nodes), str(sum(r.failed.values())), f"{r.wall_seconds:.1f}", rate,
                      *(f"{r.metrics[k]:.4f}" if k in r.metrics else "-" for k in metric_names))
    console.print(table)
    for reason in sorted({reason for r in result.rounds for reason in r.failed}):
        rounds = ", ".join(str(r.round) for r in result.rounds if reason in r.failed)
        console.print(f"[yellow]virtual nodes failed[/yellow] in round(s) {rounds}: {reason}", highlight=False)
    sizes = result.partition_sizes
    console.print(f"rows per node {min(sizes)}..{max(sizes)}; ε per node {min(result.epsilon):.3f}.."
                  f"{max(result.epsilon):.3f} of the job's {spec.privacy.epsilon} (δ={spec.privacy.delta});"
                  f" peak memory {result.peak_rss_bytes / 2**30:.2f} GiB; {result.wall_seconds:.0f} s in all")
    if out is not None:
        (out / "simulation.json").write_text(result.to_json())
        console.print(f"written: {out / 'simulation.json'}")
    given_up = [r for r in result.rounds if r.given_up]
    if given_up:
        console.print(f"[red]global model unchanged in round(s) {', '.join(str(r.round) for r in given_up)}:[/red]"
                      f" fewer than min_nodes={spec.min_nodes} results", highlight=False)
    if given_up or any(r.failed for r in result.rounds):
        console.print(f"Flower's log, with each failure's traceback: {work / 'flower.log'}", highlight=False)
    elif out is None:
        shutil.rmtree(work)
    if len(given_up) == len(result.rounds):
        raise typer.Exit(1)


def _load_service_commands() -> None:
    for ep in entry_points(group="fedtrain.commands"):
        app.add_typer(ep.load(), name=ep.name)


def main() -> None:
    _load_service_commands()
    try:
        app()
    except FedtrainError as err:
        console.print(f"[red]error:[/red] {err}")
        raise SystemExit(2) from None
