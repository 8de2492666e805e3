"""Start a coordinator and nodes as real processes on 127.0.0.1, and stop them again.

For the demo, notebooks and tests: the processes are the same `fedtrain` commands a
deployment runs, only on one machine.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from fedtrain.client import CoordinatorClient
from fedtrain.errors import FedtrainError


class LocalConsortium:
    """Context manager owning every process it starts; all are stopped on exit."""

    def __init__(self, root: Path, poll_seconds: float = 2.0):
        self.root = Path(root)
        self.logs = self.root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.poll_seconds = poll_seconds
        self.address = ""
        self.processes: dict[str, subprocess.Popen] = {}

    def __enter__(self) -> LocalConsortium:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _spawn(self, key: str, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        log = (self.logs / f"{key}.log").open("ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedtrain", *args], stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})}, start_new_session=True,
        )
        self.processes[key] = proc
        return proc

    def start_coordinator(self, timeout: float = 60.0) -> str:
        state = self.root / "coordinator"
        addr_file = state / "coordinator.addr"
        addr_file.unlink(missing_ok=True)
        proc = self._spawn("coordinator", ["coordinator", "start", "--state-dir", str(state), "--port", "0"])
        deadline = time.monotonic() + timeout
        while not addr_file.exists():
            if proc.poll() is not None:
                raise FedtrainError(f"the coordinator exited with {proc.returncode}; see {self.logs / 'coordinator.log'}")
            if time.monotonic() > deadline:
                raise FedtrainError(f"the coordinator did not start within {timeout:.0f}s")
            time.sleep(0.1)
        self.address = addr_file.read_text().strip()
        with CoordinatorClient(self.address) as client:
            while not client.healthy():
                if time.monotonic() > deadline:
                    raise FedtrainError(f"the coordinator at {self.address} is not healthy")
                time.sleep(0.1)
        return self.address

    def node_state(self, name: str) -> Path:
        return self.root / "nodes" / name

    def start_node(self, name: str, data: Path, policy: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
        if not self.address:
            raise FedtrainError("start the coordinator before the nodes")
        return self._spawn(f"node-{name}", [
            "node", "start", "--coordinator", self.address, "--data", str(data), "--policy", str(policy),
            "--state-dir", str(self.node_state(name)), "--name", name, "--poll-seconds", str(self.poll_seconds),
        ], env)

    def client(self) -> CoordinatorClient:
        return CoordinatorClient(self.address)

    def stop_process(self, key: str, timeout: float = 10.0) -> None:
        proc = self.processes.pop(key, None)
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def stop(self) -> None:
        # Nodes first, so that none of them logs a lost coordinator on the way out.
        for key in sorted(self.processes, key=lambda k: k == "coordinator"):
            self.stop_process(key)
