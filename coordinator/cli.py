"""`fedtrain coordinator ...` commands."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

import typer

from fedtrain.console import console

app = typer.Typer(help="Run the coordinator that a consortium's nodes connect to.", no_args_is_help=True)


@app.command()
def start(
    state_dir: Path = typer.Option(..., help="Directory for the coordinator's SQLite state (created if missing)."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(7443, help="Port to listen on; 0 picks a free one."),
) -> None:
    """Start the coordinator and serve until SIGINT/SIGTERM.

    The bound address is written to STATE_DIR/coordinator.addr once it is serving.
    """
    from coordinator.service import serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s coordinator %(levelname)s %(message)s", force=True)
    logging.getLogger("flwr").propagate = False  # Flower logs through its own handler
    server, bound, coord = serve(state_dir, host, port)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    (state_dir / "coordinator.addr").write_text(f"{host}:{bound}\n")
    console.print(f"coordinator listening on {host}:{bound} (state in {state_dir})")
    stop.wait()
    coord.stop()
    server.stop(grace=2).wait()
