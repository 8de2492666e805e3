"""Mutual TLS and node identity: who the coordinator lets in, and with which certificate."""

import datetime as dt
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time

import grpc
import pytest
import yaml

from coordinator.service import serve
from fedtrain.protocol import tls
from fedtrain.cli.options import identity_option
from fedtrain.cli.client import CoordinatorClient
from fedtrain.errors import PermissionDenied, Unavailable
from fedtrain.protocol import fedtrain_pb2 as pb
from fedtrain.protocol import fedtrain_pb2_grpc as pb_grpc
from fedtrain.protocol.codec import PROTOCOL_VERSION

from conftest import eventually, make_spec
from test_end_to_end import cli, write_policy


@pytest.fixture
def pki(tmp_path):
    """A consortium CA with the coordinator's and an operator's certificates, and a foreign CA."""
    tls.init_ca(tmp_path / "ca")
    tls.init_ca(tmp_path / "other-ca")
    return {
        "dir": tmp_path,
        "coordinator": tls.issue(tmp_path / "ca", "coordinator", "coord", tmp_path / "coordinator"),
        "operator": tls.issue(tmp_path / "ca", "operator", "ops", tmp_path / "operator"),
    }


@pytest.fixture
def secure(tmp_path, pki):
    server, port, coord = serve(tmp_path / "state", port=0, identity=pki["coordinator"])
    channels = []

    def connect(identity):
        channel = tls.channel(f"127.0.0.1:{port}", identity, [])
        channels.append(channel)
        return pb_grpc.NodeServiceStub(channel)

    yield coord, port, connect
    for channel in channels:
        channel.close()
    coord.stop()
    server.stop(0).wait()


def node_cert(pki, name, ca="ca", **kw):
    """A node certificate for ``name``; a second one for the same name replaces the first on disk."""
    return tls.issue(pki["dir"] / ca, "node", name, pki["dir"] / f"node-{name}", force=True, **kw)


def register(stub, name, token=""):
    return stub.Register(pb.RegisterRequest(name=name, protocol_version=PROTOCOL_VERSION, join_token=token),
                         timeout=5).node_id


def refused(fn):
    with pytest.raises(grpc.RpcError) as err:
        fn()
    return err.value.code(), err.value.details()


def test_a_good_certificate_enrolls_once_with_its_token_and_is_then_known_by_its_fingerprint(pki, secure):
    coord, _, connect = secure
    cert = node_cert(pki, "hospital-a")
    token = coord.registry.create_token("hospital-a", 3600)
    stub = connect(cert)
    code, details = refused(lambda: register(stub, "hospital-a"))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "not enrolled" in details and "join token" in details
    node_id = register(stub, "hospital-a", token)
    assert coord.registry.node(node_id).fingerprint == cert.fingerprint
    # Known by its certificate from now on: no token needed, the same id, and it may poll.
    assert register(connect(cert), "hospital-a") == node_id
    assert stub.Poll(pb.PollRequest(node_id=node_id, wait_seconds=0), timeout=5) == pb.PollReply()
    # The token was one-time: another certificate of the same name cannot spend it again.
    code, details = refused(lambda: register(connect(node_cert(pki, "hospital-a")), "hospital-a", token))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "already used" in details


def test_tokens_are_bound_to_a_name_and_expire(pki, secure):
    coord, _, connect = secure
    stub = connect(node_cert(pki, "b"))
    for token, why in [(coord.registry.create_token("a", 3600), "is for node 'a'"),
                       (coord.registry.create_token("b", -1), "expired"),
                       ("made-up", "not one this coordinator issued")]:
        code, details = refused(lambda: register(stub, "b", token))
        assert code == grpc.StatusCode.PERMISSION_DENIED and why in details
    # A node may only register under its certificate's name.
    code, details = refused(lambda: register(stub, "a", coord.registry.create_token("a", 3600)))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "holds the certificate of 'b'" in details


@pytest.mark.parametrize("case", ["no certificate", "plaintext", "another CA", "expired"])
def test_bad_certificates_fail_the_handshake(pki, secure, case):
    coord, port, connect = secure
    address = f"127.0.0.1:{port}"
    token = ""
    if case == "no certificate":
        channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(pki["coordinator"].ca_pem))
        stub = pb_grpc.NodeServiceStub(channel)
    elif case == "plaintext":
        stub = connect(None)
    elif case == "another CA":
        stub = connect(node_cert(pki, "mallory", ca="other-ca"))
    else:
        past = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=3)
        stub = connect(node_cert(pki, "late", not_before=past, days=1))
        token = coord.registry.create_token("late", 3600)
    code, details = refused(lambda: register(stub, "late", token))
    assert code == grpc.StatusCode.UNAVAILABLE
    assert coord.registry.nodes() == []


