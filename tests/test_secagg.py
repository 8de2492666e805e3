"""SecAgg+ at the protocol level: the real node and server state machines, in one process."""

import datetime as dt
import itertools
import random

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from scipy import stats

from fedtrain.protocol import tls
from fedtrain.errors import SecAggError, SpecError, WireError
from fedtrain.protocol import fedtrain_pb2 as pb
from fedtrain.secagg.encoding import ImpossibleAggregate, check_sum, decode_sum, encode, error_bound, quant_bits
from fedtrain.secagg.node import SecAggNode
from fedtrain.secagg.peers import PeerAuth, signed_bytes
from fedtrain.secagg.server import SecAggServer
from fedtrain.spec import SecureAggregationSpec

from conftest import make_spec

CLIP = 0.5


@pytest.fixture(autouse=True)
def _node_certificates(consortium_pki):
    Round.pki = consortium_pki


def auth(node):
    """Node ``node``'s certificate, from the consortium CA."""
    return PeerAuth(Round.pki.identity("node", f"secagg-{node}"))


def enrolled(node):
    """The fingerprint the coordinator knows node ``node`` by."""
    return Round.pki.identity("node", f"secagg-{node}").fingerprint


class Round:
    """One round between real SecAggNodes and a SecAggServer, with stages driven by the test."""

    pki = None  # the consortium's, set for each test

    def __init__(self, n, length=1001, settings=SecureAggregationSpec(), job="job", round=1, seed=0):
        self.ids = [100 + 7 * i for i in range(n)]
        self.server = SecAggServer(job, round, self.ids, settings, length, CLIP, rng=random.Random(seed))
        self.nodes = {i: SecAggNode(job, round, i, auth(i)) for i in self.ids}
        self.rng = np.random.default_rng(seed)
        self.updates = {}  # node -> (weight, update): what each node would have sent in the clear

    def keys(self, skip=()):
        for i, req in self.server.setup_requests().items():
            if i not in skip:
                self.server.add_keys(i, self.nodes[i].setup(req), enrolled(i))

    def shares(self, skip=()):
        for i, req in self.server.share_keys_requests().items():
            if i not in skip:
                self.server.add_shares(i, self.nodes[i].share_keys(req))

    def collect(self, skip=()):
        for i, req in self.server.collect_requests().items():
            self.nodes[i].receive_shares(req)
            if i in skip:
                continue
            update = self.rng.normal(0, 0.1, self.server.length - 1)
            weight = float(self.rng.uniform(0.05, 1))
            vector, clipped = encode({"w": update}, weight, CLIP, self.server.quant_bits)
            assert clipped == 0
            self.updates[i] = (weight, update)
            self.server.add_masked(i, self.nodes[i].mask(vector))

    def unmask(self, skip=()):
        for i, req in self.server.unmask_requests().items():
            if i not in skip:
                self.server.add_reveal(i, self.nodes[i].unmask(req))
        return self.server.aggregate()

    def run(self, before=(), after=()):
        self.keys()
        self.shares()
        self.collect(skip=before)
        return self.unmask(skip=after)

    def check_sum(self, total):
        contributors = sorted(self.updates)
        assert list(total.nodes) == contributors
        weight = sum(w for w, _ in self.updates.values())
        exact = sum(w * u for w, u in self.updates.values())
        bound = error_bound(len(contributors), CLIP, self.server.quant_bits)
        assert np.abs(total.update - exact).max() <= bound
        assert abs(total.weight - weight) <= error_bound(len(contributors), 1.0, self.server.quant_bits)


@pytest.mark.parametrize("n", [3, 5, 10])
def test_the_unmasked_aggregate_is_the_sum_of_the_updates(n):
    r = Round(n)
    r.check_sum(r.run())
    assert 2 * r.server.threshold > r.server.holders


def test_a_sparse_graph_at_25_nodes_still_sums_exactly():
    r = Round(25)
    assert r.server.holders == 11 and r.server.threshold == 6  # 2*ceil(log2 25)+1 holders
    assert all(len(peers) == 10 for peers in r.server.graph.values())
    assert all(a in r.server.graph[b] for a in r.ids for b in r.server.graph[a])  # symmetric
    r.check_sum(r.run(before={r.ids[3]}, after={r.ids[9]}))


