"""Mutual TLS and node identity: who the coordinator lets in, and with which certificate."""

import datetime as dt
import logging

import grpc
import pytest

from coordinator.service import serve
from fedtrain.protocol import tls
from fedtrain.cli.options import identity_option
from fedtrain.cli.client import CoordinatorClient
from fedtrain.errors import PermissionDenied, Unavailable
from fedtrain.protocol import fedtrain_pb2 as pb
from fedtrain.protocol import fedtrain_pb2_grpc as pb_grpc
from fedtrain.protocol.codec import PROTOCOL_VERSION

from conftest import make_spec


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
    return tls.issue(pki["dir"] / ca, "node", name, pki["dir"] / f"node-{name}", **kw)


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
    # An operator's certificate is not a node's, and a node's cannot submit jobs.
    code, details = refused(lambda: register(connect(pki["operator"]), "ops"))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "operator certificate" in details
    with CoordinatorClient(f"127.0.0.1:{port}", a) as client, pytest.raises(PermissionDenied, match="node certificate"):
        client.jobs()
    with CoordinatorClient(f"127.0.0.1:{port}", pki["operator"]) as client:
        assert client.submit(make_spec())
        assert len(client.jobs()) == 1
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
