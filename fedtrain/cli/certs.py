"""`fedtrain certs`: the consortium's CA and the certificates of mutual TLS."""

from __future__ import annotations

from pathlib import Path

import typer

from fedtrain.console import console
from fedtrain.protocol.tls import ROLES, init_ca, issue

app = typer.Typer(help="The consortium's CA and the certificates of mutual TLS.", no_args_is_help=True)
# A hundred years: far beyond any sensible validity, well within what X.509 dates can hold.
MAX_DAYS = 36_500


@app.command("init")
def certs_init(ca_dir: Path = typer.Option(..., "--ca-dir", help="Directory for ca.pem and ca.key (the CA's key)."),
               name: str = typer.Option("fedtrain consortium CA", help="The CA's common name."),
               days: int = typer.Option(3650, min=1, max=MAX_DAYS, help="Validity in days.")) -> None:
    """Create the consortium's certificate authority. Keep ca.key offline; share ca.pem."""
    cert = init_ca(ca_dir, name, days)
    console.print(f"CA written: {cert} (and {ca_dir / 'ca.key'}, readable by you only)")


@app.command("issue")
def certs_issue(
    ca_dir: Path = typer.Option(..., "--ca-dir", help="The CA directory of `fedtrain certs init`."),
    out: Path = typer.Option(..., "--out", help="Directory to write ca.pem, cert.pem and key.pem to."),
    node: str = typer.Option(None, "--node", metavar="NAME", help="Issue a node certificate."),
    coordinator: str = typer.Option(None, "--coordinator", metavar="NAME", help="Issue the coordinator's certificate."),
    operator: str = typer.Option(None, "--operator", metavar="NAME", help="Issue an operator's (job CLI) certificate."),
    host: list[str] = typer.Option(["localhost", "127.0.0.1"], "--host",
                                   help="With --coordinator: a DNS name or IP address nodes dial (repeatable)."),
    days: int = typer.Option(365, min=1, max=MAX_DAYS, help="Validity in days."),
    force: bool = typer.Option(False, "--force", help="Replace a certificate and key already in --out."),
) -> None:
    """Issue a certificate for exactly one of --node, --coordinator or --operator."""
    chosen = [(role, name) for role, name in zip(ROLES, (coordinator, node, operator)) if name]
    if len(chosen) != 1:
        raise typer.BadParameter("give exactly one of --node, --coordinator or --operator")
    (role, name), = chosen
    identity = issue(ca_dir, role, name, out, days=days, hosts=tuple(host), force=force)
    console.print(f"{role} certificate for {name} in {out}: fingerprint {identity.fingerprint},"
                  f" valid until {identity.not_after:%Y-%m-%d} UTC")
