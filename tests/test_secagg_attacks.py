"""Secure aggregation under attack, with real node agents over loopback gRPC (mutual TLS).

A hostile coordinator (our own gRPC servicer, holding the consortium's coordinator
certificate) drives a real NodeAgent through SecAgg+ with two made-up peers whose X25519
keys it holds: if the node sent shares, the coordinator would decrypt them and rebuild the
node's self-mask seed and mask key, then its exact update and example count. And a
hostile node (a real agent with ``_mask`` replaced) masks a forged vector to drag the
global model anywhere. The defenders run their real code throughout.
"""

import datetime as dt
import logging
import queue
import threading
from concurrent import futures

import grpc
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedtrain.data import write_table
from fedtrain.models import build_model, evaluate, initial_state, load_dataset, load_trainable_state
from fedtrain.protocol import fedtrain_pb2 as pb
from fedtrain.protocol import fedtrain_pb2_grpc as pb_grpc
from fedtrain.protocol.codec import GRPC_OPTIONS, decode_arrays, encode_arrays, encode_values, manifest_of
from fedtrain.protocol.refusal import Reason, parse_refusal
from fedtrain.secagg import crypto
from fedtrain.secagg.encoding import clip_range, decode_sum, error_bound, node_weight, quant_bits, vector_length
from fedtrain.secagg.peers import PeerAuth, signed_bytes

from conftest import FEATURES, RecordingAgent, make_spec, owner_policy
from test_end_to_end import wait_for

VICTIM, PEERS = 1, (2, 3)
JOB, ROUND = "job-under-attack", 2
THRESHOLD = 2  # of 3 holders: the victim and its two made-up peers


# --- the hostile coordinator ----------------------------------------------------------------

class HostileCoordinator(pb_grpc.NodeServiceServicer):
    """Hands the node whatever the test queues, and keeps everything the node sends."""

    def __init__(self, model):
        self.polls: queue.Queue[pb.PollReply] = queue.Queue()
        self.answers: queue.Queue[pb.OfferAnswer] = queue.Queue()
        self.results: queue.Queue[list[pb.ResultPart]] = queue.Queue()
        self.model = model

    def Register(self, request, context):
        return pb.RegisterReply(node_id=VICTIM)

    def Poll(self, request, context):
        try:
            return self.polls.get(timeout=min(request.wait_seconds, 0.5))
        except queue.Empty:
            return pb.PollReply()

    def AnswerOffer(self, request, context):
        self.answers.put(request)
        return pb.Ack()

    def FetchArrays(self, request, context):
        yield from encode_arrays(self.model)

    def SubmitResult(self, request_iterator, context):
        self.results.put(list(request_iterator))
        return pb.Ack()

    def task(self, spec, task_id, message_type, **secagg) -> list[pb.ResultPart]:
        """Send one task; what the node answers."""
        self.polls.put(pb.PollReply(task=pb.TaskHeader(
            task_id=task_id, job_id=JOB, round=ROUND, message_type=message_type, spec_json=spec.canonical_json(),
            secagg=pb.SecAggRequest(**secagg), config=encode_values({"server-round": ROUND}))))
        return self.results.get(timeout=60)


@pytest.fixture
def hostile(tmp_path, shards, consortium_pki):
    """start(identity) -> (the hostile coordinator, the victim agent, the job spec), the victim
    having accepted the job."""
    spec = make_spec(min_nodes=3, training={"rounds": ROUND, "batch_size": 32, "learning_rate": 0.5})
    coordinator = HostileCoordinator(initial_state(spec))
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=GRPC_OPTIONS)
    pb_grpc.add_NodeServiceServicer_to_server(coordinator, server)
    running = []

    def start(identity, decision=pb.OfferAnswer.ACCEPTED):
        # The consortium's own coordinator certificate: the coordinator itself is the attacker.
        if identity is None:
            port = server.add_insecure_port("127.0.0.1:0")
        else:
            credentials = consortium_pki.identity("coordinator", "coordinator").server_credentials()
            port = server.add_secure_port("127.0.0.1:0", credentials)
        server.start()
        data = shards[0][0]
        victim = RecordingAgent(coordinator=f"127.0.0.1:{port}", data=data, policy=owner_policy(data),
                                state_dir=tmp_path / "victim", name="victim", poll_seconds=0.2, identity=identity)
        stop = threading.Event()
        thread = threading.Thread(target=victim.run, args=(stop,), daemon=True)
        thread.start()
        running.append((victim, stop, thread))
        coordinator.polls.put(pb.PollReply(offer=pb.JobOffer(job_id=JOB, spec_json=spec.canonical_json())))
        coordinator.offer_answer = coordinator.answers.get(timeout=30)
        assert coordinator.offer_answer.decision == decision
        return coordinator, victim, spec

    yield start
    for victim, stop, thread in running:
        stop.set()
        thread.join(10)
        victim.close()
    server.stop(0).wait()


