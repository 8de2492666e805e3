"""`fedtrain audit`: measure a job's privacy with one training run, next to its claimed ε."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.table import Table

from fedtrain.console import console

if TYPE_CHECKING:
    from fedtrain.audit import AuditResult


def audit_command(
    spec_path: Path = typer.Argument(..., metavar="JOB.yaml", help="The job spec to audit."),
    data: Path = typer.Option(..., "--data", help="Table to split over the nodes (the format the job reads)."),
    nodes: int = typer.Option(3, "--nodes", "-n", min=1, help="Number of in-process nodes; node 0 holds the canaries."),
    canaries: int = typer.Option(200, "--canaries", min=1, help="Canaries, each inserted with probability 1/2."),
    guesses: int = typer.Option(None, "--guesses", min=2, help="Canaries guessed on (even; default: half, at least"
                                " 10, fixed before any score is seen)."),
    black_box: bool = typer.Option(False, "--black-box", help="Score by the final model's loss on each canary, not"
                                   " by node 0's updates."),
    seed: int = typer.Option(None, help="Seed of the canary bits and the split (default: unpredictable)."),
    out: Path = typer.Option(None, help="Directory to write audit.json to."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON object."),
) -> None:
    """Train the job once with canaries in one node's data and bound its ε from below.

    The bound holds at 95% confidence: a bound above the job's ε means the training leaks
    more than it claims (exit status 1).
    """
    from fedtrain.audit import run_audit
    from fedtrain.spec import load_job_spec

    # Flower logs a line per round and node; this command's result says it all. (Here, not in
    # run_audit: a coordinator that audits its jobs keeps its other jobs' Flower log.)
    logging.getLogger("flwr").setLevel(logging.ERROR)
    spec = load_job_spec(spec_path)
    if as_json:
        result = run_audit(spec, data, nodes=nodes, canaries=canaries, guesses=guesses, white_box=not black_box,
                           seed=seed)
        typer.echo(result.model_dump_json())
    else:
        with console.status(f"{spec.name}: auditing with {canaries} canaries on {nodes} nodes"):
            result = run_audit(spec, data, nodes=nodes, canaries=canaries, guesses=guesses,
                               white_box=not black_box, seed=seed)
        show(result)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "audit.json").write_text(result.model_dump_json(indent=2))
        if not as_json:
            console.print(f"written: {out / 'audit.json'}")
    if result.verdict != "consistent":
        raise typer.Exit(1)


def show(result: AuditResult) -> None:
    """The audit's table: the bound next to the claim, and the verdict."""
    table = Table(title=f"{result.job}: one-run privacy audit ({result.score})")
    for column in ("claimed ε", "ε lower bound", "δ", "confidence", "correct / guesses", "canaries", "verdict"):
        table.add_column(column, justify="right")
    colour = "green" if result.verdict == "consistent" else "red"
    table.add_row(f"{result.claimed_epsilon:g}", f"{result.epsilon_lower_bound:.3f}", f"{result.delta:g}",
                  f"{result.confidence:.0%}", f"{result.correct_guesses} / {result.guesses}",
                  str(result.canaries), f"[{colour}]{result.verdict}[/{colour}]")
    console.print(table)
    console.print(f"{result.seconds:.0f} s; a lower bound: the job's true ε may be larger than it shows.")