def test_one_node_drops_before_its_masked_update_and_one_after_and_the_sum_is_right():
    r = Round(5)
    before, after = r.ids[1], r.ids[3]
    total = r.run(before={before}, after={after})
    assert after in total.nodes and before not in total.nodes
    r.check_sum(total)


def test_too_many_dropouts_before_the_masked_updates_fail_before_anything_is_revealed():
    r = Round(5)
    r.keys()
    r.shares()
    r.collect(skip=set(r.ids[:3]))
    with pytest.raises(SecAggError, match=r"collect: only 2 of 5 nodes sent masked updates and the threshold is 3;"
                                          r" nodes \[100, 107, 114\] dropped out"):
        r.server.unmask_requests()
    assert r.server.reveals == {}


def test_too_many_dropouts_in_the_unmask_stage_name_the_silent_nodes():
    r = Round(5)
    r.keys()
    r.shares()
    r.collect()
    with pytest.raises(SecAggError, match=r"threshold is 3; nodes \[100, 107, 114\] did not reveal"):
        r.unmask(skip=set(r.ids[:3]))


def test_a_round_needs_three_nodes_and_holders_that_met_the_threshold():
    with pytest.raises(SecAggError, match="at least 3 nodes"):
        SecAggServer("j", 1, [1, 2], SecureAggregationSpec(), 10, CLIP)
    r = Round(5)
    r.keys(skip=set(r.ids[:3]))
    with pytest.raises(SecAggError, match=r"setup: only 2 of 5 nodes answered, nodes \[100, 107, 114\] dropped out"):
        r.server.share_keys_requests()
    # In a sparse graph, a node can lose too many of its own holders while most nodes are still in.
    r = Round(25)
    victim = r.ids[0]
    r.keys(skip=set(sorted(r.server.graph[victim])[:6]))
    with pytest.raises(SecAggError, match=f"setup: node {victim} has 5 of its 11 share holders left"):
        r.server.share_keys_requests()


def test_what_the_coordinator_receives_from_one_node_looks_uniform_and_uncorrelated():
    r = Round(3, length=50_001, seed=1)
    r.keys()
    r.shares()
    requests = r.server.collect_requests()
    node = r.ids[0]
    r.nodes[node].receive_shares(requests[node])
    # A strongly structured update: a ramp, so that any leak would show.
    update = np.linspace(-CLIP, CLIP, r.server.length - 1)
    encoded, _ = encode({"w": update}, 1.0, CLIP, r.server.quant_bits)
    masked = r.nodes[node].mask(encoded)

    def uniform_p(values):
        counts = np.bincount((values >> np.uint32(28)).astype(np.int64), minlength=16)  # top 4 bits
        return stats.chisquare(counts).pvalue

    assert uniform_p(masked) > 1e-4 and uniform_p(masked & np.uint32(0xFFFF) << np.uint32(16)) > 1e-4
    assert stats.kstest(masked / 2.0**32, "uniform").pvalue > 1e-4
    assert abs(np.corrcoef(masked[1:].astype(np.float64), update)[0, 1]) < 4 / np.sqrt(len(update))
    # The same tests do see the unmasked encoding for what it is: they are not blind.
    assert uniform_p(encoded) < 1e-10 and abs(np.corrcoef(encoded[1:].astype(np.float64), update)[0, 1]) > 0.99


def _unmask_with(r, victim, dropped_at):
    """A coordinator that tells each holder in ``dropped_at`` that ``victim`` dropped out, and the
    others that it is active. Returns the shares of the victim's seed and key it obtains."""
    seeds, keys = [], []
    for holder in sorted(r.server.graph[victim] | {victim}):
        active = sorted((r.server.graph[holder] | {holder}) - ({victim} if holder in dropped_at else set()))
        dropped = [victim] if holder in dropped_at else []
        try:
            reveal = r.nodes[holder].unmask(pb.SecAggUnmask(active=active, dropped=dropped))
        except SecAggError:
            continue
        seeds += [s.share for s in reveal.seed_shares if s.owner == victim]
        keys += [s.share for s in reveal.key_shares if s.owner == victim]
    return seeds, keys


def test_no_way_of_asking_gives_the_coordinator_both_secrets_of_a_node():
    holders = 5
    victim_index = 2
    for dropped_at in itertools.chain.from_iterable(itertools.combinations(range(holders), k) for k in range(6)):
        r = Round(holders, length=11)
        r.keys()
        r.shares()
        r.collect()
        victim = r.ids[victim_index]
        seeds, keys = _unmask_with(r, victim, {r.ids[i] for i in dropped_at})
        t = r.server.threshold
        assert not (len(seeds) >= t and len(keys) >= t), dropped_at
        # A node never calls itself dropped; each other holder gives one kind of share.
        assert len(seeds) + len(keys) == holders - (victim_index in dropped_at)


