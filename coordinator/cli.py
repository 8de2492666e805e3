"""`fedtrain coordinator ...` commands: serve, and manage the consortium's nodes.

The management commands work on the state directory directly, next to a running
coordinator (SQLite allows it): a revocation takes effect at the node's next request.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path

import typer
from rich.table import Table

from fedtrain.cli.options import INSECURE, LOG_FORMAT, TLS_DIR, identity_option
from fedtrain.console import console, err_console
from fedtrain.logs import LogFormat, configure_logging

app = typer.Typer(help="Run the coordinator that a consortium's nodes connect to.", no_args_is_help=True)
STATE_DIR = typer.Option(..., "--state-dir", help="Directory for the coordinator's SQLite state (created if missing).")


def _registry(state_dir: Path):
    from coordinator.db import Database
    from coordinator.registry import Registry

    if not (state_dir / "coordinator.db").exists():
        raise typer.BadParameter(f"{state_dir} holds no coordinator state", param_hint="--state-dir")
    return Registry(Database(state_dir / "coordinator.db"))


@app.command()
def start(
    state_dir: Path = STATE_DIR,
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(7443, help="Port to listen on; 0 picks a free one."),
    tls_dir: Path = TLS_DIR,
    insecure: bool = INSECURE,
    eval_dir: Path | None = typer.Option(None, "--eval-dir", exists=True, file_okay=False,
                                  help="The only directory whose tables a job's evaluation.data may name"
                                       " [default: STATE_DIR/eval]."),
    audit_canaries: int = typer.Option(0, "--audit-canaries", min=0,
                                       help="Audit each ended job's privacy claim with this many canaries on its"
                                            " evaluation table (`fedtrain audit`); the report shows the bound."
                                            " 0: no audits."),
    metrics_port: int | None = typer.Option(None, "--metrics-port", min=0,
                                            help="Serve Prometheus metrics (plain HTTP, no authentication) at"
                                                 " /metrics on this port; 0 picks a free one. Default: none."),
    metrics_host: str = typer.Option("127.0.0.1", "--metrics-host",
                                     help="Address the metrics listen on, with --metrics-port."),
    log_format: LogFormat = LOG_FORMAT,
) -> None:
    """Start the coordinator and serve until SIGINT/SIGTERM.

    It serves mutual TLS with the coordinator certificate in --tls-dir: every caller needs a
    certificate from the same CA. The bound address is written to STATE_DIR/coordinator.addr
    once it is serving (after the metrics' to STATE_DIR/metrics.addr, with --metrics-port).
    """
    from coordinator.service import serve
    from fedtrain.faults import Faults

    faults = Faults.from_env()  # FEDTRAIN_FAULT: where jobs hold, for the tests of crashes
    os.umask(0o077)  # all that this process writes (state, reports) is its owner's only
    identity = identity_option(tls_dir, insecure, "coordinator")
    configure_logging(log_format, "coordinator")
    log = logging.getLogger("fedtrain.coordinator")
    server, bound, coord = serve(state_dir, host, port, identity=identity, eval_dir=eval_dir, faults=faults,
                                 audit_canaries=audit_canaries)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        metrics = None if metrics_port is None else coord.metrics.serve(metrics_host, metrics_port)
    except OSError as err:  # e.g. the port is taken
        coord.stop()
        server.stop(0)
        raise typer.BadParameter(f"cannot serve metrics on {metrics_host}:{metrics_port}: {err.strerror or err}",
                                 param_hint="--metrics-port") from None
    if metrics is not None:
        (state_dir / "metrics.addr").write_text(f"{metrics_host}:{metrics.server_port}\n")
        log.info("metrics at http://%s:%d/metrics", metrics_host, metrics.server_port)
    (state_dir / "coordinator.addr").write_text(f"{host}:{bound}\n")
    security = f"mutual TLS as {identity.name}" if identity else "plaintext"
    log.info("listening on %s:%d, %s (state in %s)", host, bound, security, state_dir)
    stop.wait()
    if metrics is not None:
        metrics.shutdown()
    coord.stop()
    server.stop(grace=2).wait()


@app.command()
def token(
    names: list[str] = typer.Argument(..., metavar="NODE...", help="Node names (their certificates' common names)."),
    state_dir: Path = STATE_DIR,
    hours: float = typer.Option(24.0, help="How long each token stays valid."),
) -> None:
    """Issue one-time join tokens: a node's first start with its token enrolls its certificate.

    Prints one line per node: NAME TOKEN.
    """
    registry = _registry(state_dir)
    for name in names:
        print(name, registry.create_token(name, hours * 3600))


@app.command()
def nodes(state_dir: Path = STATE_DIR) -> None:
    """Every node the coordinator knows: certificate, state and when it was last seen."""
    from coordinator.grid import NODE_LIVENESS_SECONDS

    registry = _registry(state_dir)
    now = time.time()
    table = Table(title="nodes")
    for col in ("id", "name", "state", "certificate", "valid until", "last seen"):
        table.add_column(col)
    for n in registry.nodes():
        if n.revoked_at is not None:
            state = f"revoked {time.strftime('%Y-%m-%d %H:%M', time.gmtime(n.revoked_at))} UTC"
        elif n.cert_expires is not None and n.cert_expires < now:
            state = "certificate expired"
        else:
            state = "connected" if now - n.last_seen <= NODE_LIVENESS_SECONDS else "disconnected"
        table.add_row(str(n.id), n.name, state, n.fingerprint[:23] + "…" if n.fingerprint else "none (plaintext)",
                      time.strftime("%Y-%m-%d", time.gmtime(n.cert_expires)) if n.cert_expires else "",
                      f"{now - n.last_seen:.0f} s ago")
    for name, expires in registry.open_tokens():
        table.add_row("", name, "join token issued, not enrolled", "", "",
                      f"token valid until {time.strftime('%Y-%m-%d %H:%M', time.gmtime(expires))} UTC")
    console.print(table)


@app.command()
def revoke(name: str = typer.Argument(..., metavar="NODE"), state_dir: Path = STATE_DIR) -> None:
    """Revoke a node's certificate: the coordinator refuses it from its next request on, and drops
    it from running jobs. A new certificate and join token can enroll the node again."""
    from fedtrain.errors import EnrollmentError

    try:
        node = _registry(state_dir).revoke(name)
    except EnrollmentError as err:
        err_console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(1) from None
    console.print(f"node {node.name} revoked" + (f" (certificate {node.fingerprint})" if node.fingerprint else ""))
