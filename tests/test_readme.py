"""README's commands, run as written.

Every `fedtrain` line of README's shell blocks runs in the walkthrough below: a
consortium, three data owners (each in its own directory, as on its own machine) and a
pilot, as real processes on this machine. README names the coordinator
coord.example.org:7443 and listens on 0.0.0.0; here they are 127.0.0.1 and the free port
the coordinator picked (started with --port 0), JOB_ID is what the commands printed, and
each owner's join-token.txt holds the token printed for it. The YAML blocks headed
``# job.yaml`` and ``# policy.yaml`` are the files used. Commands that README only
mentions in its text are checked against the CLI: the command and its options exist.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import click
import pytest
import typer
import yaml

from fedtrain.cli import main as cli
from fedtrain.cli.client import CoordinatorClient
from fedtrain.demos.tabular import demo_spec, write_shards
from fedtrain.protocol.tls import load_identity

from conftest import eventually

README = (Path(__file__).parents[1] / "README.md").read_text()
OWNERS = ("hospital-a", "hospital-b", "hospital-c")


def blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", README, flags=re.S | re.M)


def shell_commands() -> list[str]:
    """The `fedtrain` and `export` lines of README's sh blocks (continuations joined)."""
    lines = []
    for block in blocks("sh"):
        for line in block.replace("\\\n", " ").splitlines():
            if line.startswith(("fedtrain ", "export ")):
                lines.append(" ".join(shlex.split(line, comments=True)))
    return lines


def readme_files() -> dict[str, str]:
    """YAML blocks whose first line is ``# NAME``, by name."""
    return {m.group(1): block for block in blocks("yaml") if (m := re.match(r"# (\S+)\n", block))}


class Walkthrough:
    def __init__(self):
        self.commands = shell_commands()
        self.ran: set[str] = set()
        self.subs = {"coord.example.org": "127.0.0.1", "0.0.0.0": "127.0.0.1", "7443": "0"}
        self.env = {**os.environ, "COLUMNS": "200"}
        self.exported: dict[Path, dict[str, str]] = {}  # by directory: each party's own shell
        self.procs: list[subprocess.Popen] = []

    def argv(self, prefix: str, subs: dict[str, str]) -> list[str]:
        matches = [c for c in self.commands if c.startswith(prefix)]
        assert len(matches) == 1, f"README should have one command starting {prefix!r}: {matches}"
        self.ran.add(matches[0])
        text = matches[0]
        for old, new in {**self.subs, **subs}.items():
            text = text.replace(old, new)
        return shlex.split(text)

    def command(self, prefix: str, cwd: Path, subs: dict[str, str] | None) -> tuple[list[str], dict]:
        """README's command as this machine runs it (`python -m fedtrain`), and its shell's environment."""
        argv = self.argv(prefix, subs or {})
        return [sys.executable, "-m", "fedtrain", *argv[1:]], {**self.env, **self.exported.get(cwd, {})}

    def run(self, prefix: str, cwd: Path, subs: dict[str, str] | None = None) -> str:
        argv, env = self.command(prefix, cwd, subs)
        proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0, f"{' '.join(argv)}\n{proc.stdout}\n{proc.stderr}"
        return proc.stdout

    def spawn(self, prefix: str, cwd: Path, subs: dict[str, str] | None = None) -> subprocess.Popen:
        argv, env = self.command(prefix, cwd, subs)
        with (cwd / f"{argv[3]}.log").open("w") as log:  # node.log, coordinator.log
            proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self.procs.append(proc)
        return proc

    def export(self, cwd: Path) -> None:
        self.exported[cwd] = dict(assignment.split("=", 1) for assignment in self.argv("export ", {})[1:])

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def wait_for(condition, what: str, timeout: float = 120.0):
    return eventually(condition, what, timeout, every=0.5)


