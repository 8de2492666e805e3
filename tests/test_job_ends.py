"""Jobs that always end: an operator cancels one mid-round, and one that too few nodes accept
fails at its start_timeout. An in-process coordinator and node agents over mutual TLS."""

import json
import logging
import threading
from pathlib import Path

import pytest

from fedtrain.errors import NotFound, SpecError
from fedtrain.node.audit_log import AuditLog
from nodes.jobs import JobBook
from nodes.state import StatePaths

from conftest import RecordingAgent, eventually, make_spec, owner_policy
from test_end_to_end import cli, wait_for


def test_a_cancelled_job_abandons_its_round_keeps_the_rest_and_charges_nothing_for_it(consortium, consortium_pki):
    start, client = consortium
    training, release = threading.Event(), threading.Event()

    class HeldInRound2(RecordingAgent):
        """Trains round 2 for real, once the test lets it go: the job is cancelled meanwhile."""

        def _load_training(self):
            super()._load_training()
            local_update = self.tasks.local_update

            def held(task, private, start):
                if task.round == 2:
                    training.set()
                    release.wait(60)
                return local_update(task, private, start)
            self.tasks.local_update = held

    node, = start(1, agents=[HeldInRound2])
    job_id = client.submit(make_spec(min_nodes=1, training={"rounds": 5}))
    assert training.wait(60), "round 2 never started"
    status = client.cancel(job_id)
    release.set()
    assert status.state == "cancelled", status.error
    assert status.error == "cancelled by operator operator after round 1 of 5"
    assert [r.round for r in status.rounds] == [0, 1]
    report = json.loads((Path(status.report_path).parent / "report.json").read_text())
    assert report["job"]["state"] == "cancelled" and [r["round"] for r in report["rounds"]] == [0, 1]

    # The node finishes training round 2, finds its task closed, and drops the update uncharged;
    # then it is told the job ended.
    book = JobBook(StatePaths(node.args["state_dir"]).jobs)
    eventually(lambda: book.get(job_id).ended == "cancelled", "the node to be told the job was cancelled")
    assert node.charged_rounds(job_id) == [1]
    sent = [(e["type"], e["round"]) for e in AuditLog(StatePaths(node.args["state_dir"]).audit).entries()
            if e["type"] in ("TaskOpen", "SubmitResult")]
    assert sent == [("TaskOpen", 1), ("SubmitResult", 1), ("TaskOpen", 2)]

    # A job that has ended cannot be cancelled; the CLI says so and exits 1.
    again = cli("job", "cancel", job_id, "--coordinator", client.address,
                "--tls-dir", str(consortium_pki.root / "operator" / "operator"), check=False)
    assert again.returncode == 1 and f"job {job_id} has already ended (cancelled)" in again.stdout + again.stderr
    with pytest.raises(NotFound, match="unknown job 'nope'"):
        client.cancel("nope")


def test_a_job_too_few_nodes_accept_fails_at_its_start_timeout_naming_them(consortium, caplog):
    with pytest.raises(SpecError, match="start_timeout: Input should be greater than 0"):
        make_spec(start_timeout=0)
    start, client = consortium

    class Silent(RecordingAgent):
        """Polls, takes the job's offer and never answers it."""

        def _on_offer(self, offer):
            pass

    refusing, silent, accepting = start(3, agents=[RecordingAgent, Silent, RecordingAgent])
    refusing.halt()
    refusing.args["policy"] = owner_policy(refusing.args["data"], max_rounds_per_job=1)
    refusing.start()
    caplog.set_level(logging.INFO, logger="fedtrain.coordinator")
    flower = logging.getLogger("flwr")
    flower.addHandler(caplog.handler)
    try:
        job_id = client.submit(make_spec(min_nodes=2, training={"rounds": 2}, start_timeout=4))
        status = wait_for(client, job_id, lambda s: s.state != "waiting", timeout=60)
    finally:
        flower.removeHandler(caplog.handler)
    assert status.state == "failed" and not status.rounds[1:]
    assert status.error == (
        "JobNotStarted: fewer than min_nodes=2 nodes accepted the job within its start_timeout of 4 s:"
        " refused: n0 (limit-exceeded: policy.max_rounds_per_job=1, training.rounds=2); no answer: n1;"
        " accepted: n2")
    assert Path(status.report_path).exists()
    logged = caplog.text
    assert f"job {job_id} waits for min_nodes=2 nodes to accept it:" in logged
    assert "Waiting for nodes to connect" not in logged