def test_revoked_certificates_are_refused_at_the_next_request(pki, secure, caplog):
    coord, _, connect = secure
    cert = node_cert(pki, "c")
    stub = connect(cert)
    node_id = register(stub, "c", coord.registry.create_token("c", 3600))
    coord.registry.revoke("c")
    with caplog.at_level(logging.WARNING, logger="fedtrain.coordinator"):
        code, details = refused(lambda: stub.Poll(pb.PollRequest(node_id=node_id, wait_seconds=0), timeout=5))
        assert code == grpc.StatusCode.PERMISSION_DENIED and "was revoked" in details
        code, details = refused(lambda: register(stub, "c"))
        assert code == grpc.StatusCode.PERMISSION_DENIED and "revoked" in details
    assert any("refused" in r.message and "revoked" in r.message for r in caplog.records)
    # A new certificate with a new token enrolls the node again, under its old id; the old one stays out.
    fresh = node_cert(pki, "c")
    assert register(connect(fresh), "c", coord.registry.create_token("c", 3600)) == node_id
    assert refused(lambda: register(connect(cert), "c"))[0] == grpc.StatusCode.PERMISSION_DENIED


def test_roles_and_node_ids_cannot_be_borrowed(pki, secure, shards):
    coord, port, connect = secure
    a, b = node_cert(pki, "a"), node_cert(pki, "b")
    id_a = register(connect(a), "a", coord.registry.create_token("a", 3600))
    stub_b = connect(b)
    register(stub_b, "b", coord.registry.create_token("b", 3600))
    code, details = refused(lambda: stub_b.Poll(pb.PollRequest(node_id=id_a, wait_seconds=0), timeout=5))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "another certificate" in details
    # An operator's certificate is not a node's, and a node's cannot submit or cancel jobs.
    code, details = refused(lambda: register(connect(pki["operator"]), "ops"))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "operator certificate" in details
    with CoordinatorClient(f"127.0.0.1:{port}", a) as client, pytest.raises(PermissionDenied, match="node certificate"):
        client.jobs()
    with CoordinatorClient(f"127.0.0.1:{port}", pki["operator"]) as client:
        job_id = client.submit(make_spec())
        assert len(client.jobs()) == 1
    with CoordinatorClient(f"127.0.0.1:{port}", a) as client, pytest.raises(PermissionDenied, match="node certificate"):
        client.cancel(job_id)
    with CoordinatorClient(f"127.0.0.1:{port}") as client, pytest.raises(Unavailable, match="--tls-dir"):
        client.jobs()


def test_tls_directories_are_checked_before_connecting(pki, tmp_path):
    node_cert(pki, "n")
    d = pki["dir"] / "node-n"
    assert identity_option(d, False, "node").name == "n"
    with pytest.raises(tls.TLSError, match="--insecure"):
        identity_option(None, False, "node")
    assert identity_option(None, True, "node") is None
    with pytest.raises(tls.TLSError, match="needs a coordinator certificate"):
        tls.load_identity(d, "coordinator")
    past = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=3)
    node_cert(pki, "old", not_before=past, days=1)
    with pytest.raises(tls.TLSError, match="not now"):
        tls.load_identity(pki["dir"] / "node-old", "node")
    (d / tls.CA_CERT).write_bytes((pki["dir"] / "other-ca" / tls.CA_CERT).read_bytes())
    with pytest.raises(tls.TLSError, match="was not issued by the CA"):
        tls.load_identity(d, "node")
    (d / tls.KEY).unlink()
    with pytest.raises(tls.TLSError, match="key.pem is missing"):
        tls.load_identity(d, "node")
    with pytest.raises(tls.TLSError, match="already holds a CA"):
        tls.init_ca(pki["dir"] / "ca")


