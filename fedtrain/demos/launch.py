"""Start a coordinator and nodes as real processes on 127.0.0.1, and stop them again.

For the demo, notebooks and tests: the processes are the same `fedtrain` commands a
deployment runs, only on one machine, with mutual TLS as in a deployment: a CA, a
certificate per party and a join token per node.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from fedtrain.protocol import tls
from fedtrain.cli.client import CoordinatorClient
from fedtrain.errors import FedtrainError


class LocalConsortium:
    """Context manager owning every process it starts; all are stopped on exit."""

    def __init__(self, root: Path, poll_seconds: float = 2.0, secure: bool = True, eval_dir: Path | None = None,
                 node_threads: int | None = None, host: str = "127.0.0.1",
                 on_host: Callable[[str], list[str]] = lambda key: [],
                 fedtrain: tuple[str, ...] = (sys.executable, "-m", "fedtrain")):
        """``secure=False`` runs everything with --insecure (plaintext, no identities); ``eval_dir``
        holds the tables jobs evaluate on (the coordinator's --eval-dir); ``node_threads``: torch
        threads per node process (default: a third of the CPUs, at least one), so that three
        nodes training at once share the machine instead of spinning on each other's cores.
        ``host``: the address the coordinator listens on and nodes dial (its certificate names it);
        ``on_host(key)``: the command prefix that runs process ``key`` ("coordinator", "node-NAME")
        on its own network host, e.g. ``["ip", "netns", "exec", NAMESPACE]``; none by default.
        ``fedtrain``: the command every process runs, e.g. an installed package's console script."""
        self.root = Path(root)
        self.host = host
        self.on_host = on_host
        self.fedtrain = list(fedtrain)
        self.node_threads = node_threads or max(1, (os.cpu_count() or 1) // 3)
        self.eval_dir = eval_dir
        self.logs = self.root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.poll_seconds = poll_seconds
        self.secure = secure
        self.pki = self.root / "pki"
        self.tokens: dict[str, str] = {}
        self.address = ""
        self.processes: dict[str, subprocess.Popen] = {}
        if secure and not (self.pki / "ca" / tls.CA_KEY).exists():
            tls.init_ca(self.pki / "ca", "local consortium CA")
            tls.issue(self.pki / "ca", "coordinator", "coordinator", self.pki / "coordinator",
                      hosts=tuple(dict.fromkeys((*tls.DEFAULT_HOSTS, host))))
            tls.issue(self.pki / "ca", "operator", "operator", self.pki / "operator")

    def security_args(self, party: str) -> list[str]:
        """The CLI options a command of ``party`` (coordinator, operator) runs with here."""
        return ["--tls-dir", str(self.pki / party)] if self.secure else ["--insecure"]

    def __enter__(self) -> LocalConsortium:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _spawn(self, key: str, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        log = (self.logs / f"{key}.log").open("ab")
        proc = subprocess.Popen(
            [*self.on_host(key), *self.fedtrain, *args], stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})}, start_new_session=True,
        )
        self.processes[key] = proc
        return proc

    def start_coordinator(self, timeout: float = 60.0, port: int = 0, env: dict[str, str] | None = None,
                          options: tuple[str, ...] = ()) -> str:
        """Start (or restart, on the same state and ``port``) the coordinator, with more CLI
        ``options`` (e.g. ``--metrics-port``); returns its address."""
        state = self.root / "coordinator"
        addr_file = state / "coordinator.addr"
        addr_file.unlink(missing_ok=True)
        eval_dir = ["--eval-dir", str(self.eval_dir)] if self.eval_dir else []
        proc = self._spawn("coordinator", ["coordinator", "start", "--state-dir", str(state), "--host", self.host,
                                           "--port", str(port), *eval_dir, *self.security_args("coordinator"),
                                           *options], env)
        deadline = time.monotonic() + timeout
        while not addr_file.exists():
            if proc.poll() is not None:
                raise FedtrainError(f"the coordinator exited with {proc.returncode}; see {self.logs / 'coordinator.log'}")
            if time.monotonic() > deadline:
                raise FedtrainError(f"the coordinator did not start within {timeout:.0f}s")
            time.sleep(0.1)
        self.address = addr_file.read_text().strip()
        if self.on_host("coordinator"):
            # On another network host, out of this process's reach: its address is written once it serves.
            return self.address
        with self.client() as client:
            while not client.healthy():
                if time.monotonic() > deadline:
                    raise FedtrainError(f"the coordinator at {self.address} is not healthy")
                time.sleep(0.1)
        return self.address

    def node_state(self, name: str) -> Path:
        return self.root / "nodes" / name

    def enroll(self, names: list[str]) -> None:
        """Issue node certificates and one-time join tokens (as a consortium's operator would),
        all tokens with one `fedtrain coordinator token` call."""
        names = [n for n in names if n not in self.tokens]
        if not self.secure or not names:
            return
        for name in names:
            if not (self.pki / "nodes" / name / tls.CERT).exists():
                tls.issue(self.pki / "ca", "node", name, self.pki / "nodes" / name)
        out = subprocess.run(
            [*self.fedtrain, "coordinator", "token", *names,
             "--state-dir", str(self.root / "coordinator")], capture_output=True, text=True,
        )
        if out.returncode:
            raise FedtrainError(f"`fedtrain coordinator token` failed: {out.stdout}{out.stderr}")
        self.tokens.update(line.split() for line in out.stdout.splitlines() if line.strip())

    def start_node(self, name: str, data: Path, policy: Path, env: dict[str, str] | None = None,
                   options: tuple[str, ...] = ()) -> subprocess.Popen:
        """Start node ``name`` on ``data`` under ``policy``, with more CLI ``options`` (e.g. ``--log-format``)."""
        if not self.address:
            raise FedtrainError("start the coordinator before the nodes")
        security = ["--insecure", "--name", name]
        if self.secure:
            self.enroll([name])
            security = ["--tls-dir", str(self.pki / "nodes" / name)]
            env = {**(env or {}), "FEDTRAIN_JOIN_TOKEN": self.tokens[name]}  # not in argv, which anyone can read
        env = {"OMP_NUM_THREADS": str(self.node_threads), **(env or {})}
        return self._spawn(f"node-{name}", [
            "node", "start", "--coordinator", self.address, "--data", str(data), "--policy", str(policy),
            "--state-dir", str(self.node_state(name)), "--poll-seconds", str(self.poll_seconds), *security,
            *options,
        ], env)

    def client(self) -> CoordinatorClient:
        identity = tls.load_identity(self.pki / "operator", "operator") if self.secure else None
        return CoordinatorClient(self.address, identity)

    def stop_process(self, *keys: str, timeout: float = 10.0) -> None:
        """SIGTERM these processes all at once (each takes seconds to wind down), then wait for
        them; whichever is still running after ``timeout`` is killed."""
        running = [p for p in (self.processes.pop(k, None) for k in keys) if p is not None and p.poll() is None]
        for proc in running:
            os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in running:
            try:
                proc.wait(max(deadline - time.monotonic(), 0.0))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def kill(self, key: str) -> None:
        """SIGKILL a process (and its children): a crash, with no chance to clean up."""
        proc = self.processes.pop(key)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def stop(self) -> None:
        # Nodes first, so that none of them logs a lost coordinator on the way out.
        self.stop_process(*(k for k in self.processes if k != "coordinator"))
        self.stop_process("coordinator")