def test_a_node_answers_unmask_once_and_never_with_both_kinds_for_a_peer():
    r = Round(3)
    r.keys()
    r.shares()
    r.collect()
    a, b, c = r.ids
    with pytest.raises(SecAggError, match=r"both active and dropped"):
        r.nodes[a].unmask(pb.SecAggUnmask(active=[a, b, c], dropped=[b]))
    with pytest.raises(SecAggError, match="answered once"):  # even a corrected request
        r.nodes[a].unmask(pb.SecAggUnmask(active=[a, c], dropped=[b]))
    with pytest.raises(SecAggError, match="lists this node as dropped"):
        r.nodes[b].unmask(pb.SecAggUnmask(active=[a, c], dropped=[b]))
    with pytest.raises(SecAggError, match="at least 2 must have sent"):
        r.nodes[c].unmask(pb.SecAggUnmask(active=[c], dropped=[a, b]))


def test_a_node_refuses_unsafe_parameters():
    node = SecAggNode("j", 1, 1, auth(1))
    with pytest.raises(SecAggError, match="more than half"):
        node.setup(pb.SecAggSetup(num_nodes=4, neighbours=[2, 3, 4], threshold=2, quant_bits=20))
    with pytest.raises(SecAggError, match="wrap around"):
        node.setup(pb.SecAggSetup(num_nodes=5, neighbours=[2, 3, 4, 5], threshold=3, quant_bits=quant_bits(5) + 1))
    with pytest.raises(SecAggError, match="names this node itself"):
        node.setup(pb.SecAggSetup(num_nodes=5, neighbours=[1, 3, 4], threshold=3, quant_bits=20))
    with pytest.raises(SecAggError, match="arrived in stage 'new'"):
        node.share_keys(pb.SecAggShareKeys())


def test_shares_replayed_from_another_round_or_redirected_do_not_decrypt():
    old, new = Round(3, round=1), Round(3, round=2)
    for r in (old, new):
        r.keys()
        r.shares()
    a, b, c = new.ids
    replay = old.server.collect_requests()[a]
    # The old round's ciphertexts, addressed right, but sealed for other keys and another round.
    with pytest.raises(SecAggError, match=f"share from node {b} does not decrypt for job job round 2"):
        new.nodes[a].receive_shares(replay)
    fresh = new.server.collect_requests()
    redirected = pb.SecAggCollect(shares=[pb.EncryptedShare(src=s.src, dst=b, ciphertext=s.ciphertext)
                                          for s in fresh[a].shares if s.src == c])
    with pytest.raises(SecAggError, match=f"share from node {c} does not decrypt"):
        new.nodes[b].receive_shares(redirected)


