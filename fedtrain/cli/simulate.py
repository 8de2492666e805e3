"""`fedtrain simulate`: rehearse a job with virtual nodes on Flower's simulation engine."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from fedtrain.console import console, err_console


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
    audit: bool = typer.Option(False, "--audit", help="Also audit the job's privacy claim on the same table and"
                               " nodes (`fedtrain audit`, up to 200 canaries); a VIOLATION exits 1."),
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
        err_console.print("note: the rehearsal aggregates in the clear; secure aggregation gives the same sum up"
                          " to its quantization")
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
        err_console.print(f"[yellow]virtual nodes failed[/yellow] in round(s) {rounds}: {reason}", highlight=False)
    sizes = result.partition_sizes
    console.print(f"rows per node {min(sizes)}..{max(sizes)}; ε per node {min(result.epsilon):.3f}.."
                  f"{max(result.epsilon):.3f} of the job's {spec.privacy.epsilon} (δ={spec.privacy.delta});"
                  f" peak memory {result.peak_rss_bytes / 2**30:.2f} GiB; {result.wall_seconds:.0f} s in all")
    audited = None
    if audit:
        from fedtrain.audit import run_audit
        from fedtrain.audit.canaries import capacity
        from fedtrain.cli.audit import show

        with console.status(f"{spec.name}: auditing on {nodes} nodes"):
            audited = run_audit(spec, data, nodes=nodes, canaries=min(200, capacity(spec)))
        show(audited)
    if out is not None:
        summary = json.loads(result.to_json()) | {"audit": audited.model_dump() if audited else None}
        (out / "simulation.json").write_text(json.dumps(summary, indent=2))
        console.print(f"written: {out / 'simulation.json'}")
    given_up = [r for r in result.rounds if r.given_up]
    if given_up:
        err_console.print(f"[red]global model unchanged in round(s) {', '.join(str(r.round) for r in given_up)}:[/red]"
                          f" fewer than min_nodes={spec.min_nodes} results", highlight=False)
    if given_up or any(r.failed for r in result.rounds):
        err_console.print(f"Flower's log, with each failure's traceback: {work / 'flower.log'}", highlight=False)
    elif out is None:
        shutil.rmtree(work)
    if len(given_up) == len(result.rounds) or (audited is not None and audited.verdict != "consistent"):
        raise typer.Exit(1)