# --- the made-up peers ---------------------------------------------------------------------

class MadeUpPeer:
    """A peer the coordinator invents: it holds the private halves of the keys it advertises."""

    def __init__(self, node_id):
        self.node_id = node_id
        self.enc, self.mask = crypto.new_private_key(), crypto.new_private_key()

    def keys(self):
        return pb.PublicKeys(node_id=self.node_id, encryption_key=crypto.public_bytes(self.enc),
                             mask_key=crypto.public_bytes(self.mask),
                             seed_commitment=crypto.commitment(crypto.new_seed()))

    def share_key(self, victim_keys):
        lo, hi = sorted((VICTIM, self.node_id))
        return crypto.agree(self.enc, victim_keys.encryption_key, crypto.context("share-key", JOB, ROUND, lo, hi))


def _der(cert):
    return cert.public_bytes(serialization.Encoding.DER)


def _self_signed(name):
    """A self-signed certificate with the subject and extensions of the CA's node certificates."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "node"),
                         x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return cert, key


def _sign_with(key, keys):
    keys.signature = key.sign(signed_bytes(JOB, ROUND, keys), ec.ECDSA(hashes.SHA256()))
    return keys


def advertise(peer, how, pki):
    """``peer``'s keys as a hostile coordinator can dress them up."""
    keys = peer.keys()
    if how == "no certificate":
        return keys
    if how == "self-signed certificate":
        cert, key = _self_signed(f"made-up-{peer.node_id}")
        keys.certificate = _der(cert)
        return _sign_with(key, keys)
    if how == "a real node's CA certificate, signed with another key":
        # Certificates are public: this one belongs to an enrolled node whose key stays with it.
        keys.certificate = _der(x509.load_pem_x509_certificate(pki.identity("node", f"n{peer.node_id}").cert_pem))
        return _sign_with(ec.generate_private_key(ec.SECP256R1()), keys)
    if how == "replayed from the previous round":
        # A real node's own advertisement of round 1, whose keys have since leaked.
        return PeerAuth(pki.identity("node", f"n{peer.node_id}")).sign(JOB, ROUND - 1, keys)
    if how == "minted with the CA key":
        # Whoever holds the CA key can issue a node certificate: the one stated trust assumption.
        return PeerAuth(pki.identity("node", f"sybil-{peer.node_id}")).sign(JOB, ROUND, keys)
    raise AssertionError(how)


def steal(victim_keys, sent, peers):
    """The shares of the victim's seed and mask key that the made-up peers can decrypt, and
    the secrets when there are enough of them (else None, None)."""
    pairs = []
    for parts in sent:
        for share in parts[0].header.secagg.shares.shares:
            plain = crypto.unseal(peers[share.dst].share_key(victim_keys), share.ciphertext,
                                  crypto.context("share", JOB, ROUND, VICTIM, share.dst))
            if plain is not None:
                pairs.append(pb.SharePair.FromString(plain))
    if len(pairs) < THRESHOLD:
        return pairs, None, None
    return pairs, crypto.combine([p.seed_share for p in pairs]), crypto.combine([p.key_share for p in pairs])


def run_up_to_shares(coordinator, spec, how, pki):
    setup = pb.SecAggSetup(num_nodes=3, neighbours=list(PEERS), threshold=THRESHOLD, quant_bits=quant_bits(3))
    reply, = coordinator.task(spec, "setup", "train.secagg", setup=setup)
    victim_keys = reply.header.secagg.keys
    assert victim_keys.signature and not reply.header.refusal
    peers = {p: MadeUpPeer(p) for p in PEERS}
    ask = pb.SecAggShareKeys(keys=[advertise(peer, how, pki) for peer in peers.values()])
    sent = [coordinator.task(spec, "share-keys", "train.secagg", share_keys=ask)]
    return victim_keys, peers, sent