def test_the_server_rejects_bad_input_with_the_reason():
    r = Round(3, length=11)
    a, b, c = r.ids
    r.keys()
    with pytest.raises(WireError, match="node 999, which is not part of this round"):
        r.server.add_keys(999, pb.PublicKeys(node_id=999), None)
    with pytest.raises(WireError, match=f"node {a} already sent its public keys"):
        r.server.add_keys(a, r.server.keys[a], enrolled(a))
    requests = r.server.share_keys_requests()
    with pytest.raises(WireError, match="arrived after the stage closed"):
        r.server.add_keys(a, r.server.keys[a], enrolled(a))
    shares = r.nodes[a].share_keys(requests[a])
    wrong = pb.EncryptedShares(shares=[shares.shares[0]])
    with pytest.raises(WireError, match=f"must send one share to each of nodes \\[{b}, {c}\\]"):
        r.server.add_shares(a, wrong)
    r.server.add_shares(a, shares)
    for i in (b, c):
        r.server.add_shares(i, r.nodes[i].share_keys(requests[i]))
    collect = r.server.collect_requests()
    for i in r.ids:
        r.nodes[i].receive_shares(collect[i])
    with pytest.raises(WireError, match=r"is uint32\[10\], expected uint32\[11\]"):
        r.server.add_masked(a, np.zeros(10, dtype=np.uint32))
    with pytest.raises(WireError, match=r"is float32\[11\]"):
        r.server.add_masked(a, np.zeros(11, dtype=np.float32))
    for i in r.ids:
        r.server.add_masked(i, r.nodes[i].mask(encode({"w": np.zeros(10)}, 1.0, CLIP, r.server.quant_bits)[0]))
    unmask = r.server.unmask_requests()
    reveal = r.nodes[a].unmask(unmask[a])
    def forged(owner, share):
        return pb.Reveal(seed_shares=[pb.RevealedShare(owner=s.owner, share=share if s.owner == owner else s.share)
                                      for s in reveal.seed_shares])

    other_index = (2).to_bytes(4, "little") + reveal.seed_shares[1].share[4:]
    with pytest.raises(WireError, match=f"node {a}'s seed share of node {b} is not the share it was given"):
        r.server.add_reveal(a, forged(b, other_index))
    with pytest.raises(WireError, match=f"must reveal seed shares of nodes \\[{a}, {b}, {c}\\], got \\[{a}, {b}\\]"):
        r.server.add_reveal(a, pb.Reveal(seed_shares=reveal.seed_shares[:2]))
    # Right index, wrong content: only reconstruction can tell, and it says so.
    corrupt = reveal.seed_shares[1].share[:4] + bytes(48)
    r.server.add_reveal(a, forged(b, corrupt))
    for i in (b, c):
        r.server.add_reveal(i, r.nodes[i].unmask(unmask[i]))
    with pytest.raises(SecAggError, match=f"node {b}'s self-mask seed (does not match|cannot be reconstructed)"):
        r.server.aggregate()


def test_quantization_round_trip_and_clipping():
    rng = np.random.default_rng(3)
    updates = [rng.normal(0, 0.3, 1000) for _ in range(4)]
    bits = quant_bits(4)
    total = sum(encode({"x": u}, 0.5, CLIP, bits)[0] for u in updates)
    weight, summed = decode_sum(total, 4, CLIP, bits)
    exact = sum(0.5 * np.clip(u, -CLIP, CLIP) for u in updates)  # clipped, then weighted
    assert abs(weight - 2.0) <= error_bound(4, 1.0, bits)
    assert np.abs(summed - exact).max() <= error_bound(4, CLIP, bits)
    assert encode({"x": np.array([2.0, -2.0, 0.1])}, 0.5, CLIP, bits)[1] == 2
    assert 4 * 2**bits < 2**32


def test_the_job_option_defaults_and_its_errors():
    assert make_spec(min_nodes=3).secagg is not None
    assert make_spec(min_nodes=2).secagg is None
    assert make_spec(min_nodes=3, secure_aggregation=False).secagg is None
    assert make_spec(min_nodes=4, secure_aggregation={"neighbours": 5}).secagg.neighbours == 5
    with pytest.raises(SpecError, match="needs min_nodes >= 3"):
        make_spec(min_nodes=2, secure_aggregation=True)
    with pytest.raises(SpecError, match="neighbours must be odd"):
        make_spec(min_nodes=3, secure_aggregation={"neighbours": 4})
    with pytest.raises(SpecError, match="threshold"):
        make_spec(min_nodes=3, secure_aggregation={"threshold": 0.4})


def _signed_as(identity, keys, job="job", round=1):
    """``keys`` signed with ``identity``'s certificate key, whatever its role."""
    key = serialization.load_pem_private_key(identity.key_pem, password=None)
    keys.certificate = x509.load_pem_x509_certificate(identity.cert_pem).public_bytes(serialization.Encoding.DER)
    keys.signature = key.sign(signed_bytes(job, round, keys), ec.ECDSA(hashes.SHA256()))
    return keys