@pytest.mark.slow
def test_readme_walkthrough(tmp_path):
    w = Walkthrough()
    consortium, pilot = tmp_path / "consortium", tmp_path / "pilot"
    owners = {name: tmp_path / name for name in OWNERS}
    for d in (consortium, pilot, *owners.values()):
        d.mkdir()
    # What `make demo` leaves in out/demo, for the pilot; the same data for the others.
    demo = pilot / "out" / "demo"
    demo.mkdir(parents=True)
    columns, shards, test = write_shards(demo, len(OWNERS))
    (demo / "job.yaml").write_text(yaml.safe_dump(demo_spec(columns, test, 5, 3.0).model_dump(mode="json")))
    files = readme_files()
    (consortium / "job.yaml").write_text(files["job.yaml"])
    shutil.copy(test, consortium / "test.csv")
    for shard, owner in zip(shards, owners.values()):
        shutil.copy(shard, owner / "patients.csv")
        (owner / "policy.yaml").write_text(files["policy.yaml"])

    # The consortium: its CA, certificates and coordinator; each owner's directory and token.
    w.run("fedtrain certs init", consortium)
    w.run("fedtrain certs issue --ca-dir pki/ca --coordinator", consortium)
    w.run("fedtrain certs issue --ca-dir pki/ca --operator", consortium)
    try:
        w.spawn("fedtrain coordinator start", consortium)
        addr = consortium / "coordinator-state" / "coordinator.addr"
        port = wait_for(lambda: addr.exists() and addr.read_text().strip().rsplit(":", 1)[1], "the coordinator")
        w.subs["7443"] = port
        # Jobs evaluate on tables in the coordinator's evaluation dir only.
        shutil.copy(test, consortium / "coordinator-state" / "eval" / "test.csv")
        nodes = {}
        for name, owner in owners.items():
            w.run("fedtrain certs issue --ca-dir pki/ca --node", consortium, {"hospital-a": name})
            shutil.copytree(consortium / "pki" / name, owner / "pki" / name)
            printed, token = w.run("fedtrain coordinator token", consortium, {"hospital-a": name}).split()
            assert printed == name
            (owner / "join-token.txt").write_text(token + "\n")
            nodes[name] = w.spawn("fedtrain node start", owner, {"hospital-a": name})

        w.export(consortium)
        plan = w.run("fedtrain job plan", consortium)
        assert "5,000" in plan and "σ·C / batch" in plan
        job_id = w.run("fedtrain job submit", consortium).split()[-1]
        operator = load_identity(consortium / "pki" / "alice", "operator")
        with CoordinatorClient(f"127.0.0.1:{port}", operator) as client:
            wait_for(lambda: sum(n.decision == "pending_approval" for n in client.status(job_id).nodes) == 3,
                     "the owners to hold the job for approval")
            a = owners["hospital-a"]
            assert job_id in w.run("fedtrain node jobs --state-dir", a)
            shown = w.run("fedtrain node jobs --show", a, {"JOB_ID": job_id})
            assert "mean radius" in shown and "sha256" in shown
            for name, owner in owners.items():
                w.run("fedtrain node approve", owner, {"JOB_ID": job_id})
            status = wait_for(lambda: (s := client.status(job_id)).state in ("finished", "failed") and s, "the job")
        assert status.state == "finished", status.error
        assert [r.round for r in status.rounds] == [0, 1, 2, 3]

        assert "finished" in w.run("fedtrain job status", consortium, {"JOB_ID": job_id})
        report = Path(w.run("fedtrain job report", consortium, {"JOB_ID": job_id}).strip())
        assert report.name == "report.html" and report.exists()
        w.run("fedtrain job export", consortium, {"JOB_ID": job_id})
        assert (consortium / "model" / "README.md").exists()
        assert "accuracy" in w.run("fedtrain job eval", consortium, {"JOB_ID": job_id})

        assert job_id in w.run("fedtrain node budget", a)
        assert job_id in w.run("fedtrain node audit --state-dir", a)
        assert "intact" in w.run("fedtrain node audit verify", a)

        listed = w.run("fedtrain coordinator nodes", consortium)
        assert all(name in listed for name in OWNERS) and "connected" in listed
        assert "revoked" in w.run("fedtrain coordinator revoke", consortium)
        # hospital-c's node is refused at its next request, and stops saying why.
        assert wait_for(lambda: nodes["hospital-c"].poll() is not None, "the revoked node to stop", 60)
        assert "revoked" in (owners["hospital-c"] / "node.log").read_text()
    finally:
        w.stop()

    # The pilot rehearses the demo's job with 50 virtual nodes holding skewed shares of the labels.
    w.run("fedtrain simulate", pilot)
    result = json.loads((pilot / "rehearsal" / "simulation.json").read_text())
    assert len(result["rounds"]) == 5 and all(r["nodes"] == 50 for r in result["rounds"])
    assert all(2.5 < e <= 3.0 for e in result["epsilon"])  # each virtual node's DP-SGD, to the job's ε
    assert result["rounds"][-1]["metrics"]["accuracy"] > 0.85
    audit = result["audit"]  # --audit: the job's claim, measured from below on the same table
    assert audit["claimed_epsilon"] == 3.0 and audit["canaries"] == 30 and audit["verdict"] == "consistent"

    assert w.ran == set(w.commands), f"README commands the walkthrough did not run: {set(w.commands) - w.ran}"


def _command(tokens: list[str]) -> tuple[click.Command, list[str]]:
    """The CLI command that README's words name, and the words after it."""
    command: click.Command = typer.main.get_command(cli.app)
    while isinstance(command, click.Group) and tokens and tokens[0] in command.commands:
        command, tokens = command.commands[tokens[0]], tokens[1:]
    return command, tokens


def test_every_command_readme_mentions_exists():
    cli._load_service_commands()
    mentioned = re.findall(r"`(fedtrain [^`]+)`", README) + shell_commands()
    assert len(mentioned) > 30
    for text in mentioned:
        if text.startswith("export "):
            continue
        command, rest = _command(shlex.split(text)[1:])
        if isinstance(command, click.Group) and not command.invoke_without_command:  # a group by name, e.g. "the `fedtrain job` commands"
            assert rest in ([], ["..."]), f"README: {text!r} names no command"
            continue
        options = {o for p in command.params for o in (*p.opts, *p.secondary_opts)}
        unknown = [t for t in rest if t.startswith("--") and t.split("=")[0] not in options]
        assert not unknown, f"README: {text!r}: {unknown} are not options of this command"