@pytest.mark.parametrize("how", ["no certificate", "self-signed certificate",
                                 "a real node's CA certificate, signed with another key",
                                 "replayed from the previous round"])
def test_a_coordinator_cannot_make_up_peers_to_collect_a_nodes_secrets(hostile, consortium_pki, caplog, how):
    coordinator, victim, spec = hostile(consortium_pki.identity("node", "victim"))
    with caplog.at_level(logging.WARNING, logger="fedtrain.node"):
        victim_keys, peers, sent = run_up_to_shares(coordinator, spec, how, consortium_pki)
    answer = sent[0][0].header
    assert not answer.secagg.HasField("shares") and parse_refusal(answer.refusal).reason \
        is Reason.SECURE_AGGREGATION_FAILED
    assert coordinator.results.empty()  # and nothing else came
    pairs, seed, mask_key = steal(victim_keys, sent, peers)
    assert pairs == [] and seed is None and mask_key is None
    why = {"no certificate": "come without a certificate",
           "self-signed certificate": "certificate the consortium CA does not vouch for",
           "a real node's CA certificate, signed with another key": f"are not signed by n2's certificate for job {JOB}"
                                                                    f" round {ROUND}",
           "replayed from the previous round": f"are not signed by n2's certificate for job {JOB} round {ROUND}"}[how]
    assert why in caplog.text  # the node's own log says which check failed


def test_with_a_node_minted_by_the_ca_key_holder_the_same_attack_unmasks_the_node(hostile, consortium_pki):
    """The control: the attack works when its peers pass every check, which takes the CA's key.
    It recovers the seed, the mask key, the exact update and the example count."""
    coordinator, victim, spec = hostile(consortium_pki.identity("node", "victim"))
    victim_keys, peers, sent = run_up_to_shares(coordinator, spec, "minted with the CA key", consortium_pki)
    pairs, seed, mask_key = steal(victim_keys, sent, peers)
    assert crypto.commitment(seed) == victim_keys.seed_commitment
    assert crypto.public_bytes(crypto.private_from_bytes(mask_key)) == victim_keys.mask_key
    # The made-up peers send the victim shares of their own, so that it trains and masks.
    inbox = []
    for peer in peers.values():
        pair = pb.SharePair(seed_share=crypto.split(crypto.new_seed(), 2, 3)[0],
                            key_share=crypto.split(crypto.new_seed(), 2, 3)[0])
        inbox.append(pb.EncryptedShare(src=peer.node_id, dst=VICTIM, ciphertext=crypto.seal(
            peer.share_key(victim_keys), pair.SerializeToString(),
            crypto.context("share", JOB, ROUND, peer.node_id, VICTIM))))
    parts = coordinator.task(spec, "collect", "train", collect=pb.SecAggCollect(shares=inbox))
    masked = decode_arrays([p.tensor for p in parts[1:]])["secagg.masked"]
    clear = masked - crypto.mask(seed, len(masked))
    for peer in peers.values():
        lo, hi = sorted((VICTIM, peer.node_id))
        pairwise = crypto.mask(crypto.agree(peer.mask, victim_keys.mask_key, crypto.context("mask", JOB, ROUND, lo, hi)),
                               len(masked))
        clear = clear - pairwise if VICTIM < peer.node_id else clear + pairwise
    clip, bits = clip_range(spec), quant_bits(3)
    weight, update = decode_sum(clear, 1, clip, bits)
    examples = victim.policy.dataset_size
    assert round(weight * spec.secure_aggregation.max_weight) == examples
    w, change = victim.clear[ROUND]
    exact = w * np.clip(np.concatenate([change[k].ravel() for k in sorted(change)]), -clip, clip)
    assert np.abs(update - exact).max() <= error_bound(1, clip, bits)


def test_a_node_without_a_tls_identity_refuses_secure_aggregation(hostile):
    # Refused at the offer, from the spec and the node's configuration alone ...
    coordinator, victim, spec = hostile(None, decision=pb.OfferAnswer.REFUSED)
    assert parse_refusal(coordinator.offer_answer.reason).reason is Reason.SECURE_AGGREGATION_UNAUTHENTICATED
    # ... and a setup task sent anyway gets no key.
    setup = pb.SecAggSetup(num_nodes=3, neighbours=list(PEERS), threshold=THRESHOLD, quant_bits=quant_bits(3))
    reply, = coordinator.task(spec, "setup", "train.secagg", setup=setup)
    assert not reply.header.secagg.HasField("keys")
    assert parse_refusal(reply.header.refusal).reason is Reason.NOT_ACCEPTED