@pytest.mark.parametrize("forgery, error", [
    ("operator certificate", "come with a operator certificate"),
    ("coordinator certificate", "certificate the consortium CA does not vouch for"),
    ("expired node certificate", "certificate the consortium CA does not vouch for"),
    ("this node's own certificate", "this node's own certificate"),
    ("a certificate another peer uses", "advertises with the certificate of another peer"),
    ("signed for another job", "are not signed by"),
    ("keys changed after signing", "are not signed by"),
])
def test_a_node_sends_shares_only_to_peers_that_are_consortium_nodes(forgery, error):
    r = Round(3)
    r.keys()
    a, b, c = r.ids
    request = r.server.share_keys_requests()[a]
    keys = {k.node_id: k for k in request.keys}
    pki = Round.pki
    forged = pb.PublicKeys()
    forged.CopyFrom(keys[c])
    if forgery == "operator certificate":
        _signed_as(pki.identity("operator", "operator"), forged)
    elif forgery == "coordinator certificate":
        _signed_as(pki.identity("coordinator", "coordinator"), forged)
    elif forgery == "expired node certificate":
        old = tls.issue(pki.root / "ca", "node", "expired", pki.root / "expired", days=1,
                        not_before=dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=3))
        _signed_as(old, forged)
    elif forgery == "this node's own certificate":
        _signed_as(pki.identity("node", f"secagg-{a}"), forged)
    elif forgery == "a certificate another peer uses":
        _signed_as(pki.identity("node", f"secagg-{b}"), forged)
    elif forgery == "signed for another job":
        _signed_as(pki.identity("node", f"secagg-{c}"), forged, job="another-job")
    else:
        forged.seed_commitment = bytes(32)
    request = pb.SecAggShareKeys(keys=[keys[b], forged])
    with pytest.raises(SecAggError, match=error):
        r.nodes[a].share_keys(request)
    # The genuine advertisements alone pass the same checks.
    r = Round(3)
    r.keys()
    r.shares()


def test_a_node_needs_enough_authenticated_peers_for_the_threshold():
    r = Round(5)
    r.keys()
    a = r.ids[0]
    request = r.server.share_keys_requests()[a]
    with pytest.raises(SecAggError, match=r"only 2 of this node's 5 share holders advertised authenticated keys; 3"):
        r.nodes[a].share_keys(pb.SecAggShareKeys(keys=request.keys[:1]))


def test_the_coordinator_relays_only_keys_signed_with_the_certificate_a_node_enrolled():
    r = Round(3)
    a, b, c = r.ids
    requests = r.server.setup_requests()
    keys = {i: r.nodes[i].setup(requests[i]) for i in r.ids}
    unsigned = pb.PublicKeys(node_id=a, encryption_key=keys[a].encryption_key, mask_key=keys[a].mask_key,
                             seed_commitment=keys[a].seed_commitment)
    with pytest.raises(WireError, match=f"node {a} must be signed for job job round 1 by the node certificate"):
        r.server.add_keys(a, unsigned, enrolled(a))
    with pytest.raises(WireError, match=f"node {a} come with another certificate than the one it enrolled with"):
        r.server.add_keys(a, keys[a], enrolled(b))
    r.server.add_keys(a, keys[a], enrolled(a))


def test_sums_that_no_honest_nodes_can_send_are_rejected():
    n, bits, max_weight = 3, quant_bits(3), 10_000
    # Honest extremes: the smallest and largest weights, updates at the clip range and beyond.
    honest = [encode({"x": np.full(20, sign * 5 * CLIP)}, w, CLIP, bits)[0]
              for w, sign in ((1 / max_weight, 1), (1.0, 1), (1.0, -1))]
    check_sum(*decode_sum(sum(honest), n, CLIP, bits), n, CLIP, bits, max_weight)
    extreme = [encode({"x": np.full(20, 5 * CLIP)}, 1 / max_weight, CLIP, bits)[0]] * n
    check_sum(*decode_sum(sum(extreme), n, CLIP, bits), n, CLIP, bits, max_weight)
    # A forged vector: weight element 0 (w = -1), update elements at the field's maximum.
    forged = np.full(21, np.iinfo(np.uint32).max, dtype=np.uint32)
    forged[0] = 0
    with pytest.raises(ImpossibleAggregate, match=r"weights sum to \S+, outside \[0\.0003, 3\]"):
        check_sum(*decode_sum(honest[0] + honest[1] + forged, n, CLIP, bits), n, CLIP, bits, max_weight)
    # The weight element tuned so that the weights sum to a possible 4/max_weight.
    step = 2.0 / (1 << bits)
    forged[0] = round((4 / max_weight - 2 / max_weight + 1) / step)
    small = [encode({"x": np.zeros(20)}, 1 / max_weight, CLIP, bits)[0]] * 2
    weight, total = decode_sum(sum(small) + forged, n, CLIP, bits)
    assert abs(weight - 4 / max_weight) < 1e-6
    with pytest.raises(ImpossibleAggregate, match="a coordinate of the weighted sum is"):
        check_sum(weight, total, n, CLIP, bits, max_weight)
