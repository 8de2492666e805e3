"""Where a node keeps its state; shared by the agent and the owner's CLI."""

from __future__ import annotations

from pathlib import Path


class StatePaths:
    def __init__(self, state_dir: Path):
        self.ledger = state_dir / "ledger.db"
        self.jobs = state_dir / "jobs.db"
        self.audit = state_dir / "audit.jsonl"
        self.key = state_dir / "node_ed25519.pem"  # signs the owner's approvals
        self.policy = state_dir / "policy.yaml"     # the policy in force, for the owner's commands
