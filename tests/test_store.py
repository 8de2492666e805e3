"""The coordinator's SQLite state across versions and restarts."""

import sqlite3

import numpy as np
import pytest

from coordinator.db import Database
from coordinator.job_store import JobStore
from coordinator.registry import Registry
from fedtrain.errors import EnrollmentError

# The tables a coordinator wrote before node certificates, skipped-round notes and
# strategy checkpoints existed.
_OLD_SCHEMA = """
CREATE TABLE nodes (id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT UNIQUE NOT NULL,
                    registered_at REAL NOT NULL, last_seen REAL NOT NULL);
CREATE TABLE jobs (id TEXT PRIMARY KEY, name TEXT NOT NULL, spec_json TEXT NOT NULL, state TEXT NOT NULL,
                   error TEXT NOT NULL DEFAULT '', created_at REAL NOT NULL);
CREATE TABLE rounds (job_id TEXT NOT NULL REFERENCES jobs(id), round INTEGER NOT NULL, metrics_json TEXT NOT NULL,
                     wall_seconds REAL NOT NULL, PRIMARY KEY (job_id, round));
CREATE TABLE checkpoints (job_id TEXT NOT NULL REFERENCES jobs(id), round INTEGER NOT NULL, tensors BLOB NOT NULL,
                          PRIMARY KEY (job_id, round));
INSERT INTO nodes (name, registered_at, last_seen) VALUES ('old-node', 1.0, 2.0);
INSERT INTO jobs VALUES ('j1', 'old-job', '{}', 'finished', '', 3.0);
INSERT INTO rounds VALUES ('j1', 0, '{"accuracy": 0.5}', 0.0);
"""


def test_an_older_state_dir_opens_with_everything_it_held(tmp_path):
    path = tmp_path / "coordinator.db"
    with sqlite3.connect(path) as db:
        db.executescript(_OLD_SCHEMA)
    db = Database(path)
    registry, jobs = Registry(db), JobStore(db)
    [node] = registry.nodes()
    assert (node.name, node.fingerprint, node.revoked_at) == ("old-node", None, None)
    assert [j.name for j in jobs.jobs()] == ["old-job"]
    assert jobs.rounds("j1") == [(0, {"accuracy": 0.5}, 0.0)]
    # The new columns work on the old tables.
    jobs.finish_round("j1", 1, {}, 1.0, {"w": np.ones(2, np.float32)}, {"m_t/w": np.zeros(2)}, "too few")
    assert jobs.skipped_rounds("j1") == {1: "too few"}
    done, weights, state = jobs.checkpoint("j1")
    assert done == 1 and weights["w"].tolist() == [1, 1] and set(state) == {"m_t/w"}
    token = registry.create_token("old-node", 60)
    node_id = registry.enroll(token, "old-node", "sha256:ab", 4e9)
    assert node_id == node.id and registry.node(node_id).fingerprint == "sha256:ab"
    db.close()


def test_a_revoked_node_leaves_running_jobs_and_its_tokens_die(tmp_path):
    db = Database(tmp_path / "coordinator.db")
    registry, jobs = Registry(db), JobStore(db)
    node_id = registry.enroll(registry.create_token("a", 60), "a", "sha256:aa", 4e9)
    spare = registry.create_token("a", 60)
    job = jobs.create_job("j", "{}")
    jobs.set_decision(job, node_id, "accepted", "")
    assert jobs.accepted_nodes(job, seen_since=0) == [node_id]
    registry.revoke("a")
    assert jobs.accepted_nodes(job, seen_since=0) == [] and jobs.undecided_nodes("other", seen_since=0) == []
    assert registry.revoked_at("sha256:aa") is not None and registry.open_tokens() == []
    with pytest.raises(EnrollmentError, match="already used"):  # a token from before the revocation
        registry.enroll(spare, "a", "sha256:bb", 4e9)
    db.close()
