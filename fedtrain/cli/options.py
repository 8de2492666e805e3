"""Options every `fedtrain` command group takes: where the coordinator is, and the TLS
identity to speak to it with. The coordinator's and the node's command groups import them."""

from __future__ import annotations

from pathlib import Path

import typer

from fedtrain.console import err_console
from fedtrain.logs import LogFormat
from fedtrain.protocol.tls import Identity, TLSError, load_identity

COORDINATOR = typer.Option("127.0.0.1:7443", "--coordinator", "-c", envvar="FEDTRAIN_COORDINATOR",
                           help="HOST:PORT of the coordinator.")
TLS_DIR = typer.Option(None, "--tls-dir", envvar="FEDTRAIN_TLS_DIR",
                       help="Directory with ca.pem, cert.pem and key.pem (from `fedtrain certs issue`).")
INSECURE = typer.Option(False, "--insecure", help="Plaintext gRPC with no authentication: tests on one machine only.")
LOG_FORMAT = typer.Option(LogFormat.text, "--log-format",
                          help="How the log lines on stderr look: text, or json (one object a line, for log shippers).")


def identity_option(tls_dir: Path | None, insecure: bool, role: str) -> Identity | None:
    """The TLS identity a command connects or serves with; plaintext only when asked for by name."""
    if insecure:
        if tls_dir is not None:
            raise TLSError("give --tls-dir or --insecure, not both")
        err_console.print("[bold yellow]warning:[/bold yellow] --insecure: plaintext gRPC; nothing is encrypted and"
                          " nobody is authenticated. Use it for tests on one machine only.", highlight=False)
        return None
    if tls_dir is None:
        raise TLSError(f"mutual TLS needs --tls-dir DIR holding this {role}'s certificate (`fedtrain certs issue"
                       f" --{role} NAME`), or FEDTRAIN_TLS_DIR; --insecure runs plaintext")
    return load_identity(tls_dir, role)



ROUND = typer.Option(0, "--round", help="The global model after this round; 0 means the latest.")
