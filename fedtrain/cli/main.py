"""The `fedtrain` command line.

`coordinator` and `node` command groups come from the services installed next to
the library (entry point group ``fedtrain.commands``); the library itself holds the
operator's `job`, `certs` and `model` commands, `simulate`, `audit` and the `demo`.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from pathlib import Path

import typer

from fedtrain.cli import audit, certs, jobs, models, simulate
from fedtrain.console import err_console
from fedtrain.errors import FedtrainError

app = typer.Typer(help="fedtrain: federated training with DP-SGD on data that never leaves its owner.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
app.add_typer(jobs.app, name="job")
app.add_typer(certs.app, name="certs")
app.add_typer(models.app, name="model")
app.command("simulate")(simulate.simulate_command)
app.command("audit")(audit.audit_command)
app.command("generate")(models.generate_command)


@app.command("demo")
def demo(out: Path = typer.Option(None, help="Directory for report.json, report.png and all state."),
         text: bool = typer.Option(False, "--text", help="LoRA fine-tuning of MiniLM on tweets instead."),
         llm: bool = typer.Option(False, "--llm", help="DP-LoRA instruction tuning of SmolLM2-135M-Instruct instead."),
         rounds: int = typer.Option(None, help="Federated rounds (5 tabular, 4 text, 2 llm)."),
         epsilon: float = typer.Option(None, help="Total epsilon per node for the job (3 tabular, 8 text and llm).")
         ) -> None:
    """Run a demo on 127.0.0.1: a coordinator and 3 node processes, FedAvg under DP-SGD.

    By default breast-cancer data and a logistic model; with --text, sentiment of
    tweets with the shipped MiniLM encoder and a LoRA adapter; with --llm, the same tweets
    as instructions for the shipped SmolLM2 chat model, with secure aggregation.
    """
    if text and llm:
        raise typer.BadParameter("choose one of --text and --llm")
    if llm:
        from fedtrain.demos.llm import run_llm_demo

        run_llm_demo(out or Path("out/demo-llm"), rounds=rounds or 2, epsilon=epsilon or 8.0)
    elif text:
        from fedtrain.demos.text import ROUNDS, run_text_demo

        run_text_demo(out or Path("out/demo-text"), rounds=rounds or ROUNDS, epsilon=epsilon or 8.0)
    else:
        from fedtrain.demos.tabular import run_demo

        run_demo(out or Path("out/demo"), rounds=rounds or 5, epsilon=epsilon or 3.0)


def _load_service_commands() -> None:
    for ep in entry_points(group="fedtrain.commands"):
        app.add_typer(ep.load(), name=ep.name)


def main() -> None:
    _load_service_commands()
    try:
        app()
    except FedtrainError as err:  # the one place an error becomes an exit code
        err_console.print(f"[red]error:[/red] {err}")
        raise SystemExit(err.exit_code) from None
