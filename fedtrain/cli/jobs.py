"""`fedtrain job`: submit and follow jobs on a coordinator, fetch, export and evaluate their models."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from fedtrain.cli.client import CoordinatorClient
from fedtrain.cli.options import COORDINATOR, INSECURE, ROUND, TLS_DIR, identity_option
from fedtrain.cli.views import decisions_table, follow, status_table
from fedtrain.console import console, err_console
from fedtrain.errors import FedtrainError
from fedtrain.protocol import fedtrain_pb2 as pb
from fedtrain.spec import job_spec_from_json

app = typer.Typer(help="Submit and follow jobs on a coordinator.", no_args_is_help=True)


def _client(coordinator: str, tls_dir: Path | None, insecure: bool) -> CoordinatorClient:
    return CoordinatorClient(coordinator, identity_option(tls_dir, insecure, "operator"))


@app.command("submit")
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


@app.command("plan")
def job_plan(
    spec_path: Path = typer.Argument(..., exists=True, dir_okay=False, help="The job spec (YAML)."),
    examples: list[int] = typer.Option(..., "--examples", min=1,
                                       help="A node's dataset size (its policy's dataset_size); repeat for several."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON list, one object per size."),
) -> None:
    """Print, for each node size, the DP plan a node will train and charge under: noise multiplier,
    sample rate, expected logical batch, steps, the noise per coordinate (σ·C / batch) and
    against the signal (σ·√d / batch, d trainable parameters) and the job's ε, with a warning
    for each regime known to give poor accuracy. Needs no coordinator."""
    from fedtrain.privacy.planning import plan_node, trainable_parameters
    from fedtrain.spec import load_job_spec

    spec = load_job_spec(spec_path)
    trainable = trainable_parameters(spec)
    plans = [plan_node(spec, n, trainable) for n in examples]
    if as_json:
        print(json.dumps([p.model_dump() for p in plans]))
        return
    table = Table(title=f"DP plan of {spec.name}: {spec.training.rounds} round(s), ε = {spec.privacy.epsilon:g},"
                        f" δ = {spec.privacy.delta:g}, C = {spec.privacy.max_grad_norm:g},"
                        f" d = {'?' if trainable is None else f'{trainable:,}'} trainable parameters")
    for col in ("examples", "σ", "sample rate", "batch", "steps/round", "steps", "σ·C / batch", "σ·√d / batch", "ε"):
        table.add_column(col, justify="right")
    for p in plans:
        table.add_row(f"{p.examples:,}", f"{p.noise_multiplier:.3f}", f"{p.sample_rate:.4g}", f"{p.expected_batch:,}",
                      f"{p.steps_per_round:,}", f"{p.total_steps:,}", f"{p.noise_std:.3g}",
                      "?" if p.noise_to_signal is None else f"{p.noise_to_signal:.3g}", f"{p.epsilon:.3f}")
    console.print(table)
    if trainable is None:
        err_console.print("the base model is not on this machine: no noise-to-signal (σ·√d / batch)")
    for p in plans:
        for warning in p.warnings:
            err_console.print(f"[yellow]warning[/yellow] ({p.examples:,} examples): {warning}")


@app.command("status")
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


@app.command("cancel")
def job_cancel(
    job_id: str,
    coordinator: str = COORDINATOR,
    tls_dir: Path = TLS_DIR,
    insecure: bool = INSECURE,
) -> None:
    """Stop a waiting or running job: its round in progress is abandoned (its nodes charge no budget
    for it), its nodes are told, and its rounds and report are kept. A job that has ended is an error."""
    with _client(coordinator, tls_dir, insecure) as client:
        status = client.cancel(job_id)
    if status.state in ("waiting", "running"):  # still abandoning its round, or evaluating the last one
        console.print(f"job {job_id} is stopping; `fedtrain job status {job_id}` shows when it has")
    else:
        console.print(f"job {job_id}: {status.state}" + (f" ({status.error})" if status.error else ""))


@app.command("report")
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


@app.command("export")
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
    from fedtrain.models.export import export_model

    with _client(coordinator, tls_dir, insecure) as client:
        status, round, arrays = _checkpoint(client, job_id, round)
    for path in export_model(status, arrays, round, out, merged=merged):
        console.print(f"wrote {path} (after round {round})")


@app.command("eval")
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
