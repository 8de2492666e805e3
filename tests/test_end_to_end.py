"""Real processes on 127.0.0.1: a coordinator, node agents, and the `fedtrain` CLI."""

import json
import sqlite3
import subprocess
import sys
import time
import urllib.request

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from fedtrain.demos.launch import LocalConsortium
from fedtrain.node.ledger import PrivacyLedger
from fedtrain.protocol.codec import decode_values

from conftest import make_spec

pytestmark = pytest.mark.slow


def cli(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "fedtrain", *args], capture_output=True, text=True, timeout=120,
                          env={"COLUMNS": "200", "PATH": ""})
    if check and proc.returncode != 0:
        raise AssertionError(f"fedtrain {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def wait_for(client, job_id, predicate, timeout=180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.status(job_id)
        if predicate(status):
            return status
        time.sleep(0.3)
    raise AssertionError(f"timed out; last status: {status}")


def registered(consortium, names, timeout=60):
    """Wait until the coordinator knows these nodes (read from its database)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with sqlite3.connect(consortium.root / "coordinator" / "coordinator.db") as db:
            if set(names) <= {name for name, in db.execute("SELECT name FROM nodes")}:
                return
        time.sleep(0.2)
    raise AssertionError(f"nodes {names} did not register within {timeout}s")


def scrape(addr_file):
    """The coordinator's /metrics, fetched over HTTP: {(sample name, labels as sorted tuples): value}."""
    with urllib.request.urlopen(f"http://{addr_file.read_text().strip()}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def json_log_lines(path):
    """Every line of a process's log (stdout and stderr), each of which must be a JSON object."""
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    for line in lines:
        assert {"time", "level", "logger", "party", "message"} <= line.keys(), line
    return lines


def write_policy(path, **policy):
    path.write_text(yaml.safe_dump({"delta": 1e-5, "dataset_size": 150, **policy}))
    return path


def test_demo_writes_its_report(tmp_path):
    from fedtrain.demos.tabular import run_demo

    report = run_demo(tmp_path / "demo", rounds=2, epsilon=3.0)
    assert (tmp_path / "demo" / "report.png").stat().st_size > 10_000
    saved = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert [r["round"] for r in saved["rounds"]] == [0, 1, 2]
    for node in saved["nodes"].values():
        assert 2.9 < node["epsilon"] <= 3.0 and node["steps"] > 0 and node["noise_multiplier"] > 0.5
    assert report["accuracy_ratio"] > 0.85


def test_cli_job_and_a_refusal_for_budget_reach_the_operator(tmp_path, shards):
    paths, test = shards
    policy = write_policy(tmp_path / "policy.yaml", max_epsilon=1.2)
    spec = make_spec(min_nodes=2, evaluation={"data": str(test)})
    spec_file = tmp_path / "job.yaml"
    spec_file.write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    with LocalConsortium(tmp_path / "run", poll_seconds=1, eval_dir=tmp_path) as c:
        address = c.start_coordinator(options=("--metrics-port", "0", "--log-format", "json"))
        c.enroll(["n0", "n1"])
        for i in range(2):
            c.start_node(f"n{i}", paths[i], policy, options=("--log-format", "json"))
        ops = ["--coordinator", address, *c.security_args("operator")]
        job_id = cli("job", "submit", str(spec_file), *ops, "--wait").stdout.strip().splitlines()[0]
        status_out = cli("job", "status", job_id, *ops).stdout
        assert "finished" in status_out and "n0=" in status_out

        # The first job spent ~0.99 of 1.2; both jobs together would compose to ~1.38.
        with c.client() as client:
            first = client.status(job_id)
            second = client.submit(spec)
            status = wait_for(client, second, lambda s: sum(n.decision == "refused" for n in s.nodes) == 2)
        # Typed: the reason code and the policy's own number, nothing of the ledger's history.
        for node in status.nodes:
            assert node.reason == "budget-exceeded: policy.max_epsilon=1.2"
        assert "budget-exceeded" in cli("job", "status", second, *ops).stdout
        metrics = scrape(c.root / "coordinator" / "metrics.addr")

    for i in range(2):
        state = c.node_state(f"n{i}")
        budget = json.loads(cli("node", "budget", "--state-dir", str(state), "--json").stdout)
        assert [r["round"] for r in budget["rounds"]] == [1, 2] and budget["spent"] <= 1.0
        assert all(r["sent"] for r in budget["rounds"])
        audit = [json.loads(line) for line in cli("node", "audit", "--state-dir", str(state), "--json").stdout.splitlines()]
        results = [e for e in audit if e["type"] == "SubmitResult"]
        # Only the model's parameters left the node, each with its payload hash and epsilon.
        assert len(results) == 2
        for e in results:
            assert {t["name"] for t in e["tensors"]} == {"0.weight", "0.bias"}
            assert len(e["payload_sha256"]) == 64 and 0 < e["epsilon"] <= 1.0
        assert {e["type"] for e in audit} >= {"Register", "Poll", "AnswerOffer", "FetchArrays", "SubmitResult"}

        # The coordinator's metrics: the job's ε that the node's ledger charged, and the node's uploads.
        labels = (("job", job_id), ("node", f"n{i}"))
        charged = [r for r in budget["rounds"] if r["job_id"] == job_id][-1]["job_epsilon"]
        assert metrics["fedtrain_node_epsilon", labels] == pytest.approx(charged, rel=1e-12)
        uploaded = sum(n.bytes_received for r in first.rounds for n in r.nodes if n.name == f"n{i}")
        assert metrics["fedtrain_received_bytes_total", labels] == uploaded > 0
        assert ("fedtrain_updates_rejected_total", labels) not in metrics
        # Opacus's and torch's per-round warnings are gone; our explanation is logged once.
        messages = [line["message"] for line in json_log_lines(c.logs / f"node-n{i}.log")]
        assert sum("secure RNG is off" in m for m in messages) == 1
        assert not [m for m in messages if "Secure RNG turned off" in m or "Full backward hook is firing when" in m]

    job = (("job", job_id),)
    assert metrics["fedtrain_rounds_completed_total", job] == 2 and ("fedtrain_rounds_failed_total", job) not in metrics
    assert metrics["fedtrain_round_duration_seconds_count", job] == 2
    assert metrics["fedtrain_nodes_connected", ()] == 2
    assert [metrics["fedtrain_jobs", (("state", s),)] for s in ("finished", "waiting", "running")] == [1, 1, 0]
    assert any(line["message"].startswith("listening on") for line in json_log_lines(c.logs / "coordinator.log"))


def test_owner_approval_gates_a_fedadam_job_and_the_node_charges_what_job_plan_said(tmp_path, shards):
    paths, _ = shards
    policy = write_policy(tmp_path / "policy.yaml", max_epsilon=5.0, require_approval=True)
    spec = make_spec(strategy={"name": "fedadam", "params": {"eta": 0.05}},
                     training={"optimizer": "adamw", "learning_rate": 0.01, "weight_decay": 0.01})
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    [planned] = json.loads(cli("job", "plan", str(job_file), "--examples", "150", "--json").stdout)
    with LocalConsortium(tmp_path / "run", poll_seconds=1) as c:
        c.start_coordinator()
        c.start_node("owner", paths[0], policy)
        state = str(c.node_state("owner"))
        with c.client() as client:
            job_id = client.submit(spec)
            wait_for(client, job_id, lambda s: [n.decision for n in s.nodes] == ["pending_approval"])
            assert job_id in cli("node", "jobs", "--state-dir", state).stdout
            time.sleep(2)
            assert client.status(job_id).rounds[-1].round == 0  # nothing trained while pending
            refused = cli("node", "approve", "not-a-job", "--state-dir", state, check=False)
            assert refused.returncode == 1 and "no job 'not-a-job'" in refused.stderr
            cli("node", "approve", job_id, "--state-dir", state)
            status = wait_for(client, job_id, lambda s: s.state in ("finished", "failed"))
    assert status.state == "finished", status.error
    assert [r.round for r in status.rounds] == [0, 1, 2]
    assert status.error == ""  # every round aggregated: FedAdam's step keeps the model's dtypes
    ledger = PrivacyLedger(c.node_state("owner") / "ledger.db", max_epsilon=5.0, delta=1e-5)
    rows = ledger.rows(job_id)
    ledger.close()
    assert [(r.noise_multiplier, r.sample_rate, r.steps) for r in rows] == [
        (planned["noise_multiplier"], planned["sample_rate"], planned["steps_per_round"])] * 2
    assert rows[-1].job_epsilon == pytest.approx(planned["epsilon"]) and planned["total_steps"] == 2 * rows[0].steps


def test_a_crash_between_ledger_commit_and_send_loses_no_spend(tmp_path, shards):
    paths, _ = shards
    policy = write_policy(tmp_path / "policy.yaml", max_epsilon=5.0)
    spec = make_spec(strategy={"name": "fedprox", "params": {"proximal_mu": 0.1}})
    with LocalConsortium(tmp_path / "run", poll_seconds=1) as c:
        c.start_coordinator()
        node = c.start_node("n", paths[0], policy, env={"FEDTRAIN_FAULT": "after-ledger-commit"})
        with c.client() as client:
            job_id = client.submit(spec)
            assert node.wait(120) == 70  # died right after charging round 1, before sending it
            ledger = PrivacyLedger(c.node_state("n") / "ledger.db", max_epsilon=5.0, delta=1e-5)
            [(row, _)] = ledger.undelivered()
            assert (row.job_id, row.round) == (job_id, 1)

            c.start_node("n", paths[0], policy)  # restart, no fault point
            status = wait_for(client, job_id, lambda s: s.state in ("finished", "failed"))
    assert status.state == "finished", status.error
    rows = ledger.rows(job_id)
    assert [(r.round, r.sent) for r in rows] == [(1, True), (2, True)]  # each round charged exactly once
    assert rows[0].task_id == row.task_id  # round 1 was re-sent, not retrained
    round1 = next(r for r in status.rounds if r.round == 1)
    assert [decode_values(n.metrics)["epsilon"] for n in round1.nodes] == [pytest.approx(rows[0].job_epsilon)]
    # Exactly these scalars leave a node with its update; nothing computed from the data without noise.
    assert set(decode_values(round1.nodes[0].metrics)) == {
        "num-examples", "noise-multiplier", "sample-rate", "steps", "epsilon", "delta"}
    ledger.close()


def test_losing_one_of_three_nodes_mid_round_keeps_the_job_going_and_charges_once(tmp_path, shards):
    paths, _ = shards
    policy = write_policy(tmp_path / "policy.yaml", max_epsilon=5.0)
    # Deadline enough for a restarted node to load torch and Opacus and train on 2 busy cores.
    spec = make_spec(min_nodes=2, round_timeout=15)
    with LocalConsortium(tmp_path / "run", poll_seconds=1) as c:
        c.start_coordinator()
        c.enroll(["n0", "n1", "n2"])
        for i in range(2):
            c.start_node(f"n{i}", paths[i], policy)
        lost = c.start_node("n2", paths[2], policy, env={"FEDTRAIN_FAULT": "after-ledger-commit"})
        registered(c, ["n0", "n1", "n2"])  # so that round 1 samples all three
        with c.client() as client:
            job_id = client.submit(spec)
            assert lost.wait(120) == 70  # gone mid-round: charged round 1, never sent it
            # The round goes on without it once its deadline passes: min_nodes = 2 still holds.
            status = wait_for(client, job_id, lambda s: any(r.round == 1 for r in s.rounds))
            assert sorted(n.name for n in status.rounds[1].nodes) == ["n0", "n1"]
            c.start_node("n2", paths[2], policy)  # it comes back and rejoins at the next round
            status = wait_for(client, job_id, lambda s: s.state in ("finished", "failed"))
    assert status.state == "finished", status.error
    assert sorted(n.name for n in status.rounds[2].nodes) == ["n0", "n1", "n2"]
    for i in range(3):
        ledger = PrivacyLedger(c.node_state(f"n{i}") / "ledger.db", max_epsilon=5.0, delta=1e-5)
        # Each round charged exactly once; n2's round-1 update was charged, then refused as late.
        assert [(r.round, r.sent) for r in ledger.rows(job_id)] == [(1, True), (2, True)], f"n{i}"
        ledger.close()


def test_a_killed_coordinator_resumes_the_job_where_it_stopped(tmp_path, shards):
    paths, test = shards
    policy = write_policy(tmp_path / "policy.yaml", max_epsilon=5.0)
    names = ["n0", "n1", "n2"]
    # FedAdam carries state (its moments) from round to round; plain aggregation, so that a
    # round run again can be answered with the same, already charged, updates.
    spec = make_spec(min_nodes=3, secure_aggregation=False, training={"rounds": 3},
                     strategy={"name": "fedadam", "params": {"eta": 0.05}}, evaluation={"data": str(test)})
    with LocalConsortium(tmp_path / "run", poll_seconds=1, eval_dir=tmp_path) as c:
        address = c.start_coordinator(env={"FEDTRAIN_FAULT": "before-checkpoint:2"})
        c.enroll(names)
        for name, path in zip(names, paths):
            c.start_node(name, path, policy)
        with c.client() as client:
            job_id = client.submit(spec)
            wait_for(client, job_id, lambda s: len(s.rounds) == 2)
            after_round_1 = client.model(job_id, 1)

        def charged(name):
            ledger = PrivacyLedger(c.node_state(name) / "ledger.db", max_epsilon=5.0, delta=1e-5)
            try:
                return [(r.round, r.sent) for r in ledger.rows(job_id)]
            finally:
                ledger.close()

        # Every node has sent round 2 and the coordinator holds before checkpointing it: crash it there.
        deadline = time.monotonic() + 120
        while any(charged(n) != [(1, True), (2, True)] for n in names):
            assert time.monotonic() < deadline, [charged(n) for n in names]
            time.sleep(0.2)
        time.sleep(0.5)  # the last upload reaches the coordinator's mailbox
        c.kill("coordinator")
        c.start_coordinator(port=int(address.rsplit(":", 1)[1]))  # same state dir, same address
        with c.client() as client:
            status = wait_for(client, job_id, lambda s: s.state in ("finished", "failed"))
            assert status.state == "finished", status.error
            assert [r.round for r in status.rounds] == [0, 1, 2, 3]
            resumed = client.model(job_id, 1)
    for k in after_round_1:
        assert (resumed[k] == after_round_1[k]).all()  # the checkpoint survived the crash as it was
    log = (c.logs / "coordinator.log").read_text()
    assert f"job {job_id} resumes after round 1" in log
    for r in (1, 2, 3):  # no round was checkpointed twice
        assert log.count(f"job {job_id} round {r} done") == 1
    for name in names:
        # Round 2 was run again after the restart; each node answered with the update it had
        # already charged: every round is charged exactly once.
        assert charged(name) == [(1, True), (2, True), (3, True)], name
        node_log = (c.logs / f"node-{name}.log").read_text()
        assert node_log.count("round 2: sending the update charged before (no new spend)") == 1