def test_certs_issue_replaces_a_live_certificate_only_with_force_and_takes_whole_days_only(pki):
    live = node_cert(pki, "hospital-a")
    out = pki["dir"] / "node-hospital-a"
    issue = ["certs", "issue", "--ca-dir", str(pki["dir"] / "ca"), "--node", "hospital-a", "--out", str(out)]
    refused = cli(*issue, check=False)
    assert refused.returncode == 3 and refused.stdout == "", refused
    assert f"{out / tls.CERT} and {out / tls.KEY} already exist" in refused.stderr and "--force" in refused.stderr
    assert tls.load_identity(out, "node").fingerprint == live.fingerprint  # the live node keeps working
    for command in ([*issue, "--force", "--days", "-1"], ["certs", "init", "--ca-dir", str(pki["dir"] / "new-ca"),
                                                          "--days", "0"]):
        bad = cli(*command, check=False)
        assert bad.returncode == 2 and "Invalid value for '--days'" in bad.stderr, bad
        assert "Traceback" not in bad.stderr + bad.stdout
    assert not (pki["dir"] / "new-ca").exists()
    replaced = cli(*issue, "--force")
    assert tls.load_identity(out, "node").fingerprint != live.fingerprint
    assert tls.load_identity(out, "node").fingerprint in replaced.stdout


def test_job_submit_prints_only_the_job_id_on_stdout_and_warnings_and_errors_on_stderr(tmp_path):
    server, port, coord = serve(tmp_path / "state", port=0)  # plaintext, as --insecure speaks
    try:
        good, bad = tmp_path / "job.yaml", tmp_path / "typo.yaml"
        good.write_text(yaml.safe_dump(make_spec().model_dump(mode="json")))
        bad.write_text(yaml.safe_dump({**make_spec().model_dump(mode="json"), "min_node": 2}))
        submit = ["job", "submit", "--coordinator", f"127.0.0.1:{port}", "--insecure"]
        out = cli(*submit, str(good))
        with CoordinatorClient(f"127.0.0.1:{port}") as client:
            assert out.stdout == f"{client.jobs()[0].job_id}\n"
        assert "warning: --insecure: plaintext gRPC" in out.stderr
        refused = cli(*submit, str(bad), check=False)
        assert refused.returncode == 2 and refused.stdout == ""
        assert "min_node: unknown key (did you mean min_nodes?)" in refused.stderr
    finally:
        coord.stop()
        server.stop(0).wait()


@pytest.mark.slow
def test_a_node_gives_up_on_a_certificate_that_cannot_verify_but_waits_out_a_closed_port(pki, secure, tmp_path):
    """Two real node processes: one holds certificates of another CA than the coordinator's, the
    other dials a port where nothing listens. Both say at WARNING what is wrong and what to
    check; only the first cannot mend by retrying, and exits with status 1 after --give-up-after."""
    _, port, _ = secure
    data = tmp_path / "data.csv"
    data.write_text("a,y\n1.0,0\n")
    policy = write_policy(tmp_path / "policy.yaml", max_epsilon=1.0)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, never listening: connections to it are refused
    nodes = {}
    for name, address, ca in (("foreign", f"127.0.0.1:{port}", "other-ca"),
                              ("patient", f"127.0.0.1:{closed.getsockname()[1]}", "ca")):
        node_cert(pki, name, ca=ca)
        log = (tmp_path / f"{name}.log").open("w")
        nodes[name] = subprocess.Popen(
            [sys.executable, "-m", "fedtrain", "node", "start", "--coordinator", address, "--data", str(data),
             "--policy", str(policy), "--state-dir", str(tmp_path / name),
             "--tls-dir", str(pki["dir"] / f"node-{name}"), "--give-up-after", "2"],
            stdout=log, stderr=log, env={**os.environ, "COLUMNS": "200"}, start_new_session=True)

    def warnings(name):
        return [line for line in (tmp_path / f"{name}.log").read_text().splitlines() if " WARNING " in line]

    try:
        assert nodes["foreign"].wait(120) == 1
        logged = (tmp_path / "foreign.log").read_text()
        assert any("the coordinator's certificate did not verify (unable to get local issuer certificate)" in w
                   and "ca.pem in this node's --tls-dir is the consortium's CA" in w for w in warnings("foreign"))
        gave_up = re.search(r"error: gave up after (\d+) s: the TLS handshake with 127.0.0.1:\d+ failed", logged)
        assert gave_up and 2 <= int(gave_up[1]) <= 12, logged  # within a retry (at most 10 s) of the limit
        assert "Traceback" not in logged

        refused = eventually(lambda: [w for w in warnings("patient") if "connection refused" in w],
                             "the patient node's warning")
        assert f"nothing listens at 127.0.0.1:{closed.getsockname()[1]} (connection refused)" in refused[0]
        time.sleep(4)  # twice --give-up-after: an absent coordinator is waited for
        assert nodes["patient"].poll() is None
        os.killpg(nodes["patient"].pid, signal.SIGTERM)
        assert nodes["patient"].wait(30) == 0
    finally:
        closed.close()
        for proc in nodes.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