# --- a hostile node --------------------------------------------------------------------------

class ZeroWeightMaxUpdate(RecordingAgent):
    """Masks a forged vector: weight element 0 (w = -1), every update element the field's maximum."""

    def _mask(self, spec, secagg, update, start, num_examples):
        vector = np.full(vector_length(manifest_of(update)), np.iinfo(np.uint32).max, dtype=np.uint32)
        vector[0] = 0
        return secagg.mask(vector)


class TunedWeightMaxUpdate(RecordingAgent):
    """Sets its weight element so that the weights sum to barely above 3/max_weight (inside
    the weights' possible range) and every update element to the field's maximum."""

    others = 0.0  # the honest nodes' weight sum, which this attacker is taken to know

    def _mask(self, spec, secagg, update, start, num_examples):
        step = 2.0 / (1 << secagg.quant_bits)
        target = 4 / spec.secure_aggregation.max_weight
        # decode_sum takes 1 off per input; the honest weights come with theirs.
        forged_weight = target - self.others
        vector = np.full(vector_length(manifest_of(update)), np.iinfo(np.uint32).max, dtype=np.uint32)
        vector[0] = round((forged_weight + 1) / step)
        return secagg.mask(vector)


@pytest.mark.slow
@pytest.mark.parametrize("attacker", [ZeroWeightMaxUpdate, TunedWeightMaxUpdate])
def test_a_node_masking_a_forged_vector_gets_the_round_rejected_and_the_model_kept(consortium, attacker):
    start, client = consortium
    nodes = start(3, agents=[attacker])
    spec = make_spec(min_nodes=3, secure_aggregation={"stage_timeout": 4.0}, round_timeout=15,
                     training={"rounds": 1, "batch_size": 32, "learning_rate": 0.5}, round_retries=0)
    attacker.others = sum(node_weight(n.args["policy"].dataset_size, spec.secure_aggregation.max_weight)
                          for n in nodes[1:])
    job_id = client.submit(spec)
    status = wait_for(client, job_id, lambda s: s.state in ("finished", "failed"), timeout=120)
    assert "secure aggregation failed: impossible aggregate" in status.error
    what = "weights sum to" if attacker is ZeroWeightMaxUpdate else "a coordinate of the weighted sum is"
    assert what in status.error
    # Every contributor's result shows the rejection: the masks hide which one forged its vector.
    round_nodes = status.rounds[1].nodes
    assert len(round_nodes) == 3 and all("impossible aggregate" in r.refusal for r in round_nodes)
    before, after = initial_state(spec), client.model(job_id, 1)
    assert all(np.array_equal(before[k], after[k]) for k in before)


@pytest.mark.slow
def test_an_honest_secure_run_passes_the_checks_and_learns(consortium, cancer, tmp_path):
    x, y = cancer
    start, client = consortium
    start(3)
    # Public scaling constants: the reference dataset's own, as a consortium would publish them.
    scaling = {"mean": x.mean(axis=0).tolist(), "std": x.std(axis=0).tolist()}
    spec = make_spec(min_nodes=3, data={"scaling": scaling}, secure_aggregation={"stage_timeout": 4.0},
                     round_timeout=15, training={"rounds": 3, "batch_size": 32, "learning_rate": 0.5})
    job_id = client.submit(spec)
    status = wait_for(client, job_id, lambda s: s.state in ("finished", "failed"), timeout=120)
    assert status.state == "finished" and not status.error
    assert all(not r.refusal for rnd in status.rounds for r in rnd.nodes)
    table = tmp_path / "all.csv"
    write_table(table, FEATURES, x, "malignant", y)
    data = load_dataset(table, spec)

    def accuracy(weights):
        model = build_model(spec)
        load_trainable_state(model, weights)
        return evaluate(model, data, spec)["accuracy"]

    first, last = accuracy(initial_state(spec)), accuracy(client.model(job_id, 3))
    assert last > 0.9 and last > first + 0.1  # about 0.78 -> 0.94
